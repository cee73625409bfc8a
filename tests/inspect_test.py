"""inspect: published model sizes, counts equal to the real model's, FLOPs, the CLI."""

import importlib.util
import math
import os
import re
import subprocess
import sys

from flax import nnx
from helpers import in_process
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm import config as cfglib
from sparse_lm import inspect as inspectlib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.errors import ConfigError
from sparse_lm.errors import RunError
from sparse_lm.models import layers
from sparse_lm.models.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE_TINY = ["switch", "glam", "hierarchical", "nllb_moe:lm_tiny", "mixtral", "dbrx", "deepseek_moe"]


def load(spec: str):
  """'configs/x.py:variant' -> the validated config."""
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location(
    os.path.basename(path)[:-3], os.path.join(ROOT, path)
  )
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return cfglib.validate(mod.get_config(arg))


def real_param_count(c) -> int:
  with nnx.use_eager_sharding(False):
    model = Transformer(cfglib.model_spec(c), statelib.vocab_size_of(c), rngs=nnx.Rngs(0))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# (config, published total, published active)
PUBLISHED = [
  ("configs/mixtral.py:8x7b", 46.7e9, 12.9e9),  # Mixtral paper / model card
  ("configs/dbrx.py:132b", 132e9, 36e9),  # DBRX announcement
  ("configs/deepseek_moe.py:16b", 16.4e9, 2.8e9),  # DeepSeekMoE paper, table 2
  ("configs/glam.py:64b_64e", 1.2e12, 96.6e9),  # GLaM, Table 4
]


@pytest.mark.parametrize("spec,total,active", PUBLISHED)
def test_published_sizes(spec, total, active):
  s = inspectlib.summarize(load(spec))
  assert s["active_params"] == pytest.approx(active, rel=0.02)
  if spec.startswith("configs/glam.py"):
    # GLaM's table rounds the total to two digits; its own dims (64 layers,
    # d_model 8192, 128 heads of 128, GeGLU d_ff 32768, GELU experts, 256K
    # vocab) give 1.16T, which reproduces its 96.6B active exactly.
    assert round(s["total_params"] / 1e12, 1) == 1.2
    # No expert FFN reproduces both numbers within 2%: total - active is the 62
    # unchosen experts of each of the 32 MoE layers, fixed by d_model and d_ff,
    # and lies outside what both 2% bands allow for GELU (2 matrices: 1.065T)
    # and GeGLU (3 matrices: 1.598T) experts.
    m = load(spec).model
    lo, hi = 0.98 * total - 1.02 * active, 1.02 * total - 0.98 * active
    for matrices in (2, 3):
      gap = 32 * 62 * matrices * m.d_model * m.d_ff
      assert not lo <= gap <= hi, (matrices, gap, lo, hi)
  else:
    assert s["total_params"] == pytest.approx(total, rel=0.02)


@pytest.mark.parametrize(
  "spec", ["configs/dense.py:tiny", "configs/switch.py:tiny", "configs/deepseek_moe.py:tiny"]
)
def test_total_equals_the_real_models_parameter_count(spec):
  c = load(spec)
  assert inspectlib.summarize(c)["total_params"] == real_param_count(c)


def test_dense_counts_by_hand():
  c = load("configs/dense.py:tiny")
  m, V = c.model, c.data.vocab_size
  D, F, L = m.d_model, m.d_ff, m.num_layers
  per_layer = 4 * D * D + 2 * D * F + 2 * D  # attention, FFN, two norm scales
  s = inspectlib.summarize(c)
  assert s["total_params"] == s["active_params"] == L * per_layer + V * D + D
  fwd = 2 * (L * (4 * D * D + 2 * D * F) + V * D) + 4 * L * c.data.seq_len * D
  assert s["inference_flops_per_token"] == fwd
  assert s["train_flops_per_token"] == 3 * fwd
  assert s["param_bytes"] == 4 * s["total_params"]
  assert s["optimizer_bytes"] == 8 * s["total_params"]  # AdamW: mu and nu


@pytest.mark.parametrize("family", MOE_TINY)
def test_moe_active_fraction_from_the_expert_count(family):
  """Routed expert weights count k/E; everything else, shared experts too, counts fully."""
  family, _, variant = family.partition(":")  # nllb_moe's tiny is an encoder-decoder
  c = load(f"configs/{family}.py:{variant or 'tiny'}")
  m = cfglib.model_spec(c)
  moe = m.moe
  routed = (
    len(m.moe_layers)
    * moe.num_experts
    * (3 if layers.is_gated(moe.activation) else 2)
    * m.d_model
    * moe.d_ff
  )
  s = inspectlib.summarize(c)
  assert s["routed_expert_params"] == routed
  k = inspectlib.experts_per_token(m)
  assert s["total_params"] - s["active_params"] == round(routed * (1 - k / moe.num_experts))
  assert s["active_params"] < s["total_params"]


def test_switch_costs_dense_flops_plus_the_router():
  """Top-1 of experts as wide as the dense FFN: only the D x E router matmul is added."""
  dense, switch = load("configs/dense.py:tiny"), load("configs/switch.py:tiny")
  d, s = inspectlib.summarize(dense), inspectlib.summarize(switch)
  m = switch.model
  router = 2 * len(cfglib.model_spec(switch).moe_layers) * m.d_model * m.moe.num_experts
  assert s["inference_flops_per_token"] - d["inference_flops_per_token"] == router


def test_per_device_memory_follows_the_mesh():
  c = load("configs/mixtral.py:8x7b")  # FSDP: every Param has a d_model axis
  model = statelib.abstract_model(c)
  s = inspectlib.summarize(c, model=model)
  d = inspectlib.per_device(c, model, 8)
  assert d["mesh"]["fsdp"] == 8
  assert d["param_bytes"] == pytest.approx(s["param_bytes"] / 8, rel=1e-6)
  assert d["optimizer_bytes"] == pytest.approx(s["optimizer_bytes"] / 8, rel=1e-6)
  dense = load("configs/dense.py:tiny")  # data parallel: replicated
  d = inspectlib.per_device(dense, statelib.abstract_model(dense), 8)
  assert d["mesh"]["data"] == 8
  assert d["param_bytes"] == inspectlib.summarize(dense)["param_bytes"]


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "sparse_lm.inspect", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def test_cli_prints_both_configs_side_by_side(monkeypatch):
  # In this process (in_process: the program's flags, parser and main); the
  # test below runs the program as a process.
  r = in_process(
    [
      sys.executable,
      "-m",
      "sparse_lm.inspect",
      "--config=configs/mixtral.py:8x7b",
      "--compare=configs/dense.py:base",
      "--devices=8",
      "--compare.model.num_layers=6",
    ],
    monkeypatch=monkeypatch,
  )
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  header = re.split(r"\s{3,}", lines[0].strip())
  assert header == ["configs/mixtral.py:8x7b", "configs/dense.py:base**"], r.stdout
  rows = {k: v for k, *v in (re.split(r"\s{3,}", line.strip()) for line in lines[1:])}
  assert rows["total params"][0] == "46.70B", r.stdout
  assert rows["layers (MoE)"] == ["32 (32)", "6 (0)"], r.stdout
  assert rows["mesh"] == ["fsdp=8", "data=8"], r.stdout
  assert "** model.num_layers=6" in r.stdout


def test_cli_names_the_config_key_on_a_bad_device_count():
  r = _cli("--config=configs/mixtral.py:8x7b", "--devices=3")
  assert r.returncode != 0
  assert "configs/mixtral.py:8x7b" in r.stderr and "data.batch_size" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr


def test_import_and_export_host_peaks_are_one_parameter_at_a_time():
  """Mixtral 8x7B: the largest parameter, an expert array wi [8, 4096, 14336],
  sets both: the import holds it once (bfloat16); the export reads it
  (float32) into TensorStore's buffer and the array; each plus a fixed
  overhead (a block of rows, TensorStore's own)."""
  c = cfglib.load_config("configs/mixtral.py:8x7b")
  model = statelib.abstract_model(c)
  wi = 8 * 4096 * 14336
  fixed = inspectlib.CONVERT_OVERHEAD
  assert inspectlib.import_host_bytes(c, model) == wi * 2 + fixed
  assert inspectlib.export_host_bytes(c, model) == 2 * wi * 4 + fixed


# ------------------------------------------------------ --compile: XLA's bytes


def _shard_bytes(tree) -> int:
  """Bytes one device holds of abstract arrays with shardings."""
  return sum(
    math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree)
  )


def test_compile_rows_on_8_devices_are_xlas_bytes_of_the_real_steps():
  """Mixtral tiny, one layer, on 8 simulated devices as data 2 x expert 4
  (the all-to-all path): both steps compile, XLA's argument bytes per device
  are the shards of the state and the batch the step is given, the donated
  state is aliased to the new one, and the table has every row."""
  c = inspectlib.with_mesh(load("configs/mixtral.py:tiny"), "data=2,expert=4")
  c.model.num_layers = 1
  assert inspectlib.column(c, 8)["mesh"] == "data=2 expert=4"
  compiled = inspectlib.compile_rows(c, 8)  # what column(..., compile_steps=True) adds
  rows = inspectlib.compiled_column(c, compiled)
  _, (state, batch, n) = inspectlib.train_program(c, inspectlib.cpu_mesh(c, 8))
  s = compiled["train"]
  # jit drops the step number where nothing random reads it (no dropout, no jitter)
  assert s["arguments"] in (_shard_bytes((state, batch)), _shard_bytes((state, batch, n)))
  assert s["aliased"] == _shard_bytes(state)
  assert s["total"] == s["arguments"] + s["outputs"] - s["aliased"] + s["temporaries"] + s["code"]
  # The shards the analytic per-device rows count: float32 params + AdamW moments.
  d = inspectlib.per_device(c, statelib.abstract_model(c), 8)
  assert _shard_bytes(state) == pytest.approx(d["param_bytes"] + d["optimizer_bytes"], rel=0.01)
  for step in ("train", "decode"):
    for name, _ in inspectlib.COMPILED_ROWS:
      assert rows[f"{step} step: {name}"] not in ("", "n/a"), (step, name, rows)
  assert rows["decode step: batch x cache"] == f"{c.data.batch_size} x {c.data.seq_len}"
  assert rows["train step: total / device"] == inspectlib._bytes(s["total"])
  assert inspectlib.table({"tiny": rows}).count("\n") == len(rows)


def test_cli_compile_sets_its_own_device_count():
  """The one process of the CLI: --devices=4 with no XLA_FLAGS (the program
  asks JAX for 4 CPU devices itself before its first operation), --mesh."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "sparse_lm.inspect",
      "--config=configs/dense.py:tiny",
      "--compile",
      "--devices=4",
      "--mesh=fsdp=4",
      "--config.model.num_layers=1",
    ],
    cwd=ROOT,
    env=dict(env, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert r.returncode == 0, r.stderr
  rows = {k: v for k, *v in (re.split(r"\s{3,}", l.strip()) for l in r.stdout.splitlines()[1:])}
  assert rows["mesh"] == ["fsdp=4"], r.stdout
  for step in ("train", "decode"):
    assert re.fullmatch(r"[\d,.]+ [KMG]iB", rows[f"{step} step: total / device"][0]), r.stdout
  assert "--mesh=fsdp=4" in r.stdout and "model.num_layers=1" in r.stdout


def test_mesh_flag_is_checked():
  c = load("configs/mixtral.py:tiny")
  assert inspectlib.with_mesh(c, "fsdp=-1").mesh == (
    ("data", 1),
    ("fsdp", -1),
    ("expert", 1),
    ("tensor", 1),
  )
  with pytest.raises(ConfigError, match="--mesh='pipe=2'"):
    inspectlib.with_mesh(c, "pipe=2")


# ------------------------------------------------------ the fit check (train.py)


def _tiny_run():
  """A dense tiny config's mesh, abstract state and shardings, as train.py has them."""
  c = load("configs/dense.py:tiny")
  c.model.num_layers = 1
  mesh = sharding.make_mesh(c)
  V = statelib.vocab_size_of(c)
  with sharding.use(mesh, c):
    graphdef, abs_state, state_shd = statelib.abstract_state(c, V, mesh)
    batch_shd = sharding.named(mesh, "batch", "length")
  return c, mesh, V, graphdef, abs_state, state_shd, batch_shd


def _fake_step(state_shd, batch_shd, mib: int):
  """A cheap stand-in for the train step whose temporaries are about `mib` MiB."""
  repl = sharding.named(batch_shd.mesh)

  def step(state, batch, n):
    tmp = jnp.sin(jnp.arange(mib * 2**18, dtype=jnp.float32) + n)
    return state, {"loss": jnp.sum(tmp) + jnp.sum(batch["weights"])}

  return jax.jit(
    step,
    in_shardings=(state_shd, batch_shd, repl),
    out_shardings=(state_shd, repl),
    donate_argnums=0,
  )


def test_fit_check_refuses_in_one_line_naming_the_bytes_and_the_knobs():
  c, mesh, _, _, abs_state, state_shd, batch_shd = _tiny_run()
  step = _fake_step(state_shd, batch_shd, 64)
  # CPU with no limit given: the step is returned as it is, nothing compiled.
  assert inspectlib.check_fits(c, step, abs_state, state_shd, batch_shd) is step
  said = []
  with sharding.use(mesh, c), pytest.raises(RunError) as e:
    inspectlib.check_fits(
      c, step, abs_state, state_shd, batch_shd, None, said.append, bytes_limit=32 * 2**20
    )
  msg = str(e.value)
  assert "\n" not in msg and "device has 32.00 MiB" in msg, msg
  need = re.search(r"needs ([\d,.]+ [KMG]iB) per device", msg)
  assert need and need.group(1) in said[0], (msg, said)
  assert "config.mesh" in msg and "data.batch_size" in msg and "--compile" in msg, msg
  for knob in ("remat", "microbatches"):  # named where the config has the key
    assert (f"train.{knob}=" in msg) == (knob in c.train), msg
  with sharding.use(mesh, c):  # the same step fits 1 GiB
    inspectlib.check_fits(
      c, step, abs_state, state_shd, batch_shd, None, said.append, bytes_limit=2**30
    )


def test_fit_check_returns_the_compiled_train_step():
  """The first step does not compile again (the check did); a batch of other
  keys goes to the jitted step."""
  c, mesh, V, graphdef, abs_state, state_shd, batch_shd = _tiny_run()
  repl = sharding.named(mesh)
  step = jax.jit(
    statelib.train_step(c, graphdef),
    in_shardings=(state_shd, batch_shd, repl),
    out_shardings=(state_shd, repl),
    donate_argnums=0,
  )
  compiles = []
  count = lambda event, secs, **kw: compiles.append(event)
  with sharding.use(mesh, c):
    fitted = inspectlib.check_fits(
      c, step, abs_state, state_shd, batch_shd, None, lambda _: None, bytes_limit=2**40
    )
    state = jax.jit(lambda: nnx.state(statelib.create(c, V)), out_shardings=state_shd)()
    toks = np.random.default_rng(0).integers(0, V, (c.data.batch_size, c.data.seq_len + 1))
    batch = {
      "inputs": jax.device_put(toks[:, :-1].astype(np.int32), batch_shd),
      "targets": jax.device_put(toks[:, 1:].astype(np.int32), batch_shd),
      "weights": jax.device_put(np.ones(toks[:, 1:].shape, np.float32), batch_shd),
    }
    step0 = jnp.int32(0)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
      state, meas = fitted(state, batch, step0)
      assert np.isfinite(float(meas["loss"]))
    finally:
      jax.monitoring.unregister_event_duration_listener(count)
    assert "/jax/core/compile/backend_compile_duration" not in compiles
    fake = _fake_step(state_shd, batch_shd, 1)
    fitted = inspectlib.check_fits(
      c, fake, abs_state, state_shd, batch_shd, None, lambda _: None, bytes_limit=2**40
    )
    fitted(state, {**batch, "mask": batch["weights"]}, step0)  # compiled would raise
