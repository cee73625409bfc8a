r"""Sizing the Switch-vs-dense study (experiments/switch_vs_dense/README.md, "Sizing").

  python -m sparse_lm.sweep --config=configs/sweeps/switch_vs_dense_calibration.py:speed \
      --workdir=runs/svd_calibration_speed
  python -m sparse_lm.sweep --config=configs/sweeps/switch_vs_dense_calibration.py:gain \
      --workdir=runs/svd_calibration_gain

Arg (after ':'):
  speed  60-step runs (speed only; the loss is not read) of the study's model
         family at two depths and two tokenizers, each as dense, Switch E=8
         and E=32 with MoE in every layer. results.csv's tokens_per_s is the
         median over log steps (compilation excluded).
  gain   1500-step runs (6.1M tokens) of dense, E=8 and E=32 for both
         tokenizers at 2 layers: how large the MoE gain is at each, before
         the study's horizon and grid are fixed.
"""

from sparse_lm import config as cfglib


def get_config(arg: str = "speed"):
  arg = arg or "speed"
  if arg not in ("speed", "gain"):
    raise cfglib.ConfigError(
      f"switch_vs_dense_calibration arg {arg!r} is unknown: 'speed' or 'gain'"
    )
  c = cfglib.load_config("configs/switch.py:tiny")
  c.model.moe.every, c.model.moe.offset = 1, 0
  c.model.moe.init_scale, c.model.moe.jitter = 1.0, 0.0
  c.data.batch_size = 32
  if arg == "speed":
    c.train.num_steps, c.train.log_every = 60, 10
    c.train.eval_every = c.train.checkpoint_every = 1000
    c.train.eval_batches = 1
  else:
    c.train.num_steps, c.train.log_every = 1500, 50
    c.train.schedule, c.train.warmup_steps, c.train.learning_rate = "rsqrt", 100, 3e-3
    c.train.eval_every, c.train.eval_batches, c.train.checkpoint_every = 250, 16, 500
  return c


def sweep(add, arg: str = "speed"):
  for tokenizer in ("sentencepiece", "byte"):
    for layers in (2, 4) if (arg or "speed") == "speed" else (2,):
      for e in (1, 8, 32):
        add(**{"data.tokenizer": tokenizer, "model.num_layers": layers, "model.moe.num_experts": e})
