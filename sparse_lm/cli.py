"""What every sparse_lm program shares on the command line: one-line errors.

A user error (a config file that does not exist, an unknown --config.key, a
value of the wrong type, a bad config value, a workdir in use, a run that
cannot go on) ends as one line on stderr, `<program>: <what to do>`, and exit
status 1, never a traceback. `run(main, name)` is absl's app.run with that.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

from sparse_lm.errors import UserError


def fail(name: str, message: str, hard: bool = False):
  print(f"{name}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  if hard:
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access
  sys.exit(1)


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_error(e: Exception) -> str:
  """absl wraps an exception raised while a flag parses (a config file's
  get_config, say) with its traceback: keep the flag and the last line."""
  lines = [l for l in str(e).splitlines() if l.strip()]
  if len(lines) > 1 and "Traceback" in str(e):
    return f"{lines[0].split(':')[0]}: {lines[-1].strip()}"
  return lines[0] if lines else type(e).__name__


def flags_parser(name: str, config_flags=("config",)):
  """An app.run flags_parser that turns every parse error into one line."""

  def parse(argv):
    for flag in config_flags:
      value = _flag_value(argv, flag)
      if value is not None and not os.path.exists(value.partition(":")[0]):
        fail(name, f"--{flag}={value}: config file {value.partition(':')[0]!r} does not exist")
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(name, _parse_error(e))
    except (AttributeError, KeyError) as e:  # --config.a.b=... where the config has no a.b
      key = str(e).strip("'\"")
      bad = [
        a.split("=")[0]
        for a in argv
        if a.startswith("--") and "." in a.split("=")[0] and a.split("=")[0].split(".")[-1] == key
      ]
      fail(
        name,
        f"{bad[0] if bad else key}: the config has no such key "
        "(all keys and defaults: sparse_lm/config.py, base_config())",
      )

  return parse


def quiet_logs():
  """Warnings and errors only (TFDS and Orbax log a line per file at INFO).
  A failed checkpoint write makes Orbax's threads log their tracebacks as
  errors; the run's own one-line message already names the cause."""
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(
    lambda r: not (r.levelno == logging.converter.STANDARD_ERROR and "/orbax/" in r.pathname)
  )


def run(main, name: str, config_flags=("config",)):
  """app.run(main) with one-line errors for bad flags and UserError."""

  def wrapped(argv):
    quiet_logs()
    try:
      return main(argv)
    except UserError as e:
      fail(name, str(e), hard=e.hard_exit)

  app.run(wrapped, flags_parser=flags_parser(name, config_flags))


def define_distributed_flags():
  """--distributed, --coordinator, --num_processes, --process_id: the
  multi-host flags of the programs that run on several processes (main,
  convert); init_distributed() reads them."""
  flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() with JAX's own cluster detection (SLURM, TPU pods, ...).",
  )
  flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's id.")


def init_distributed():
  """jax.distributed.initialize() under the multi-host flags, before anything
  touches a device; nothing without them."""
  F = flags.FLAGS
  if not (F.coordinator or F.distributed):
    return
  import jax  # pylint: disable=g-import-not-at-top

  # CPU devices need gloo for cross-process collectives; the setting only
  # touches the CPU client. (Asking jax.default_backend() first would start
  # the backend, and initialize() must come before that.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=F.coordinator, num_processes=F.num_processes, process_id=F.process_id
  )
