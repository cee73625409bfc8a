r"""Switch vs dense (Fedus et al. 2021, figures 1 and 4, table 1) at CPU scale.

  python experiments/switch_vs_dense/report.py --run     # every sweep + the report

which runs (two points at a time), then reports on:
  python -m sparse_lm.sweep --config=configs/sweeps/switch_vs_dense.py \
      --workdir=runs/switch_vs_dense --parallel=2
  python -m sparse_lm.sweep --config=configs/sweeps/dense_lr.py --workdir=runs/dense_lr
  python -m sparse_lm.sweep --config=configs/sweeps/switch_vs_dense.py:ablations \
      --workdir=runs/switch_vs_dense_ablations --parallel=2
  python -m sparse_lm.sweep --config=configs/sweeps/switch_vs_dense.py:why \
      --workdir=runs/switch_vs_dense_why --parallel=2

Arg (after ':'):
  cpu        the core grid (default; 12 runs, about 1 hour on 2 CPU cores two
             at a time): dense and Switch E = 2, 4, 8, 16, 32, with 3 seeds at
             dense, E=8 and E=32.
  ablations  one seed each (8 runs, about 45 minutes): E=32 at a second
             learning rate, table 1's capacity factors 1.0 and 2.0 and top-2
             at E=8, a dense model matched on total parameters, jitter on,
             the paper's init s=0.1 for dense and E=8.
  why        one seed each at E=8 and E=32 (about 40 minutes): twice the
             steps, dropless dispatch, a sigmoid gate; why the gain peaks.
  long       the core grid with the two levers of the why runs together:
             twice the steps (2400, 9.8M tokens) and dropless dispatch
             (12 runs, 1 h 55 min here two at a time).
  accel      the core grid at d_model 512 / 8 layers for one GPU or TPU host.

Every point has the same active FLOPs per token: top-1 Switch layers in every
layer whose experts are the dense FFN's size, so adding experts adds
parameters, not compute. The dense model is the same config with one expert
(num_experts=1 means a dense FFN). One initialisation for all (the default,
s=1, for every weight of dense and MoE alike; the paper's s=0.1 is an
ablation), one learning rate tuned for the dense baseline at this horizon
(configs/sweeps/dense_lr.py; experiments/switch_vs_dense/README.md), and the
same data order for every point of one seed: train.seed sets the model init
and the data order together. Sizing: experiments/switch_vs_dense/README.md.
"""

from sparse_lm import config as cfglib

# The dense baseline's tuned learning rate at this horizon, with the cooldown
# (configs/sweeps/dense_lr.py; experiments/switch_vs_dense/README.md).
LEARNING_RATE = 1.2e-2
EXPERTS = (2, 4, 8, 16, 32)
SEEDS = (0, 1, 2)
SEEDED = (1, 8, 32)  # expert counts run with every seed (1 = dense)
COOLDOWN_STEPS = 200  # the last 200 steps decay linearly to 0 (README.md, "Noise")
NUM_STEPS = 1200  # 4.9M tokens; why: experiments/switch_vs_dense/README.md
ARGS = ("cpu", "long", "ablations", "why", "accel")


def get_config(arg: str = "cpu"):
  arg = arg or "cpu"
  if arg not in ARGS:
    raise cfglib.ConfigError(f"switch_vs_dense arg {arg!r} is unknown: one of {', '.join(ARGS)}")
  c = cfglib.load_config("configs/switch.py:tiny")
  m = c.model
  m.init_scale = 1.0  # the default init for every weight (s=0.1 is an ablation)
  m.moe.jitter = 0.0  # jitter on is an ablation
  m.moe.every, m.moe.offset = 1, 0  # MoE in every layer: the FFN is most of the step
  c.data.batch_size = 32  # 4096 tokens a step
  t = c.train
  t.learning_rate, t.schedule, t.warmup_steps = LEARNING_RATE, "rsqrt", 100
  t.num_steps = NUM_STEPS
  t.cooldown_steps = COOLDOWN_STEPS
  t.eval_every, t.eval_batches = 100, 16
  t.log_every, t.checkpoint_every = 25, 500
  if arg == "long":
    # The why runs' two levers together: twice the tokens, no dropped tokens.
    m.moe.dispatch = "dropless"
    t.num_steps, t.cooldown_steps = 2 * NUM_STEPS, 2 * COOLDOWN_STEPS
  if arg == "accel":
    m.d_model, m.num_layers, m.num_heads, m.d_ff = 512, 8, 8, 2048
    c.data.batch_size, c.data.seq_len, c.data.vocab_size = 64, 512, 8192
    m.dtype = "bfloat16"
    t.learning_rate, t.warmup_steps, t.num_steps = 1e-3, 500, 5_000
    t.cooldown_steps = 1_000
    t.eval_every, t.checkpoint_every, t.log_every = 250, 1_000, 50
  return c


def sweep(add, arg: str = "cpu"):
  arg = arg or "cpu"
  if arg == "why":
    return _why(add)
  if arg in ("cpu", "long", "accel"):
    # Seed 0 of every E first, then the other seeds: a grid cut short still has
    # the whole curve at one seed.
    for seed in SEEDS:
      for e in (1,) + EXPERTS:
        if e in SEEDED:
          add(**{"model.moe.num_experts": e, "train.seed": seed})
        elif seed == SEEDS[0]:
          add(**{"model.moe.num_experts": e})
    return
  # Ablations, seed 0, in the order a short session should keep them. First
  # the second rate at E=32 (the largest model is not held to a rate tuned
  # for the smallest), then table 1 at E=8 (top-1 with cf 1.25 is the core
  # point), the dense model matched on total parameters with E=4 (d_ff x 4;
  # 2.1x the FLOPs per token), jitter and the paper's init for every weight.
  add(**{"model.moe.num_experts": 32, "train.learning_rate": LEARNING_RATE / 2})
  for cf in (1.0, 2.0):
    add(**{"model.moe.num_experts": 8, "model.moe.capacity_factor": cf})
  add(**{"model.moe.num_experts": 8, "model.moe.router": "topk", "model.moe.top_k": 2})
  add(**{"model.moe.num_experts": 1, "model.d_ff": 4 * 512})
  add(**{"model.moe.num_experts": 8, "model.moe.jitter": 1e-2})
  for e in (1, 8):  # the paper's reduced init (section 2.4) for every weight
    add(**{"model.moe.num_experts": e, "model.init_scale": 0.1})


def _why(add):
  """Why the gain peaks at E=8 (README.md), seed 0 at E=8 and E=32: twice the
  tokens (E=32 closes on E=8 as training goes on), no dropped tokens
  (MegaBlocks' dropless dispatch), a gate that no softmax over E ties to 1/E
  (DeepSeek-V3's sigmoid scores, unnormalised for top-1)."""
  for e in (8, 32):
    add(
      **{
        "model.moe.num_experts": e,
        "train.num_steps": 2 * NUM_STEPS,
        "train.cooldown_steps": 2 * COOLDOWN_STEPS,
      }
    )
  for e in (32, 8):
    add(**{"model.moe.num_experts": e, "model.moe.dispatch": "dropless"})
    add(
      **{
        "model.moe.num_experts": e,
        "model.moe.router": "sigmoid_bias",
        "model.moe.normalize_gates": False,
      }
    )
