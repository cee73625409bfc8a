"""KV-cache decoding (sparse_lm/decode.py) equals the full forward, for every family.

For each family's tiny config (shrunk to d_model 32 for speed, the family's
layer pattern, router, experts and attention kept), in inference form (MoE
layers dispatch without dropping): step-by-step cached decoding gives the full
forward's logits (tolerance: 1e-4 absolute and relative, float32), prefill of
n then m steps equals prefill of n + m, no position sees a later one, and a
left-padded batch decodes each row as it would alone.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm import config as cfglib
from sparse_lm import decode
from sparse_lm.errors import ConfigError
from sparse_lm.models.transformer import Transformer

FAMILIES = [
  "dense",
  "switch",
  "glam",
  "hierarchical",
  "nllb_moe:lm_tiny",  # its tiny is an encoder-decoder (encoder_decoder_test.py)
  "mixtral",
  "dbrx",
  "deepseek_moe",
]
V = 97
TOL = dict(rtol=1e-4, atol=1e-4)


def tiny(family, **moe):
  family, _, variant = family.partition(":")
  c = cfglib.load_config(f"configs/{family}.py:{variant or 'tiny'}")
  m = c.model
  m.d_model, m.d_ff, m.num_heads = 32, 64, 4
  m.num_kv_heads = 2 if m.num_kv_heads else 0  # keep GQA where the family has it
  m.head_dim = 0
  if m.moe.num_experts > 1:
    m.moe.d_ff = 32 if m.moe.d_ff else 0
  for k, v in moe.items():
    m.moe[k] = v
  return cfglib.validate(c)


def model_of(c, seed=0):
  with nnx.use_eager_sharding(False):
    return Transformer(decode.inference_spec(cfglib.model_spec(c)), V, rngs=nnx.Rngs(seed))


def full_logits(model, tokens):
  return np.asarray(jax.jit(lambda t: model(t)[0])(tokens))


def cached_logits(model, tokens, n):
  """Prefill tokens[:, :n], then one decode step per remaining token."""
  graphdef, state = nnx.split(model)
  B, L = tokens.shape
  cache = decode.init_cache(model.m, B, L)
  ones = jnp.ones((B, n), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  logits, cache, _ = decode.forward(graphdef, state, tokens[:, :n], ones, pos[:, :n], cache)
  out = [np.asarray(logits)]
  for t in range(n, L):
    logits, cache, _ = decode.forward(
      graphdef, state, tokens[:, t : t + 1], ones[:, :1], pos[:, t : t + 1], cache
    )
    out.append(np.asarray(logits))
  return np.concatenate(out, 1), cache


def tokens_of(B=2, L=12, seed=3):
  return jax.random.randint(jax.random.key(seed), (B, L), 3, V)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_full_forward(family):
  c = tiny(family)
  model = model_of(c)
  toks = tokens_of()
  with jax.default_matmul_precision("highest"):
    full = full_logits(model, toks)
    step, cache = cached_logits(model, toks, n=5)
    whole, _ = cached_logits(model, toks, n=12)  # prefill of n + m at once
  np.testing.assert_allclose(step, full, **TOL)
  np.testing.assert_allclose(whole, full, **TOL)
  assert int(cache.index) == 12 and bool(cache.valid_BxS.all())
  spec = cfglib.model_spec(c)
  assert cache.layers[0].k.shape == (2, 12, spec.num_kv_heads, spec.head_dim)  # kv heads only
  assert decode.cache_bytes(spec, 2, 12) == sum(
    x.size * x.dtype.itemsize for kv in cache.layers for x in kv
  )


@pytest.mark.parametrize("family", ["dense", "switch", "mixtral"])
def test_decode_step_cannot_see_the_future(family):
  model = model_of(tiny(family))
  toks = tokens_of(L=10)
  later = toks.at[:, 7:].set((toks[:, 7:] + 5) % V)  # change tokens 7..9 only
  a, _ = cached_logits(model, toks, n=4)
  b, _ = cached_logits(model, later, n=4)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])  # positions 0..6 never saw them
  assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3


@pytest.mark.parametrize("family", ["switch", "mixtral", "deepseek_moe"])
def test_left_padded_batch_decodes_each_row_as_alone(family):
  model = model_of(tiny(family))
  long = [int(t) for t in tokens_of(B=1, L=9, seed=5)[0]]
  short = long[3:]  # 6 tokens: 3 pads on the left
  kw = dict(max_new_tokens=6, stop_ids=(), pad_id=0)
  with jax.default_matmul_precision("highest"):
    both = decode.generate(model, [long, short], **kw)
    alone = decode.generate(model, [short], **kw)
  assert both.tokens[1] == alone.tokens[0]
  assert len(both.tokens[0]) == 6


def test_capacity_decode_dispatch_without_drops_matches_too():
  c = tiny("switch", decode_dispatch="capacity", eval_capacity_factor=64.0)
  model = model_of(c)
  toks = tokens_of()
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(cached_logits(model, toks, n=5)[0], full_logits(model, toks), **TOL)


def test_expert_choice_is_refused_for_decoding():
  c = tiny("switch", router="expert_choice")
  with pytest.raises(ConfigError, match="config.model.moe.router='expert_choice' cannot decode"):
    decode.inference_spec(cfglib.model_spec(c))


def test_sampling_greedy_top_k_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  key = jax.random.key(0)
  assert int(decode.sample(logits, key, decode.Sampling())[0]) == 0
  keys = jax.random.split(key, 400)
  draw = lambda s: np.array([int(decode.sample(logits, k, s)[0]) for k in keys[:200]])
  assert set(draw(decode.Sampling(1.0, top_k=2))) == {0, 1}
  assert set(draw(decode.Sampling(1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 >= 0.7
  assert set(draw(decode.Sampling(1.0, top_p=0.5))) == {0}
  assert len(set(draw(decode.Sampling(1.0)))) == 4


def naive_greedy(model, prompt, n, stop=()):
  """Greedy tokens by a full forward over the whole sequence for each token
  (right-padded to one length, the padding masked: one compiled program)."""
  seq, out = list(prompt), []
  L = len(prompt) + n
  fwd = jax.jit(lambda t, mask: model(t, mask_BxL=mask)[0][0])
  for _ in range(n):
    tokens = np.zeros((1, L), np.int32)
    tokens[0, : len(seq)] = seq
    mask = (np.arange(L) < len(seq)).astype(np.float32)[None]
    nxt = int(np.argmax(np.asarray(fwd(jnp.asarray(tokens), jnp.asarray(mask)))[len(seq) - 1]))
    if nxt in stop:
      break
    seq.append(nxt)
    out.append(nxt)
  return out


@pytest.mark.parametrize("family", ["dense", "mixtral", "switch"])
def test_generate_loop_equals_naive_greedy_decoding(family):
  # The device-side loop (sampling, stop check and tokens on the device, bucketed
  # prompt and cache lengths) against a full forward per token, row by row.
  model = model_of(tiny(family))
  prompts = [[5, 6, 7], [8] * 9, [9, 10, 11, 12, 13]]
  stop = (17,)
  with jax.default_matmul_precision("highest"):
    g = decode.generate(model, prompts, max_new_tokens=12, stop_ids=stop, check_every=4)
    want = [naive_greedy(model, p, 12, stop) for p in prompts]
  assert g.tokens == want


def test_new_prompt_lengths_share_compiled_programs():
  model = model_of(tiny("mixtral"))
  step, prefill = decode._step, decode.forward  # pylint: disable=protected-access
  before = step._cache_size(), prefill._cache_size()  # pylint: disable=protected-access
  for n in (1, 7, 19, 40, 57):  # one bucket: prompts up to 64, cache 128
    decode.generate(model, [list(range(3, 3 + n))], max_new_tokens=8)
  after = step._cache_size(), prefill._cache_size()  # pylint: disable=protected-access
  assert after[0] - before[0] == 1 and after[1] - before[1] == 1, (before, after)
  assert [decode.bucket(n) for n in (1, 64, 65, 500)] == [64, 64, 128, 512]


def test_decode_step_compiles_once_on_a_placed_state():
  # A state committed to its device, as a restored checkpoint is: the first
  # step's carry must enter with the types and shardings the step returns, or
  # the step compiles again at the second step, inside the timed decode steps
  # (generate then reported 64 tokens at a quarter of the rate of 256).
  model = model_of(tiny("mixtral"))
  nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
  compiles = []

  def listener(event, secs, **kw):
    if event == "/jax/core/compile/backend_compile_duration" and "_step" in kw.get("fun_name"):
      compiles.append(secs)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    before = decode._step._cache_size()  # pylint: disable=protected-access
    for n in (2, 30):  # one bucket; 11 new tokens: shapes no other test compiles
      g = decode.generate(model, [list(range(3, 3 + n))], max_new_tokens=11, check_every=64)
    after = decode._step._cache_size()  # pylint: disable=protected-access
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(compiles) == 1 and after - before == 1, (compiles, before, after)
  assert g.steps == 9 and len(g.tokens[0]) == 11  # timed: the 9 steps after the compiled one
