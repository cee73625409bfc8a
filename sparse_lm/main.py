r"""Entry point: flags, multi-host init, train.

  python -m sparse_lm.main --config=configs/switch.py:tiny --workdir=runs/switch \
      --config.train.num_steps=200

Under several processes (SLURM, TPU pods, or --coordinator/--num_processes/
--process_id) it initialises jax.distributed before anything touches a device.
"""

from absl import flags
from ml_collections import config_flags

from sparse_lm import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs and checkpoints go.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-host: JAX's own cluster detection, or the coordinator given by hand.
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() with JAX's own cluster detection (SLURM, TPU pods, ...).",
)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top

  if _COORDINATOR.value or _DISTRIBUTED.value:
    # CPU devices need gloo for cross-process collectives; the setting only
    # touches the CPU client. (Asking jax.default_backend() first would start
    # the backend, and initialize() must come before that.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  from sparse_lm import train  # pylint: disable=g-import-not-at-top

  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main, "sparse_lm.main")  # user errors end as one line (cli.py)
