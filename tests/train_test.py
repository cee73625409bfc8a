"""End to end through the CLI: eval loss falls, exact resume after SIGKILL,
SIGTERM saves and exits cleanly, an incompatible workdir is refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3"}


def cli(workdir, tfds_dir, *overrides, config="configs/dense.py:tiny"):
  return [
    sys.executable,
    "-m",
    "sparse_lm.main",
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


def run(args, **kw):
  return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def losses(workdir):
  return {r["step"]: r["train_loss"] for r in rows(workdir) if "train_loss" in r}


def start_until_step(args, wd, step, **popen):
  """Starts a training process and returns it once it has logged `step`."""
  proc = subprocess.Popen(args, cwd=ROOT, env=ENV, **popen)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(os.path.join(wd, "metrics.jsonl")) and max(losses(wd), default=0) >= step:
      break
    time.sleep(0.05)
  return proc


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_cli_trains_and_eval_loss_falls(tmp_path, tfds_dir):
  wd = str(tmp_path / "run")
  p = run(
    cli(
      wd,
      tfds_dir,
      "--config.train.num_steps=60",
      "--config.train.eval_every=20",
      "--config.train.log_every=10",
    )
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert "step     60/60" in p.stdout and "done at step 60: eval_loss" in p.stdout
  evals = [r["eval_loss"] for r in rows(wd) if "eval_loss" in r]
  assert len(evals) == 3 and evals[-1] < evals[0] - 0.3, evals
  first = rows(wd)[0]
  assert first["step"] == 0 and first["total_params"] == first["active_params"] > 0
  assert all("tokens_per_s" in r and "lr" in r for r in rows(wd)[1:])
  assert os.listdir(os.path.join(wd, "tensorboard"))


def test_exact_resume_after_sigkill(tmp_path, tfds_dir):
  args = [
    "--config.train.num_steps=24",
    "--config.train.checkpoint_every=8",
    "--config.train.log_every=1",
    "--config.train.eval_every=12",
  ]
  ref = str(tmp_path / "ref")
  assert run(cli(ref, tfds_dir, *args)).returncode == 0
  wd = str(tmp_path / "killed")
  proc = start_until_step(
    cli(wd, tfds_dir, *args), wd, 12, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(losses(wd))
  assert 8 < killed_at < 24, f"the kill landed at step {killed_at}"
  p = run(cli(wd, tfds_dir, *args))
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resumed from" in p.stdout
  assert losses(wd) == losses(ref)  # the same losses, step for step, bit for bit
  assert [r["step"] for r in rows(wd)] == [r["step"] for r in rows(ref)]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tfds_dir):
  wd = str(tmp_path / "term")
  proc = start_until_step(
    cli(
      wd,
      tfds_dir,
      "--config.train.num_steps=100000",
      "--config.train.checkpoint_every=100000",
      "--config.train.log_every=1",
    ),
    wd,
    3,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  saved = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
  assert saved and max(saved) >= 3, saved
  assert f"done at step {max(saved)}" in out


def test_incompatible_workdir_is_refused_and_nothing_is_lost(tmp_path, tfds_dir):
  wd = str(tmp_path / "arch")
  assert run(cli(wd, tfds_dir, "--config.train.num_steps=4")).returncode == 0
  before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    metrics_before = f.read()
  p = run(cli(wd, tfds_dir, "--config.train.num_steps=8", "--config.model.num_layers=3"))
  assert p.returncode != 0
  assert "different architecture" in p.stderr and "model.num_layers: 2 -> 3" in p.stderr
  assert "Traceback" not in p.stderr
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    assert f.read() == metrics_before


def test_bad_config_value_is_one_line_error_before_anything_runs(tmp_path, tfds_dir):
  wd = str(tmp_path / "bad")
  p = run(cli(wd, tfds_dir, "--config.model.num_heads=3"))
  assert p.returncode != 0
  assert "config.model.num_heads=3 is invalid" in p.stderr and "Traceback" not in p.stderr
  assert not os.path.exists(wd)
