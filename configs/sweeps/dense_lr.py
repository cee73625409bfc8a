r"""Learning-rate sweep of the dense baseline of configs/sweeps/switch_vs_dense.py.

  python -m sparse_lm.sweep --config=configs/sweeps/dense_lr.py --workdir=runs/dense_lr

The same model, data, schedule and horizon as that study's dense point (seed
0); the best rate becomes its LEARNING_RATE, shared by every Switch point.
experiments/switch_vs_dense/report.py puts the results in its tables.
"""

from sparse_lm import config as cfglib


def get_config(arg: str = "cpu"):
  c = cfglib.load_config(f"configs/sweeps/switch_vs_dense.py:{arg or 'cpu'}")
  c.model.moe.num_experts = 1  # dense
  return c


def sweep(add):
  for lr in (3e-3, 6e-3, 1.2e-2):
    add(**{"train.learning_rate": lr})
