r"""Learning-rate sweep of the dense baseline of configs/sweeps/switch_vs_dense.py.

  python -m sparse_lm.sweep --config=configs/sweeps/dense_lr.py --workdir=runs/dense_lr

The same model, data, schedule and horizon as that study's dense point (seed
0), at half and twice its LEARNING_RATE (the core grid's dense seed-0 run is
the point at LEARNING_RATE itself); the best rate is the study's, shared by
every Switch point. experiments/switch_vs_dense/report.py tables all three.
"""

from sparse_lm import config as cfglib


def get_config(arg: str = "cpu"):
  c = cfglib.load_config(f"configs/sweeps/switch_vs_dense.py:{arg or 'cpu'}")
  c.model.moe.num_experts = 1  # dense
  return c


def sweep(add):
  base = cfglib.load_module("configs/sweeps/switch_vs_dense.py").LEARNING_RATE
  for lr in (base / 2, base * 2):
    add(**{"train.learning_rate": lr})
