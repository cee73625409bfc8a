"""Helpers the test files share: `from helpers import ...` (conftest.py holds
only the fixtures and hooks; pytest advises against importing it).

conftest.py sets the simulated devices before jax is imported, and pytest
loads it before any test module, so importing this module from a test is safe.

  CLI runs     cli, endless, start, run, rows, losses, saved_steps,
               start_until_step, one_line_error, write_sweep
  In-process   in_process (a program's command line run in this process, as
               run() runs it in a child), tiny_config (cli()'s config),
               user_error (what cli.run prints for a UserError),
               backend_compiles, checkpoints_finite
  MoE layer    the layer sizes, model_cfg, build, flat_aux, and layer_grads
               (forward + gradients of sum(y * ct) under one jit)
"""

import ast
import contextlib
import functools
import io
import json
import os
import runpy
import subprocess
import sys
import textwrap
import time

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags as mlc_flags
import numpy as np
import pytest

from sparse_lm import cli as clilib
from sparse_lm import config as cfglib
from sparse_lm.errors import UserError
from sparse_lm.models.moe.layer import MoeFfn

# ------------------------------------------------------------------ CLI runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The children's environment: one device, the suite's XLA:CPU compile flags
# (conftest.py's FAST_XLA_FLAGS). conftest.py adds a compilation cache that
# every child of the session shares (JAX_COMPILATION_CACHE_DIR).
XLA_FLAGS = os.environ.get("SPARSE_LM_TEST_XLA_FLAGS", "")
ENV = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "TF_CPP_MIN_LOG_LEVEL": "3"}

# cli()'s settings of a tiny run, as config keys (tiny_config() applies them in-process).
TINY = {
  "data.batch_size": 8,
  "data.seq_len": 64,
  "model.d_model": 64,
  "model.d_ff": 128,
  "train.eval_batches": 2,
  "data.vocab_size": 512,
}


def cli(workdir, tfds_dir, *overrides, config="configs/dense.py:tiny", program="sparse_lm.main"):
  """A tiny training run's command line (d_model 64, batch 8 x 64, vocabulary 512)."""
  return [
    sys.executable,
    "-m",
    program,
    f"--config={config}",
    f"--workdir={workdir}",
    f"--config.data.data_dir={tfds_dir}",
    *(f"--config.{k}={v}" for k, v in TINY.items()),
    *overrides,
  ]


def tiny_config(tfds_dir, *overrides, config="configs/dense.py:tiny"):
  """cli()'s config, built in-process: the same file and settings, then
  `overrides` as "key=value" strings (values as Python literals) or (key, value)."""
  c = cfglib.load_config(config)
  c.data.data_dir = str(tfds_dir)
  pairs = list(TINY.items())
  for o in overrides:
    if isinstance(o, str):
      k, _, v = o.removeprefix("--config.").partition("=")
      try:
        v = ast.literal_eval(v)
      except (ValueError, SyntaxError):
        pass
      o = (k, v)
    pairs.append(o)
  for key, value in pairs:
    *path, last = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = value
  return c


def endless(workdir, tfds_dir, *overrides):
  """cli() of a run that trains until it is stopped, logging every step."""
  return cli(
    workdir, tfds_dir, "--config.train.num_steps=100000", "--config.train.log_every=1", *overrides
  )


def start(args):
  """A training process with its output captured as text."""
  return subprocess.Popen(
    args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def run(args, **kw):
  return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def rows(workdir, name="metrics.jsonl"):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(l) for l in f]


def losses(workdir):
  return {r["step"]: r["train_loss"] for r in rows(workdir) if "train_loss" in r}


def saved_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def start_until_step(args, wd, step, saved=False, **popen):
  """Starts a training process (output captured as text, unless `popen` says
  otherwise) and returns it once it has logged `step` (and, with `saved`,
  once a checkpoint is on disk: saves are asynchronous, and under load the
  first one can finish steps after it was started)."""
  popen = popen or {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
  proc = subprocess.Popen(args, cwd=ROOT, env=ENV, **popen)
  deadline = time.time() + 300
  ckpts = os.path.join(wd, "checkpoints")
  while time.time() < deadline and proc.poll() is None:
    if (
      os.path.exists(os.path.join(wd, "metrics.jsonl"))
      and max(losses(wd), default=0) >= step
      and (not saved or (os.path.isdir(ckpts) and saved_steps(wd)))
    ):
      break
    time.sleep(0.05)
  return proc


def one_line_error(p, *needles):
  """The process failed with exit 1 and one line on stderr holding each needle."""
  assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  last = p.stderr.strip().splitlines()[-1]
  for n in needles:
    assert n in last, last
  return last


def user_error(fn, *needles, program="sparse_lm.main"):
  """fn() raises a UserError, which cli.run prints as one line on stderr with
  exit status 1 (no traceback): that line holds each needle. Returns it.
  (in_process() runs a whole command line so.)"""
  with pytest.raises(UserError) as e:
    fn()
  err = io.StringIO()
  with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
    clilib.fail(program, str(e.value))
  assert exit_.value.code == 1
  lines = err.getvalue().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{program}: "), err.getvalue()
  for n in needles:
    assert n in lines[0], lines[0]
  return lines[0]


_FLAG_DEFINES = (
  "DEFINE_string",
  "DEFINE_bool",
  "DEFINE_boolean",
  "DEFINE_integer",
  "DEFINE_float",
  "DEFINE_enum",
  "DEFINE_multi_string",
  "mark_flags_as_required",
  "mark_flag_as_required",
)


# cli.run's config_flags: the flags whose value is a config file.
CONFIG_FLAGS = {"sparse_lm.main": ("config",), "sparse_lm.sweep": ("config",)}
CONFIG_FLAGS["sparse_lm.inspect"] = ("config", "compare")


def in_process(args, *, monkeypatch):
  """A program's command line (`[python, "-m", program, *argv]`, as cli()
  makes) run in this process, as cli.run runs it under absl's app.run: the
  program's own flag definitions, cli.flags_parser on argv, then main, with
  a UserError printed by cli.fail. The flags go to a FlagValues of their own
  (the programs define theirs on absl's global FLAGS, and two programs cannot
  define one flag in one process): the module is executed afresh by runpy,
  not imported. Returns subprocess.run's kind of result (returncode 0 or 1,
  stdout, stderr), for one_line_error().

  For what fails or prints before compiling: a run compiles here on this
  process's 8 simulated devices, not on the children's one (tests/faults_test.py
  keeps one real process of the contract: exit status 1, one line on stderr)."""
  assert list(args[:2]) == [sys.executable, "-m"], args
  program, argv = args[2], list(args[3:])
  fv = flags.FlagValues()
  monkeypatch.setattr(sys, "argv", [program, *argv])  # config_flags reads it when defined
  for name in _FLAG_DEFINES:
    monkeypatch.setattr(flags, name, functools.partial(getattr(flags, name), flag_values=fv))
  monkeypatch.setattr(
    mlc_flags,
    "DEFINE_config_file",
    functools.partial(mlc_flags.DEFINE_config_file, flag_values=fv),
  )
  monkeypatch.setattr(flags, "FLAGS", fv)
  module = runpy.run_module(program, run_name="in_process")
  if "_define_flags" in module:  # defined only when run as a program
    module["_define_flags"]()
  out, err, code = io.StringIO(), io.StringIO(), 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      left = clilib.flags_parser(program, CONFIG_FLAGS.get(program, ()))([program, *argv])
      try:
        module["main"](left)  # what the parser leaves, as app.run passes it
      except UserError as e:
        assert not e.hard_exit, e  # it would end this process
        clilib.fail(program, str(e))
    except SystemExit as e:
      code = e.code
  return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def backend_compiles():
  """Counts the XLA compilations of this process inside the block: yields a
  list that gets one entry (its seconds) per compilation."""
  seen = []

  def listener(event, seconds, **kw):
    del kw
    if event == "/jax/core/compile/backend_compile_duration":
      seen.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def checkpoints_finite(wd, steps=None) -> dict[int, bool]:
  """{step: every model variable finite} for each checkpoint of run `wd`
  (all of them by default), each restored in this process (state.load_model
  on one device)."""
  from sparse_lm import state as statelib  # pylint: disable=g-import-not-at-top

  out = {}
  for s in saved_steps(wd) if steps is None else steps:
    model, _, _ = statelib.load_model(wd, s)
    out[s] = all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))
  assert out, f"{wd} holds no checkpoint"
  return out


def write_sweep(tmp_path, tfds_dir, lrs=(1e-3, 3e-3, 1e-2), steps=12):
  """A sweep file over learning rates of a tiny dense model."""
  path = tmp_path / "tiny_sweep.py"
  path.write_text(
    textwrap.dedent(f'''
      """Test sweep.

        python -m sparse_lm.sweep --config={path} --workdir=x
      """
      from sparse_lm import config as cfglib

      TARGET_LOSS = 7.0

      def get_config(arg=None):
        c = cfglib.load_config("configs/dense.py:tiny")
        c.data.data_dir = {tfds_dir!r}
        c.data.batch_size, c.data.seq_len, c.data.vocab_size = 8, 32, 512
        c.model.d_model, c.model.d_ff = 32, 64
        c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = {steps}, 6, 3
        c.train.log_every, c.train.eval_batches = 1, 1
        return c

      def sweep(add):
        for lr in {tuple(lrs)!r}:
          add(**{{"train.learning_rate": lr}})
  ''')
  )
  return str(path)


# ------------------------------------------------------------------ MoE layer

D, F, E = 16, 24, 8  # the MoE layer tests' sizes (tests/moe_*_test.py)
ACTIVATION = {
  "switch": "gelu",
  "topk": "swiglu",
  "mixtral": "swiglu",
  "sigmoid_bias": "relu",
  "group_limited": "swiglu",
  "hierarchical": "geglu",
  "expert_choice": "gelu",
}


def model_cfg(router="topk", dispatch="capacity", impl=None, **moe):
  """A small MoE layer's spec: E experts of d_ff F on d_model D, no drops
  unless a test says so; impl: {part: value} for model.moe.impl (policy.py)."""
  c = cfglib.base_config()
  m = c.model
  m.d_model, m.d_ff = D, 2 * F
  m.moe.num_experts, m.moe.d_ff = E, F
  m.moe.router, m.moe.dispatch = router, dispatch
  m.moe.activation = ACTIVATION[router]
  m.moe.top_k = {"switch": 1, "expert_choice": 1, "group_limited": 3}.get(router, 2)
  if router == "hierarchical":
    m.moe.num_groups, m.moe.top_k_groups = 2, 2
  if router == "group_limited":
    m.moe.num_groups, m.moe.top_k_groups = 4, 2
  if router == "sigmoid_bias":
    m.moe.num_shared_experts = 1
  m.moe.eval_capacity_factor = 1.0 * E  # no drops unless a test says otherwise
  m.moe.min_capacity = 1
  m.moe.importance_weight = 0.1
  for k, v in moe.items():
    m.moe[k] = v
  for k, v in (impl or {}).items():
    m.moe.impl[k] = v
  return cfglib.model_spec(cfglib.validate(c))


def build(m, seed=0):
  with nnx.use_eager_sharding(False):
    layer = MoeFfn(m, rngs=nnx.Rngs(seed))
  if hasattr(layer, "router_bias"):  # a non-trivial bias so it matters
    layer.router_bias[...] = 0.2 * jax.random.normal(jax.random.key(seed + 7), (E,))
  return layer


def flat_aux(aux) -> dict:
  """aux with its state_updates dict flattened to "state_updates/<name>" keys,
  without the row statistics the terms are made of ("stats", "state": their
  shapes follow the batch's rows; the terms made of them are compared)."""
  aux = {k: v for k, v in aux.items() if k not in ("stats", "state")}
  for k, v in aux.pop("state_updates", {}).items():
    aux[f"state_updates/{k}"] = v
  return jax.tree.map(np.asarray, aux)


# Cuts the CPU compile time of these small programs about 3x (every test compiles).
FAST_COMPILE = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
  "xla_cpu_use_fusion_emitters": False,
}


@functools.partial(jax.jit, static_argnames=("graphdef", "train"), compiler_options=FAST_COMPILE)
def _layer_grads(graphdef, state, x, ct, mask, rng, train):
  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x, mask_BxL=mask, train=train, rng=rng)
    return jnp.sum(y.astype(jnp.float32) * ct), (y, aux)

  (_, (y, aux)), (g_state, g_x) = jax.value_and_grad(loss, (0, 1), has_aux=True)(state, x)
  return y, aux, g_state, g_x


def layer_grads(graphdef, state, x, ct, mask=None, rng=None, train=False):
  """(y, aux, grads) of an MoE layer: forward and gradients of sum(y * ct)
  w.r.t. every variable and x ("x"), one jit per layer config."""
  y, aux, g_state, g_x = _layer_grads(graphdef, state, x, ct, mask, rng, train)
  grads = {
    k: np.asarray(v[...])
    for k, v in vars(nnx.merge(graphdef, g_state)).items()
    if isinstance(v, nnx.Variable)
  }
  grads["x"] = np.asarray(g_x)
  return np.asarray(y), flat_aux(aux), grads
