"""inspect: published model sizes, counts equal to the real model's, FLOPs, the CLI."""

import importlib.util
import os
import re
import subprocess
import sys

from flax import nnx
from helpers import in_process
import jax
import pytest

from sparse_lm import config as cfglib
from sparse_lm import inspect as inspectlib
from sparse_lm import state as statelib
from sparse_lm.models import layers
from sparse_lm.models.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE_TINY = ["switch", "glam", "hierarchical", "nllb_moe", "mixtral", "dbrx", "deepseek_moe"]


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
  c = load(f"configs/{family}.py:tiny")
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


def test_import_host_peak_is_the_largest_parameter_shard_read_and_placed():
  """Mixtral 8x7B: one device holds all 8 experts of wi [8, 4096, 14336]
  (bf16 read + float32 copy); with the experts over 8 devices the peak is the
  embedding [32000, 4096], which every device holds whole."""
  c = cfglib.load_config("configs/mixtral.py:8x7b")
  model = statelib.abstract_model(c)
  assert inspectlib.import_host_bytes(c, model, 1) == 8 * 4096 * 14336 * (2 + 4)
  c.mesh = (("data", 1), ("fsdp", 1), ("expert", 8), ("tensor", 1))
  assert inspectlib.import_host_bytes(c, model, 8) == 32000 * 4096 * (2 + 4)
