"""One step's update does not depend on how its batch is split (issue 27).

train.microbatches = n runs the batch as n micro-batches inside one compiled
step (state.micro_grads). For every token-choice router, float32, dropless,
with every router loss on (balance, z, importance / load): the loss, the
router losses, the routing-state (bias) update and the parameters after the
update are those of n = 1, whatever n, on one device and on 8; under
balance_scope "micro" the balance loss differs (the knob does something).
Expert choice routes each micro-batch on its own (tested for what it does).
The encoder-decoder too (both stacks' MoE layers, packed seq2seq rows; one
device, no expert output masking or dropout: those draw their masks per
micro-batch, so only their distribution is the same).
A run with microbatches logs the losses of one without: tests/scale_model_test.py.
"""

import functools

from flax import nnx
from helpers import FAST_COMPILE
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm import config as cfglib
from sparse_lm import params as paramslib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.data import seq2seq
from sparse_lm.errors import ConfigError

V, B, L = 64, 8, 16
ROUTERS = {  # router: model.moe overrides
  "switch": dict(top_k=1),
  "topk": dict(top_k=2, normalize_gates=True),
  "mixtral": dict(top_k=2),
  "sigmoid_bias": dict(top_k=2, bias_update_rate=0.01, normalize_gates=True),
  "group_limited": dict(top_k=2, num_groups=2, top_k_groups=1, bias_update_rate=0.01),
  "hierarchical": dict(top_k=1, num_groups=2, top_k_groups=2),
}


def config(router, microbatches=1, scope="global", mesh=None, remat="none", scan=False, **moe):
  c = cfglib.base_config()
  c.data.vocab_size, c.data.batch_size, c.data.seq_len = V, B, L
  c.data.tokenizer = "byte"
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = 32, 2, 2, 64
  m.moe.num_experts, m.moe.router, m.moe.dispatch = 4, router, "dropless"
  m.moe.every, m.moe.d_ff, m.moe.balance_scope = 1, 32, scope
  m.moe.load_balance_weight, m.moe.z_loss_weight, m.moe.importance_weight = 0.1, 0.01, 0.1
  for k, v in {**ROUTERS.get(router, {}), **moe}.items():
    m.moe[k] = v
  c.train.microbatches, c.train.learning_rate, c.train.warmup_steps = microbatches, 1e-2, 0
  c.train.remat, m.scan_layers = remat, scan
  if mesh:
    c.mesh = mesh
  return cfglib.validate(c)


def batch():
  k1, k2 = jax.random.split(jax.random.key(0))
  tokens = jax.random.randint(k1, (B, L + 1), 0, V)
  weights = (jnp.arange(L)[None, :] < jax.random.randint(k2, (B, 1), L // 2, L + 1)).astype(
    jnp.float32
  )  # a padded tail in most rows
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def one_step(c, mesh=None, data=None):
  """(measurements, model parameters and state after the update) of one step."""
  data = batch() if data is None else data
  V_ = statelib.vocab_size_of(c)
  if mesh is None:
    graphdef, _, _ = statelib.abstract_state(c, V_)
    with nnx.use_eager_sharding(False):
      state = jax.jit(lambda: nnx.state(statelib.create(c, V_)))()
      step = jax.jit(statelib.train_step(c, graphdef), compiler_options=FAST_COMPILE)
      out_state, meas = step(state, data, jnp.int32(0))
  else:
    with sharding.use(mesh, c):
      graphdef, _, shd = statelib.abstract_state(c, V_, mesh)
      state = jax.jit(lambda: nnx.state(statelib.create(c, V_)), out_shardings=shd)()
      bshd = sharding.named(mesh, "batch", "length")
      step = jax.jit(
        statelib.train_step(c, graphdef),
        out_shardings=(shd, sharding.named(mesh)),
        compiler_options=FAST_COMPILE,
      )
      data = jax.device_put(data, bshd)
      out_state, meas = step(state, data, jnp.int32(0))
  flat = {
    paramslib.path_str(kp): np.asarray(v)
    for kp, v in jax.tree_util.tree_flatten_with_path(out_state)[0]
  }
  # By per-layer names: scanned layers are stacked, their optimizer state too.
  flat = paramslib.per_layer(flat, paramslib.layout_of({p: v.shape for p, v in flat.items()}))
  leaves = {p[2:]: v for p, v in flat.items() if p.startswith("0/")}
  # AdamW's first moment: 0.1 x the gradient.
  leaves.update({p: v for p, v in flat.items() if p.startswith("1/") and "/mu/" in p})
  return jax.device_get(meas), leaves


def terms(meas) -> dict:
  out = {"loss": meas["loss"], "ce": meas["ce"], "router_loss": meas["router_loss"]}
  for i, a in enumerate(meas["moe"]):
    for k in ("load_balance_loss", "z_loss", "importance_loss", "load_loss", "expert_fraction"):
      out[f"{i}/{k}"] = a[k]
  return out


def assert_same(a, b, tol=1e-5):
  """The same loss terms, gradients (AdamW's first moment after one step: 0.1
  x the gradient), routing state and parameters after the update. AdamW's
  first update is lr * g / (|g| + 1e-8): where |g| is near 1e-8 float32
  rounding of g moves it by up to lr, so parameters are compared where the
  gradient is not that small (|g| > 1e-6) and everywhere else to lr."""
  (ma, pa), (mb, pb) = a, b
  ta, tb = terms(ma), terms(mb)
  for k in ta:
    np.testing.assert_allclose(ta[k], tb[k], rtol=tol, atol=tol, err_msg=k)
  mu = {p.split("/mu/")[1]: v for p, v in pa.items() if "/mu/" in p}
  for p in pa:
    if "/mu/" in p:  # gradients
      scale = np.abs(pb[p]).max() + 1e-12
      np.testing.assert_allclose(pa[p] / scale, pb[p] / scale, atol=tol, err_msg=p)
      continue
    conditioned = np.abs(mu[p]) > 1e-7 if p in mu else np.ones(pa[p].shape, bool)
    np.testing.assert_allclose(
      pa[p][conditioned], pb[p][conditioned], rtol=tol, atol=tol, err_msg=p
    )
    np.testing.assert_allclose(pa[p], pb[p], atol=2e-2, err_msg=p)  # 2 x lr at most


@functools.cache
def reference(router):
  return one_step(config(router))


@functools.cache
def split(router, n):
  return one_step(config(router, n))


GRID = [(r, 4) for r in ROUTERS] + [("mixtral", 2), ("hierarchical", 2)]


@pytest.mark.parametrize("router,n", GRID)
def test_microbatches_do_not_change_the_update(router, n):
  assert_same(split(router, n), reference(router))


@pytest.mark.parametrize("router", ["mixtral", "sigmoid_bias"])
def test_microbatches_on_8_devices_equal_one_device(router):
  # sigmoid_bias scanned: its layers' parameters and bias stored stacked, the
  # experts of each still split over the expert axis (the layer axis is not).
  mesh_cfg = (("data", 2), ("fsdp", 1), ("expert", 4), ("tensor", 1))
  c = config(router, 4, mesh=mesh_cfg, scan=router == "sigmoid_bias")
  assert_same(one_step(c, sharding.make_mesh(c)), reference(router))


@pytest.mark.parametrize("router", ["mixtral", "sigmoid_bias"])
def test_microbatches_with_remat_and_scanned_layers_equal_the_plain_step(router):
  # Rematerialisation and scanning change how the step computes, never what:
  # router losses and statistics are counted once (tests/scale_model_test.py
  # checks each alone; here with micro-batches and the bias update).
  assert_same(one_step(config(router, 2, remat="full", scan=True)), reference(router))


def test_microbatches_too_small_for_expert_parallelism_are_refused():
  mesh = (("data", 1), ("fsdp", 1), ("expert", 4), ("tensor", 2))
  c = config("mixtral", 8, mesh=mesh)
  c.data.seq_len = 2  # 8 micro-batches of one row: 2 tokens over 4 expert shards
  with pytest.raises(ConfigError, match="train.microbatches=8 is invalid: makes micro-batches"):
    sharding.mesh_sizes(c, 8)


def test_bias_is_updated_once_from_the_whole_step():
  _, params = split("sigmoid_bias", 4)
  bias = [v for p, v in params.items() if p.endswith("router_bias")]
  assert bias and all(np.abs(b).max() > 0 for b in bias)  # it moved, once: +-rate
  np.testing.assert_allclose(np.abs(bias[0]), 0.01 * (bias[0] != 0), rtol=1e-6)


def test_sequence_scope_does_not_depend_on_microbatches():
  ref = one_step(config("mixtral", scope="sequence"))
  assert_same(one_step(config("mixtral", 4, scope="sequence")), ref)
  glob = terms(reference("mixtral")[0])["0/load_balance_loss"]
  assert abs(terms(ref[0])["0/load_balance_loss"] - glob) > 1e-4  # per row is another loss


def test_micro_scope_changes_the_balance_loss():
  whole = terms(reference("mixtral")[0])
  micro = terms(one_step(config("mixtral", 4, scope="micro"))[0])
  assert abs(micro["0/load_balance_loss"] - whole["0/load_balance_loss"]) > 1e-4
  np.testing.assert_allclose(micro["ce"], whole["ce"], rtol=1e-5)  # only the balance terms move


def test_expert_choice_routes_each_microbatch_on_its_own():
  # Expert choice picks each expert's top-C tokens of the batch it sees: with
  # n micro-batches, each is routed alone (capacity per micro-batch), so the
  # step's cross-entropy is the weighted mean of the micro-batches' own.
  kw = dict(router="expert_choice", dispatch="capacity", capacity_factor=1.0)
  c2 = config(kw.pop("router"), 2, **kw)
  ce2 = float(one_step(c2)[0]["ce"])
  data = batch()
  parts = []
  for i in range(2):
    rows = {k: v[i::2] for k, v in data.items()}
    c1 = config("expert_choice", 1, **kw)
    c1.data.batch_size = B // 2
    V_ = statelib.vocab_size_of(c1)
    graphdef, _, _ = statelib.abstract_state(c1, V_)
    with nnx.use_eager_sharding(False):
      state = jax.jit(lambda: nnx.state(statelib.create(c1, V_)))()
      step = jax.jit(statelib.train_step(c1, graphdef), compiler_options=FAST_COMPILE)
      _, meas = step(state, rows, jnp.int32(0))
    parts.append((float(meas["ce"]), float(rows["weights"].sum())))
  expected = sum(ce * w for ce, w in parts) / sum(w for _, w in parts)
  np.testing.assert_allclose(ce2, expected, rtol=1e-5)


def encdec_batch():
  """8 packed rows of random seq2seq examples (1-3 a row, some padding)."""
  rng = np.random.default_rng(0)
  exs = []
  for _ in range(20):
    n, m = rng.integers(3, 9), rng.integers(2, 8)
    t = rng.integers(1, V, m).astype(np.int32)
    exs.append(
      seq2seq.Example(rng.integers(1, V, n).astype(np.int32), t, np.ones(m, np.float32), 0)
    )
  b = seq2seq.pack(exs, range(len(exs)), L, L)
  assert len(b["encoder_input_tokens"]) >= B
  return {k: jnp.asarray(v[:B]) for k, v in b.items()}


def encdec_config(n, mesh=None, **data):
  """switch_t5's encoder-decoder, a top-2 MoE in layer 1 of both stacks, every router loss."""
  c = cfglib.load_config("configs/switch_t5.py:tiny")
  c.data.vocab_size, c.data.batch_size, c.data.seq_len, c.data.tokenizer = V, B, L, "byte"
  c.data.objective, c.data.dataset = "seq2seq", "seq2seq:unused.jsonl"
  for k, v in data.items():
    c.data[k] = v
  m = c.model
  m.d_model, m.num_heads, m.head_dim, m.d_ff = 32, 2, 16, 64
  m.moe.num_experts, m.moe.top_k, m.moe.router, m.moe.dispatch = 4, 2, "topk", "dropless"
  m.moe.load_balance_weight, m.moe.z_loss_weight, m.moe.jitter = 0.1, 0.01, 0.0
  c.train.microbatches, c.train.learning_rate, c.train.warmup_steps = n, 1e-2, 0
  if mesh:
    c.mesh = mesh
  return cfglib.validate(c)


def test_encoder_decoder_microbatches_do_not_change_the_update():
  data = encdec_batch()
  ref = one_step(encdec_config(1), data=data)
  assert len(ref[0]["moe"]) == 2  # the encoder's MoE layer, then the decoder's
  assert_same(one_step(encdec_config(4), data=data), ref)


def test_encoder_decoder_microbatches_too_small_for_the_decoder_are_refused():
  # The encoder's micro-batches route 16 tokens (1 row x 16), the decoder's 6:
  # not divisible by the 4 token shards; the whole batch's 48 are.
  mesh = (("data", 1), ("fsdp", 1), ("expert", 4), ("tensor", 2))
  sharding.mesh_sizes(encdec_config(1, mesh, targets_len=6), 8)
  with pytest.raises(ConfigError, match=r"microbatches=8 is invalid: .*6 tokens \(the decoder"):
    sharding.mesh_sizes(encdec_config(8, mesh, targets_len=6), 8)
