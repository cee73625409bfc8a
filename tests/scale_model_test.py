"""model.scan_layers, train.remat and model.param_dtype change how the model
computes and stores, never what it computes.

Against the plain model (unscanned, not rematerialised, float32): every remat
policy and the scanned layers give the same logits, router losses (every value
of moe_aux) and gradients (float32: 1e-5 relative, 1e-6 absolute); full remat
needs fewer temporary bytes; bfloat16 parameters train a step, their optimizer
moments bfloat16 too. Scanned layers are stored stacked (sparse_lm/params.py
maps them to per-layer names): the same initial values and per-layer names,
logical axes and counts; a checkpoint saved scanned restores unscanned and
back, leaf for leaf; a run switches the key on resume with the losses of one
that never did; a scanned run's export is the unscanned one's, byte for byte,
and init_from reads it by per-layer names; decoding a scanned model equals its
full forward.
"""

import functools
import re

from flax import nnx
from helpers import losses
from helpers import tiny_config
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib
from sparse_lm import decode
from sparse_lm import inspect as inspectlib
from sparse_lm import params as paramslib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm import train
from sparse_lm.errors import ConfigError
from sparse_lm.models.transformer import Transformer
from sparse_lm.models.transformer import scan_plan

V = 64
TOL = dict(rtol=1e-5, atol=1e-6)
TOKENS_BxL = jax.random.randint(jax.random.key(1), (2, 17), 0, V)
# Cuts the CPU compile time of these small programs about 3x (as moe_layer_test).
FAST_COMPILE = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
  "xla_cpu_use_fusion_emitters": False,
}

# Tiny models (d_model 32) whose layers make every part of a scan plan.
KINDS = {
  # 2 dense layers with dropout: one scanned layer repeated twice.
  "dense": {"model.num_layers": 2, "model.dropout": 0.1},
  # Layer 0 dense (first_dense_layers), then super-blocks (MoE, dense) at 1-2
  # and 3-4, scanned, and layer 5 (MoE) left over: switch routing with jitter.
  "switch": {
    "model.num_layers": 6,
    "model.moe.num_experts": 4,
    "model.moe.every": 2,
    "model.moe.offset": 1,
    "model.moe.first_dense_layers": 1,
    "model.moe.jitter": 0.01,
  },
  # Every layer MoE, top-2 of 4 experts, dropless.
  "mixtral": {
    "model.num_layers": 2,
    "model.activation": "swiglu",
    "model.moe.num_experts": 4,
    "model.moe.top_k": 2,
    "model.moe.router": "mixtral",
    "model.moe.dispatch": "dropless",
    "model.moe.every": 1,
    "model.moe.offset": 0,
  },
}


def config(kind: str, **keys):
  c = cfglib.base_config()
  c.model.d_model, c.model.num_heads, c.model.d_ff = 32, 4, 64
  c.data.batch_size, c.data.seq_len, c.data.num_streams = 2, 16, 1
  for key, value in {**KINDS[kind], **keys}.items():
    *parents, leaf = key.split(".")
    functools.reduce(lambda node, k: node[k], parents, c)[leaf] = value
  return cfglib.validate(c)


def build(c, spec=None):
  with nnx.use_eager_sharding(False):
    return Transformer(spec or cfglib.model_spec(c), V, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnames=("graphdef",), compiler_options=FAST_COMPILE)
def _loss_and_grads(graphdef, state, tokens_BxL, rng):
  def loss(state):
    out = nnx.merge(graphdef, state)(tokens_BxL[:, :-1], train=True, rng=rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens_BxL[:, 1:]).mean()
    router_loss = sum((a["router_loss"] for a in out.moe_aux), jnp.float32(0.0))
    return ce + router_loss, (out.logits, out.moe_aux)

  (loss_value, (logits, moe_aux)), grads = jax.value_and_grad(loss, has_aux=True)(state)
  return {"loss": loss_value, "logits": logits, "moe_aux": moe_aux, "grads": grads}


@pytest.fixture(scope="module")
def step_of():
  """step_of(kind, **keys): loss, logits, moe_aux and gradients of one
  training forward of that model (the same init and batch), computed once."""
  done = {}

  def get(kind, **keys):
    key = (kind, tuple(sorted(keys.items())))
    if key not in done:
      graphdef, state = nnx.split(build(config(kind, **keys)))
      out = _loss_and_grads(graphdef, state, TOKENS_BxL, jax.random.key(7))
      done[key] = jax.tree.map(np.asarray, out)
    return done[key]

  return get


def per_layer(out: dict) -> dict:
  """{name: array} of a step's outputs, the gradients by per-layer names
  (params.per_layer: a scanned model's are stacked)."""
  flat = {
    paramslib.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(out["grads"])[0]
  }
  grads = paramslib.per_layer(flat, paramslib.layout_of({p: x.shape for p, x in flat.items()}))
  # moe_aux by layer: a scanned model's keeps its scanned layers' stacked (LayerAux).
  rest = {k: v for k, v in out.items() if k != "grads"} | {
    "moe_aux": list(map(dict, out["moe_aux"]))
  }
  rest = jax.tree_util.tree_flatten_with_path(rest)[0]
  return {
    **{jax.tree_util.keystr(p): x for p, x in rest},
    **{f"grads/{p}": x for p, x in grads.items()},
  }


def assert_same(got, want):
  flat_want, flat_got = per_layer(want), per_layer(got)
  assert list(flat_got) == list(flat_want)  # the same terms, in layer order
  for path, x in flat_got.items():
    np.testing.assert_allclose(x, flat_want[path], err_msg=path, **TOL)


@pytest.mark.parametrize("kind", ["switch", "mixtral"])
@pytest.mark.parametrize("remat", ["full", "dots", "moe"])
def test_remat_keeps_loss_router_losses_and_gradients(step_of, kind, remat):
  assert_same(step_of(kind, **{"train.remat": remat}), step_of(kind))


def test_scan_plan_leaves_first_dense_layers_and_the_remainder_out():
  assert scan_plan(cfglib.model_spec(config("dense"))) == (0, 1, 2)
  assert scan_plan(cfglib.model_spec(config("mixtral"))) == (0, 1, 2)
  # Layer 0 before, (1, 2) and (3, 4) scanned, layer 5 after.
  assert scan_plan(cfglib.model_spec(config("switch"))) == (1, 2, 2)


@pytest.mark.parametrize("kind", ["dense", "mixtral", "switch"])
def test_scanned_layers_give_the_unscanned_model(step_of, kind):
  assert_same(step_of(kind, **{"model.scan_layers": True}), step_of(kind))


def test_remat_applies_to_the_scanned_body(step_of):
  got = step_of("switch", **{"model.scan_layers": True, "train.remat": "moe"})
  assert_same(got, step_of("switch"))


def _temp_bytes(c) -> int:
  graphdef, abs_state, _ = statelib.abstract_state(c, V)
  B, L = c.data.batch_size, c.data.seq_len
  batch = {
    "inputs": jax.ShapeDtypeStruct((B, L), jnp.int32),
    "targets": jax.ShapeDtypeStruct((B, L), jnp.int32),
    "weights": jax.ShapeDtypeStruct((B, L), jnp.float32),
  }
  step = jax.ShapeDtypeStruct((), jnp.int32)
  lowered = jax.jit(statelib.train_step(c, graphdef)).lower(abs_state, batch, step)
  return lowered.compile(FAST_COMPILE).memory_analysis().temp_size_in_bytes


def test_full_remat_needs_fewer_temporary_bytes():
  """The train step of a 4-layer MoE model at 4 x 64 tokens: full remat keeps
  each block's input only (7.6 MB -> 3.3 MB of temporaries here). Scanned:
  XLA:CPU drops the optimization barriers that keep unscanned blocks'
  recomputation apart from their forward, and merges the two again (the same
  temporaries with remat or without); a scan's backward loop cannot."""
  keys = {
    "model.num_layers": 4,
    "model.moe.first_dense_layers": 0,
    "model.scan_layers": True,
    "data.seq_len": 64,
    "data.batch_size": 4,
  }
  none = _temp_bytes(config("switch", **keys))
  full = _temp_bytes(config("switch", **keys, **{"train.remat": "full"}))
  assert full < 0.75 * none, (full, none)


def _logits(model):
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, TOKENS_BxL))


@functools.partial(jax.jit, static_argnames=("graphdef",), compiler_options=FAST_COMPILE)
def _forward(graphdef, state, tokens_BxL):
  return nnx.merge(graphdef, state)(tokens_BxL).logits


def _per_layer_leaves(state) -> dict:
  """{per-layer path: numpy array} of every leaf of a train state, model and
  optimizer (params.per_layer: a scanned state's stacked leaves cut per layer)."""
  flat = {
    paramslib.path_str(kp): np.asarray(x)
    for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]
  }
  return paramslib.per_layer(flat, paramslib.layout_of({p: x.shape for p, x in flat.items()}))


def test_scanned_layers_are_stored_stacked_and_named_per_layer():
  """Scanned, the super-blocks' parameters are one array per position ([repeats,
  ...], a leading logical axis that no mesh axis shards), drawn as the
  unscanned model's (the same values for the same seed); by per-layer names
  (params.per_layer) the two states, the parameter list inspect counts and its
  summary are the same."""
  scanned, unscanned = (config("switch", **{"model.scan_layers": on}) for on in (True, False))
  flat = lambda model: {
    paramslib.path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))
  }
  s, u = flat(build(scanned)), flat(build(unscanned))
  # Layer 0 (first_dense_layers) and 5 (the remainder) per layer; 1-4 stacked.
  assert {p.split("/")[1] for p in s if p.startswith("blocks/")} == {"0", "5"}
  assert s["scan/0/attn/wq"].shape == (2, *u["blocks/1/attn/wq"].shape)
  assert s["scan/1/ffn/wi"].shape == (2, *u["blocks/2/ffn/wi"].shape)
  got = paramslib.per_layer(s, paramslib.layout_of({p: x.shape for p, x in s.items()}))
  assert list(got) == list(u)
  for p in u:
    np.testing.assert_array_equal(got[p], u[p], err_msg=p)
  abs_scanned, abs_unscanned = (statelib.abstract_model(c, V) for c in (scanned, unscanned))
  assert paramslib.param_list(abs_scanned) == paramslib.param_list(abs_unscanned)
  assert inspectlib.summarize(scanned, V) == inspectlib.summarize(unscanned, V)
  fsdp = {"mesh": (("data", 1), ("fsdp", 8), ("expert", 1), ("tensor", 1))}
  c = config("switch", **{"model.scan_layers": True, "data.batch_size": 8, **fsdp})
  mesh = sharding.make_mesh(c)
  with sharding.use(mesh, c):
    _, abs_state, shd = statelib.abstract_state(c, V, mesh)
  names = paramslib.logical_names(abs_state)
  specs = {paramslib.path_str(kp): x.spec for kp, x in jax.tree_util.tree_flatten_with_path(shd)[0]}
  assert names["scan/0/attn/wq"] == (None, *names["blocks/0/attn/wq"])
  assert specs["0/scan/0/attn/wq"] == P(None, *specs["0/blocks/0/attn/wq"])
  assert specs["0/blocks/0/attn/wq"][0] == "fsdp"  # the per-layer axes stay sharded


def test_checkpoint_restores_with_scan_layers_on_or_off(tmp_path):
  """On disk a checkpoint keeps its run's layout: saved scanned (stacked),
  resumed unscanned (the trainer's restore_latest), saved again and restored
  scanned (restore_step); every leaf, the optimizer's included, comes back
  by its per-layer name, bit for bit."""
  scanned, unscanned = (config("switch", **{"model.scan_layers": on}) for on in (True, False))
  # What a resumed run compares (checkpoint.check_resume): the same tree.
  assert statelib.state_tree(scanned, V) == statelib.state_tree(unscanned, V)
  with nnx.use_eager_sharding(False):
    model, opt = statelib.create(scanned, V)
  train_graphdef, state = nnx.split((model, opt))
  keys = iter(jax.random.split(jax.random.key(5), 1000))  # moments and bias not at init
  noise = lambda x: x + jax.random.normal(next(keys), x.shape) if x.dtype == jnp.float32 else x
  state = jax.tree.map(noise, state)
  want, logits = _per_layer_leaves(state), _logits(nnx.merge(train_graphdef, state)[0])
  for step, c in enumerate((unscanned, scanned), 1):
    ckpt = ckptlib.Checkpointer(str(tmp_path), say=lambda *a: None)
    ckpt.save(step, state, {"batches": step})
    ckpt.close()
    graphdef, abs_state, shd = statelib.abstract_state(c, V)
    ckpt = ckptlib.Checkpointer(str(tmp_path), read_only=True)
    if step == 1:
      assert ckpt.restore_latest(ckptlib.target(abs_state, shd))[2] == {"batches": 1}
    _, state = ckpt.restore_step(step, ckptlib.target(abs_state, shd))
    ckpt.close()
    got = _per_layer_leaves(state)
    assert list(got) == list(want)
    for p in want:
      np.testing.assert_array_equal(got[p], want[p], err_msg=p)
    restored = nnx.merge(graphdef, state)[0]
    assert restored.m.scan_layers is c.model.scan_layers
    np.testing.assert_allclose(_logits(restored), logits, **TOL)


def test_export_and_init_from_of_a_scanned_run_equal_the_unscanned_runs(tmp_path):
  """A run saved scanned: its Hugging Face export is, byte for byte, the
  export of the same parameters saved unscanned (convert reads them by
  per-layer names); load_model reads each run into the other's layout;
  train.init_from reads the per-layer names it asks for from it
  (param_metadata, read_params cut the stacked arrays) into an unscanned run."""
  from sparse_lm import convert  # pylint: disable=g-import-not-at-top
  from sparse_lm import finetune  # pylint: disable=g-import-not-at-top

  runs = {}
  for on in (False, True):
    c = config("mixtral", **{"model.scan_layers": on, "data.tokenizer": "byte"})
    Vb, wd = statelib.vocab_size_of(c), str(tmp_path / f"scan_{on}")
    graphdef, abs_state, shd = statelib.abstract_state(c, Vb)
    with nnx.use_eager_sharding(False):
      state = nnx.state(statelib.create(c, Vb))
    ckpt = ckptlib.Checkpointer(wd, say=lambda *a: None)
    ckpt.save(3, state, {"batches": 0})
    ckpt.close()
    ckptlib.save_config(c, wd, {})
    convert.export_checkpoint(wd, str(tmp_path / f"hf_{on}"), say=lambda *a: None)
    runs[on] = wd
  for name in ("model.safetensors", "config.json"):
    a, b = ((tmp_path / f"hf_{on}" / name).read_bytes() for on in (False, True))
    assert a == b, name
  meta = {on: ckptlib.param_metadata(runs[on], 3) for on in (False, True)}
  assert meta[True] == meta[False]
  # load_model (decoding, evaluation) of either run under the other's layout.
  loaded = []
  for on in (False, True):
    other = ckptlib.read_config(runs[not on])
    model = statelib.load_model(runs[on], config=other)[0]
    loaded.append(_per_layer_leaves(nnx.state(model)))
    assert ("scan" in nnx.state(model)) is other.model.scan_layers
  for p in loaded[0]:
    np.testing.assert_array_equal(loaded[0][p], loaded[1][p], err_msg=p)
  c = config("mixtral", **{"data.tokenizer": "byte"})
  c.train.init_from = runs[True]
  _, abs_state, _ = statelib.abstract_state(c, Vb)
  with nnx.use_eager_sharding(False):
    fresh = nnx.state(statelib.create(config("mixtral", **{"train.seed": 1}), Vb))
  state, report = finetune.init_from(c, fresh, abs_state)
  assert set(report.how.values()) == {f"copied from {p}" for p in report.how}
  with nnx.use_eager_sharding(False):
    want = _per_layer_leaves(nnx.state(statelib.create(c, Vb)))
  got = _per_layer_leaves(state)
  for p in want:
    if p.startswith("0/"):
      np.testing.assert_array_equal(got[p], want[p], err_msg=p)


def _mixtral_run(tfds_dir, workdir, steps, *overrides) -> dict[int, float]:
  """The trainer end to end, in this process: configs/mixtral.py:tiny at
  TINY's sizes, logging every step; its train losses by step."""
  c = tiny_config(
    tfds_dir,
    f"train.num_steps={steps}",
    "train.log_every=1",
    "train.eval_batches=1",
    *overrides,
    config="configs/mixtral.py:tiny",
  )
  train.train_and_evaluate(c, str(workdir))
  return losses(str(workdir))


@pytest.fixture(scope="module")
def plain_mixtral(tmp_path_factory, tfds_dir):
  """The reference of the two tests below: 4 steps, unscanned, one microbatch."""
  return _mixtral_run(tfds_dir, tmp_path_factory.mktemp("plain"), 4)


def test_a_run_switches_scan_layers_when_it_resumes(tmp_path, tfds_dir, capsys, plain_mixtral):
  """The trainer end to end (in-process, configs/mixtral.py:tiny): 2 steps
  scanned, then resumed unscanned to step 4 (the checkpoint, stacked on disk,
  restores per layer; check_resume names the key and goes on): the losses are
  those of a run that was never scanned."""
  _mixtral_run(tfds_dir, tmp_path / "switched", 2, "model.scan_layers=True")
  switched = _mixtral_run(tfds_dir, tmp_path / "switched", 4, "model.scan_layers=False")
  assert (
    "resuming with a changed config: model.scan_layers: True -> False" in capsys.readouterr().out
  )
  plain = plain_mixtral
  assert sorted(switched) == sorted(plain) == [1, 2, 3, 4]
  np.testing.assert_allclose([switched[k] for k in plain], list(plain.values()), rtol=1e-5)


def test_a_run_with_microbatches_logs_the_same_losses(tmp_path, tfds_dir, plain_mixtral):
  # Issue 27: main --config=configs/mixtral.py:tiny --config.train.microbatches=4,
  # then =1, same seed: the same losses (in-process, as main runs it). (Here
  # beside the scan test: they share the microbatches=1 run.)
  a = _mixtral_run(tfds_dir, tmp_path / "mb4", 4, "train.microbatches=4")
  assert sorted(a) == sorted(plain_mixtral) == [1, 2, 3, 4]
  np.testing.assert_allclose(
    [a[k] for k in plain_mixtral], list(plain_mixtral.values()), rtol=1e-5, atol=1e-5
  )


def test_decoding_a_scanned_model_equals_its_full_forward():
  """Decoding runs the layers one by one (the same parameters); the full
  forward runs them scanned."""
  c = config("switch", **{"model.scan_layers": True})
  model = build(c, decode.inference_spec(cfglib.model_spec(c)))
  graphdef, state = nnx.split(model)
  tokens_BxL = TOKENS_BxL[:, :8]
  B, L = tokens_BxL.shape
  full = np.asarray(_forward(graphdef, state, tokens_BxL))
  cache, n = decode.init_cache(model.m, B, L), 5
  ones = jnp.ones((B, L), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  out = []
  for a, b in [(0, n)] + [(t, t + 1) for t in range(n, L)]:  # prefill, then one token a step
    logits, cache, _ = decode.forward(
      graphdef, state, tokens_BxL[:, a:b], ones[:, a:b], pos[:, a:b], cache
    )
    out.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(out, 1), full, rtol=1e-4, atol=1e-4)
  # The inference model's cast to a bfloat16 model.dtype: stacked or not, the
  # same parameters become bfloat16 (matrices) and stay float32 (vectors, routers).
  dtypes = []
  for on in (True, False):
    m = build(config("switch", **{"model.scan_layers": on, "model.dtype": "bfloat16"}))
    flat = {
      paramslib.path_str(p): v.get_value()
      for p, v in nnx.to_flat_state(nnx.state(decode.for_inference(m)))
    }
    per = paramslib.per_layer(flat, paramslib.layout_of({p: x.shape for p, x in flat.items()}))
    dtypes.append({p: x.dtype for p, x in per.items()})
  assert dtypes[0] == dtypes[1] and dtypes[0]["blocks/1/attn_norm/scale"] == jnp.float32


@pytest.mark.parametrize("moments_dtype", ["param", "float32"])
def test_bfloat16_params_train_a_step(moments_dtype):
  """model.param_dtype="bfloat16": every Param is bfloat16 (the router still
  computes in float32), a train step keeps them so; AdamW's moments are in the
  parameters' dtype as optax keeps them (it has a mu_dtype but no nu_dtype),
  or float32 with train.moments_dtype="float32", where the first moment after
  one step is (1 - b1) times the float32 cast of the bfloat16 gradient
  (clipping off), most of its values not representable in bfloat16. inspect
  counts the bytes of each."""
  c = config("mixtral", **{"model.param_dtype": "bfloat16", "train.warmup_steps": 0})
  c.train.moments_dtype, c.train.grad_clip = moments_dtype, 0.0
  with nnx.use_eager_sharding(False):
    model, opt = statelib.create(c, V)
  graphdef, state = nnx.split((model, opt))
  before = nnx.state(model, nnx.Param)
  assert {p.dtype for p in jax.tree.leaves(before)} == {jnp.dtype(jnp.bfloat16)}
  batch = {
    "inputs": TOKENS_BxL[:, :-1],
    "targets": TOKENS_BxL[:, 1:],
    "weights": jnp.ones((2, 16), jnp.float32),
  }
  step = jax.jit(statelib.train_step(c, graphdef), compiler_options=FAST_COMPILE)
  new_state, measurements = step(state, batch, jnp.int32(0))
  assert np.isfinite(float(measurements["loss"]))
  model, opt = nnx.merge(graphdef, new_state)
  after = nnx.state(model, nnx.Param)
  assert {p.dtype for p in jax.tree.leaves(after)} == {jnp.dtype(jnp.bfloat16)}
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))
  )
  moments = [
    leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(opt))[0]
    if re.search(r"\['(mu|nu)'\]", jax.tree_util.keystr(path))
  ]
  assert len(moments) == 2 * len(jax.tree.leaves(after))
  dtype = jnp.dtype(jnp.bfloat16 if moments_dtype == "param" else jnp.float32)
  assert {m.dtype for m in moments} == {dtype}
  if moments_dtype == "float32":
    grads = nnx.grad(lambda mdl: statelib.loss_fn(mdl, batch, train=True, rng=None)[0])(
      nnx.merge(graphdef, state)[0]
    )
    mu = [l for p, l in jax.tree_util.tree_flatten_with_path(nnx.state(opt))[0] if "'mu'" in str(p)]
    want = [(1 - c.train.b1) * g.astype(jnp.float32) for g in jax.tree.leaves(grads)]
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    for m, w in zip(mu, want):  # (this gradient is computed outside the step:
      np.testing.assert_allclose(m, w, rtol=2**-6, atol=1e-30)  # 2 bfloat16 ulps apart)
    rounded = sum(int(np.sum(np.asarray(m) != np.asarray(m.astype(jnp.bfloat16)))) for m in mu)
    assert rounded > sum(m.size for m in mu) // 2  # held with float32's mantissa
  summary = inspectlib.summarize(c, V)
  assert summary["param_bytes"] == 2 * summary["total_params"]
  assert summary["optimizer_bytes"] == 2 * dtype.itemsize * summary["total_params"]


@pytest.mark.parametrize(
  "key,value",
  [("model.scan_layers", None), ("model.param_dtype", "float16"), ("train.remat", "all")],
)
def test_a_bad_value_is_a_one_line_error_naming_the_key(key, value):
  with pytest.raises(ConfigError, match=re.escape(f"config.{key}={value!r}")) as e:
    config("dense", **{key: value})
  assert "\n" not in str(e.value)


def test_scanned_layers_refuse_adafactor():
  # Its update's RMS clipping and parameter scale are per array: a stacked
  # array mixes its layers' (parameters 5e-5 apart after one step at learning
  # rate 1e-2, measured), and its factored moments' placeholders are not per layer.
  with pytest.raises(
    ConfigError, match=r"config.model.scan_layers=True is invalid: with train.opt"
  ):
    config("dense", **{"model.scan_layers": True, "train.optimizer": "adafactor"})
