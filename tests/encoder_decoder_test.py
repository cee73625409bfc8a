"""The encoder-decoder (model.arch="encoder_decoder"; models/encoder_decoder.py, issue 30).

T5's relative position buckets against a per-pair reference written from
Mesh TensorFlow's definition, and the stack's bias table read through them;
packed seq2seq examples give each example's logits alone; cached decoding
gives the full forward's logits; MoE in both stacks
on an 8-way expert-parallel mesh gives the one-device loss and gradients;
configs/switch_t5.py:tiny trains (its input and the train step); the config errors.
"""

import functools
import math
import re

from flax import nnx
from helpers import FAST_COMPILE
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib
from sparse_lm import data as datalib
from sparse_lm import inspect as inspectlib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.data import seq2seq
from sparse_lm.errors import ConfigError
from sparse_lm.errors import RunError
from sparse_lm.models import encoder_decoder as ed
from sparse_lm.models.moe import parallel
from sparse_lm.models.moe import routing


def t5_bucket(rel: int, bidirectional: bool, num_buckets=32, max_distance=128) -> int:
  """One pair's bucket, as Mesh TensorFlow's _relative_position_bucket defines
  it (scalar Python): rel = key position - query position."""
  n = -rel
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      bucket, n = num_buckets, -n
  elif n < 0:
    n = 0
  max_exact = num_buckets // 2
  if n < max_exact:
    return bucket + n
  large = max_exact + int(
    math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  )
  return bucket + min(large, num_buckets - 1)


def test_relative_position_buckets_are_t5s():
  rel = np.arange(-300, 301)
  for bidirectional in (True, False):
    got = np.asarray(ed.relative_position_bucket(jnp.asarray(rel), bidirectional))
    want = [t5_bucket(int(r), bidirectional) for r in rel]
    np.testing.assert_array_equal(got, want, err_msg=f"bidirectional={bidirectional}")
  # Values worked by hand: 8 exact offsets per direction, then log-spaced up to 128.
  buckets = {bi: np.asarray(ed.relative_position_bucket(jnp.asarray(rel), bi)) for bi in (1, 0)}
  at = lambda r, bi=True: int(buckets[bi][list(rel).index(r)])
  assert [at(r) for r in (0, -1, 1, -7, -8, -20, -127, -128, -300)] == [
    0, 1, 17, 7, 8, 10, 15, 15, 15
  ]  # fmt: skip
  assert [at(r, False) for r in (5, -15, -16, -127, -300)] == [0, 15, 16, 31, 31]
  # The stack's [1, H, L, L] bias: its table at each pair's bucket.
  model = tiny_model(50, dispatch="dropless")
  for stack, bidirectional in ((model.encoder, True), (model.decoder, False)):
    table = np.asarray(stack.rel_bias[...])
    L = 40
    want = np.array(
      [[table[t5_bucket(k - q, bidirectional)] for k in range(L)] for q in range(L)]
    ).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(np.asarray(stack.position_bias(L)), want, rtol=0, atol=0)


def tiny_config(mesh=None, remat="none", **moe):
  """configs/switch_t5.py:tiny at test size: MoE in layer 1 of each stack's 2."""
  c = cfglib.load_config("configs/switch_t5.py:tiny")
  m = c.model
  m.d_model, m.num_heads, m.head_dim, m.d_ff = 32, 2, 16, 64
  c.data.batch_size, c.data.num_streams = 8, 8
  for k, v in moe.items():
    m.moe[k] = v
  if mesh:
    c.mesh = mesh
  c.train.remat = remat
  return cfglib.validate(c)


@functools.cache
def _tiny_state(V: int, seed: int):
  """tiny_config()'s parameters (drawn in one jit: faster than eagerly); the
  MoE settings the tests change (dispatch, capacity) do not enter the draw."""
  spec = cfglib.model_spec(tiny_config())
  build = lambda: ed.EncoderDecoder(spec, V, rngs=nnx.Rngs(seed))
  with nnx.use_eager_sharding(False):
    return jax.jit(lambda: nnx.state(build()), compiler_options=FAST_COMPILE)()


def tiny_model(V: int, seed: int = 1, remat: str = "none", **moe):
  """tiny_config(remat, **moe)'s EncoderDecoder."""
  spec = cfglib.model_spec(tiny_config(remat=remat, **moe))
  with nnx.use_eager_sharding(False):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: ed.EncoderDecoder(spec, V, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, _tiny_state(V, seed))


def examples(seed, V, n):
  """n random seq2seq Examples of different lengths (T5's layout: decoder start 0)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ne, nd = rng.integers(3, 9), rng.integers(2, 6)
    out.append(
      seq2seq.Example(
        rng.integers(2, V, ne).astype(np.int32),
        rng.integers(2, V, nd).astype(np.int32),
        np.ones(nd, np.float32),
        0,
      )
    )
  return out


def test_packed_examples_give_each_examples_logits():
  """Three examples packed in one row give, token for token, the logits each
  gives alone in a padded row (encoder, decoder and cross masks keep them
  apart; the relative biases do not depend on where an example starts).
  Dropless MoE in evaluation: routing does not depend on the batch."""
  V = 50
  model = tiny_model(V, dispatch="dropless")
  exs = examples(0, V, 3)
  packed = seq2seq.pack(exs, range(3), 24, 14)
  assert packed["encoder_input_tokens"].shape[0] == 1  # all three in one row
  alone = {k: np.concatenate([seq2seq.pack([e], [0], 24, 14)[k] for e in exs]) for k in packed}
  fwd = jax.jit(
    lambda b: (
      model(
        b["encoder_input_tokens"],
        b["decoder_input_tokens"],
        encoder_segments_BxS=b["encoder_segment_ids"],
        decoder_segments_BxL=b["decoder_segment_ids"],
      ).logits
    ),
    compiler_options=FAST_COMPILE,
  )
  with jax.default_matmul_precision("highest"):
    got, want = np.asarray(fwd(packed)), np.asarray(fwd(alone))
  at = 0
  for i, e in enumerate(exs):
    n = len(e.targets)
    np.testing.assert_allclose(got[0, at : at + n], want[i, :n], rtol=1e-5, atol=1e-5)
    at += n
  # And the padded tail of a row changes nothing: the same example in a longer row.
  longer = seq2seq.pack(exs[:1], [0], 32, 20)
  n = len(exs[0].targets)
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(np.asarray(fwd(longer))[0, :n], want[0, :n], rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_the_full_forward():
  """The encoder once, then the decoder over its self-attention cache and the
  cross-attention's keys and values: a 3-token prefill and single steps give
  the full forward's logits at every position (sources of 12, 7 and 3 real
  tokens, padding hidden; dropless MoE in both stacks), and greedy decoding
  picks the full forward's argmax at each step."""
  V, N = 50, 6
  graphdef, state = nnx.split(tiny_model(V, dispatch="dropless"))
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  for stack in (model.encoder, model.decoder):  # biases of a trained model's size (std 1.8)
    stack.rel_bias[...] = stack.rel_bias[...] * 10
  rng = np.random.default_rng(4)
  valid = np.arange(12)[None] < np.array([[12], [7], [3]])
  src = np.where(valid, rng.integers(2, V, (3, 12)), 0).astype(np.int32)
  dec_in = rng.integers(2, V, (3, N)).astype(np.int32)  # teacher forcing: any tokens
  full = jax.jit(
    lambda s, d, seg: model(s, d, encoder_segments_BxS=seg).logits, compiler_options=FAST_COMPILE
  )
  decode = jax.jit(model.decode, compiler_options=FAST_COMPILE)
  greedy = jax.jit(model.greedy, static_argnums=2, compiler_options=FAST_COMPILE)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(full(src, dec_in, valid.astype(np.int32)))
    state = jax.jit(model.start_decoding, static_argnums=2)(src, valid, N)
    got, state = decode(dec_in[:, :3], state)
    steps = [np.asarray(got)]
    for i in range(3, N):
      got, state = decode(dec_in[:, i : i + 1], state)
      steps.append(np.asarray(got))
    toks = np.asarray(greedy(src, valid, N))
    started = np.concatenate([np.zeros((3, 1), np.int32), toks[:, :-1]], 1)  # T5's start: 0
    again = np.asarray(full(src, started, valid.astype(np.int32)))
  np.testing.assert_allclose(np.concatenate(steps, 1), want, rtol=1e-5, atol=1e-5)
  assert int(state.index) == N
  np.testing.assert_array_equal(again.argmax(-1), toks)


# Every router that can decode (routing.Router.decodes), at settings it accepts.
DECODING_ROUTERS = {
  "topk": {"top_k": 2},
  "mixtral": {"top_k": 2},
  "sigmoid_bias": {"top_k": 2},
  "group_limited": {"top_k": 2, "num_groups": 2, "top_k_groups": 1},
  "hierarchical": {"top_k": 1, "num_groups": 2, "top_k_groups": 2},
}


def test_cached_decoding_equals_the_full_forward_for_every_router():
  """The other routers that can decode (switch: the test above; expert
  choice cannot): single cached steps give the full forward's logits,
  dropless MoE in both stacks, DeepSeek's bias drawn away from 0."""
  assert set(DECODING_ROUTERS) | {"switch"} == {
    n for n, r in routing.ROUTERS.items() if r.decodes
  }  # a new router that can decode joins this list
  V, N = 50, 4
  rng = np.random.default_rng(5)
  valid = np.arange(8)[None] < np.array([[8], [5]])
  src = np.where(valid, rng.integers(2, V, (2, 8)), 0).astype(np.int32)
  dec_in = rng.integers(2, V, (2, N)).astype(np.int32)
  for router, kw in DECODING_ROUTERS.items():
    spec = cfglib.model_spec(tiny_config(router=router, num_experts=4, dispatch="dropless", **kw))
    with nnx.use_eager_sharding(False):
      model = nnx.merge(*nnx.split(jax.jit(lambda: ed.EncoderDecoder(spec, V, rngs=nnx.Rngs(2)))()))
    for path, v in nnx.to_flat_state(nnx.state(model)):
      if path[-1] == "router_bias":
        v.set_value(jnp.asarray(rng.normal(size=v.get_value().shape) * 0.3, jnp.float32))
    with jax.default_matmul_precision("highest"):
      want = np.asarray(
        jax.jit(model, compiler_options=FAST_COMPILE)(
          src, dec_in, encoder_segments_BxS=valid.astype(np.int32)
        ).logits
      )
      start = jax.jit(model.start_decoding, static_argnums=2, compiler_options=FAST_COMPILE)
      state = start(src, valid, N)
      decode = jax.jit(model.decode, compiler_options=FAST_COMPILE)
      steps = []
      for i in range(N):  # one program per router: single steps (the test above: prefill)
        got, state = decode(dec_in[:, i : i + 1], state)
        steps.append(np.asarray(got))
    np.testing.assert_allclose(np.concatenate(steps, 1), want, rtol=1e-5, atol=1e-5, err_msg=router)


def test_expert_parallel_mesh_gives_one_devices_loss_and_gradients(monkeypatch):
  """MoE in both stacks, 8 experts: the training loss (cross-entropy + router
  losses, with jitter, capacity drops and packed rows) and the gradient of
  every parameter on a mesh expert=8 equal those on one device (which
  recomputes its blocks in the backward pass: train.remat="full")."""
  V, B = 64, 8
  c8 = tiny_config([("data", 1), ("fsdp", 1), ("expert", 8), ("tensor", 1)], capacity_factor=1.0)
  rows = seq2seq.pack(examples(3, V, 40), range(40), 16, 10)
  batch = {k: v[:B] for k, v in rows.items()}
  assert len(rows["encoder_input_tokens"]) >= B and (batch["encoder_segment_ids"] == 0).any()
  graphdef, state = nnx.split(tiny_model(V, seed=0, capacity_factor=1.0))
  graphdef_remat = nnx.graphdef(tiny_model(V, seed=0, remat="full", capacity_factor=1.0))
  calls = []
  real = parallel.placement
  monkeypatch.setattr(
    parallel, "placement", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1]
  )

  def loss_and_grads(graphdef):
    def f(state, batch):
      loss, aux = statelib.loss_fn(
        nnx.merge(graphdef, state), batch, train=True, rng=jax.random.key(5)
      )
      return loss, [a["dropped_fraction"] for a in aux["moe"]]

    return jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST_COMPILE)

  with jax.default_matmul_precision("highest"):
    (loss1, dropped1), g1 = loss_and_grads(graphdef_remat)(state, batch)
    mesh = sharding.make_mesh(c8, jax.devices()[:8])
    with sharding.use(mesh, c8):
      st = jax.device_put(state, nnx.get_named_sharding(state, mesh))
      b8 = jax.device_put(batch, sharding.named(mesh, "batch", "length"))
      wi = nnx.merge(graphdef, st).decoder.blocks[1].ffn.wi[...]
      assert wi.addressable_shards[0].data.shape[0] == 1  # 8 experts / 8 devices
      del calls[:]
      (loss8, dropped8), g8 = loss_and_grads(graphdef)(st, b8)
  assert len(calls) == 2 and all(isinstance(p, parallel.ExpertParallel) for p in calls)
  assert len(dropped1) == 2 and min(map(float, dropped1)) > 0  # both stacks route; tokens drop
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  np.testing.assert_allclose(dropped8, dropped1, rtol=1e-6)
  flat1 = dict(nnx.to_flat_state(g1))
  flat8 = dict(nnx.to_flat_state(g8))
  assert flat1.keys() == flat8.keys()
  for k in flat1:
    a, b = np.asarray(flat1[k][...]), np.asarray(flat8[k][...])
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6, err_msg="/".join(map(str, k)))


def test_remat_wraps_every_block():
  """train.remat="full": each block of both stacks under jax.checkpoint (its
  loss and gradients equal "none"'s: the expert-parallel test's one-device
  reference runs with it)."""
  V = 64
  batch = {k: v[:8] for k, v in seq2seq.pack(examples(3, V, 40), range(40), 16, 10).items()}
  for remat, n in (("none", 0), ("full", 4)):  # 2 + 2 blocks
    graphdef, state = nnx.split(tiny_model(V, remat=remat))
    f = lambda st: statelib.loss_fn(
      nnx.merge(graphdef, st), batch, train=True, rng=jax.random.key(2)
    )
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda st: f(st)[0]))(state))
    assert len(re.findall(r"= remat\w*\[", jaxpr)) == n, remat  # jax.checkpoint's primitive


def test_switch_t5_tiny_trains(tfds_dir):
  """configs/switch_t5.py:tiny's input (span corruption of the stdlib corpus)
  and train step (state.train_step: loss, AdamW, routing state): 12 steps
  lower the loss. (train.py's loop adds 30 s of compiling the eval step and
  checkpointing here; its encoder-decoder lines are the MoE layer ids.)"""
  c = tiny_config()
  c.data.data_dir = str(tfds_dir)
  c.train.learning_rate, c.train.warmup_steps, c.train.num_steps = 1e-2, 2, 12
  inp = datalib.make_input(c.data, seed=0, process_index=0, process_count=1)
  assert inp.vocab_size == 512 + seq2seq.EXTRA_IDS  # the sentinels above the tokenizer's ids
  with nnx.use_eager_sharding(False):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: statelib.create(c, inp.vocab_size)))
    state = jax.jit(lambda: nnx.state(statelib.create(c, inp.vocab_size)))()
  step = jax.jit(statelib.train_step(c, graphdef), donate_argnums=0, compiler_options=FAST_COMPILE)
  losses = []
  for i in range(c.train.num_steps):
    batch = next(inp)
    state, meas = step(state, batch, jnp.int32(i))
    losses.append(float(meas["ce"]))
  # What inspect --compile and train.py's fit check compile: the input's features and lengths.
  shd = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = lambda b: {k: (tuple(v.shape), str(v.dtype)) for k, v in b.items()}
  assert shapes(inspectlib.abstract_batch(c, shd)) == shapes(batch)
  assert shapes(inspectlib.abstract_batch(c, shd, batch)) == shapes(batch)
  assert bool(meas["finite"]) and len(meas["moe"]) == 2  # the encoder's and the decoder's
  assert ed.moe_layer_ids(cfglib.model_spec(c)) == [1, 3]
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses


@pytest.mark.parametrize(
  "changes,key",
  [
    ({"model.arch": "decoder"}, "data.objective"),
    ({"data.objective": "lm"}, "model.arch"),
    ({"model.arch": "decoder", "data.objective": "lm"}, "model.position"),
    ({"model.position": "rope"}, "model.position"),
    ({"model.scan_layers": True}, "model.scan_layers"),
    ({"model.arch": "t5"}, "model.arch"),
    (
      {"model.arch": "decoder", "data.objective": "lm", "model.position": "sinusoidal"},
      "model.position",
    ),
    (
      {
        "model.arch": "decoder",
        "data.objective": "lm",
        "model.position": "rope",
        "model.mlp_bias": True,
      },
      "model.mlp_bias",
    ),
  ],
)
def test_config_errors(changes, key, tmp_path):
  c = cfglib.load_config("configs/switch_t5.py:tiny")
  for k, v in changes.items():
    block, _, name = k.rpartition(".")
    c[block][name] = v
  with pytest.raises(ConfigError, match=f"^config.{key}=") as e:
    cfglib.validate(c)
  assert "\n" not in str(e.value)
  if changes.get("model.arch") == "t5":  # the programs read a run (encoder_decoder_cli_test.py)
    good = cfglib.validate(cfglib.load_config("configs/switch_t5.py:tiny"))
    good.data.tokenizer = "byte"
    ckptlib.save_config(good, str(tmp_path), {})
    with pytest.raises(RunError, match="holds no checkpoint$") as e:
      statelib.load_model(str(tmp_path))
    assert "\n" not in str(e.value)


def nllb_reference(P, src, tgt, *, heads, eom_rate, eps=1e-5):
  """NLLB-200's MoE forward (transformers' modeling_nllb_moe.py, fairseq's
  transformer in the NLLB branch) in float64 numpy, one example: decoder
  logits [len(tgt), V] for source tokens src and decoder input tokens tgt.
  P: parameter path -> array (our layout: w [in, out], heads split)."""
  E = P["embed/embedding"].astype(np.float64)
  D = E.shape[1]
  half = D // 2

  def sinusoids(n):  # fairseq's get_embedding at rows padding_idx + 1 + i = 2 + i
    w = np.exp(np.arange(half) * -(math.log(10000) / (half - 1)))
    a = (np.arange(n) + 2)[:, None] * w[None]
    return np.concatenate([np.sin(a), np.cos(a)], 1)

  def ln(x, pre):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * P[f"{pre}/scale"] + P[f"{pre}/bias"]

  def attention(pre, xq, xkv, causal):
    lin = lambda x, w, b: x @ P[f"{pre}/{w}"].reshape(D, -1) + P[f"{pre}/{b}"].reshape(-1)
    q, k, v = lin(xq, "wq", "bq"), lin(xkv, "wk", "bk"), lin(xkv, "wv", "bv")
    Z = q.shape[1] // heads
    out = []
    for h in range(heads):
      s = slice(h * Z, (h + 1) * Z)
      logits = (q[:, s] * Z**-0.5) @ k[:, s].T
      if causal:
        logits = np.where(np.tril(np.ones(logits.shape, bool)), logits, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      out.append((p / p.sum(-1, keepdims=True)) @ v[:, s])
    return np.concatenate(out, 1) @ P[f"{pre}/wo"].reshape(-1, D) + P[f"{pre}/bo"]

  def ffn(pre, x):
    relu = lambda h: np.maximum(h, 0)
    if f"{pre}/router" not in P:  # NllbMoeDenseActDense: fc2(relu(fc1(x)))
      return relu(x @ P[f"{pre}/wi"] + P[f"{pre}/bi"]) @ P[f"{pre}/wo"] + P[f"{pre}/bo"]
    y = np.zeros_like(x)
    for t in range(len(x)):  # NllbMoeTop2Router, per token: top-2, gates renormalised
      logits = x[t] @ P[f"{pre}/router"]
      p = np.exp(logits - logits.max())
      p /= p.sum()
      e1 = int(np.argmax(p))
      e2 = int(np.argmax(np.where(np.arange(len(p)) == e1, -np.inf, logits)))
      for e, g in ((e1, p[e1] / (p[e1] + p[e2])), (e2, p[e2] / (p[e1] + p[e2]))):
        h = relu(x[t] @ P[f"{pre}/wi"][e] + P[f"{pre}/bi"][e])
        y[t] += g * (h @ P[f"{pre}/wo"][e] + P[f"{pre}/bo"][e])
    return y * (1 - eom_rate)  # NllbMoeExperts in evaluation (fairseq's moe_tok_dropout)

  n_layers = 1 + max(int(k.split("/")[2]) for k in P if k.startswith("encoder/blocks/"))
  x = E[src] * math.sqrt(D) + sinusoids(len(src))
  for i in range(n_layers):
    pre = f"encoder/blocks/{i}"
    x = x + attention(f"{pre}/attn", ln(x, f"{pre}/attn_norm"), ln(x, f"{pre}/attn_norm"), False)
    x = x + ffn(f"{pre}/ffn", ln(x, f"{pre}/ffn_norm"))
  enc = ln(x, "encoder/final_norm")
  x = E[tgt] * math.sqrt(D) + sinusoids(len(tgt))
  for i in range(n_layers):
    pre = f"decoder/blocks/{i}"
    h = ln(x, f"{pre}/attn_norm")
    x = x + attention(f"{pre}/attn", h, h, True)
    x = x + attention(f"{pre}/cross_attn", ln(x, f"{pre}/cross_norm"), enc, False)
    x = x + ffn(f"{pre}/ffn", ln(x, f"{pre}/ffn_norm"))
  return ln(x, "decoder/final_norm") @ E.T  # tied, unscaled (lm_head = shared)


def test_nllb_moe_forward_and_decoding_equal_a_reference():
  """configs/nllb_moe.py:tiny at test size (4 + 4 layers, top-2 of 8 experts
  in layer 3 of each stack; biases and norms drawn away from their init):
  two packed examples give, token for token, the logits of a float64 numpy
  forward written from transformers' NllbMoe definitions (sinusoids at
  position + 2 restarting per example, sqrt(D) embedding scale, biased q / k /
  v / o scaled by 1 / sqrt(Z), LayerNorm, ReLU FFNs and experts with biases,
  top-2 renormalised, EOM's 0.8 in evaluation, tied output without
  rescaling); cached decoding gives the same logits step by step."""
  V = 50
  c = cfglib.load_config("configs/nllb_moe.py:tiny")
  c.model.d_model, c.model.d_ff, c.model.moe.dispatch = 32, 64, "dropless"
  spec = cfglib.model_spec(cfglib.validate(c))
  assert spec.moe_layers == (3,) and spec.moe.top_k == 2 and spec.moe.eom_rate == 0.2
  with nnx.use_eager_sharding(False):
    model = ed.EncoderDecoder(spec, V, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  params = nnx.state(model, nnx.Param)
  for path, v in nnx.to_flat_state(params):
    name = path[-1]
    if name in ("bias", "scale") or (name.startswith("b") and name != "blocks"):
      v.set_value(v.get_value() * 1.0 + rng.normal(0, 0.3, v.get_value().shape))
  nnx.update(model, params)
  P = {"/".join(map(str, k)): np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(params)}

  exs = examples(5, V, 2)
  packed = seq2seq.pack(exs, range(2), 20, 12)
  assert packed["encoder_input_tokens"].shape[0] == 1  # both in one row
  fwd = jax.jit(
    lambda b: (
      model(
        b["encoder_input_tokens"],
        b["decoder_input_tokens"],
        encoder_segments_BxS=b["encoder_segment_ids"],
        decoder_segments_BxL=b["decoder_segment_ids"],
      ).logits
    ),
    compiler_options=FAST_COMPILE,
  )
  with jax.default_matmul_precision("highest"):
    got = np.asarray(fwd(packed))[0]
  at_src = at_tgt = 0
  wants = []
  for e in exs:
    ns, nt = len(e.encoder), len(e.targets)
    row = packed["encoder_input_tokens"][0]
    src, tgt = row[at_src : at_src + ns], packed["decoder_input_tokens"][0, at_tgt : at_tgt + nt]
    want = nllb_reference(P, src, tgt, heads=spec.num_heads, eom_rate=0.2)
    np.testing.assert_allclose(got[at_tgt : at_tgt + nt], want, rtol=1e-4, atol=1e-4)
    wants.append((src, tgt, want))
    at_src, at_tgt = at_src + ns, at_tgt + nt
  # Cached decoding of the first example (its source padded to 9): the same logits.
  src, tgt, want = wants[0]
  src_BxS = np.zeros((1, 9), np.int32)
  src_BxS[0, : len(src)] = src
  decode = jax.jit(model.decode, compiler_options=FAST_COMPILE)
  with jax.default_matmul_precision("highest"):
    state = model.start_decoding(src_BxS, src_BxS > 0, len(tgt))
    steps = []
    for i in range(len(tgt)):
      logits, state = decode(np.asarray(tgt[i : i + 1], np.int32)[None], state)
      steps.append(np.asarray(logits)[0])
  np.testing.assert_allclose(np.concatenate(steps), want, rtol=1e-4, atol=1e-4)


def test_nllb_moe_54b_is_the_papers_size():
  """configs/nllb_moe.py:54b: inspect's count equals the NLLB-200 MoE's
  parameters written out from its dims (d_model 2048, 24 + 24 layers, FFN
  8192, 128 experts in every 4th layer, vocabulary 256,206, biases and
  LayerNorms as fairseq's, tied embedding): 54,500,569,088, the paper's 54.5B."""
  c = cfglib.validate(cfglib.load_config("configs/nllb_moe.py:54b"))
  s = inspectlib.summarize(c)
  D, F, V, E = 2048, 8192, 256_206, 128
  attn, ln, ffn = 4 * D * D + 4 * D, 2 * D, 2 * D * F + F + D
  moe = D * E + E * ffn  # router (no bias) + experts
  enc = 18 * (attn + 2 * ln + ffn) + 6 * (attn + 2 * ln + moe) + ln
  dec = 18 * (2 * attn + 3 * ln + ffn) + 6 * (2 * attn + 3 * ln + moe) + ln
  assert s["total_params"] == enc + dec + V * D == 54_500_569_088
  assert round(s["total_params"] / 1e9, 1) == 54.5
  assert s["routed_expert_params"] == 12 * E * ffn
