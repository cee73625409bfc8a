"""experiments/switch_t5/report.py's statistics on made-up run folders (no training)."""

import json
import math
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.switch_t5 import report  # noqa: E402
from sparse_lm import sweep as sweeplib  # noqa: E402

STEPS = (2, 4, 6, 8, 10, 12)  # the :cpu_smoke horizon: 12 steps, cooldown from step 8


def fake_run(d, losses, params=1000):
  """A finished run folder: metrics.jsonl with one eval per step of STEPS."""
  os.makedirs(d, exist_ok=True)
  rows = [{"step": 0, "total_params": params, "active_params": 100, "train_flops_per_token": 1e6}]
  for s, l in zip(STEPS, losses):
    rows += [{"step": s, "tokens": 64 * s, "tokens_per_s": 500.0, "train_loss": l}]
    rows += [{"step": s, "eval_loss": l}]
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  open(os.path.join(d, "DONE"), "w").close()


def test_paired_difference_and_step_ratios(tmp_path, monkeypatch):
  """Dense seed s ends at 1.0 + 0.1 s, E=32 0.2 - 0.01 s below it, E=8 on
  dense's curve: the paired mean, its t interval and both step ratios are the
  values worked out by hand here; the rate of the lowest loss is chosen."""
  monkeypatch.chdir(ROOT)
  lr_sweep, grid = report.grids(smoke=True)
  lr_dir = tmp_path / "lr"
  for p, end in zip(sweeplib.points(lr_sweep), (1.4, 1.3, 1.2, 1.0, 1.1), strict=True):
    fake_run(lr_dir / sweeplib.point_name(p), [5, 4, 3, 2, 1.5, end])
  rate, lr_rows = report.chosen_rate(lr_sweep, str(lr_dir))
  assert rate == 0.012
  assert [r["learning_rate"] for r in lr_rows] == [0.0015, 0.003, 0.006, 0.012, 0.024]
  core = f"{grid}@{rate:g}"
  for p in sweeplib.points(core):
    s, e = p["train.seed"], p["model.moe.num_experts"]
    dense = [5, 4, 3, 2, 1.5, 1.0 + 0.1 * s]
    e8 = [5, 4, 3, 2, 1.5, 0.95 + 0.1 * s]  # dense's curve, 0.05 below it at the end
    curve = [5, 3.5, 2.5, 1.8, 1.2, 0.8 + 0.11 * s] if e == 32 else e8 if e == 8 else dense
    fake_run(tmp_path / core.partition(":")[2] / sweeplib.point_name(p), curve, 1000 * e)
  rows, ref = report.arm_rows(core, str(tmp_path))
  by_e = {r["experts"]: r for r in rows}
  assert ref["final"] == pytest.approx(1.1) and ref["final_step"] == 12 and ref["stop"] == 8
  e32 = by_e[32]
  assert e32["paired_minus_dense"] == pytest.approx([-0.2, -0.19, -0.18])
  assert e32["minus_dense"] == pytest.approx(-0.19)
  assert e32["minus_dense_ci95"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))
  # Mean curve ..., 1.2 at step 10, 0.91 at 12 reaches dense's 1.1 at 10 + 2 * 0.1 / 0.29.
  assert e32["step_ratio"] == pytest.approx((10 + 2 * 0.1 / 0.29) / 12)
  assert e32["per_seed_step_ratio"][0] == pytest.approx(11 / 12)  # 1.2 -> 0.8 reaches 1.0
  # Trailing means of 3 to step 8: dense 3.0; E=32 3.667 at 6, 2.6 at 8.
  assert e32["stable_step_ratio"] == pytest.approx((6 + 2 * (11 / 3 - 3) / (11 / 3 - 2.6)) / 8)
  # E=8: 0.05 below dense on every seed (a zero-width interval); its mean curve
  # ends at 1.05 and crosses dense's mean final 1.1 at 10 + 2 * 0.4 / 0.45.
  e8 = by_e[8]
  assert e8["n"] == 3 and e8["minus_dense"] == pytest.approx(-0.05)
  assert e8["minus_dense_ci95"] == pytest.approx(0, abs=1e-12)
  assert e8["step_ratio"] == pytest.approx((10 + 2 * 0.4 / 0.45) / 12)
  assert report.interval([0.3]) == (0.3, None)  # one seed: no interval
  assert by_e[1]["stable_step_ratio"] == 1
  out = tmp_path / "out"
  out.mkdir()
  report.write(str(out), core, rows, ref, lr_rows)
  assert sorted(os.listdir(out)) == [
    "loss_minus_dense.png",
    "loss_vs_step.png",
    "results.csv",
    "results.json",
    "results.md",
  ]
  md = (out / "results.md").read_text()
  assert "| Switch E=32 | 3 |" in md and "-0.1900 +- 0.0248" in md
  # --part lr writes the calibration; a later --part grid, its folders gone, reads it.
  report.write_lr(str(out), lr_sweep, rate, lr_rows)
  assert "**0.012**" in (out / "lr_results.md").read_text()
  shutil.rmtree(lr_dir)
  got_rate, got_rows = report.calibration(lr_sweep, str(tmp_path), str(out))
  assert got_rate == rate and [r["end_loss"] for r in got_rows] == [1.4, 1.3, 1.2, 1.0, 1.1]
  with pytest.raises(report.ConfigError, match="not finished"):
    report.calibration(lr_sweep, str(tmp_path), str(tmp_path / "nothing"))


def test_every_grid_expands_to_valid_distinct_points(monkeypatch):
  """configs/sweeps/switch_t5.py's grids name real config keys with valid
  values (points() validates each point's config) and distinct folders; the
  grid has 3 seeds at dense and E=32, and one rate per :lr point."""
  monkeypatch.chdir(ROOT)
  mod = report.cfglib.load_module(report.SWEEP)
  for g in mod.GRIDS:
    names = [sweeplib.point_name(p) for p in sweeplib.points(f"{report.SWEEP}:{g}")]
    assert names and len(set(names)) == len(names), g
  grid = sweeplib.points(f"{report.SWEEP}:cpu@0.006")
  for e in (1, 32):
    assert sorted(p["train.seed"] for p in grid if p["model.moe.num_experts"] == e) == [0, 1, 2]
  rates = [p["train.learning_rate"] for p in sweeplib.points(f"{report.SWEEP}:lr")]
  assert rates == list(mod.LR_GRID)
  c = report.cfglib.load_config(f"{report.SWEEP}:cpu@0.006")
  assert c.train.learning_rate == 0.006 and c.model.arch == "encoder_decoder"
  assert (c.model.moe.every, c.model.moe.offset, c.model.moe.capacity_factor) == (2, 1, 1.25)
