"""End to end through the CLI: eval loss falls, exact resume after SIGKILL,
SIGTERM saves and exits cleanly, an incompatible workdir is refused."""

import os
import shutil
import signal
import subprocess

from helpers import cli
from helpers import endless
from helpers import in_process
from helpers import losses
from helpers import rows
from helpers import run
from helpers import start_until_step
import numpy as np
import pytest

from sparse_lm import checkpoint
from sparse_lm import config as cfglib
from sparse_lm import train
from sparse_lm.errors import RunError


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  """A 60-step run through the CLI: (workdir, its process)."""
  wd = str(tmp_path_factory.mktemp("trained") / "run")
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
  return wd, p


def test_cli_trains_and_eval_loss_falls(trained):
  wd, p = trained
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
  proc = start_until_step(endless(wd, tfds_dir, "--config.train.checkpoint_every=100000"), wd, 3)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  saved = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
  assert saved and max(saved) >= 3, saved
  assert f"done at step {max(saved)}" in out


def test_incompatible_workdir_is_refused_and_nothing_is_lost(
  tmp_path, tfds_dir, trained, monkeypatch
):
  # A copy of the trained run, resumed (in this process) with another layer count.
  wd = str(tmp_path / "arch")
  shutil.copytree(trained[0], wd)
  before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    metrics_before = f.read()
  args = cli(wd, tfds_dir, "--config.train.num_steps=80", "--config.model.num_layers=3")
  p = in_process(args, monkeypatch=monkeypatch)
  assert p.returncode != 0
  assert "different architecture" in p.stderr and "model.num_layers: 2 -> 3" in p.stderr
  assert "Traceback" not in p.stderr
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    assert f.read() == metrics_before


def test_bad_config_value_is_one_line_error_before_anything_runs(tmp_path, tfds_dir, monkeypatch):
  wd = str(tmp_path / "bad")
  p = in_process(cli(wd, tfds_dir, "--config.model.num_heads=3"), monkeypatch=monkeypatch)
  assert p.returncode != 0
  assert "config.model.num_heads=3 is invalid" in p.stderr and "Traceback" not in p.stderr
  assert not os.path.exists(wd)


def test_resume_allows_changes_that_keep_the_checkpoint_tree_and_names_them(
  tmp_path, tfds_dir, monkeypatch
):
  # Issue 17, smell 1: only what changes the parameter / optimizer tree or the
  # tokenizer is refused; capacity, dropout and loss weights are not architecture.
  wd = str(tmp_path / "change")
  args = ["--config.train.num_steps=4", "--config.train.schedule=constant"]
  assert run(cli(wd, tfds_dir, *args, config="configs/switch.py:tiny")).returncode == 0
  changed = [
    "--config.model.moe.capacity_factor=2.0",
    "--config.model.dropout=0.1",
    "--config.model.moe.expert_dropout=0.2",
    "--config.model.moe.load_balance_weight=0.05",
    # Also: train.save_optimizer=False saves parameters only (step 6, below).
    "--config.train.save_optimizer=False",
  ]
  p = run(
    cli(
      wd,
      tfds_dir,
      "--config.train.num_steps=6",
      *args[1:],
      *changed,
      config="configs/switch.py:tiny",
    )
  )
  assert p.returncode == 0, p.stderr[-3000:]
  line = next(l for l in p.stdout.splitlines() if l.startswith("resuming with a changed config"))
  for key in (
    "capacity_factor: 1.25 -> 2.0",
    "model.dropout: 0.0 -> 0.1",
    "expert_dropout",
    "load_balance_weight",
    "num_steps: 4 -> 6",
  ):
    assert key in line, line
  assert "resumed from" in p.stdout and max(losses(wd)) == 6
  # What changes the parameter or optimizer tree is refused (in this process).
  p = in_process(
    cli(
      wd,
      tfds_dir,
      "--config.train.num_steps=8",
      "--config.model.moe.num_experts=4",
      config="configs/switch.py:tiny",
    ),
    monkeypatch=monkeypatch,
  )
  assert p.returncode == 1 and "model.moe.num_experts: 8 -> 4" in p.stderr, p.stderr[-2000:]
  p = in_process(
    cli(
      wd,
      tfds_dir,
      "--config.train.num_steps=8",
      "--config.train.optimizer=adafactor",
      config="configs/switch.py:tiny",
    ),
    monkeypatch=monkeypatch,
  )
  assert p.returncode == 1 and "train.optimizer: 'adamw' -> 'adafactor'" in p.stderr, p.stderr[
    -2000:
  ]
  # train.save_optimizer=False saved parameters only at step 6; a resume from
  # such a checkpoint starts the optimizer state fresh and says so.
  argv = cli(wd, tfds_dir, "--config.train.num_steps=8", *args[1:], config="configs/switch.py:tiny")
  p = in_process(argv, monkeypatch=monkeypatch)
  assert p.returncode == 0, p.stderr[-3000:]
  state_dir = lambda step: os.path.join(wd, "checkpoints", str(step), "state")
  assert checkpoint.holds_optimizer(state_dir(4)) and not checkpoint.holds_optimizer(state_dir(6))
  assert "step 6 holds parameters only: the optimizer state starts fresh" in p.stdout
  assert max(losses(wd)) == 8 and checkpoint.holds_optimizer(state_dir(8))


def test_failed_in_process_run_gives_ctrl_c_back(tmp_path, tfds_dir):
  # Issue 17, smell 3: a run that failed left its SIGINT handler installed.
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  c = cfglib.load_config("configs/dense.py:tiny")
  c.data.data_dir, c.data.vocab_size, c.data.batch_size, c.data.seq_len = tfds_dir, 512, 8, 32
  c.model.d_model, c.model.d_ff = 32, 64
  c.train.num_steps, c.train.learning_rate, c.train.warmup_steps = 20, 1e4, 0
  c.train.eval_batches = 1
  with pytest.raises(RunError, match="is not finite"):
    train.train_and_evaluate(c, str(tmp_path / "diverges"))
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_rates_are_timed_over_finished_device_work(tmp_path):
  # Issue 17, smell 9: the step in flight at a SIGTERM logged "tok/s 2,983,652".
  # Issue 26: still "166,548" after "24,838" in a plain run: the clock started
  # when a step was fetched while the next one was already running. Now it
  # runs only between drained checks (no later step in flight); evals and
  # saves restart it, and the first step (it compiles) only starts it.
  c = cfglib.base_config()
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, say=lambda *a: None)
  monitor = train.Monitor(c, str(tmp_path), 0, ckpt, [])
  times = iter([10.0, 12.0, 20.0, 21.0])
  monitor.now = lambda: next(times)
  meas = {"ce": 1.0, "grad_norm": 1.0, "loss": 1.0, "finite": True}
  monitor.check(1, meas, drained=True)  # t=10: compiled and ran; starts the clock
  monitor.log(1, meas, {})
  monitor.check(2, meas)  # one step late: step 3 was in flight, no clock reading
  monitor.check(3, meas, drained=True)  # t=12
  monitor.log(3, meas, {})
  monitor.restart()  # an eval and a save until t=20
  monitor.check(4, meas, drained=True)  # t=21
  monitor.log(4, meas, {})
  monitor.check(5, meas)  # not drained: its time says nothing about finished work
  monitor.log(5, meas, {})
  monitor.close()
  got = {r["step"]: r.get("tokens_per_s") for r in rows(str(tmp_path))}
  tokens = c.data.batch_size * c.data.seq_len
  assert got == {1: None, 3: 2 * tokens / 2.0, 4: tokens / 1.0, 5: None}


def test_adafactor_trains_on_a_mesh(tmp_path, tfds_dir):
  # Adafactor's factored moments have another rank than their parameter, so the
  # parameter's sharding names cannot apply to them (it failed under any mesh).
  c = cfglib.load_config("configs/glam.py:tiny")
  c.data.data_dir, c.data.vocab_size, c.data.batch_size, c.data.seq_len = tfds_dir, 512, 8, 32
  c.model.d_model, c.model.d_ff, c.model.moe.d_ff = 32, 64, 32
  c.train.optimizer, c.train.num_steps, c.train.eval_batches = "adafactor", 3, 1
  c.mesh = (("data", 2), ("fsdp", 2), ("expert", 2), ("tensor", 1))
  out = train.train_and_evaluate(c, str(tmp_path / "adafactor"))
  assert out["step"] == 3 and np.isfinite(out["eval_loss"])
