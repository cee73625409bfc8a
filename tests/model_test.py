"""Transformer: causality by gradients, GQA / RoPE shapes, dense-vs-MoE pattern,
and the released checkpoints' conventions (rope_layout, qk_norm, qkv_bias,
clip_qkv, norm_bias, the shared-expert gate, router_dtype)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm import config as cfglib
from sparse_lm.models import layers
from sparse_lm.models.transformer import Transformer


def tiny(**model):
  c = cfglib.base_config()
  c.model.d_model, c.model.num_heads, c.model.d_ff = 32, 4, 64
  for k, v in model.items():
    c.model[k] = v
  return cfglib.validate(c)


def build(c, vocab=50):
  with nnx.use_eager_sharding(False):
    return Transformer(cfglib.model_spec(c), vocab, rngs=nnx.Rngs(0))


class _ShiftedEmbed(nnx.Module):
  """The real embedding plus a differentiable per-position input delta."""

  def __init__(self, embed, delta):
    self.inner, self.delta = embed, nnx.Param(delta)

  def __call__(self, tokens, dtype):
    return self.inner(tokens, dtype) + self.delta[...]

  def attend(self, x):
    return self.inner.attend(x)


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("num_kv_heads", [0, 2, 1])
def test_causal_by_gradients(position, num_kv_heads):
  c = tiny(position=position, num_kv_heads=num_kv_heads)
  model = build(c)
  L = 8
  model.embed = _ShiftedEmbed(model.embed, jnp.zeros((1, L, 32)))
  tokens = jax.random.randint(jax.random.key(1), (2, L), 0, 50)
  t = 4

  def out_at_t(model):
    logits = model(tokens).logits
    return logits[:, t].sum()

  g_LxD = nnx.grad(out_at_t)(model).embed.delta[...][0]
  norms = np.linalg.norm(np.asarray(g_LxD), axis=-1)
  assert np.all(norms[: t + 1] > 0), norms  # position t sees itself and the past
  np.testing.assert_array_equal(norms[t + 1 :], 0.0)  # and nothing of the future


def test_gqa_shapes_and_equivalence_to_mha():
  c = tiny(num_heads=4, num_kv_heads=2)
  attn = nnx.eval_shape(lambda: _attn(c))
  assert attn.wq.get_value().shape == (32, 4, 8)
  assert attn.wk.get_value().shape == (32, 2, 8)
  assert attn.wo.get_value().shape == (4, 8, 32)
  # GQA with kv heads repeated equals plain MHA with those repeated weights.
  gqa = _attn(c)
  mha = _attn(tiny(num_heads=4, num_kv_heads=4))
  mha.wq[...] = gqa.wq[...]
  mha.wo[...] = gqa.wo[...]
  mha.wk[...] = jnp.repeat(gqa.wk[...], 2, axis=1)
  mha.wv[...] = jnp.repeat(gqa.wv[...], 2, axis=1)
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  np.testing.assert_allclose(gqa(x, pos).out, mha(x, pos).out, atol=1e-5)
  assert gqa(x, pos).cache is None  # one return type; no cache when not decoding


def _attn(c):
  with nnx.use_eager_sharding(False):
    return layers.Attention(cfglib.model_spec(c), rngs=nnx.Rngs(0))


def test_rope_is_relative():
  # <rope(q, i), rope(k, j)> depends only on i - j, and rope keeps the norm.
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
  at = lambda x, p: layers.rope(x, jnp.full((1, 1), p), 10_000.0)
  dot = lambda i, j: float(jnp.sum(at(q, i) * at(k, j)))
  assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-4)
  assert dot(5, 2) != pytest.approx(dot(5, 3), rel=1e-4)
  np.testing.assert_allclose(jnp.linalg.norm(at(q, 7)), jnp.linalg.norm(q), rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_forward_shapes(activation, norm):
  c = tiny(activation=activation, norm=norm, tie_embeddings=False)
  logits, aux, cache = build(c)(jnp.zeros((2, 8), jnp.int32))
  assert logits.shape == (2, 8, 50) and logits.dtype == jnp.float32
  assert aux == [] and cache is None


def test_bf16_compute_keeps_f32_params():
  c = tiny(dtype="bfloat16")
  model = build(c)
  logits = model(jnp.zeros((2, 8), jnp.int32)).logits
  assert logits.dtype == jnp.float32
  assert all(
    p.get_value().dtype == jnp.float32 for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param))
  )


@pytest.mark.parametrize(
  "every,offset,expected", [(2, 1, [1, 3]), (4, 3, [3]), (1, 0, [0, 1, 2, 3])]
)
def test_layer_pattern(every, offset, expected):
  c = cfglib.base_config()
  c.model.num_layers, c.model.moe.num_experts = 4, 4
  c.model.moe.every, c.model.moe.offset = every, offset
  assert list(cfglib.model_spec(c).moe_layers) == expected
  c.model.moe.num_experts = 1  # one expert = dense
  assert cfglib.model_spec(c).moe_layers == ()


@pytest.mark.parametrize("model_scale,moe_scale", [(1.0, 0.0), (0.1, 0.0), (1.0, 0.1)])
def test_init_scale_is_the_switch_variance_scale(model_scale, moe_scale):
  # Fedus et al. 2021 section 2.4: truncated normal with std sqrt(s / fan_in).
  # model.init_scale is s for every weight matrix; model.moe.init_scale (if
  # not 0) overrides it for the MoE layer; embeddings keep std 1/sqrt(D).
  c = tiny(init_scale=model_scale, num_layers=2, d_model=128, d_ff=512, num_heads=4)
  c.model.moe.num_experts, c.model.moe.every, c.model.moe.offset = 8, 2, 1
  c.model.moe.init_scale = moe_scale
  m = build(cfglib.validate(c), vocab=512)
  moe_s = moe_scale or model_scale
  dense_block, moe_block = m.blocks[0], m.blocks[1]
  cases = [
    (dense_block.attn.wq, 128 * 4, model_scale),
    (dense_block.attn.wo, 128, model_scale),
    (dense_block.ffn.wi, 128, model_scale),
    (dense_block.ffn.wo, 512, model_scale),
    (moe_block.ffn.router, 128, moe_s),
    (moe_block.ffn.wi, 128, moe_s),
    (moe_block.ffn.wo, 512, moe_s),
    (dense_block.attn.wk, 128 * 4, model_scale),
  ]
  for p, fan_in, s in cases:
    std = float(np.std(np.asarray(p[...])))
    np.testing.assert_allclose(std, np.sqrt(s / fan_in), rtol=0.06)
  np.testing.assert_allclose(np.std(np.asarray(m.embed.embedding[...])), 128**-0.5, rtol=0.06)


def test_rope_layouts_rotate_the_pairs_they_name():
  """ "interleaved" on features permuted to (0, 2, 4, ..., 1, 3, 5, ...) is
  "half" on the permuted ones (how Llama's conversion permutes q and k)."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  perm = jnp.concatenate([jnp.arange(0, 8, 2), jnp.arange(1, 8, 2)])
  inter = layers.rope(x, pos, 1e4, "interleaved")
  np.testing.assert_allclose(
    inter[..., perm], layers.rope(x[..., perm], pos, 1e4, "half"), atol=1e-6
  )
  assert not np.allclose(inter, layers.rope(x, pos, 1e4, "half"), atol=1e-3)


def _qkv(c, x):
  model = build(c)
  return model.blocks[0].attn._qkv(x, jnp.zeros(x.shape[:2], jnp.int32))  # pylint: disable=protected-access


def test_qk_norm_normalises_each_head_or_all_heads():
  x = 10.0 * jax.random.normal(jax.random.key(1), (2, 5, 32))
  rms = lambda a, axes: jnp.sqrt(jnp.mean(a * a, axes))
  q, k, _ = _qkv(tiny(qk_norm="head", position="learned"), x)
  np.testing.assert_allclose(rms(q, -1), 1.0, atol=1e-3)  # every head: scale 1 at init
  np.testing.assert_allclose(rms(k, -1), 1.0, atol=1e-3)
  q, k, _ = _qkv(tiny(qk_norm="full", position="learned"), x)
  np.testing.assert_allclose(rms(q, (-2, -1)), 1.0, atol=1e-3)
  assert float(jnp.abs(rms(q, -1) - 1.0).max()) > 1e-2  # not per head
  q0, _, _ = _qkv(tiny(position="learned"), x)
  assert float(rms(q0, (-2, -1)).mean()) > 2.0  # without it, the input's scale


def test_qkv_bias_and_clip_qkv():
  x = 3.0 * jax.random.normal(jax.random.key(2), (2, 5, 32))
  c = tiny(qkv_bias=True, clip_qkv=0.5, position="learned")
  model = build(c)
  attn = model.blocks[0].attn
  assert attn.bq[...].shape == (4, 8) and attn.bk[...].shape == (4, 8)
  q, k, v = attn._qkv(x, jnp.zeros((2, 5), jnp.int32))  # pylint: disable=protected-access
  assert max(float(jnp.abs(a).max()) for a in (q, k, v)) == pytest.approx(0.5)
  attn.bq[...] = jnp.full((4, 8), 100.0)
  q, _, _ = attn._qkv(x, jnp.zeros((2, 5), jnp.int32))  # pylint: disable=protected-access
  np.testing.assert_allclose(q, 0.5)  # the bias comes before the clamp


def test_layer_norm_without_bias():
  model = build(tiny(norm="layer", norm_bias=False))
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "final_norm/scale" in names and not any(n.endswith("norm/bias") for n in names)
  x = jax.random.normal(jax.random.key(3), (2, 3, 32)) + 5.0
  y = model.final_norm(x)
  ref = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_shared_expert_gate_scales_the_shared_output_by_a_sigmoid():
  from sparse_lm.models.moe.layer import MoeFfn  # pylint: disable=g-import-not-at-top

  c = tiny(activation="swiglu")
  moe = c.model.moe
  moe.num_experts, moe.top_k, moe.router, moe.dispatch = 4, 2, "mixtral", "dropless"
  moe.num_shared_experts, moe.shared_expert_gate, moe.every, moe.offset = 1, True, 1, 0
  m = cfglib.model_spec(cfglib.validate(c))
  with nnx.use_eager_sharding(False):
    layer = MoeFfn(m, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (6, 32))
  layer.shared_gate[...] = jnp.zeros((32, 1))  # sigmoid(0) = 1/2
  ungated = layer._shared(x) * 2.0  # pylint: disable=protected-access
  w = jax.random.normal(jax.random.key(5), (32, 1))
  layer.shared_gate[...] = w
  np.testing.assert_allclose(
    layer._shared(x), ungated * jax.nn.sigmoid(x @ w), rtol=1e-5, atol=1e-6
  )  # pylint: disable=protected-access


def test_router_dtype_compute_takes_the_logits_in_the_model_dtype():
  c = tiny(activation="swiglu", dtype="bfloat16")
  moe = c.model.moe
  moe.num_experts, moe.top_k, moe.router, moe.dispatch = 4, 2, "mixtral", "dropless"
  moe.every, moe.offset, moe.z_loss_weight = 1, 0, 1.0
  tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, 50)
  z = {}
  for rdt in ("float32", "compute"):
    moe.router_dtype = rdt
    aux = build(cfglib.validate(c))(tokens).moe_aux
    z[rdt] = float(aux[0]["z_loss"])
  assert z["float32"] != z["compute"]  # bf16 logits round differently
  assert z["compute"] == pytest.approx(z["float32"], rel=2e-2)
