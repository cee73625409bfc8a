"""GPT-OSS and RoPE scaling (issue 31): the pieces against transformers' own
values (tests/fixtures/hf/make_fixtures.py --gpt_oss_only writes them; no
torch here), the sliding-window cache, the configs' sizes.

tests/convert_test.py runs its every-family tests on tests/fixtures/hf/gpt_oss
too (logits within 1e-4 of transformers' with both window types, sinks and
yarn; the same 16 greedy tokens; export -> import bit-exact with the hub's
names); this file adds the MXFP4 copy of that fixture (gpt_oss/mxfp4)."""

import functools
import json
import pathlib
import types

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib
from sparse_lm import convert
from sparse_lm import decode
from sparse_lm import inspect as inspectlib
from sparse_lm import params as paramslib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.convert import mxfp4
from sparse_lm.errors import ConfigError
from sparse_lm.errors import ConvertError
from sparse_lm.models import layers
from sparse_lm.models.moe import dispatch as dispatch_lib
from sparse_lm.models.moe import experts as experts_lib
from sparse_lm.models.transformer import Transformer

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf"
EP_TP_MESH = (("data", 1), ("fsdp", 1), ("expert", 4), ("tensor", 2))


def test_rope_scaling_matches_transformers():
  """Inverse frequencies and attention factors of yarn (GPT-OSS's, truncated,
  DeepSeek's mscale pair, a given attention_factor), linear, llama3 and
  dynamic (static: at max_position_embeddings) against transformers'
  ROPE_INIT_FUNCTIONS; the factor scales q and k; bad keys are one line."""
  golden = json.loads((FIX / "rope_golden.json").read_text())
  for name, g in golden.items():
    p = dict(g["rope_parameters"])
    theta = p.pop("rope_theta")
    if p["rope_type"] == "dynamic":
      p["max_position_embeddings"] = g["max_position_embeddings"]
    freq, att = layers.rope_frequencies(g["head_dim"], theta, tuple(sorted(p.items())))
    np.testing.assert_allclose(freq, g["inv_freq"], rtol=2e-6, err_msg=name)
    assert att == pytest.approx(g["attention_factor"], rel=1e-6), name
  # The attention factor multiplies cos and sin: every pair's norm scales by it.
  yarn = dict(golden["gpt_oss_yarn"]["rope_parameters"])
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 16))
  y = layers.rope(x, jnp.arange(3)[None], yarn.pop("rope_theta"), "half", tuple(yarn.items()))
  ratio = jnp.linalg.norm(y, axis=-1) / jnp.linalg.norm(x, axis=-1)
  np.testing.assert_allclose(ratio, golden["gpt_oss_yarn"]["attention_factor"], rtol=1e-5)

  c = cfglib.load_config("configs/gpt_oss.py:tiny")
  c.model.rope_scaling = mlc.ConfigDict({"rope_type": "longrope", "factor": 2.0})
  with pytest.raises(ConfigError, match=r"^config.model.rope_scaling.rope_type='longrope'"):
    cfglib.validate(c)
  c.model.rope_scaling = mlc.ConfigDict(
    {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 64}
  )
  with pytest.raises(ConfigError, match=r"^config.model.rope_scaling.rope_type='dynamic'.*static"):
    cfglib.validate(c)
  c.model.rope_scaling.max_position_embeddings = 256  # static up to data.seq_len=128
  cfglib.validate(c)
  with pytest.raises(ConfigError, match=r"rope_type='dynamic' changes its frequencies past"):
    decode.generate(types.SimpleNamespace(m=cfglib.model_spec(c)), [[1] * 250], max_new_tokens=9)
  c.model.rope_scaling = mlc.ConfigDict({"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ConfigError, match="original_max_position_embeddings=None is invalid"):
    cfglib.validate(c)


def test_mxfp4_dequantisation_and_import_match_transformers(tmp_path):
  """Our MXFP4 decoding of the fixture's blocks / scales (written by the
  fixture script in the published layout) equals transformers' own
  (convert_moe_packed_tensors) bit for bit; importing the MXFP4 copy gives
  transformers' logits (on an expert x tensor mesh), its experts
  transformers' dequantised ones de-interleaved (gate, up); its export drops
  quantization_config and writes the unquantised names."""
  golden = load_file(FIX / "gpt_oss" / "mxfp4_golden.safetensors")
  q = load_file(FIX / "gpt_oss" / "mxfp4" / "model.safetensors")
  for name, want in golden.items():
    got = mxfp4.dequantize(q[name + "_blocks"], q[name + "_scales"])
    assert got.dtype == np.float32 and np.array_equal(got, want), name
  codes = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)  # every byte, scale 2^0
  table = mxfp4.dequantize(codes, np.full((1, 1, 16), 127, np.uint8))[0, :, 0].reshape(16, 16, 2)
  np.testing.assert_array_equal(table[:, :, 0], np.tile(mxfp4.FP4_VALUES, (16, 1)).reshape(16, 16))

  # Onto 4 expert x 2 tensor devices: the experts split, their hidden dim
  # (and bi, bg) split and psum'd, bo added once after the sum.
  quant = tmp_path / "quant"
  convert.import_checkpoint(
    str(FIX / "gpt_oss" / "mxfp4"), str(quant), EP_TP_MESH, say=lambda *a: None
  )
  c = ckptlib.read_config(str(quant))
  mesh = sharding.make_mesh(c)
  model, c, _ = statelib.load_model(str(quant), inference=True, mesh=mesh)
  assert model.blocks[0].ffn.bi[...].sharding.shard_shape((4, 32)) == (1, 16)
  g = load_file(FIX / "gpt_oss" / "golden.safetensors")
  with sharding.use(mesh, c):
    logits = nnx.jit(lambda model, ids: model(ids).logits)(model, jnp.asarray(g["input_ids"]))
  assert np.abs(np.asarray(logits) - g["logits"]).max() < 1e-4
  p = _params(quant)
  gate_up = golden["model.layers.0.mlp.experts.gate_up_proj"]  # [E, D, 2F], gate at even columns
  assert np.array_equal(p["blocks/0/ffn/wg"], gate_up[..., 0::2])
  assert np.array_equal(p["blocks/0/ffn/wi"], gate_up[..., 1::2])
  assert np.array_equal(p["blocks/0/ffn/wo"], golden["model.layers.0.mlp.experts.down_proj"])
  fam, cfg = convert.hf_to_config(str(FIX / "gpt_oss" / "mxfp4"))
  source = json.loads((FIX / "gpt_oss" / "mxfp4" / "config.json").read_text())
  out = convert.hf_config(fam, cfg, source, "bfloat16")
  assert "quantization_config" not in out and out["rope_parameters"]["rope_type"] == "yarn"
  assert out["rope_scaling"]["factor"] == 4.0 and out["rope_theta"] == 150000.0  # 4.x readers
  # The released configs spell RoPE as transformers 4.x: top-level rope_theta + rope_scaling.
  released = {k: v for k, v in source.items() if k != "rope_parameters"}
  rope = dict(source["rope_parameters"])
  released["rope_theta"] = rope.pop("rope_theta")
  released["rope_scaling"] = rope
  ours = convert.config_of(fam, released).model
  assert ours.to_dict() == convert.config_of(fam, source).model.to_dict()
  names = {n for r in fam.rules(cfglib.model_spec(cfg), False) for n in r.hf}
  assert "model.layers.0.mlp.experts.gate_up_proj" in names
  assert not any(n.endswith(("_blocks", "_scales")) for n in names)
  bad = dict(source, quantization_config={"quant_method": "fp8"})
  with pytest.raises(ConvertError, match="quantization_config.quant_method='fp8'"):
    convert.config_of(fam, bad)


def _params(workdir) -> dict:
  model, _, _ = statelib.load_model(str(workdir))
  return {
    paramslib.path_str(p): np.asarray(v.get_value())
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def _tiny(window=4, **model):
  """configs/gpt_oss.py:tiny, smaller: 2 layers (sliding, full) of width 32."""
  c = cfglib.load_config("configs/gpt_oss.py:tiny")
  c.model.d_model, c.model.head_dim, c.model.d_ff, c.data.vocab_size = 32, 8, 32, 512
  c.model.num_layers, c.model.layer_types = 2, ("sliding_attention", "full_attention")
  c.model.sliding_window = window
  for k, v in model.items():
    setattr(c.model, k, v)
  cfglib.validate(c)
  return c


def _randomised(c, seed=0):
  """A tiny GPT-OSS whose biases, sinks and router bias are not zero."""
  with nnx.use_eager_sharding(False):
    model = Transformer(cfglib.model_spec(c), c.data.vocab_size, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  # vectors and [E, F] / [E, D] biases (not the embedding tables)
  small = lambda x: x.ndim == 1 or (x.ndim == 2 and x.shape[0] == c.model.moe.num_experts)
  noise = lambda x, k: x + 0.5 * jax.random.normal(k, x.shape) if small(x) else x
  leaves = [noise(x, k) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


@functools.cache
def _tiny_model():
  """(config, model) shared by the tests below (drawing a model op by op is
  most of a small test's time on CPU); a test that changes it clones it."""
  c = _tiny()
  return c, _randomised(c)


def test_sliding_window_cache_stays_bounded_and_decodes_as_the_full_forward():
  """Decoding 24 tokens past a window of 4: the sliding layers' caches hold 4
  slots at every step (the full layers' S), the cached logits equal the full
  forward's (window mask, sinks, yarn) and so do the greedy tokens; with a
  prefill longer than the window too, and left-padded rows."""
  model = decode.for_inference(_tiny_model()[1])
  m = model.m
  assert [m.window(i) for i in range(2)] == [4, 0]
  graphdef, state = nnx.split(model)
  S, B = 32, 2
  toks = jax.random.randint(jax.random.key(3), (B, 33), 3, 512)
  forward = jax.jit(lambda t: nnx.merge(graphdef, state)(t).logits)
  full = np.asarray(forward(toks))[:, :30]
  for prefill in (1, 7):
    cache = decode.init_cache(m, B, S)
    assert [lc.k.shape[1] for lc in cache.layers] == [4, S]
    pos = jnp.broadcast_to(jnp.arange(30, dtype=jnp.int32), (B, 30))
    ones = jnp.ones((B, 30), jnp.float32)
    lg, cache, _ = decode.forward(
      graphdef, state, toks[:, :prefill], ones[:, :prefill], pos[:, :prefill], cache
    )
    got = [lg]
    for t in range(prefill, 30):
      lg, cache, _ = decode.forward(
        graphdef, state, toks[:, t : t + 1], ones[:, t : t + 1], pos[:, t : t + 1], cache
      )
      assert [lc.k.shape[1] for lc in cache.layers] == [4, S]
      got.append(lg)
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-4)
  assert decode.cache_bytes(m, B, S) == 2 * B * (4 + S) * m.num_kv_heads * m.head_dim * 4
  # Greedy decoding of two prompts of different lengths (left-padded) = the
  # argmax of the full forward over each prompt and its tokens so far.
  prompts = [toks[0, :5].tolist(), toks[1, :9].tolist()]
  out = decode.generate(model, prompts, max_new_tokens=24)
  seqs = jnp.asarray([p + g + [0] * (33 - len(p) - len(g)) for p, g in zip(prompts, out.tokens)])
  logits = np.asarray(forward(seqs))  # causal: the padding after a row changes nothing before it
  for row, (p, gen) in enumerate(zip(prompts, out.tokens)):
    assert gen == logits[row, len(p) - 1 : len(p) + 23].argmax(-1).tolist()


def test_expert_biases_and_clamped_swiglu_in_every_kernel():
  """The experts with biases and GPT-OSS's clamped SwiGLU: the grouped CPU
  block loops (forward and their custom gradient), ragged_dot, the batched
  capacity buffer and the decode gather equal a naive per-token loop."""
  E, D, F, T, K = 4, 8, 16, 10, 2
  ks = jax.random.split(jax.random.key(0), 8)
  w = experts_lib.Weights(
    *(jax.random.normal(k, s) for k, s in zip(ks, [(E, D, F), (E, D, F), (E, F, D)])),
    *(jax.random.normal(k, s) for k, s in zip(ks[3:], [(E, F), (E, F), (E, D)])),
  )
  act = "swiglu_clamped:1.702:1.0"
  x = 2 * jax.random.normal(ks[6], (T, D))
  expert = jax.random.randint(ks[7], (T, K), 0, E)

  def naive(w, x):
    """[T * K, D] in assignment order: each choice's expert written out."""
    e_A, x_AxD = expert.reshape(-1), jnp.repeat(x, K, axis=0)
    h = jnp.einsum("ad,adf->af", x_AxD, w.wi[e_A]) + w.bi[e_A]
    g = jnp.minimum(jnp.einsum("ad,adf->af", x_AxD, w.wg[e_A]) + w.bg[e_A], 1.0)
    a = (jnp.clip(h, -1.0, 1.0) + 1) * g * jax.nn.sigmoid(1.702 * g)
    return jnp.einsum("af,afd->ad", a, w.wo[e_A]) + w.bo[e_A]

  order = jnp.argsort(expert.reshape(-1), stable=True)
  sizes = jnp.bincount(expert.reshape(-1), length=E)
  x_rows = x[order // K]

  @functools.partial(jax.jit, static_argnums=0)
  def sorted_rows(kernel, w, x_rows):
    ex = dispatch_lib.Experts(w, act, "batched", kernel, None)
    return ex.grouped(dispatch_lib.SHARD1, x_rows, sizes)

  want = naive(w, x)[order]
  for kernel in ("blocks", "ragged"):
    np.testing.assert_allclose(sorted_rows(kernel, w, x_rows), want, rtol=1e-5, atol=1e-5)
  # The block loops' custom gradient (weights, biases, rows) = the naive loop's.
  loss = lambda w, xr: jnp.sum(jnp.sin(sorted_rows("blocks", w, xr)))
  g_blocks = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x_rows)
  naive_loss = lambda w, x: jnp.sum(jnp.sin(naive(w, x)))
  g_naive = jax.jit(jax.grad(naive_loss, argnums=(0, 1)))(w, x)
  np.testing.assert_allclose(
    jnp.zeros_like(x).at[order // K].add(g_blocks[1]), g_naive[1], rtol=1e-4, atol=1e-4
  )
  for a, b in zip(jax.tree.leaves(g_blocks[0]), jax.tree.leaves(g_naive[0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # The batched capacity layout: each expert's rows padded to C.
  C = int(sizes.max())
  buf = jnp.zeros((E, C, D))
  starts = jnp.cumsum(sizes) - sizes
  slot = jnp.arange(T * K) - starts[expert.reshape(-1)[order]]
  buf = buf.at[expert.reshape(-1)[order], slot].set(x_rows)
  ex = dispatch_lib.Experts(w, act, "batched", "blocks", None)
  y = jax.jit(lambda w, buf: ex._replace(w=w).batched(dispatch_lib.SHARD1, buf))(w, buf)
  y = y[expert.reshape(-1)[order], slot]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # The decode gather, gates 1 and 0: the first choice's output.
  r = type("R", (), {})()
  r.expert_TxK, r.valid_TxK = expert, jnp.ones((T, K), bool)
  r.gate_TxK = jnp.broadcast_to(jnp.array([1.0, 0.0]), (T, K))
  y, _ = jax.jit(lambda w, x: dispatch_lib.gather_dispatch(x, r, w, act))(w, x)
  np.testing.assert_allclose(y, naive(w, x).reshape(T, K, D)[:, 0], rtol=1e-5, atol=1e-5)


# What configs/gpt_oss.py must equal in the imported released config.json.
ARCHITECTURE = (
  "d_model num_layers num_heads num_kv_heads head_dim d_ff activation swiglu_alpha swiglu_limit "
  "norm norm_eps rope_theta rope_scaling qkv_bias attn_out_bias attn_sinks sliding_window "
  "layer_types tie_embeddings moe.num_experts moe.top_k moe.router moe.router_logit_bias "
  "moe.expert_bias moe.every moe.dispatch"
).split()


def test_released_configs_match_the_model_cards_and_configs_and_tiny_trains():
  """The released config.json of gpt-oss-20b / -120b (tests/fixtures/released:
  MXFP4, yarn as top-level rope_scaling) import at full size to inspect's
  totals within 0.5% of the model cards' (20.91B / 3.61B active; 116.83B /
  5.13B; active without the input embedding, as the cards count), equal
  configs/gpt_oss.py's variants in every architecture key, and export back
  the published rope_theta / rope_scaling without quantization_config;
  :tiny's (narrowed) loss falls on CPU in a few AdamW steps through the
  router and expert biases, sinks and windows."""
  cards = {"20b": (20.91e9, 3.61e9), "120b": (116.83e9, 5.13e9)}
  for variant, (total, active) in cards.items():
    hf = json.loads((FIX.parent / "released" / f"gpt-oss-{variant}" / "config.json").read_text())
    fam = convert.family_of(hf, "config.json")
    c = cfglib.validate(convert.config_of(fam, hf))
    s = inspectlib.summarize(c, c.data.vocab_size)
    assert abs(s["total_params"] / total - 1) < 5e-3, (variant, s["total_params"])
    got = s["active_params"] - s["input_embedding_params"]
    assert abs(got / active - 1) < 5e-3, (variant, got)
    ours = cfglib.load_config(f"configs/gpt_oss.py:{variant}")
    for key in ARCHITECTURE:
      a, b = (functools.reduce(getattr, key.split("."), x.model) for x in (c, ours))
      a, b = (tuple(v) if isinstance(v, list) else v for v in (a, b))
      assert a == b or (key == "rope_scaling" and a.to_dict() == b.to_dict()), (variant, key)
    back = convert.hf_config(fam, c, hf, "bfloat16")
    assert back["rope_scaling"] == hf["rope_scaling"] and back["rope_theta"] == hf["rope_theta"]
    assert "quantization_config" not in back and back["layer_types"] == hf["layer_types"]

  model = nnx.clone(_tiny_model()[1])
  opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
  toks = jax.random.randint(jax.random.key(5), (4, 33), 3, 512)

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      out = model(toks[:, :-1], train=True, rng=jax.random.key(0))
      ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, toks[:, 1:]).mean()
      return ce + sum(a["router_loss"].sum() for a in out.moe_aux)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(12)]
  assert losses[-1] < losses[0] - 0.5, losses  # (it decodes: the test above)
