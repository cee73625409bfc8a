"""Fine-tuning: init_from by name rules, sparse upcycling against the dense model,
frozen parameters, instruction data (packing, response-only loss), routing drift.

Every equality is against a reference computed another way: the upcycled MoE
against the dense model's own forward, packed examples against each example
run alone, frozen parameters bit for bit against their initial values.
"""

import json
import os
import signal
import subprocess
import sys

from flax import nnx
from helpers import cli
from helpers import in_process
from helpers import losses
from helpers import one_line_error
from helpers import rows
from helpers import run
from helpers import saved_steps
from helpers import start_until_step
import jax
import numpy as np
import pytest

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib
from sparse_lm import finetune
from sparse_lm import inspect as inspectlib
from sparse_lm import params as paramslib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm import train
from sparse_lm.errors import ConfigError
from sparse_lm.models.moe import routing

V = 64


def fresh_state(c):
  """The config's initial train state on one device, built eagerly: its ops
  compile once for the module (a jit of create compiled ~15 s per config),
  and no test depends on the fresh values beyond their being random."""
  with nnx.use_eager_sharding(False):
    return nnx.state(statelib.create(c, V))


def dense_config(**model):
  c = cfglib.base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff, m.activation = 32, 4, 4, 48, "swiglu"
  for k, v in model.items():
    m[k] = v
  c.data.batch_size, c.data.seq_len = 8, 16
  return c


def moe_config(router, top_k=2, E=4, **moe):
  """The dense config with MoE FFNs in layers 1 and 3 (a mixed dense / MoE stack),
  experts as wide as the dense FFN, no dropped tokens."""
  c = dense_config()
  m = c.model.moe
  m.num_experts, m.router, m.top_k, m.dispatch = E, router, top_k, "dropless"
  m.every, m.offset = 2, 1
  for k, v in moe.items():
    m[k] = v
  return cfglib.validate(c)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  """A dense 'run': its state saved by the Checkpointer (real Orbax), weights
  trained by a few random SGD-like perturbations so that nothing is at init."""
  wd = str(tmp_path_factory.mktemp("dense"))
  c = cfglib.validate(dense_config())
  _, abs_state, shd = statelib.abstract_state(c, V)
  state = fresh_state(c)
  noise = lambda x, k: x + 0.05 * jax.random.normal(k, x.shape, x.dtype) if x.ndim else x
  keys = iter(jax.random.split(jax.random.key(9), 1000))
  state = jax.tree.map(lambda x: noise(x, next(keys)), state)
  ckpt = ckptlib.Checkpointer(wd, keep=2, say=lambda *a: None)
  ckpt.save(7, state, {"batches": 0})
  ckpt.close()
  ckptlib.save_config(c, wd, {})
  return wd, c


def logits_of(c, state):
  graphdef, _, _ = statelib.abstract_state(c, V)
  model = nnx.merge(graphdef, state)[0]
  toks = jax.random.randint(jax.random.key(3), (2, 16), 0, V)
  with jax.default_matmul_precision("highest"):
    return np.asarray(model(toks)[0]), model


def upcycled(c, source, mesh=None):
  """(logits, model, report) of config c initialised from `source`."""
  c.train.init_from = source
  c = cfglib.validate(c)
  if mesh is None:
    _, abs_state, shd = statelib.abstract_state(c, V)
    state = fresh_state(c)
    state, report = finetune.init_from(c, state, abs_state)
    return (*logits_of(c, state), report)
  state = fresh_state(c)
  with sharding.use(mesh, c):
    graphdef, abs_state, shd = statelib.abstract_state(c, V, mesh)
    # Placed as the trainer's jit(create, out_shardings=shd) places it (the
    # trees differ only in the Variables' eager_sharding metadata).
    leaves, want = jax.tree.leaves(state), jax.tree.leaves(abs_state)
    assert [x.shape for x in leaves] == [a.shape for a in want]
    state = jax.tree.unflatten(
      jax.tree.structure(shd), [jax.device_put(x, d) for x, d in zip(leaves, jax.tree.leaves(shd))]
    )
    state, report = finetune.init_from(c, state, abs_state)
    toks = jax.random.randint(jax.random.key(3), (8, 16), 0, V)
    with jax.default_matmul_precision("highest"):
      out = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)[0](t)[0])(state, toks))
  return out[:2], None, report


def dense_model(dense_run):
  """(logits, model) of the dense run's checkpoint."""
  wd, c = dense_run
  _, abs_state, shd = statelib.abstract_state(c, V)
  ckpt = ckptlib.Checkpointer(wd, read_only=True)
  _, state = ckpt.restore_step(None, ckptlib.target(abs_state, shd))
  ckpt.close()
  return logits_of(c, state)


@pytest.fixture(scope="module")
def dense_ref(dense_run):
  """dense_model(dense_run), restored and run once for the module's tests."""
  return dense_model(dense_run)


# Routers whose gates sum to 1 per token: the upcycled model equals the dense one.
EQUAL = [
  ("mixtral", {}),
  ("topk", {"normalize_gates": True}),
  ("sigmoid_bias", {"normalize_gates": True}),
  ("group_limited", {"num_groups": 2, "top_k_groups": 1}),
  ("hierarchical", {"num_groups": 2, "top_k_groups": 1}),
]


@pytest.mark.parametrize("router,kw", EQUAL, ids=[r for r, _ in EQUAL])
def test_upcycled_moe_equals_the_dense_model_at_step_0(dense_run, dense_ref, router, kw):
  want = dense_ref[0]
  got, model, report = upcycled(moe_config(router, **kw), dense_run[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Every expert is a copy of its layer's dense MLP; the router is new.
  how = report.how
  assert how["blocks/1/ffn/wi"].startswith("copied into every expert from blocks/1/ffn/wi")
  assert how["blocks/1/ffn/router"] == "fresh" and how["blocks/0/ffn/wi"].startswith("copied from")
  fresh = sorted(p for p, h in how.items() if h == "fresh")  # the routers, and only they
  assert fresh and all("router" in p.split("/")[-1] for p in fresh), fresh
  assert f"fresh ({len(fresh)}): " in report.line(), report.line()
  wi = np.asarray(model.blocks[3].ffn.wi[...])
  np.testing.assert_array_equal(wi[0], wi[-1])


def test_gates_that_do_not_sum_to_one_need_the_gate_scale(dense_run, dense_ref):
  # Switch's gate is p (eq. 2) and unnormalised top-k's the chosen probabilities:
  # the copies' output is scaled down. init_gate_scale="expected" multiplies each
  # copy's output projection by 1 / (the gates' sum at uniform routing), which is
  # exact only when the router is zero (every logit equal, init_router="zero");
  # with a fresh router the chosen gates differ from token to token
  # (test_upcycle_recipes_start_at_the_dense_model measures the gap; it covers
  # Switch, this test unnormalised top-k).
  router, kw = "topk", {"normalize_gates": False}
  want = dense_ref[0]
  c = moe_config(router, **kw)
  got, model, _ = upcycled(c, dense_run[0])
  assert np.abs(got - want).max() > 1e-2  # without the scale: not the dense model
  c = moe_config(router, **kw)
  c.train.init_gate_scale, c.train.init_router = "expected", "zero"
  got, model, report = upcycled(c, dense_run[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert report.how["blocks/1/ffn/router"] == "zero"
  assert not np.any(np.asarray(model.blocks[1].ffn.router[...]))


def test_upcycle_recipes_start_at_the_dense_model(dense_run, dense_ref):
  """Each recipe of configs/finetune/upcycle.py, applied to the small mixed
  stack: its step-0 logits against the dense model's (max abs difference).
  The recipe is function-preserving exactly when the router table says its
  gates sum to gate_mass for any logits, or the router starts at zero; the
  fresh-router Switch recipe is not (its chosen gate is above 1/E)."""
  upcycle = cfglib.load_module("configs/finetune/upcycle.py")
  want, gaps = dense_ref[0], {}
  for name in ("mixtral", "switch", "switch_fresh"):
    c = upcycle.apply_recipe(moe_config("mixtral"), name)
    router = routing.ROUTERS[c.model.moe.router]
    exact = router.fixed_gate_sum(c.model.moe) or c.train.init_router == "zero"
    got, _, _ = upcycled(c, dense_run[0])
    gaps[name] = float(np.abs(got - want).max())
    assert (gaps[name] < 1e-5) == exact, (name, gaps)
  assert gaps["switch_fresh"] > 1e-2, gaps
  print("step-0 max |logits - dense logits|:", gaps)


@pytest.mark.parametrize("router", ["mixtral", "switch"])
def test_upcycling_onto_an_expert_parallel_mesh(dense_run, dense_ref, router):
  # The source was saved on one device; the MoE is placed on data 2 x fsdp 2 x expert 2.
  # Switch with the gate scale and a zero router: the scale was once read from a
  # name the sharded branch overwrote (the study's upcycle run failed on it).
  c = moe_config(router, **({"top_k": 1} if router == "switch" else {}))
  if router == "switch":
    c.train.init_gate_scale, c.train.init_router = "expected", "zero"
  c.mesh = (("data", 2), ("fsdp", 2), ("expert", 2), ("tensor", 1))
  mesh = sharding.make_mesh(c, jax.devices()[:8])
  got, _, _ = upcycled(c, dense_run[0], mesh)
  np.testing.assert_allclose(got, dense_ref[0], rtol=1e-5, atol=1e-5)


def test_drop_upcycling_reinitialises_a_fraction_per_expert(dense_run, dense_ref):
  c = moe_config("mixtral")
  c.train.init_reinit_fraction = 0.25
  _, model, _ = upcycled(c, dense_run[0])
  wi, wo = np.asarray(model.blocks[1].ffn.wi[...]), np.asarray(model.blocks[1].ffn.wo[...])
  dense = dense_ref[1].blocks[1].ffn
  F = wi.shape[-1]
  copied = [(wi[e] == np.asarray(dense.wi[...])).all(0) for e in range(4)]  # [F] per expert
  for e in range(4):
    assert (~copied[e]).sum() == round(0.25 * F), (~copied[e]).sum()
    # The same hidden units of wo (rows) are fresh as of wi (columns).
    np.testing.assert_array_equal(~(wo[e] == np.asarray(dense.wo[...])).all(1), ~copied[e])
  assert len({tuple(np.flatnonzero(~m)) for m in copied}) == 4  # a different subset each


def test_upcycling_into_scanned_layers_and_freezing_them(dense_run, dense_ref):
  """model.scan_layers stores the layers stacked (sparse_lm/params.py):
  init_from fills their rows by per-layer names, so the upcycled model equals
  the dense one and Drop-Upcycling gives the unscanned run's values (its fresh
  units cut from the stacked init). train.frozen judges a stacked array by its
  layers' names: a rule that names all of them freezes it, one that names some
  is a one-line error."""

  def scanned_moe(on):
    c = moe_config("mixtral")
    c.model.scan_layers = on
    return c

  got, model, report = upcycled(scanned_moe(True), dense_run[0])
  np.testing.assert_allclose(got, dense_ref[0], rtol=1e-5, atol=1e-5)
  assert "scan" in nnx.state(model) and report.how["blocks/3/ffn/wi"].startswith(
    "copied into every expert from blocks/3/ffn/wi"
  )
  states = []
  for scan in (False, True):
    c = scanned_moe(scan)
    c.train.init_from, c.train.init_reinit_fraction = dense_run[0], 0.25
    c = cfglib.validate(c)
    state, _ = finetune.init_from(c, fresh_state(c), statelib.abstract_state(c, V)[1])
    flat = {paramslib.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    states.append(paramslib.per_layer(flat, paramslib.state_layout(state)))
  assert list(states[0]) == list(states[1])
  for p in states[0]:
    np.testing.assert_array_equal(states[0][p], states[1][p], err_msg=p)
  c = scanned_moe(True)
  c.train.frozen = r"blocks/[02]/attn/.*"  # layers 0 and 2: all the rows of scan/0/attn
  _, abs_state, _ = statelib.abstract_state(cfglib.validate(c), V)
  opt = {paramslib.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(abs_state[1])[0]}
  assert not any("scan/0/attn/" in p for p in opt) and any("scan/1/attn/" in p for p in opt)
  c.train.frozen = r"blocks/0/attn/.*"
  with pytest.raises(ConfigError, match=r"freezes blocks/0/attn/wk.* but not the other") as e:
    statelib.abstract_state(cfglib.validate(c), V)
  assert "\n" not in str(e.value) and "model.scan_layers=False" in str(e.value)


def test_growing_experts_tiles_them(dense_run, tmp_path):
  src = str(tmp_path / "moe4")
  c4 = moe_config("mixtral")
  state = fresh_state(c4)
  ckpt = ckptlib.Checkpointer(src, keep=1, say=lambda *a: None)
  ckpt.save(1, state, {"batches": 0})
  ckpt.close()
  c8 = moe_config("mixtral", E=8)
  c8.train.init_rules = ((r".*/ffn/router", None),)
  _, model, report = upcycled(c8, src)
  assert report.how["blocks/1/ffn/wi"].startswith("tiled over the experts")
  wi = np.asarray(model.blocks[1].ffn.wi[...])
  np.testing.assert_array_equal(wi[:4], wi[4:])


@pytest.mark.parametrize(
  "rules,source,needle",
  [
    (((r"nothing/.*", None),), None, "matches no parameter"),
    (((r"blocks/(\d+)/ffn/router", r"blocks/\1/ffn/gate"),), None, "does not have"),
    ((), "missing", "holds no run's checkpoints"),
    ((), ":3", "has no step 3"),
  ],
)
def test_bad_init_from_is_a_one_line_error(dense_run, rules, source, needle):
  c = moe_config("mixtral")
  c.train.init_rules = rules
  src = dense_run[0] if source is None else dense_run[0] + source
  with pytest.raises(ConfigError, match=needle) as e:
    upcycled(c, src)
  assert "\n" not in str(e.value)


def test_a_shape_mismatch_names_both_paths_and_shapes(dense_run):
  c = dense_config(d_ff=96)
  with pytest.raises(ConfigError) as e:
    upcycled(cfglib.validate(c), dense_run[0])
  msg = str(e.value)
  assert "blocks/0/ffn/wg (32, 96)" in msg and "blocks/0/ffn/wg (32, 48)" in msg


# ------------------------------------------------------------------ frozen


@pytest.mark.parametrize("frozen", [":experts", ":router", ":non_experts", r"blocks/0/attn/.*"])
def test_frozen_parameters_have_no_optimizer_state(frozen):
  c = moe_config("mixtral")
  nbytes = lambda s: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s))
  graphdef, base, _ = statelib.abstract_state(c, V)
  before = inspectlib.summarize(c, V)["optimizer_bytes"]
  c.train.frozen = frozen
  _, abs_state, _ = statelib.abstract_state(cfglib.validate(c), V)
  is_frozen = finetune.frozen_predicate(frozen)
  params = paramslib.param_list(nnx.merge(graphdef, base)[0])
  frozen_bytes = sum(4 * int(np.prod(s)) for p, s, n in params if is_frozen(p, n))
  assert frozen_bytes > 0
  assert nbytes(base[1]) - nbytes(abs_state[1]) == 2 * frozen_bytes  # AdamW's mu and nu
  assert inspectlib.summarize(c, V)["optimizer_bytes"] == before - 2 * frozen_bytes


def test_frozen_parameters_are_bit_identical_after_training(base_run):
  # base_run trained 8 steps with train.frozen=":experts" (through the CLI).
  model, c, tok = statelib.load_model(base_run)
  assert c.train.frozen == ":experts"
  with nnx.use_eager_sharding(False):
    init = statelib.create(cfglib.validate(c), tok.vocab_size)[0]
  after, before = nnx.to_flat_state(nnx.state(model)), dict(nnx.to_flat_state(nnx.state(init)))
  changed = {"/".join(map(str, p)): not np.array_equal(v[...], before[p][...]) for p, v in after}
  assert not changed["blocks/1/ffn/wi"] and not changed["blocks/1/ffn/wo"]
  assert changed["blocks/1/ffn/router"] and changed["blocks/0/attn/wq"]


def test_a_frozen_regex_that_matches_nothing_is_refused(tmp_path, tfds_dir):
  c = cfglib.load_config("configs/dense.py:tiny")
  c.data.data_dir, c.data.vocab_size, c.data.batch_size = tfds_dir, 512, 8
  c.train.frozen = "no/such/param"
  wd = str(tmp_path / "nothing")
  with pytest.raises(ConfigError, match="freezes no parameter"):
    train.train_and_evaluate(c, wd)
  assert not os.path.exists(os.path.join(wd, "config.json"))


# ------------------------------------------------------------------ end to end


def instruction_file(path, n=64):
  lines = [
    {"prompt": f"# add {i}\ndef f{i}(x):\n", "response": f"  return x + {i}\n"} for i in range(n)
  ]
  path.write_text("".join(json.dumps(e) + "\n" for e in lines))
  return str(path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tfds_dir):
  """An 8-step Switch run through the CLI, its experts frozen: the run the
  frozen test checks, and the base the fine-tuning tests start from."""
  wd = str(tmp_path_factory.mktemp("base") / "switch")
  p = run(
    cli(
      wd,
      tfds_dir,
      "--config.train.num_steps=8",
      "--config.train.frozen=:experts",
      config="configs/switch.py:tiny",
    )
  )
  assert p.returncode == 0, p.stderr[-3000:]
  return wd


def sft_args(data, base, *more):
  return [
    f"--config.data.dataset=sft:{data}",
    f"--config.data.eval_split={data}",
    "--config.data.tokenizer_dataset=stdlib",
    f"--config.train.init_from={base}",
    "--config.train.log_every=1",
    "--config.train.eval_every=8",
    "--config.train.checkpoint_every=4",
    "--config.train.num_steps=16",
    *more,
  ]


def test_finetuning_resumes_exactly_after_kill_and_logs_routing_drift(
  tmp_path, tfds_dir, base_run, monkeypatch
):
  data = instruction_file(tmp_path / "sft.jsonl")
  ref = str(tmp_path / "ref")
  p = run(cli(ref, tfds_dir, *sft_args(data, base_run), config="configs/switch.py:tiny"))
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"init from {base_run} step 8: copied (" in p.stdout and "fresh" not in p.stdout
  evals = [r for r in rows(ref) if "eval_loss" in r]
  assert evals and all(r["drift/mean/kl"] >= 0 and "drift/layer1/kl_response" in r for r in evals)
  assert evals[-1]["drift/mean/kl"] > 0  # the router moved while tuning
  # kill -9 mid-run; the base run is moved away: the run resumes itself, exactly.
  wd = str(tmp_path / "killed")
  args = cli(wd, tfds_dir, *sft_args(data, base_run), config="configs/switch.py:tiny")
  proc = start_until_step(
    args, wd, 6, saved=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 4 <= max(losses(wd)) < 16 and saved_steps(wd)
  moved = base_run + "_moved"
  os.rename(base_run, moved)
  try:
    p = run(args)
  finally:
    os.rename(moved, base_run)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resumed from" in p.stdout and "init from" not in p.stdout
  assert losses(wd) == losses(ref)
  assert [r.get("drift/mean/kl") for r in rows(wd)] == [r.get("drift/mean/kl") for r in rows(ref)]
  # evaluate --compare_routing reports the drift from the base on the eval split.
  out = str(tmp_path / "eval.json")
  cmd = [sys.executable, "-m", "sparse_lm.evaluate", f"--workdir={ref}", f"--output={out}"]
  p = in_process(cmd + [f"--compare_routing={base_run}", "--batches=2"], monkeypatch=monkeypatch)
  assert p.returncode == 0, p.stderr[-3000:]
  drift = json.load(open(out))["routing_drift"]
  assert drift["drift/mean/kl"] > 0 and 0 <= drift["drift/layer1/top1_changed_response"] <= 1
  assert "routing drift from the base" in p.stdout


@pytest.mark.parametrize(
  "bad,needle",
  [
    ("line", "sft.jsonl:5: no string field 'response'"),
    ("source", "holds no run's checkpoints"),
    ("frozen", "config.train.frozen='nothing/here' is invalid: it freezes no parameter"),
    ("rule", "matches no parameter"),
  ],
)
def test_bad_finetuning_input_is_one_line_and_writes_nothing(
  tmp_path, tfds_dir, base_run, bad, needle, monkeypatch
):
  data = instruction_file(tmp_path / "sft.jsonl", n=4)
  if bad == "line":
    with open(data, "a") as f:
      f.write('{"prompt": "x"}\n')
  more = {
    "frozen": ["--config.train.frozen=nothing/here"],
    "rule": ["--config.train.init_rules=(('no/such/.*', None),)"],
  }.get(bad, [])
  wd = str(tmp_path / "wd")
  args = sft_args(data, base_run + ("_missing" if bad == "source" else ""), *more)
  args = cli(wd, tfds_dir, *args, config="configs/switch.py:tiny")
  one_line_error(in_process(args, monkeypatch=monkeypatch), needle)  # in this process
  assert not os.path.exists(os.path.join(wd, "config.json"))
  assert not os.path.isdir(os.path.join(wd, "checkpoints")) or not saved_steps(wd)


def test_init_data_continue_reads_the_sources_next_batch(tmp_path, tfds_dir, monkeypatch):
  """train.init_data="continue": a run started from A's step-4 checkpoint
  reads the batch A read at its step 5, so with A's parameters copied its
  first train loss is A's step-5 loss; and it is evaluated before its first
  update (its step-0 eval_loss is A's step-4 one). A different train.seed
  (another stream) is a one-line error naming the key, nothing written."""
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  common = ["--config.train.log_every=1", "--config.train.eval_every=2"]
  p = in_process(
    cli(a, tfds_dir, *common, "--config.train.num_steps=6", "--config.train.checkpoint_every=4"),
    monkeypatch=monkeypatch,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert 4 in saved_steps(a)
  follow = [*common, f"--config.train.init_from={a}:4", "--config.train.init_data=continue"]
  p = in_process(cli(b, tfds_dir, *follow, "--config.train.num_steps=1"), monkeypatch=monkeypatch)
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"continues {a}:4's stream at batch 4" in p.stdout, p.stdout[-2000:]
  at = lambda wd, step, key: next(r[key] for r in rows(wd) if r["step"] == step and key in r)
  np.testing.assert_allclose(at(b, 1, "train_loss"), at(a, 5, "train_loss"), rtol=1e-6)
  np.testing.assert_allclose(at(b, 0, "eval_loss"), at(a, 4, "eval_loss"), rtol=1e-6)
  c = str(tmp_path / "c")
  p = in_process(cli(c, tfds_dir, *follow, "--config.train.seed=1"), monkeypatch=monkeypatch)
  line = one_line_error(p, "config.train.init_data='continue' is invalid", "seed: 0 -> 1")
  assert "sparse_lm.main" in line and not os.path.exists(c)
