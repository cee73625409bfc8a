r"""Switch vs dense (Fedus et al. 2021, figure 4 and table 1) at CPU scale.

  python -m sparse_lm.sweep --config=configs/sweeps/switch_vs_dense.py --workdir=runs/switch_vs_dense
  python experiments/switch_vs_dense/report.py --workdir=runs/switch_vs_dense

Arg (after ':'): "cpu" (default; about an hour on 2 CPU cores) or "accel"
(the same study at d_model 512 / 8 layers for one GPU or TPU host).

Every point has the same active FLOPs per token: top-1 Switch layers in every
other layer whose experts are the dense FFN's size, so adding experts adds
parameters, not compute. The dense model is the same config with one expert
(num_experts=1 means a dense FFN). Learning rate and schedule are shared by all
points and were tuned for the dense baseline (experiments/switch_vs_dense/README.md).
"""

from sparse_lm import config as cfglib

# The dense baseline's tuned learning rate (configs/sweeps/dense_lr.py at this scale).
LEARNING_RATE = 3e-3


def get_config(arg: str = "cpu"):
  arg = arg or "cpu"
  if arg not in ("cpu", "accel"):
    raise cfglib.ConfigError(f"switch_vs_dense arg {arg!r} is unknown: 'cpu' or 'accel'")
  c = cfglib.load_config("configs/switch.py:tiny")
  c.train.learning_rate = LEARNING_RATE
  c.train.warmup_steps = 50
  c.train.eval_every = 50
  c.train.eval_batches = 16
  c.train.log_every = 25
  c.train.checkpoint_every = 250
  if arg == "cpu":
    c.train.num_steps = 1000
  else:
    c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.d_ff = 512, 8, 8, 2048
    c.data.batch_size, c.data.seq_len, c.data.vocab_size = 64, 512, 8192
    c.model.dtype = "bfloat16"
    c.train.learning_rate, c.train.num_steps = 1e-3, 20_000
    c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 500, 2_000, 100
  return c


def sweep(add):
  add(**{"model.moe.num_experts": 1})  # dense
  for e in (2, 4, 8, 16, 32):
    add(**{"model.moe.num_experts": e})
  # Table 1: capacity factor and top-2 at 8 experts (top-1 cf 1.25 is above).
  for cf in (1.0, 2.0):
    add(**{"model.moe.num_experts": 8, "model.moe.capacity_factor": cf})
  add(**{"model.moe.num_experts": 8, "model.moe.router": "topk", "model.moe.top_k": 2})
  # Ablation: the paper's reduced init (0.1) and jitter against the dense model's own init.
  for e in (8, 32, 4):
    add(**{"model.moe.num_experts": e, "model.moe.init_scale": 1.0, "model.moe.jitter": 0.0})
