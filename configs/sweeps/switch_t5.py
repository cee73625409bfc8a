r"""Switch vs T5 dense (Fedus et al. 2021, figure 5, table 1) on span corruption at CPU scale.

  python experiments/switch_t5/report.py --run     # the rate check, the grid, the report

which runs (two points at a time), then reports on:
  python -m sparse_lm.sweep --config=configs/sweeps/switch_t5.py:lr \
      --workdir=runs/switch_t5/lr --parallel=2
  python -m sparse_lm.sweep --config=configs/sweeps/switch_t5.py:cpu@<rate> \
      --workdir=runs/switch_t5/cpu@<rate> --parallel=2

The paper's setting, shrunk: configs/switch_t5.py's encoder-decoder (T5.1.1
style: relative position buckets, RMSNorm, GeGLU, no biases, tied embeddings)
trained on T5's span corruption of the embedded stdlib corpus, MoE in every
other layer of both stacks (2 + 2 layers, d_model 128, FFN 512: layer 1 of
the encoder and of the decoder is MoE, every=2, offset=1, as
SwitchTransformers' sparse_step=2), top-1
"switch" routing, capacity factor 1.25 in training and 2.0 in evaluation (the
paper's, Table 1; the decoder-only study's ablation found cf 1.25 best of 1.0 /
1.25 / 2.0 at E=8 and its drops cost E=32 only at 4.9M tokens, see
experiments/switch_t5/README.md), load-balance weight 1e-2, no z-loss. Every
expert is the dense FFN's size, so every point has the same FLOPs per token
(the router's matmul aside); dense is the same config with one expert.

Arg (after ':'; '@<rate>' sets the learning rate, default LEARNING_RATE):
  cpu     the grid (default): dense, Switch E=8 and E=32, seeds 0, 1, 2 at
          dense and E=32, E8_SEEDS at E=8 (9 runs, 8 where the :lr run at
          the chosen rate is copied in as dense seed 0; about 1 h 40 min two
          at a time on an idle 2-core machine: the README). report.py --part
          lr and --part grid run the two in separate sessions.
  lr      the dense rate calibration: dense seed 0 at each of LR_GRID, the
          grid's horizon; report.py --run picks the lowest final eval loss
          and runs the grid at it (that rate's run is the grid's dense seed 0).
  speed   the sizing runs (60 steps, one seed; README.md "Calibration").
  cpu_smoke, lr_smoke  the same grids at 12 steps and batch 8 (the pipeline only:
          report.py --smoke).

As in configs/sweeps/switch_vs_dense.py: one initialisation for every weight
of dense and MoE alike (s=1; the paper's s=0.1 cost the decoder-only study's
MoE most), no router jitter, an rsqrt schedule with a linear cooldown to 0
over the last COOLDOWN_STEPS, and train.seed setting the init and the data
order together, so a seed's dense and MoE runs see the same batches.
"""

from sparse_lm import config as cfglib

# The decoder-only study's tuned dense rate; :lr checks 0.125x to 2x of it here
# (3e-3 added after 6e-3 came out lowest of 0.5x / 1x / 2x: end eval 3.710
# against 3.910 at 1.2e-2; 1.5e-3 after 3e-3 was below 6e-3 by step 2100).
LEARNING_RATE = 1.2e-2
LR_GRID = (1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2)
EXPERTS = (8, 32)
SEEDS = (0, 1, 2)
# E=8's seeds: first one (the grid had to fit one session at the speeds the
# calibration measured), then seeds 1 and 2 added in a later session (about 20
# min two at a time; `--part grid` trains only the runs it does not have):
# 3 seeds at every E. The whole grid from nothing: 9 runs, about 1 h 40 min.
E8_SEEDS = (0, 1, 2)
# 9.8M encoder tokens, the decoder-only study's :long horizon; sizing (the
# estimate before the run and the speeds :lr measured):
# experiments/switch_t5/README.md, "Calibration".
NUM_STEPS = 2400
COOLDOWN_STEPS = 400  # the last 400 steps decay linearly to 0 (as switch_vs_dense:long)
SMOKE_STEPS = 12
GRIDS = ("cpu", "lr", "speed", "cpu_smoke", "lr_smoke")


def parse_arg(arg: str) -> tuple[str, float, bool]:
  """'cpu@0.006' -> ('cpu', 0.006, False); 'lr_smoke' -> ('lr', LEARNING_RATE, True)."""
  grid, _, rate = (arg or "cpu").partition("@")
  if grid not in GRIDS:
    raise cfglib.ConfigError(f"switch_t5 sweep arg {arg!r}: the grid is one of {', '.join(GRIDS)}")
  try:
    rate = float(rate) if rate else LEARNING_RATE
  except ValueError:
    raise cfglib.ConfigError(
      f"switch_t5 sweep arg {arg!r}: the rate after '@' is not a number"
    ) from None
  return grid.removesuffix("_smoke"), rate, grid.endswith("_smoke")


def get_config(arg: str = "cpu"):
  grid, rate, smoke = parse_arg(arg)
  c = cfglib.load_config("configs/switch_t5.py:tiny")
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.d_ff = 128, 2, 4, 32, 512
  m.init_scale = 1.0  # the default init for every weight (as switch_vs_dense)
  m.moe.jitter = 0.0
  m.moe.every, m.moe.offset = 2, 1  # every other layer of each stack: layer 1 of 0, 1
  c.data.vocab_size = 2048  # SentencePiece, + T5's 100 sentinels above it
  c.data.batch_size, c.data.seq_len = 32, 128  # 4096 encoder tokens a step
  t = c.train
  t.learning_rate, t.schedule, t.warmup_steps = rate, "rsqrt", 100
  t.num_steps, t.cooldown_steps = NUM_STEPS, COOLDOWN_STEPS
  t.eval_every, t.eval_batches = 100, 16
  t.log_every, t.checkpoint_every = 25, 500
  if grid == "speed":
    t.num_steps, t.cooldown_steps, t.warmup_steps = 60, 0, 10
    t.eval_every, t.checkpoint_every, t.log_every = 1000, 1000, 10
  if smoke:
    c.data.batch_size = 8
    t.num_steps, t.cooldown_steps, t.warmup_steps = SMOKE_STEPS, 4, 2
    t.eval_every, t.eval_batches, t.checkpoint_every, t.log_every = 4, 2, 6, 2
  return c


def sweep(add, arg: str = "cpu"):
  grid, _, _ = parse_arg(arg)
  if grid == "lr":
    for lr in LR_GRID:
      add(**{"model.moe.num_experts": 1, "train.seed": 0, "train.learning_rate": lr})
    return
  if grid == "speed":
    for layers in (2, 4):
      for e in (1, 32):
        add(**{"model.num_layers": layers, "model.moe.num_experts": e})
    return
  # Seed 0 of every E first, then the other seeds: a grid cut short still has
  # the whole comparison at one seed.
  for seed in SEEDS:
    for e in (1,) + EXPERTS:
      if e != 8 or seed in E8_SEEDS:
        add(**{"model.moe.num_experts": e, "train.seed": seed})
