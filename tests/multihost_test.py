"""Multi-host through the CLI: two real processes (gloo CPU collectives on
127.0.0.1, 4 simulated devices each) train exactly like one process with 8
devices on the same 2x4 (data x fsdp) mesh, and their checkpoint restores in
one process on one device. The one process's checkpoint continues on an
8x1 mesh with the losses of the uninterrupted run. Import and export on two
processes write what one process writes.

Every child writes its stdout / stderr to files beside its workdir (the
assertion messages print their tails); every wait has a timeout, and on any
failure all children still running are killed.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import helpers
import numpy as np
import pytest

from sparse_lm import convert as sparse_convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds, per group of concurrent runs
RTOL = 1e-5

# config.mesh is a list, which --config.mesh=... cannot override: a tiny config
# file takes the mesh as its argument, "data=2,fsdp=4" (missing axes are 1).
MESH_CONFIG = """
from sparse_lm import config as cfglib


def get_config(arg):
  c = cfglib.load_config("configs/dense.py:tiny")
  sizes = {k: int(v) for k, v in (kv.split("=") for kv in arg.split(","))}
  c.mesh = [(a, sizes.pop(a, 1)) for a in ("data", "fsdp", "expert", "tensor")]
  assert not sizes, sizes
  return c
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A TFDS dir with the corpus prepared and the tokenizer trained (so that
  concurrent runs only read it), and the mesh config file."""
  from sparse_lm import config as cfglib  # pylint: disable=g-import-not-at-top
  from sparse_lm.data import make_tokenizer  # pylint: disable=g-import-not-at-top

  d = tmp_path_factory.mktemp("multihost")
  data = cfglib.base_config().data
  data.data_dir, data.vocab_size = str(d / "tfds"), 512
  make_tokenizer(data)
  (d / "mesh_config.py").write_text(MESH_CONFIG)
  return d


def cli(setup, workdir, mesh, *overrides):
  """helpers.cli's tiny run on the mesh config; constant LR, so num_steps can grow on resume."""
  return helpers.cli(
    workdir,
    setup / "tfds",
    "--config.train.schedule=constant",
    "--config.train.log_every=1",
    *overrides,
    config=f"{setup / 'mesh_config.py'}:{mesh}",
  )


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Runs:
  """Children started together; wait() for all, killing the rest if one fails.

  They share a persistent compilation cache: a run on a mesh an earlier run
  already used skips XLA compilation (about half of a tiny run's CPU time).
  """

  def __init__(self, setup):
    self.procs = []  # (name, Popen, log prefix)
    self.cache = str(setup / "jax_cache")

  def start(self, name, args, devices, log):
    env = {
      **os.environ,
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {helpers.XLA_FLAGS}",
      "JAX_PLATFORMS": "cpu",
      "TF_CPP_MIN_LOG_LEVEL": "3",
      "JAX_COMPILATION_CACHE_DIR": self.cache,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
      p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=err)
    self.procs.append((name, p, log))

  def start_two_processes(self, name, args, log):
    port = free_port()
    for i in range(2):
      self.start(
        f"{name} process {i}",
        args + [f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        4,
        f"{log}.p{i}",
      )

  def wait(self, timeout=TIMEOUT):
    deadline = time.time() + timeout
    try:
      while True:
        codes = [p.poll() for _, p, _ in self.procs]
        failed = [(n, c, log) for (n, _, log), c in zip(self.procs, codes) if c not in (None, 0)]
        if failed:
          raise AssertionError("\n".join(f"{n} exited {c}:\n{tail(log)}" for n, c, log in failed))
        if all(c == 0 for c in codes):
          return
        if time.time() > deadline:
          late = [(n, log) for (n, _, log), c in zip(self.procs, codes) if c is None]
          raise AssertionError("timed out: " + "\n".join(f"{n}:\n{tail(log)}" for n, log in late))
        time.sleep(0.1)
    finally:
      self.kill()
      self.procs = []

  def kill(self):
    for _, p, _ in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def tail(log, n=3000):
  out = []
  for ext in ("out", "err"):
    with open(f"{log}.{ext}", errors="replace") as f:
      out.append(f"--- {os.path.basename(log)}.{ext}:\n{f.read()[-n:]}")
  return "\n".join(out)


def read(log):
  with open(f"{log}.out") as f:
    return f.read()


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def metric(workdir, key):
  return {r["step"]: r[key] for r in rows(workdir) if key in r}


def assert_close(got: dict, want: dict, steps, what):
  a = np.array([got[s] for s in steps])
  b = np.array([want[s] for s in steps])
  assert np.all(np.isfinite(a)), (what, got)
  np.testing.assert_allclose(a, b, rtol=RTOL, err_msg=f"{what} at steps {list(steps)}")


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
  """The run both tests compare with: one process on 8 devices, a 2x4
  (data x fsdp) mesh, 8 steps, evals every 2 steps, checkpoints at 4 and 8."""
  ref = str(tmp_path_factory.mktemp("reference") / "fsdp_2x4")
  runs = Runs(setup)
  try:
    runs.start(
      "2x4 fsdp",
      cli(
        setup,
        ref,
        "data=2,fsdp=4",
        "--config.train.num_steps=8",
        "--config.train.eval_every=2",
        "--config.train.checkpoint_every=4",
      ),
      8,
      ref,
    )
    runs.wait()
  finally:
    runs.kill()
  assert "mesh {'data': 2, 'fsdp': 4, 'expert': 1, 'tensor': 1}" in read(ref)
  assert "over 8 cpu device(s), 1 process(es)" in read(ref)
  assert sorted(os.listdir(os.path.join(ref, "checkpoints")), key=int) == ["4", "8"]
  return ref


def test_two_processes_train_like_one_and_restore_on_one_device(setup, reference, tmp_path):
  one, two = reference, str(tmp_path / "two_x4")
  runs = Runs(setup)
  try:
    # The reference (1 process x 8 devices) ran on to step 8; the two processes
    # (2 x 4 devices, the same 2x4 mesh) stop and checkpoint at 6.
    runs.start_two_processes(
      "2x4",
      cli(setup, two, "data=2,fsdp=4", "--config.train.num_steps=6", "--config.train.eval_every=6"),
      two,
    )
    runs.wait()
    out0, out1 = read(f"{two}.p0"), read(f"{two}.p1")
    assert "over 8 cpu device(s), 2 process(es)" in out0, out0
    assert "done at step 6" in out0 and "train_loss" not in out1, out1  # only process 0 reports
    # Only process 0 writes metrics.jsonl and config.json: one row per step.
    steps = [r["step"] for r in rows(two)]
    assert steps == list(range(7)), steps
    mesh = json.load(open(os.path.join(two, "config.json")))["mesh"]
    assert mesh[:2] == [["data", 2], ["fsdp", 4]], mesh
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["6"]
    # Process-count-invariant input: the same global batches, so the same losses.
    ref, got = metric(one, "train_loss"), metric(two, "train_loss")
    print("\ntrain_loss 1 process:", [ref[s] for s in range(1, 7)])
    print("train_loss 2 processes:", [got[s] for s in range(1, 7)])
    assert_close(got, ref, range(1, 7), "train_loss 2 processes vs 1")
    assert_close(metric(two, "eval_loss"), metric(one, "eval_loss"), [6], "eval_loss")

    # The two processes' checkpoint restores in one process on one device.
    runs.start(
      "1x1 resume",
      cli(setup, two, "data=1", "--config.train.num_steps=8", "--config.train.eval_every=8"),
      1,
      f"{two}.resume",
    )
    runs.wait()
    out = read(f"{two}.resume")
    assert f"resumed from {two}/checkpoints step 6" in out, out
    assert "over 1 cpu device(s), 1 process(es)" in out
    assert [r["step"] for r in rows(two)] == list(range(9))
    # Step 7's loss is computed from the restored step-6 model, optimizer and
    # data position; step 8's eval from the state trained on after the restore.
    got = metric(two, "train_loss")
    print("train_loss 7, 8: 1 process", [ref[7], ref[8]], "restored on 1x1", [got[7], got[8]])
    assert_close(got, ref, [7, 8], "train_loss after restore on 1 device")
    assert_close(metric(two, "eval_loss"), metric(one, "eval_loss"), [8], "eval_loss")
  finally:
    runs.kill()


def test_fsdp_checkpoint_restores_on_other_meshes(setup, reference, tmp_path):
  ref = reference
  runs = Runs(setup)
  try:
    # A copy of the run as it was at its step-4 checkpoint, resumed on another
    # mesh (on one device: the two-process run's checkpoint, the test above).
    targets = {"8x1": ("data=8,fsdp=1", 8)}
    for name, (mesh, devices) in targets.items():
      wd = str(tmp_path / name)
      shutil.copytree(ref, wd)
      shutil.rmtree(os.path.join(wd, "checkpoints", "8"))
      runs.start(
        name,
        cli(setup, wd, mesh, "--config.train.num_steps=8", "--config.train.eval_every=4"),
        devices,
        wd,
      )
    runs.wait()
    want = metric(ref, "train_loss")
    for name in targets:
      wd = str(tmp_path / name)
      assert f"resumed from {wd}/checkpoints step 4" in read(wd), read(wd)
      got = metric(wd, "train_loss")
      print(
        f"\ntrain_loss 5..8: 2x4 {[want[s] for s in range(5, 9)]}, "
        f"{name} {[got[s] for s in range(5, 9)]}"
      )
      assert_close(got, want, range(5, 9), f"train_loss resumed on {name}")
      assert_close(metric(wd, "eval_loss"), metric(ref, "eval_loss"), [8], f"eval_loss on {name}")
      assert all(math.isfinite(v) for v in got.values())
  finally:
    runs.kill()


def test_two_processes_import_and_export_like_one(setup, tmp_path):
  """sparse_lm.convert on two processes (one staging folder named alike by
  both, process 0 writing and renaming, barriers between): the same workdir
  files and the same exported bytes as one process."""
  fixture = os.path.join(ROOT, "tests", "fixtures", "hf", "olmoe")
  convert = lambda *args: [sys.executable, "-m", "sparse_lm.convert", *args]
  one, two = tmp_path / "one", tmp_path / "two"
  one.mkdir()
  two.mkdir()
  runs = Runs(setup)
  try:
    for verb, src, dst in (("import", "hf_dir", "workdir"), ("export", "workdir", "hf_dir")):
      at = lambda d: fixture if (verb, src) == ("import", "hf_dir") else str(d / "run")
      out = lambda d: str(d / ("run" if verb == "import" else "out"))
      args = lambda d: convert(verb, f"--{src}={at(d)}", f"--{dst}={out(d)}")
      runs.start_two_processes(f"{verb} 2 processes", args(two), str(two / verb))
      # One process: the same function in this one (host memory in, files out).
      quiet = lambda *a: None
      if verb == "import":
        sparse_convert.import_checkpoint(at(one), out(one), say=quiet)
      else:
        sparse_convert.export_checkpoint(at(one), out(one), say=quiet)
      runs.wait()
      assert f"{verb}ed" in read(str(two / verb) + ".p0"), read(str(two / verb) + ".p0")
    files = lambda d: sorted(p.name for p in (d / "out").iterdir())
    assert files(one) == files(two) and "model.safetensors" in files(one), files(two)
    for name in files(one):
      assert (one / "out" / name).read_bytes() == (two / "out" / name).read_bytes(), name
    assert not list(tmp_path.glob("*/*.importing")) and not list(tmp_path.glob("*/*.exporting"))
  finally:
    runs.kill()
