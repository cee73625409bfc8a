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
cli.define_distributed_flags()  # multi-host: JAX's cluster detection, or a coordinator


def main(argv):
  del argv
  cli.init_distributed()
  from sparse_lm import train  # pylint: disable=g-import-not-at-top

  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main, "sparse_lm.main")  # user errors end as one line (cli.py)
