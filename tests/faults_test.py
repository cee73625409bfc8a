"""Runs under faults, through the CLI: nothing good is lost and every failure
is one line (train.py's "What a run guarantees"; issue 10's defects 1-7).

Time bounds here are timeouts for a hang, not speed assertions.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from helpers import ENV
from helpers import ROOT
from helpers import backend_compiles
from helpers import checkpoints_finite
from helpers import cli
from helpers import endless
from helpers import in_process
from helpers import losses
from helpers import one_line_error
from helpers import rows
from helpers import run
from helpers import saved_steps
from helpers import start
from helpers import start_until_step
from helpers import write_sweep
import numpy as np
import pytest

DIVERGE = (
  "--config.train.learning_rate=1e3",
  "--config.train.checkpoint_every=2",
  "--config.train.log_every=5",
  "--config.train.num_steps=60",
)


# The run the broken-checkpoint, killed-save and late-divergence tests start
# from (copies of it): 8 steps, checkpoints at 4 and 8.
RUN8 = ("--config.train.checkpoint_every=4", "--config.train.log_every=1")


@pytest.fixture(scope="module")
def run8(tmp_path_factory, tfds_dir):
  wd = str(tmp_path_factory.mktemp("run8") / "wd")
  p = run(cli(wd, tfds_dir, "--config.train.num_steps=8", *RUN8))
  assert p.returncode == 0, p.stderr[-3000:]
  assert saved_steps(wd) == [4, 8]
  return wd


def copy_of(run8, wd):
  """A copy of the 8-step run in `wd` (its metrics, checkpoints and config)."""
  shutil.copytree(run8, wd)
  return wd


def test_divergence_stops_before_saving_and_resumes_from_a_finite_checkpoint(tmp_path, tfds_dir):
  # Defect 1: log_every (5) != checkpoint_every (2); the old loop checked only
  # log steps' loss, after save, and kept three NaN checkpoints.
  wd = str(tmp_path / "diverge")
  p = run(cli(wd, tfds_dir, *DIVERGE))
  last = one_line_error(
    p,
    "is not finite and was not saved",
    "the last checkpoint, step",
    "--config.train.learning_rate",
  )
  steps = saved_steps(wd)
  assert steps and f"step {steps[-1]} in" in last
  assert all(checkpoints_finite(wd).values())


def test_run_that_diverges_late_resumes_from_its_last_good_checkpoint(tmp_path, tfds_dir, run8):
  # Healthy to step 8 (a copy of run8), then the rate is raised: the run stops
  # before it saves a non-finite state (its next save would be at step 20, and
  # it logs every 5 steps only), and a rerun at a sane rate resumes from step 8.
  wd = copy_of(run8, str(tmp_path / "late"))
  p = run(
    cli(
      wd,
      tfds_dir,
      "--config.train.checkpoint_every=20",
      "--config.train.log_every=5",
      "--config.train.warmup_steps=0",
      "--config.train.num_steps=60",
      "--config.train.learning_rate=1e3",
    )
  )
  one_line_error(p, "is not finite and was not saved", "the last checkpoint, step 8 in")
  assert saved_steps(wd)[-1] == 8
  # At run8's own rate (the config's default): the broken-checkpoint tests' command.
  p = run(
    cli(wd, tfds_dir, "--config.train.num_steps=12", *RUN8, "--config.train.learning_rate=3e-3")
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"resumed from {wd}/checkpoints step 8" in p.stdout
  assert sorted(losses(wd))[-1] == 12 and np.isfinite(list(losses(wd).values())).all()


def test_skip_nonfinite_steps_counts_and_stops_after_n_in_a_row(tmp_path, tfds_dir):
  wd = str(tmp_path / "skip")
  p = run(cli(wd, tfds_dir, *DIVERGE, "--config.train.skip_nonfinite_steps=3"))
  one_line_error(p, "for 4 steps in a row", "train.skip_nonfinite_steps=3")
  assert p.stdout.count("update skipped") == 4
  # Skipped steps leave the state as it was, so their checkpoints are finite too.
  assert all(checkpoints_finite(wd).values())


def _freeze(path):
  """Makes a directory unwritable, for root too (chattr +i; root ignores modes)."""
  os.chmod(path, 0o555)
  if os.geteuid() == 0:
    if not shutil.which("chattr"):
      pytest.skip("running as root without chattr: cannot make a directory read-only")
    subprocess.run(["chattr", "+i", path], check=True)


def _thaw(path):
  if os.geteuid() == 0 and shutil.which("chattr"):
    subprocess.run(["chattr", "-i", path], check=False)
  os.chmod(path, 0o755)


def test_checkpoint_write_error_names_the_failed_step_and_the_last_on_disk(tmp_path, tfds_dir):
  # Defect 2: a PermissionError in Orbax's save threads hung the process forever.
  # Issue 17, smell 8: saves are asynchronous, so the error surfaces at the next
  # save; it blamed that step and called a step intact that never reached the disk.
  wd = str(tmp_path / "ro")
  args = endless(
    wd, tfds_dir, "--config.train.checkpoint_every=5", "--config.train.eval_every=100000"
  )
  proc = start(args)
  ckpts = os.path.join(wd, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.isdir(ckpts) and saved_steps(wd)):
    time.sleep(0.05)
  _freeze(ckpts)
  try:
    out, err = proc.communicate(timeout=120)  # it hung forever before
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  finally:
    _thaw(ckpts)
  p = subprocess.CompletedProcess(args, proc.returncode, out, err)
  last = one_line_error(p, "could not write the checkpoint of step", "the last checkpoint on disk")
  failed, on_disk = map(int, re.findall(r"step (\d+)", last))
  assert on_disk == saved_steps(wd)[-1] and failed == on_disk + 5, (last, saved_steps(wd))
  assert all(checkpoints_finite(wd).values())


def test_second_run_on_a_workdir_is_refused_and_metrics_stay_complete(
  tmp_path, tfds_dir, monkeypatch
):
  # Defect 3: two runs on one workdir both ran; one lost 46 metric rows.
  wd = str(tmp_path / "twice")
  args = endless(wd, tfds_dir, "--config.train.checkpoint_every=10")
  first = start_until_step(args, wd, 2)
  second = in_process(args, monkeypatch=monkeypatch)  # the same command, in this process
  assert first.poll() is None, "the first run should still be training"
  one_line_error(second, f"workdir {wd} is in use by another run", f"pid {first.pid}")
  first.send_signal(signal.SIGTERM)
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  logged = [r["step"] for r in rows(wd) if "train_loss" in r]
  assert logged == list(range(1, logged[-1] + 1))  # every step once, none lost


def test_killed_sweep_leaves_no_point_running(tmp_path, tfds_dir):
  # Defect 4: SIGKILL of the sweep orphaned its running point, which trained on.
  path = write_sweep(tmp_path, tfds_dir, lrs=(1e-3,), steps=100000)
  wd = str(tmp_path / "sweep")
  sweep = subprocess.Popen(
    [sys.executable, "-m", "sparse_lm.sweep", f"--config={path}", f"--workdir={wd}"],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  point = os.path.join(wd, "learning_rate=0.001")
  deadline = time.time() + 300
  while time.time() < deadline and not (
    os.path.exists(os.path.join(point, "metrics.jsonl")) and max(losses(point), default=0) >= 2
  ):
    time.sleep(0.1)
  child = [
    int(p)
    for p in os.listdir("/proc")
    if p.isdigit() and point.encode() in open(f"/proc/{p}/cmdline", "rb").read()
  ]
  assert len(child) == 1
  sweep.send_signal(signal.SIGKILL)
  sweep.wait()
  deadline = time.time() + 120  # the point saves a checkpoint on SIGTERM, then exits
  while time.time() < deadline and os.path.exists(f"/proc/{child[0]}"):
    time.sleep(0.1)
    if (
      os.path.exists(f"/proc/{child[0]}/stat")
      and open(f"/proc/{child[0]}/stat").read().split()[2] == "Z"
    ):
      break
  alive = (
    os.path.exists(f"/proc/{child[0]}/stat")
    and open(f"/proc/{child[0]}/stat").read().split()[2] != "Z"
  )
  assert not alive, "the point kept training after its sweep was killed"
  assert saved_steps(point), "it should have saved on the way out"


@pytest.mark.parametrize("damage", ["truncate_array", "truncate_to_100_bytes", "corrupt_metadata"])
def test_broken_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, tfds_dir, run8, damage):
  # Defect 5: a broken latest checkpoint ended in a 43-198 line traceback.
  wd = copy_of(run8, str(tmp_path / damage))
  latest = os.path.join(wd, "checkpoints", "8")
  files = [os.path.join(d, f) for d, _, fs in os.walk(latest) for f in fs]
  if damage.startswith("truncate"):
    target = max((f for f in files if "/ocdbt.process_0/d/" in f), key=os.path.getsize)
    with open(target, "r+b") as f:
      f.truncate(100 if damage == "truncate_to_100_bytes" else os.path.getsize(target) // 3)
  else:
    target = os.path.join(latest, "state", "_METADATA")
    with open(target, "w") as f:
      f.write("{not json")
    # Defect 7b (in the same run): a kill during a save left
    # N.orbax-checkpoint-tmp until step N was saved again.
    stale = os.path.join(wd, "checkpoints", "12.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(wd, "checkpoints", "4"), stale)  # what a kill mid-save leaves
  p = run(cli(wd, tfds_dir, "--config.train.num_steps=12", *RUN8))
  assert p.returncode == 0, p.stderr[-3000:]
  # Issue 17, smell 7: one line naming the step and the array, nothing else from
  # the failed read (it printed ~1,000 lines of asyncio tracebacks around it).
  said = [l for l in p.stdout.splitlines() if "cannot be read" in l]
  assert len(said) == 1 and "checkpoint of step 8 cannot be read" in said[0], p.stdout
  if damage.startswith("truncate"):
    assert "array " in said[0] and "is damaged" in said[0] and "TensorStore" not in said[0]
  assert len((p.stdout + p.stderr).splitlines()) < 25, p.stdout + p.stderr
  assert "resumed from" in p.stdout and "step 4" in p.stdout.split("resumed from")[1][:200]
  moved = os.listdir(os.path.join(wd, "broken_checkpoints"))
  assert len(moved) == 1 and moved[0].startswith("8.")  # kept, not deleted
  assert saved_steps(wd)[-1] == 12 and sorted(losses(wd)) == list(range(1, 13))
  assert not any("tmp" in s for s in os.listdir(os.path.join(wd, "checkpoints")))
  assert json.load(open(os.path.join(wd, "wall_time.json")))["seconds"] > 0


@pytest.mark.parametrize(
  "case,needle",
  [
    ("workdir_is_a_file", "is not a directory"),
    ("missing_config", "config file 'configs/missing.py' does not exist"),
    ("unknown_key", "--config.train.bogus: the config has no such key"),
    ("bad_type", "--config.train.num_steps=abc"),
  ],
)
def test_user_errors_are_one_line(tmp_path, tfds_dir, case, needle, monkeypatch):
  # Defect 6 (and the unwritable workdir below), in this process: sparse_lm.main's
  # flags, cli.flags_parser and main, as cli.run runs them.
  wd = str(tmp_path / "wd")
  args = cli(wd, tfds_dir, "--config.train.num_steps=2")
  if case == "workdir_is_a_file":
    open(wd, "w").close()
  elif case == "missing_config":
    args = [a if not a.startswith("--config=") else "--config=configs/missing.py" for a in args]
  elif case == "unknown_key":
    args.append("--config.train.bogus=3")
  else:
    args.append("--config.train.num_steps=abc")
  monkeypatch.chdir(ROOT)
  one_line_error(in_process(args, monkeypatch=monkeypatch), needle)


def test_user_error_ends_the_program_with_exit_1_and_one_line(tmp_path, tfds_dir):
  # The programs' contract in a real process (the cases above and the refusals in
  # the other test files run in the test's process): exit status 1, one line on
  # stderr, no traceback.
  p = run(cli(str(tmp_path / "wd"), tfds_dir, "--config.train.bogus=3"))
  one_line_error(p, "sparse_lm.main: --config.train.bogus: the config has no such key")


def test_unwritable_workdir_is_one_line_before_anything_compiles(tmp_path, tfds_dir, monkeypatch):
  parent = tmp_path / "locked"
  parent.mkdir()
  _freeze(str(parent))
  try:
    with backend_compiles() as compiled:
      p = in_process(
        cli(str(parent / "wd"), tfds_dir, "--config.train.num_steps=2"), monkeypatch=monkeypatch
      )
  finally:
    _thaw(str(parent))
  one_line_error(p, "is not writable")
  assert not compiled  # refused before anything was compiled


def test_second_sigterm_during_shutdown_still_exits_zero(tmp_path, tfds_dir):
  # Defect 7: a second SIGTERM during the final save/eval gave rc -15.
  wd = str(tmp_path / "term2")
  args = endless(
    wd, tfds_dir, "--config.train.checkpoint_every=100000", "--config.train.eval_batches=200"
  )
  proc = start_until_step(args, wd, 3)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.3)
  proc.send_signal(signal.SIGTERM)  # during the save or the final eval (200 batches)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, (proc.returncode, err[-3000:])
  assert "already stopping" in out and saved_steps(wd)
  assert f"done at step {saved_steps(wd)[-1]}" in out


LATE_REPORT = """
import asyncio, tensorstore as ts
from sparse_lm import checkpoint
promise, future = ts.Promise.new()
loop = asyncio.new_event_loop()
async def waiter():
  return await future
task = loop.create_task(waiter())
loop.run_until_complete(asyncio.sleep(0.01))
loop.close()
try:
  with checkpoint._quiet_failed_reads():
    # A read still in flight completes after Orbax's loop closed, before the
    # failure reaches the caller: TensorStore reports it as unraisable.
    promise.set_result(1)
    raise ValueError("the first array failed")
except ValueError:
  print("reported in one line")
"""


def test_a_read_finishing_after_the_failure_is_not_reported():
  # CI saw this race under load: two "Event loop is closed" tracebacks after a
  # broken checkpoint, because the filter was installed only once the error
  # reached the caller.
  p = run([sys.executable, "-c", LATE_REPORT])
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == "reported in one line" and p.stderr == "", p.stderr
