"""Sweeps: grid expansion and names, resume after the sweep is killed, results."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from helpers import ENV
from helpers import ROOT
from helpers import write_sweep
import pytest

from sparse_lm import config as cfglib
from sparse_lm import sweep as sweeplib
from sparse_lm.errors import ConfigError


def test_points_names_and_validation(tmp_path):
  path = write_sweep(tmp_path, str(tmp_path))
  grid = sweeplib.points(path)
  assert grid == [{"train.learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2)]
  assert [sweeplib.point_name(p) for p in grid] == [
    "learning_rate=0.001",
    "learning_rate=0.003",
    "learning_rate=0.01",
  ]
  bad = tmp_path / "bad.py"
  bad.write_text(open(path).read().replace('"train.learning_rate"', '"train.learning_rat"'))
  with pytest.raises(ConfigError, match="no key 'train.learning_rat'"):
    sweeplib.points(str(bad))
  neg = tmp_path / "neg.py"
  neg.write_text(open(path).read().replace("(0.001, 0.003, 0.01)", "(0.001, -1.0)"))
  with pytest.raises(ConfigError, match="config.train.learning_rate=-1.0"):
    sweeplib.points(str(neg))


def _shipped_sweeps():
  out = ["configs/sweeps/dense_lr.py", "configs/sweeps/switch_vs_dense_calibration.py"]
  for study in ("switch_vs_dense", "instruction_tuning", "upcycling", "multilingual_moe"):
    args = cfglib.load_module(f"configs/sweeps/{study}.py").ARGS
    out += [f"configs/sweeps/{study}.py:{arg}" for arg in args]
  return out


@pytest.mark.parametrize("spec", _shipped_sweeps())
def test_shipped_sweeps_expand_to_valid_distinct_points(spec, monkeypatch):
  """Every sweep the study runs names only real config keys with valid values
  (points() validates each point's config), and no two points share a folder."""
  monkeypatch.chdir(ROOT)
  grid = sweeplib.points(spec)
  assert grid
  names = [sweeplib.point_name(p) for p in grid]
  assert len(set(names)) == len(names)


def test_sweep_resumes_after_kill_and_collects(tmp_path, tfds_dir):
  path = write_sweep(tmp_path, tfds_dir, lrs=(1e-3, 3e-3))
  wd = str(tmp_path / "sweep")
  args = [sys.executable, "-m", "sparse_lm.sweep", f"--config={path}", f"--workdir={wd}"]
  proc = subprocess.Popen(
    args,
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  second = os.path.join(wd, "learning_rate=0.003")
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    ckpts = os.path.join(second, "checkpoints")
    if os.path.isdir(ckpts) and any(s.isdigit() for s in os.listdir(ckpts)):
      break
    time.sleep(0.1)
  os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running point
  proc.wait()
  first_done = os.path.join(wd, "learning_rate=0.001", "DONE")
  assert os.path.exists(first_done) and not os.path.exists(os.path.join(second, "DONE"))
  mtime = os.path.getmtime(first_done)

  p = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "2 points, 1 done, 1 to run" in p.stdout
  assert os.path.getmtime(first_done) == mtime  # skipped, not rerun
  assert "resumed from" in open(os.path.join(second, "log.txt")).read()
  with open(os.path.join(wd, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == ["learning_rate=0.001", "learning_rate=0.003"]
  for r in rows:
    assert int(r["final_step"]) == 12 and float(r["final_eval_loss"]) > 0
    assert int(r["total_params"]) > 0 and float(r["wall_time_s"]) > 0
    assert int(r["steps_to_target"]) in (6, 12)
  res = json.load(open(os.path.join(wd, "results.json")))
  assert res["target_loss"] == 7.0 and len(res["points"]) == 2


def test_print_commands(tmp_path):
  path = write_sweep(tmp_path, str(tmp_path))
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "sparse_lm.sweep",
      f"--config={path}",
      "--workdir=runs/x",
      "--print_commands",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 3 and all(l.startswith("python -m sparse_lm.main") for l in lines)
  assert "--workdir=runs/x/learning_rate=0.01 --config.train.learning_rate=0.01" in lines[2]


def test_seeds_are_aggregated_per_point(tmp_path):
  # Three seeds of one point and one of another, with metrics.jsonl written as
  # the trainer writes them; results.csv averages over seeds, runs.csv does not.
  path = tmp_path / "seeds.py"
  path.write_text(
    textwrap.dedent("""
      from sparse_lm import config as cfglib

      def get_config(arg=None):
        return cfglib.load_config("configs/dense.py:tiny")

      def sweep(add, arg):
        assert arg == "two"
        for seed in (0, 1, 2):
          add(**{"model.d_ff": 256, "train.seed": seed})
        add(**{"model.d_ff": 512})
  """)
  )
  wd = tmp_path / "sweep"
  finals = {"d_ff=256,seed=0": 3.0, "d_ff=256,seed=1": 3.2, "d_ff=256,seed=2": 3.4, "d_ff=512": 2.9}
  for name, loss in finals.items():
    d = wd / name
    d.mkdir(parents=True)
    rows = [
      {"step": 0, "total_params": 10},
      {"step": 5, "train_loss": 4.0, "tokens_per_s": 100.0, "eval_loss": loss + 0.5, "tokens": 50},
      {"step": 10, "train_loss": 3.0, "tokens_per_s": 100.0, "eval_loss": loss, "tokens": 100},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "DONE").write_text("{}")
  results = sweeplib.collect(f"{path}:two", str(wd))
  assert [r["point"] for r in results] == ["d_ff=256", "d_ff=512"]
  three, one = results
  assert three["n"] == 3 and three["seeds"] == [0, 1, 2] and one["n"] == 1
  assert three["final_eval_loss"] == pytest.approx(3.2)
  assert three["final_eval_loss_std"] == pytest.approx(0.2)  # sample std (ddof 1)
  assert one["final_eval_loss"] == 2.9 and one["final_eval_loss_std"] == 0.0
  with open(wd / "runs.csv") as f:
    assert [r["point"] for r in csv.DictReader(f)] == list(finals)
  with open(wd / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [float(r["final_eval_loss_std"]) for r in rows] == pytest.approx([0.2, 0.0])
  res = json.load(open(wd / "results.json"))
  assert len(res["runs"]) == 4 and len(res["points"]) == 2
