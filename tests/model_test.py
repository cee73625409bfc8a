"""Transformer: causality by gradients, GQA / RoPE shapes, dense-vs-MoE pattern."""

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
    logits, _ = model(tokens)
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
  np.testing.assert_allclose(gqa(x, pos), mha(x, pos), atol=1e-5)


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
  logits, aux = build(c)(jnp.zeros((2, 8), jnp.int32))
  assert logits.shape == (2, 8, 50) and logits.dtype == jnp.float32
  assert aux == []


def test_bf16_compute_keeps_f32_params():
  c = tiny(dtype="bfloat16")
  model = build(c)
  logits, _ = model(jnp.zeros((2, 8), jnp.int32))
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
