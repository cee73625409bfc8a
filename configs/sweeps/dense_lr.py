r"""Learning-rate sweep of the tiny dense model (tunes the baseline of every curve).

  python -m sparse_lm.sweep --config=configs/sweeps/dense_lr.py --workdir=runs/dense_lr
"""

from sparse_lm import config as cfglib


def get_config(arg=None):
  del arg
  return cfglib.load_config("configs/dense.py:tiny")


def sweep(add):
  for lr in (1e-3, 3e-3, 1e-2):
    add(**{"train.learning_rate": lr})
