"""The workdir's life: lock, config record, Orbax checkpoints, restore targets,
and reading a chosen subset of another run's parameters by name.

What a run guarantees (README, "Checkpoints"), and where:
  * one process per workdir: `open_workdir` takes a lock file that the OS
    releases when the holder dies (kill -9 included); a second launch is
    refused in one line naming the holder;
  * a resumed run keeps what the checkpoint holds: `check_resume` refuses a
    config whose parameter or optimizer tree differs (or whose tokenizer
    does), and names the other changed keys in one line; the tree is
    compared by per-layer names, so model.scan_layers may change: a
    checkpoint keeps the layout of the run that saved it (stacked layers
    stay stacked on disk: no copy at save time) and a restore into the other
    layout converts once (`_across_layouts`, sparse_lm/params.py's mapping);
  * only finite states are saved: `Checkpointer.save` checks the state before
    it writes (the trainer also checks every step's loss, train.py), so
    rotation (train.keep_checkpoints) only ever drops finite checkpoints;
  * a checkpoint that cannot be written ends the run in one line naming the
    step that failed and the last step on disk (Orbax saves asynchronously:
    a failure surfaces at the next save or at the end);
  * a latest checkpoint that cannot be read is moved to
    workdir/broken_checkpoints/, named in one line (step and array), and the
    step before it is restored; tmp folders of killed saves are removed.

`param_metadata` and `read_params` (fine-tuning's train.init_from,
sparse_lm/finetune.py) read only the named parameters of another run's
checkpoint onto the new run's shardings: the source may have been saved on
any mesh, scanned or not (names are per layer; a stacked array is read once
and cut into the layers asked for).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging as py_logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from typing import Any
from typing import Callable

from absl import logging
import filelock
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp

from sparse_lm import config as cfglib
from sparse_lm import params as paramslib
from sparse_lm.errors import CheckpointWriteError
from sparse_lm.errors import ConfigError
from sparse_lm.errors import RunError


def _one_line(e: BaseException, n: int = 200) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"


# ------------------------------------------------------------------- workdir


@contextlib.contextmanager
def open_workdir(workdir: str):
  """Checks that `workdir` is a writable directory (creating it) and holds its
  lock for the `with` block, so that a second run on it is refused. Process 0
  only (the others only run the block). The first thing a run writes: every
  refusal of its config comes before it (train.py)."""
  lock = _lock(workdir) if jax.process_index() == 0 else None
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds a finished checkpoint (nothing is created)."""
  ckpts = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))


def _lock(workdir: str) -> filelock.FileLock:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f"--workdir {workdir} is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise RunError(f"--workdir {workdir} is not writable: {e.strerror or e}") from None
  lock = filelock.FileLock(os.path.join(workdir, ".lock"))
  owner = os.path.join(workdir, ".lock.owner")
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    who = open(owner).read().strip() if os.path.exists(owner) else "another process"
    raise RunError(
      f"workdir {workdir} is in use by another run ({who}); wait for it or "
      "stop it, or use another --workdir"
    ) from None
  with open(owner, "w") as f:
    f.write(
      f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
  return lock


def _write_json(path: str, text: str):
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def save_config(c, workdir: str, data_fingerprint: dict):
  """config.json (the run's config) and data.json (what generate / evaluate
  check their tokenizer against). Process 0 only."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "config.json"), c.to_json(indent=2))
    _write_json(os.path.join(workdir, "data.json"), json.dumps(data_fingerprint, indent=1))


def read_config(workdir: str) -> mlc.ConfigDict:
  """A run's config.json over today's defaults (keys added to the code since
  the run keep their defaults, which reproduce the old behaviour)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RunError(f"{workdir} holds no run (no config.json): pass the --workdir of a training run")
  with open(path) as f:
    saved = json.load(f)

  def merge(base, new):
    for k, v in new.items():
      base[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base

  return mlc.ConfigDict(merge(json.loads(cfglib.base_config().to_json()), saved))


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# What the tokenizer is made of: a change makes the checkpoint's embedding mean
# other tokens (SentencePiece is trained on the dataset's train split).
TOKENIZER_KEYS = (
  "data.tokenizer",
  "data.vocab_size",
  "data.dataset",
  "data.train_split",
  "data.tokenizer_file",
)


def check_resume(c, workdir: str, tree_of: Callable, say=print):
  """Refuses to resume `workdir` under a config `c` whose checkpoint tree
  (parameters and optimizer state: names, shapes, dtypes; `tree_of(config)`
  gives it) or tokenizer differs from the saved run's, naming the keys;
  names any other changed key in one line and goes on."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  old_c = read_config(workdir)
  old, new = _flat(json.loads(old_c.to_json())), _flat(json.loads(c.to_json()))
  changed = [k for k in sorted(set(old) & set(new)) if old[k] != new[k]]
  if not changed:
    return
  show = lambda keys: "; ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in keys)
  tok = [k for k in changed if k in TOKENIZER_KEYS]
  if tok:
    raise ConfigError(
      f"workdir {workdir} holds a run with another tokenizer ({show(tok)}); "
      "use a new --workdir, or restore those values"
    )
  if tree_of(old_c) != tree_of(c):
    arch = [k for k in changed if k.startswith(("model.", "train.optimizer", "train.frozen"))]
    raise ConfigError(
      f"workdir {workdir} holds a run with a different architecture "
      f"({show(arch or changed)}: its parameters or optimizer state have other names or "
      "shapes); use a new --workdir, or restore those values"
    )
  say(f"resuming with a changed config: {show(changed)}")


class WallClock:
  """workdir/wall_time.json: this run's seconds over all its processes' lives
  (a resumed run adds to it), rewritten at every log step. Process 0 only."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "wall_time.json")
    self.enabled = jax.process_index() == 0
    self.before, self.t0 = 0.0, time.time()
    if self.enabled and os.path.exists(self.path):
      with open(self.path) as f:
        self.before = float(json.load(f)["seconds"])

  def update(self):
    if self.enabled:
      _write_json(self.path, json.dumps({"seconds": self.before + time.time() - self.t0}))


# --------------------------------------------------------------- checkpoints


def target(abs_state, shardings):
  """The restore target: the abstract state's shapes and dtypes with shardings."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings
  )


@jax.jit
def _all_finite(state) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves]))


@contextlib.contextmanager
def _absl_errors_only():
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _quiet_failed_reads():
  """A failed Orbax read leaves asyncio futures and coroutines whose errors
  are reported later, when they are collected (one traceback per array:
  "Event loop is closed", "exception was never retrieved", "Exception ignored
  in: <coroutine ...>"); the caller reports the failure in one line instead,
  so those reports are dropped. The filter goes in before the read: the reads
  still in flight when the first one fails report from Orbax's thread while
  the error travels up to the caller (CI saw two such tracebacks under load)."""
  log = py_logging.getLogger("asyncio")
  level = log.level
  log.setLevel(py_logging.CRITICAL)
  _drop_failed_read_reports()
  try:
    yield
  except BaseException:
    level = py_logging.CRITICAL  # its futures report later too, when collected
    raise
  finally:
    gc.collect()  # most of the failed futures report when collected: while quiet
    log.setLevel(level)


def _drop_failed_read_reports():
  """Filters the unraisable-exception, thread-exception and uncaught-exception
  hooks: reports that come from Orbax's coroutines or from their closed event
  loop are dropped, everything else goes to the hooks as before. Installed
  once, for the rest of the process (the late reports come after the read or
  the failed write returns). The uncaught-exception hook is what TensorStore's
  callbacks print through (PyErr_Print): after a failed write (a full disk)
  each still-pending write reported "RuntimeError: Event loop is closed" with
  its traceback before or after the run's one-line error."""
  if getattr(sys.unraisablehook, "_sparse_lm", False):
    return
  orbax_code = lambda obj: "orbax" in getattr(getattr(obj, "cr_code", None), "co_filename", "")
  closed_loop = lambda e: isinstance(e, RuntimeError) and "Event loop is closed" in str(e)
  unraisable, thread, uncaught = sys.unraisablehook, threading.excepthook, sys.excepthook

  def unraisable_hook(u):
    if not (orbax_code(u.object) or closed_loop(u.exc_value)):
      unraisable(u)

  def thread_hook(args):
    if not closed_loop(args.exc_value):
      thread(args)

  def uncaught_hook(kind, value, tb):
    if not closed_loop(value):
      uncaught(kind, value, tb)

  unraisable_hook._sparse_lm = True  # pylint: disable=protected-access
  sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook
  sys.excepthook = uncaught_hook


_TS_PATH = re.compile(r"""'path': '([^']+)'""")  # in a TensorStore spec


def broken_part(e: BaseException) -> str:
  """The array a failed read names (from the TensorStore spec Orbax quotes:
  its relative 'path' is the array's name), else the error in short."""
  names = [p.rstrip("/") for p in _TS_PATH.findall(str(e)) if not p.startswith("/")]
  if names:
    return f"array {names[-1].removesuffix('.value')} is damaged"
  return _one_line(e, 160)


class Checkpointer:
  """A run's Orbax checkpoints in workdir/checkpoints: finite-only saves with
  rotation, restore of the newest readable step (moving broken ones aside),
  and one-line errors that name the step. `say` prints progress (process 0)."""

  def __init__(self, workdir: str, *, keep: int | None = None, read_only=False, say=print):
    self.workdir, self.dir, self.say = workdir, os.path.join(workdir, "checkpoints"), say
    if read_only:
      with _absl_errors_only():  # Orbax warns that a read-only manager will not save
        options = ocp.CheckpointManagerOptions(read_only=True)
        self._mngr = ocp.CheckpointManager(self.dir, options=options)
    else:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True
      )
      self._mngr = ocp.CheckpointManager(self.dir, options=options)
      _drop_failed_read_reports()  # a failed write reports late too (a full disk)
    self.last_saved: int | None = None
    self._in_flight: int | None = None  # the async save not yet known to be on disk
    self._failed = False

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def on_disk(self) -> list[int]:
    """Steps whose folder is finalised on disk (Orbax renames a save's tmp
    folder only once it is complete)."""
    if not os.path.isdir(self.dir):
      return []
    return sorted(int(d) for d in os.listdir(self.dir) if d.isdigit())

  # ---- restore ----

  def restore_latest(self, state_target) -> tuple[int | None, Any, dict | None]:
    """(step, state, data position) of the newest checkpoint that restores, or
    (None, None, None). A checkpoint that fails to restore (truncated array,
    corrupt metadata) is moved to workdir/broken_checkpoints/ and named in one
    line; the next older one is tried. A parameters-only checkpoint (an
    import, train.save_optimizer=False) restores as the model part alone
    (state.with_fresh_optimizer completes it)."""
    for step in reversed(self.steps()):
      try:
        with _quiet_failed_reads():
          target = (
            state_target if holds_optimizer(self._state_dir(step)) else _model_part(state_target)
          )
          saved_target, to_run = _across_layouts(self._state_dir(step), target)
          out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
              state=ocp.args.StandardRestore(saved_target), data=ocp.args.JsonRestore()
            ),
          )
      except Exception as e:  # pylint: disable=broad-except  # any failure: try the older one
        self._move_broken(step, e)
        continue
      self.last_saved = step
      return step, to_run(out["state"]), out["data"]
    return None, None, None

  def _move_broken(self, step: int, e: BaseException):
    step_dir = os.path.join(self.dir, str(step))
    dest = os.path.join(self.workdir, "broken_checkpoints", f"{step}.{int(time.time())}")
    why = broken_part(e)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(step_dir, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"moved broken checkpoint {step}")
    self._mngr.reload()
    self.say(
      f"checkpoint of step {step} cannot be read ({why}); moved to {dest}, trying the one before it"
    )

  def resolve(self, step: int | None) -> int:
    """`step` (None: the latest) if it is saved, else a one-line RunError."""
    steps = self.steps()
    step = steps[-1] if step is None and steps else step
    if step is None or step not in steps:
      raise RunError(
        f"{self.dir} holds no checkpoint"
        + (f" of step {step} (it has {steps})" if step is not None else "")
      )
    return step

  def restore_step(self, step: int | None, state_target) -> tuple[int, Any]:
    """(step, state) of `step` (None: the latest), or a one-line RunError."""
    step = self.resolve(step)
    try:
      with _quiet_failed_reads():
        saved_target, to_run = _across_layouts(self._state_dir(step), state_target)
        out = self._mngr.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(saved_target))
        )
    except Exception as e:  # pylint: disable=broad-except  # a shape that does not fit, a broken file
      raise RunError(
        f"the checkpoint of step {step} in {self.dir} does not fit the run's config or "
        f"cannot be read ({broken_part(e)})"
      ) from None
    return step, to_run(out["state"])

  def _state_dir(self, step: int) -> str:
    return os.path.join(self.dir, str(step), "state")

  # ---- save ----

  def nonfinite_message(self, step: int, what: str) -> str:
    where = (
      f"the last checkpoint, step {self.last_saved} in {self.dir}, is finite"
      if self.last_saved is not None
      else "no checkpoint was saved yet"
    )
    return (
      f"step {step}: {what} is not finite and was not saved; {where}. Run the same "
      "command with a lower --config.train.learning_rate (or with "
      "--config.train.skip_nonfinite_steps=N to skip such steps) to go on from it"
    )

  def save(self, step: int, state, data_state: dict, *, optimizer: bool = True):
    """Saves step's state (asynchronously) if it is finite, else a RunError.
    optimizer=False (train.save_optimizer): the model part only, a
    parameters-only checkpoint (a third of AdamW's bytes, for release)."""
    if not optimizer:
      state = _model_part(state)
    if not bool(_all_finite(state)):
      raise RunError(self.nonfinite_message(step, "the parameters or optimizer state"))
    try:
      self._mngr.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
      )
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises what the file system raised
      self._write_failed(step, e)
    self.last_saved, self._in_flight = step, step

  def _write_failed(self, step: int, e: BaseException):
    """The one-line error of a failed write: the failed step is the async save
    still in flight if it never reached the disk, else `step`."""
    self._failed = True
    on_disk = self.on_disk()
    failed = self._in_flight if self._in_flight not in (None, *on_disk) else step
    last = f"the last checkpoint on disk is step {on_disk[-1]}" if on_disk else "none is on disk"
    raise CheckpointWriteError(
      f"could not write the checkpoint of step {failed} to {self.dir} ({_one_line(e)}); {last}"
    ) from None

  def close(self):
    """Waits for the last save; a failed one is a CheckpointWriteError."""
    if self._failed:  # a failed save leaves threads that never finish
      return
    try:
      self._mngr.wait_until_finished()
      self._mngr.close()
    except Exception as e:  # pylint: disable=broad-except  # an async write failed
      self._write_failed(self._in_flight, e)


# ------------------------------------------------------ another run's params


def _state_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "checkpoints", str(step), "state")


def _saved_leaves(state_dir: str) -> dict[str, tuple]:
  """{path: (shape, dtype)} of every leaf of a saved train state ("0/..." the
  model's, "1/..." the optimizer's), read from its metadata (nothing is loaded).
  Remembered per folder (a finished step is never rewritten in place; the
  key has the folder's inode and time): a reader that reads one parameter at
  a time (the export) would otherwise read every leaf's metadata per
  parameter, and each such read leaves about 1 MiB behind in TensorStore."""
  try:
    st = os.stat(state_dir)
  except OSError:  # Orbax's own error, as before
    return _saved_leaves_of.__wrapped__(state_dir, 0, 0)
  return dict(_saved_leaves_of(state_dir, st.st_ino, st.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _saved_leaves_of(state_dir: str, inode: int, mtime: int) -> dict[str, tuple]:
  del inode, mtime  # the cache key only
  with _absl_errors_only():  # (it warns that the item has no _CHECKPOINT_METADATA file)
    tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {
    paramslib.path_str(p[:-1]): (tuple(m.shape), np.dtype(m.dtype))
    for p, m in flat  # p[-1]: "value"
  }


def _nested(flat: dict[str, Any]) -> dict:
  """{"a/b": x} -> {"a": {"b": {"value": x}}}: a restore target in the
  checkpoint's own tree (a Variable's value is its "value")."""
  nested: dict = {}
  for path, x in flat.items():
    node = nested
    for k in path.split("/"):
      node = node.setdefault(k, {})
    node["value"] = x
  return nested


def _with_layer_axis(x: jax.ShapeDtypeStruct, n: int) -> jax.ShapeDtypeStruct:
  """x stacked n times (params.LAYER_AXIS: the new leading axis unsharded)."""
  shd = x.sharding
  if isinstance(shd, jax.sharding.NamedSharding):
    shd = jax.sharding.NamedSharding(shd.mesh, jax.sharding.PartitionSpec(None, *shd.spec))
  return jax.ShapeDtypeStruct((n, *x.shape), x.dtype, sharding=shd)


def _rows(x, rows: list[int], targets: list) -> tuple:
  """Rows of a stacked array, placed on their targets' shardings (one program)."""
  return jax.jit(
    lambda x: tuple(x[r] for r in rows), out_shardings=tuple(t.sharding for t in targets)
  )(x)


def _across_layouts(state_dir: str, state_target):
  """(the restore target in the layout the checkpoint of `state_dir` was
  saved in, a function from what it restores to `state_target`'s layout).

  On disk a checkpoint keeps the layout of the run that saved it (stacked
  under model.scan_layers: no copy at save time, the arrays as trained), so a
  run that switched model.scan_layers reads it in the saved layout and
  converts once: per-layer arrays stacked, or stacked ones split per layer
  (sparse_lm/params.py names both). Layouts that agree, or metadata that
  cannot be read (the restore reports the damage), give the target as is."""
  keep = state_target, lambda state: state
  try:
    saved = _saved_leaves(state_dir)
  except Exception:  # pylint: disable=broad-except  # the restore names what is broken
    return keep
  flat = {
    paramslib.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(state_target)[0]
  }
  if set(saved) == set(flat):
    return keep
  want = paramslib.layout_of({p: x.shape for p, x in flat.items()})
  have = paramslib.layout_of({p: shape for p, (shape, _) in saved.items()})
  if (want is None) == (have is None):
    return keep  # not a change of layout: the restore says what does not fit
  per_layer = paramslib.per_layer(flat, want)
  if have is None:
    target = per_layer
  else:
    like = {p: (shape,) for p, (shape, _) in saved.items()}
    target = paramslib.stacked(
      per_layer, like, lambda rows, _: _with_layer_axis(rows[0], len(rows))
    )
  if set(target) != set(saved):
    return keep

  def to_run(restored):
    got = {
      p: functools.reduce(lambda n, k: n[k], [*p.split("/"), "value"], restored) for p in target
    }
    if want is None:  # stacked on disk -> per layer
      out = {p: x for p, x in got.items() if not paramslib.is_stacked(p)}
      for p, x in got.items():
        if paramslib.is_stacked(p):
          names = [paramslib.layer_path(p, have, r) for r in range(have.repeats)]
          out.update(zip(names, _rows(x, list(range(have.repeats)), [flat[n] for n in names])))
    else:  # per layer on disk -> stacked
      stack = lambda rows, t: jax.jit(lambda *xs: jnp.stack(xs), out_shardings=t.sharding)(*rows)
      out = paramslib.stacked(got, flat, stack)
    return jax.tree_util.tree_map_with_path(lambda kp, _: out[paramslib.path_str(kp)], state_target)

  return _nested(target), to_run


def param_metadata(workdir: str, step: int) -> dict[str, tuple]:
  """{path: (shape, dtype)} of the model variables in a run's checkpoint of
  `step`, read from its metadata (nothing is loaded), by per-layer names
  whatever model.scan_layers saved it (params.per_layer)."""
  saved = _saved_leaves(_state_dir(workdir, step))
  model = {p.split("/", 1)[1]: v for p, v in saved.items() if p.split("/", 1)[0] == "0"}
  return paramslib.per_layer(model, paramslib.layout_of({p: v[0] for p, v in model.items()}))


def read_params(workdir: str, step: int, targets: dict[str, jax.ShapeDtypeStruct]) -> dict:
  """The source's model variables `targets` ({per-layer path: sharded
  ShapeDtypeStruct}), read (only those) onto the targets' shardings, whatever
  mesh saved them; a source saved stacked (model.scan_layers) has each of its
  stacked arrays read once and cut into the layers asked for, and a stacked
  target ("scan/{j}/...", a whole model's targets) of a source saved per layer
  is its layers' arrays stacked."""
  saved = _saved_leaves(_state_dir(workdir, step))
  model = {p.split("/", 1)[1]: v for p, v in saved.items() if p.split("/", 1)[0] == "0"}
  layout = paramslib.layout_of({p: v[0] for p, v in model.items()})
  want = paramslib.layout_of({p: t.shape for p, t in targets.items()})
  reads, where, stacks = {}, {}, {}
  for path, t in targets.items():
    if path not in model and want is not None and paramslib.is_stacked(path):
      stacks[path] = [paramslib.layer_path(path, want, r) for r in range(want.repeats)]
      reads.update({n: paramslib.row(t, r) for r, n in enumerate(stacks[path])})
      continue
    hit = None if path in model else paramslib.stacked_name(path, layout)
    if hit is None:
      reads[path], where[path] = t, (path, None)
    else:
      reads[hit[0]], where[path] = _with_layer_axis(t, layout.repeats), hit
  nested = {"0": _nested(reads)}
  args = ocp.args.PyTreeRestore(
    item=nested,
    restore_args=jax.tree.map(
      lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), nested
    ),
    partial_restore=True,
  )
  with _quiet_failed_reads(), _absl_errors_only():
    out = ocp.PyTreeCheckpointer().restore(_state_dir(workdir, step), args=args)
  get = lambda path: functools.reduce(lambda n, k: n[k], ["0", *path.split("/"), "value"], out)
  values = {path: get(src) for path, (src, r) in where.items() if r is None}
  cut: dict[str, list] = {}
  for path, (src, r) in where.items():
    if r is not None:
      cut.setdefault(src, []).append((path, r))
  for src, rows in cut.items():
    got = _rows(get(src), [r for _, r in rows], [targets[p] for p, _ in rows])
    values.update(zip([p for p, _ in rows], got))
  for path, names in stacks.items():
    stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=targets[path].sharding)
    values[path] = stack(*[get(n) for n in names])
  return {path: values[path] for path in targets}


# ------------------------------------------------ parameters-only checkpoints


def _model_part(state):
  """The model part (0) of a train state, as a state of its own kind."""
  return type(state)({0: state[0]})


def holds_optimizer(state_dir: str) -> bool:
  """Whether a saved train state has its optimizer part (1), from metadata.
  Unreadable metadata counts as holding it (the restore then names what is
  broken)."""
  try:
    return any(p.split("/", 1)[0] == "1" for p in _saved_leaves(state_dir))
  except Exception:  # pylint: disable=broad-except
    return True


def write_params(workdir: str, step: int, leaves, data_state: dict, say=print) -> int:
  """A parameters-only checkpoint of `step` in workdir/checkpoints, written
  one leaf at a time: `leaves` yields (path, numpy array) of the model's
  variables ("blocks/0/attn/wq"), each written (Orbax's partial save) and
  dropped before the next is made, so the host holds one array at a time.
  The arrays are stored uncompressed (the checkpoint is the parameters'
  bytes; zstd's output buffer would be a second copy of each), and in one
  process each goes to Orbax as a jax.Array that aliases its buffer (an
  aligned numpy array is taken without a copy; a numpy leaf would be copied).
  The step appears only when complete (Orbax finalizes it by a rename); the
  trainer restores it as the model part (restore_latest). Every process
  calls it with the same leaves (Orbax writes from process 0). Returns the
  bytes written."""
  import orbax.checkpoint.experimental.v1 as ocp1  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=g-import-not-at-top

  step_dir = os.path.join(workdir, "checkpoints", str(step))
  os.makedirs(os.path.dirname(step_dir), exist_ok=True)
  total, t0 = 0, time.time()
  saving = ocp1.options.ArrayOptions.Saving(use_compression=False)
  one = jax.process_count() == 1
  options = ocp1.options.ArrayOptions(saving=saving)
  with _absl_errors_only(), ocp1.Context(array_options=options):
    for i, (path, array) in enumerate(leaves):
      total += array.nbytes
      if one:
        array = jax.device_put(array, jax.local_devices(backend="cpu")[0], may_alias=True)
      partial.save(step_dir, {"0": _nested({path: array})})
      if i % 50 == 49:
        say(f"  {i + 1} arrays, {total / 2**30:.2f} GiB written ({time.time() - t0:.0f} s)")
      del array
    partial.finalize(step_dir)
  if jax.process_index() == 0:
    os.makedirs(os.path.join(step_dir, "data"), exist_ok=True)
    _write_json(os.path.join(step_dir, "data", "metadata"), json.dumps(data_state))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"parameters of step {step} written")
  return total
