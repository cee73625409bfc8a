"""Test setup and the helpers several test files share (no test file imports another).

8 simulated CPU devices (set before jax is imported), strict rank promotion.
  CLI runs     cli, run, rows, losses, start_until_step, saved_steps,
               one_line_error, write_sweep, and the `tfds_dir` fixture
  MoE layer    the layer sizes, model_cfg, build, flat_aux, and layer_grads
               (forward + gradients of sum(y * ct) under one jit)
"""

import functools
import json
import os
import subprocess
import sys
import textwrap
import time

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from sparse_lm import config as cfglib  # noqa: E402
from sparse_lm.models.moe.layer import MoeFfn  # noqa: E402

# ------------------------------------------------------------------ CLI runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One TFDS dir per test process: the corpus and tokenizers are prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))


def cli(workdir, tfds_dir, *overrides, config="configs/dense.py:tiny", program="sparse_lm.main"):
  """A tiny training run's command line (d_model 64, batch 8 x 64, vocabulary 512)."""
  return [
    sys.executable,
    "-m",
    program,
    f"--config={config}",
    f"--workdir={workdir}",
    f"--config.data.data_dir={tfds_dir}",
    "--config.data.batch_size=8",
    "--config.data.seq_len=64",
    "--config.model.d_model=64",
    "--config.model.d_ff=128",
    "--config.train.eval_batches=2",
    "--config.data.vocab_size=512",
    *overrides,
  ]


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
  """aux with its state_updates dict flattened to "state_updates/<name>" keys."""
  aux = dict(aux)
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
