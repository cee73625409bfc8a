"""The workdir's life: lock, config record, Orbax checkpoints, restore targets,
and restoring a chosen subset of another run's parameters by name.

What a run guarantees (README, "Checkpoints"), and where:
  * one process per workdir: `open_workdir` takes a lock file that the OS
    releases when the holder dies (kill -9 included); a second launch is
    refused in one line naming the holder;
  * a resumed run keeps what the checkpoint holds: `check_resume` refuses a
    config whose parameter or optimizer tree differs (or whose tokenizer
    does), and names the other changed keys in one line;
  * only finite states are saved: `Checkpointer.save` checks the state before
    it writes (the trainer also checks every step's loss, train.py), so
    rotation (train.keep_checkpoints) only ever drops finite checkpoints;
  * a checkpoint that cannot be written ends the run in one line naming the
    step that failed and the last step on disk (Orbax saves asynchronously:
    a failure surfaces at the next save or at the end);
  * a latest checkpoint that cannot be read is moved to
    workdir/broken_checkpoints/, named in one line (step and array), and the
    step before it is restored; tmp folders of killed saves are removed.

`restore_params` (fine-tuning's train.init_from) reads only the parameters of
another run's checkpoint, by name rules, onto the new run's abstract state
and mesh: the source may have been saved on any mesh.
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
from typing import NamedTuple
import zlib

from absl import logging
import filelock
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp

from sparse_lm import cli
from sparse_lm import config as cfglib


class RunError(cli.UserError, RuntimeError):
  """A run cannot go on; the message is one line that says what to do."""


class CheckpointWriteError(RunError):
  """A checkpoint could not be written. Orbax's save threads never finish
  after that, so the program exits with os._exit once the message is out."""

  hard_exit = True


def _one_line(e: BaseException, n: int = 200) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"


# ------------------------------------------------------------------- workdir


def open_workdir(workdir: str) -> filelock.FileLock | None:
  """Checks that `workdir` is a writable directory (creating it) and takes its
  lock, so that a second run on it is refused. Process 0 only; None elsewhere."""
  if jax.process_index() != 0:
    return None
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
    raise cfglib.ConfigError(
      f"workdir {workdir} holds a run with another tokenizer ({show(tok)}); "
      "use a new --workdir, or restore those values"
    )
  if tree_of(old_c) != tree_of(c):
    arch = [k for k in changed if k.startswith(("model.", "train.optimizer", "train.frozen"))]
    raise cfglib.ConfigError(
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
  """Filters the unraisable-exception and thread-exception hooks: reports
  that come from Orbax's read coroutines (or their closed event loop) are
  dropped, everything else goes to the hooks as before. Installed once, for
  the rest of the process (the late reports come after the read returns)."""
  if getattr(sys.unraisablehook, "_sparse_lm", False):
    return
  orbax_code = lambda obj: "orbax" in getattr(getattr(obj, "cr_code", None), "co_filename", "")
  closed_loop = lambda e: isinstance(e, RuntimeError) and "Event loop is closed" in str(e)
  unraisable, thread = sys.unraisablehook, threading.excepthook

  def unraisable_hook(u):
    if not (orbax_code(u.object) or closed_loop(u.exc_value)):
      unraisable(u)

  def thread_hook(args):
    if not closed_loop(args.exc_value):
      thread(args)

  unraisable_hook._sparse_lm = True  # pylint: disable=protected-access
  sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook


_TS_PATH = re.compile(r"""'path': '([^']+)'""")  # in a TensorStore spec


def _broken_part(e: BaseException) -> str:
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
    line; the next older one is tried."""
    for step in reversed(self.steps()):
      try:
        with _quiet_failed_reads():
          out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
              state=ocp.args.StandardRestore(state_target), data=ocp.args.JsonRestore()
            ),
          )
      except Exception as e:  # pylint: disable=broad-except  # any failure: try the older one
        self._move_broken(step, e)
        continue
      self.last_saved = step
      return step, out["state"], out["data"]
    return None, None, None

  def _move_broken(self, step: int, e: BaseException):
    step_dir = os.path.join(self.dir, str(step))
    dest = os.path.join(self.workdir, "broken_checkpoints", f"{step}.{int(time.time())}")
    why = _broken_part(e)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(step_dir, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"moved broken checkpoint {step}")
    self._mngr.reload()
    self.say(
      f"checkpoint of step {step} cannot be read ({why}); moved to {dest}, trying the one before it"
    )

  def restore_step(self, step: int | None, state_target) -> tuple[int, Any]:
    """(step, state) of `step` (None: the latest), or a one-line RunError."""
    steps = self.steps()
    step = steps[-1] if step is None and steps else step
    if step is None or step not in steps:
      raise RunError(
        f"{self.dir} holds no checkpoint"
        + (f" of step {step} (it has {steps})" if step is not None else "")
      )
    try:
      with _quiet_failed_reads():
        out = self._mngr.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state_target))
        )
    except Exception as e:  # pylint: disable=broad-except  # a shape that does not fit, a broken file
      raise RunError(
        f"the checkpoint of step {step} in {self.dir} does not fit the run's config or "
        f"cannot be read ({_broken_part(e)})"
      ) from None
    return step, out["state"]

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

  def save(self, step: int, state, data_state: dict):
    """Saves step's state (asynchronously) if it is finite, else a RunError."""
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


def path_str(path) -> str:
  """A state path as the name rules see it: "blocks/1/ffn/wi"."""
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def params_of(state) -> dict[str, Any]:
  """{path: leaf} of the model's nnx.Param values in a split train state."""
  flat = nnx.to_flat_state(state)
  return {path_str(p[1:]): v for p, v in flat if p[0] == 0 and isinstance(v, nnx.Param)}


class Assign(NamedTuple):
  """How one parameter of the new run is initialised."""

  source: str | None  # the source path, or None: fresh (the new run's own init)
  how: str  # "copy", "experts" (copied into every expert: upcycling), "tile" (E -> m E), "fresh"


def plan_init(
  rules, targets: dict[str, tuple], sources: dict[str, tuple], key="train.init_rules"
) -> dict[str, Assign]:
  """Which source parameter initialises each target one, by name rules (T5X's
  assignment map): `rules` is an ordered list of (regex, source) pairs; the
  first regex that fully matches a target path decides: `source` is a
  re.sub template of the source path ("\\1" for groups) or None for a fresh
  init. A target no rule matches takes the source parameter of its own name,
  or is fresh when the source has none. targets: {path: (shape, logical
  names)}; sources: {path: (shape, dtype)}. Shapes decide the copy: equal
  (copy), the target one expert axis more (upcycling: every expert a copy), or
  the target's expert axis a multiple of the source's (tile). Anything else,
  a rule that matches nothing, or a source path that does not exist is a
  one-line ConfigError naming both paths and shapes."""
  compiled = []
  for i, (rx, src) in enumerate(rules):
    try:
      compiled.append((re.compile(rx), src))
    except re.error as e:
      raise cfglib.ConfigError(f"config.{key}[{i}]={rx!r} is not a regex: {e}") from None
  used = [False] * len(compiled)
  plan = {}
  for path, (shape, names) in targets.items():
    hit = next((i for i, (rx, _) in enumerate(compiled) if rx.fullmatch(path)), None)
    if hit is None:
      src = path if path in sources else None
    else:
      used[hit] = True
      rx, template = compiled[hit]
      src = None if template is None else rx.fullmatch(path).expand(template)
      if src is not None and src not in sources:
        raise cfglib.ConfigError(
          f"config.{key}[{hit}] maps {path} to {src}, which the source checkpoint does not have"
        )
    plan[path] = Assign(src, "fresh") if src is None else _how(path, shape, names, src, sources)
  unused = [rules[i][0] for i, u in enumerate(used) if not u]
  if unused:
    raise cfglib.ConfigError(f"config.{key}: {unused[0]!r} matches no parameter of the new model")
  return plan


def _how(path, shape, names, src, sources) -> Assign:
  s_shape = tuple(sources[src][0])
  shape = tuple(shape)
  expert = bool(names) and names[0] == "expert"
  if s_shape == shape:
    return Assign(src, "copy")
  if expert and shape[1:] == s_shape:
    return Assign(src, "experts")
  if expert and shape[1:] == s_shape[1:] and s_shape and shape[0] % s_shape[0] == 0:
    return Assign(src, "tile")
  raise cfglib.ConfigError(
    f"config.train.init_from: {path} {shape} cannot take the source's {src} {s_shape} "
    "(shapes differ); re-initialise it with a train.init_rules entry (regex, None)"
  )


class InitReport(NamedTuple):
  """What init_from did to each parameter of the new run: {path: how}."""

  source: str
  step: int
  how: dict[str, str]  # "copied from P", "copied from P into every expert", "fresh", ...

  def line(self) -> str:
    """One line: which parameters came from where, and which are fresh."""
    groups: dict[str, list[str]] = {}
    for path, how in self.how.items():
      groups.setdefault(how.split(" from ")[0], []).append(path)
    parts = [f"{k} ({len(v)}): {_compact(v)}" for k, v in groups.items()]
    return f"init from {self.source} step {self.step}: " + "; ".join(parts)


def _compact(paths: list[str], n: int = 6) -> str:
  """Paths with their layer numbers folded: blocks/{0,2}/attn/wq."""
  folded: dict[str, list[str]] = {}
  for p in paths:
    m = re.match(r"(blocks/)(\d+)(/.*)", p)
    key, layer = ((m.group(1) + "{}" + m.group(3)), m.group(2)) if m else (p, None)
    folded.setdefault(key, []).append(layer)
  out = [
    k.format("{" + ",".join(ls) + "}" if len(ls) > 1 else ls[0]) if ls[0] is not None else k
    for k, ls in folded.items()
  ]
  return ", ".join(out[:n]) + (f", ... ({len(out) - n} more)" if len(out) > n else "")


def parse_source(spec: str, key: str = "train.init_from") -> tuple[str, int | None]:
  """'WORKDIR[:STEP]' -> (absolute workdir, step or None), or a one-line error."""
  path, step = spec, None
  head, sep, tail = spec.rpartition(":")
  if sep and tail.isdigit():
    path, step = head, int(tail)
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise cfglib.ConfigError(f"config.{key}={spec!r} is invalid: {path} holds no run's checkpoints")
  return path, step


def source_params(workdir: str, step: int | None, key: str = "train.init_from"):
  """(step, {path: (shape, dtype)}) of the model variables in a run's checkpoint,
  read from its metadata (nothing is loaded)."""
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  step = steps[-1] if step is None and steps else step
  if step is None or step not in steps:
    raise cfglib.ConfigError(
      f"config.{key} is invalid: {workdir}/checkpoints has no step {step} (it has {steps})"
    )
  with _absl_errors_only():  # (it warns that the item has no _CHECKPOINT_METADATA file)
    tree = ocp.PyTreeCheckpointer().metadata(_state_dir(workdir, step)).item_metadata.tree
  flat = jax.tree_util.tree_flatten_with_path(tree["0"], is_leaf=lambda x: hasattr(x, "shape"))[0]
  return step, {
    path_str(p[:-1]): (tuple(m.shape), np.dtype(m.dtype))
    for p, m in flat  # p[-1]: "value"
  }


def _state_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "checkpoints", str(step), "state")


def read_params(workdir: str, step: int, targets: dict[str, jax.ShapeDtypeStruct]) -> dict:
  """The source's model variables `targets` ({path: sharded ShapeDtypeStruct}),
  read (only those) onto the targets' shardings, whatever mesh saved them."""
  nested: dict = {}
  for path, t in targets.items():
    node = nested.setdefault("0", {})
    for k in path.split("/"):
      node = node.setdefault(k, {})
    node["value"] = t
  args = ocp.args.PyTreeRestore(
    item=nested,
    restore_args=jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), nested),
    partial_restore=True,
  )
  with _quiet_failed_reads(), _absl_errors_only():
    out = ocp.PyTreeCheckpointer().restore(_state_dir(workdir, step), args=args)
  get = lambda path: functools.reduce(lambda n, k: n[k], ["0", *path.split("/"), "value"], out)
  return {path: get(path) for path in targets}


def expected_gate_mass(moe) -> float:
  """The sum of a token's chosen gates when every router logit is equal (a
  zero router): what an upcycled MoE scales its copies' output by. Gates that
  sum to 1 (mixtral, normalised top-k / sigmoid, hierarchical) give 1."""
  if moe.router == "switch":
    return 1.0 / moe.num_experts  # the chosen softmax probability
  if moe.router == "topk" and not moe.normalize_gates:
    return moe.top_k / moe.num_experts
  if moe.router in ("sigmoid_bias", "group_limited") and not moe.normalize_gates:
    return moe.top_k * 0.5  # sigmoid(0) per chosen expert
  return 1.0


def _model_leaves(state) -> dict[str, tuple]:
  """{path: (keypath, leaf)} of the model variables (part 0) of a train state."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in kp]
    keys = [k for k, p in zip(keys, kp) if not isinstance(p, jax.tree_util.GetAttrKey)]
    if keys and keys[0] == 0:
      out["/".join(map(str, keys[1:]))] = (kp, leaf)
  return out


def logical_names(abs_state) -> dict[str, tuple]:
  """{path: logical axis names} of the model variables of an abstract train state."""
  flat = nnx.to_flat_state(abs_state)
  return {
    path_str(p[1:]): tuple(v.get_metadata().get("out_sharding") or ()) for p, v in flat if p[0] == 0
  }


def init_from(c, state, abs_state) -> tuple[Any, InitReport]:
  """The new run's initial state with its model variables taken from
  train.init_from's checkpoint by train.init_rules (plan_init), transformed
  (copy / into every expert / tiled; upcycling's gate scale and Drop-Upcycling
  re-init), placed with the new state's shardings. The optimizer and step
  stay fresh."""
  t, spec = c.train, cfglib.model_spec(c)
  source, step = parse_source(t.init_from)
  step, sources = source_params(source, step)
  leaves, names = _model_leaves(state), logical_names(abs_state)
  targets = {p: (leaf.shape, names.get(p, ())) for p, (_, leaf) in leaves.items()}
  plan = plan_init(t.init_rules, targets, sources)
  reads = {}
  for path, a in plan.items():
    if a.source is None:
      continue
    shd = leaves[path][1].sharding
    if isinstance(shd, jax.sharding.NamedSharding) and a.how != "copy":
      # "experts": the target's sharding without its expert axis; "tile": replicated.
      pspec = shd.spec[1:] if a.how == "experts" else ()
      shd = jax.sharding.NamedSharding(shd.mesh, jax.sharding.PartitionSpec(*pspec))
    reads[a.source] = jax.ShapeDtypeStruct(sources[a.source][0], sources[a.source][1], sharding=shd)
  values = read_params(source, step, reads)
  scale = 1.0 / expected_gate_mass(spec.moe) if t.init_gate_scale == "expected" else 1.0
  new, how = {}, {}
  for path, a in plan.items():
    kp, fresh = leaves[path]
    if a.source is None:
      how[path] = "fresh"
      continue
    x = values[a.source]
    new[path] = _transform(x, fresh, a.how, path, scale, t.init_reinit_fraction, t.seed)
    how[path] = {
      "copy": f"copied from {a.source}",
      "experts": f"copied into every expert from {a.source}",
      "tile": f"tiled over the experts from {a.source}",
    }[a.how]
  by_kp = {leaves[p][0]: v for p, v in new.items()}
  state = jax.tree_util.tree_map_with_path(lambda kp, x: by_kp.get(kp, x), state)
  return state, InitReport(f"{source}", step, how)


def _transform(x, fresh, how: str, path: str, scale: float, reinit: float, seed: int):
  """One target variable from its source value (see init_from)."""
  leaf = path.rsplit("/", 1)[-1]

  def make(x, fresh):
    x = x.astype(fresh.dtype)
    if how == "copy":
      return x
    if how == "tile":
      return jnp.tile(x, (fresh.shape[0] // x.shape[0],) + (1,) * (x.ndim - 1))
    y = jnp.broadcast_to(x[None], fresh.shape)
    if leaf == "wo":  # [E, F, D]: the copies' output projection carries the gate scale
      y = y * scale
    if reinit and leaf in ("wi", "wg", "wo"):
      # Drop-Upcycling (arXiv 2502.19261): per expert, a random fraction of the
      # hidden units keeps the fresh init (the same units for wi, wg and wo of
      # a layer; the paper draws them from the copied weights' statistics).
      E, F = fresh.shape[0], fresh.shape[2 if leaf != "wo" else 1]
      key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.rsplit("/", 1)[0].encode()))
      rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (E, F)), -1), -1)
      drop = rank < round(reinit * F)
      drop = drop[:, None, :] if leaf != "wo" else drop[:, :, None]
      y = jnp.where(drop, fresh, y)
    return y

  return jax.jit(make, out_shardings=fresh.sharding)(x, fresh)
