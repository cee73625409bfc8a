r"""Sparse upcycling as Komatsuzaki et al. (2022) compare it, at CPU scale.

  python experiments/instruction_tuning/report.py --run --part upcycling

runs every grid below in order (experiments/instruction_tuning/upcycling.py),
two points at a time, resumable; by hand, one arm's long runs are
  python -m sparse_lm.sweep --config=configs/sweeps/upcycling.py:long/dense \
      --workdir=runs/upcycling/long/dense --parallel=2
and its cooldown branches (after upcycling.py has copied each branch's start
checkpoint into its folder, `copy_branch_starts`)
  python -m sparse_lm.sweep --config=configs/sweeps/upcycling.py:cooldown/dense \
      --workdir=runs/upcycling/cooldown/dense --parallel=2

The design (README.md, "Upcycling (redesigned)"):
* a dense parent trained PARENT_STEPS steps without a cooldown (rsqrt
  schedule, the stable phase of warmup-stable-decay), on the stdlib corpus
  read once (every run below stays inside the first epoch: unseen data);
* branches at +25 % and +50 % extra compute (EXTRA) over the parent's
  PARENT_STEPS x the dense model's training FLOPs per token:
    dense       the parent's run goes on (its own data stream);
    top1        upcycled at PARENT_STEPS to Switch top-1, E=8, MoE in every
                other layer (layers 1 and 3 of 4), router at zero and the
                copies scaled by E (configs/finetune/upcycle.py:switch):
                function-preserving;
    top2        upcycled to top-2 (softmax over the top-2 logits, gates sum
                to 1: configs/finetune/upcycle.py:mixtral), fresh router;
    scratch     the top-2 MoE trained from scratch on the same total compute
                (parent + extra);
  the upcycled runs continue the parent's data (train.init_data="continue")
  and its schedule (train.schedule_offset), with a fresh optimizer;
* equal compute: a run's steps are its compute / its training FLOPs per
  token (sparse_lm.inspect.summarize, the analytic 6 x active matmul
  parameters + attention count), rounded to ROUND steps: top-2 MoE layers
  cost more per token, so top-2 arms take fewer steps (`steps`; the report
  gives each branch's compute as run);
* every cooldown is its own branch (warmup-stable-decay: Hägele et al.
  2024): each arm is one long run without cooldown (`:long/ARM`) that saves
  a checkpoint at every branch start; the branch ending at S starts from its
  checkpoint at S - COOLDOWN (the full state: parameters, optimizer and data
  position, copied into the branch's folder and resumed with train.num_steps
  = S and train.cooldown_steps = COOLDOWN: the rate goes linearly to 0 over
  the last COOLDOWN steps, and before them the schedule is unchanged);
* 2 seeds per arm: each seed is its own parent (initialisation and data
  order), and every arm of that seed starts from it, so arms are paired by
  seed.

Args (after ':'): long/ARM or cooldown/ARM for ARM in ARMS.
"""

import functools
import math

from sparse_lm import config as cfglib

ROOT = "runs/upcycling"
ARMS = ("dense", "scratch", "top1", "top2")  # the order they run in (dense first: the parents)
PARENT_STEPS = 1200  # README.md, "Upcycling (redesigned)": calibration and the knee
EXTRA = (0.25, 0.5)  # extra compute over the parent's, as a fraction of it
# The branches each arm runs. The session that ran this had the CPU for these
# only (README.md, "Calibration"): top-1 and from-scratch at +25 % alone, no
# cooled-down parent at +0 %. FULL = True runs every arm at every EXTRA (and
# the parent's own cooldown), resuming what is done.
FULL = False
EXTRA_OF = {"dense": EXTRA, "top2": EXTRA, "top1": EXTRA[:1], "scratch": EXTRA[:1]}
COOLDOWN = 100  # steps of each branch's linear decay to 0
ROUND = 10  # steps are rounded to this (the compute each branch got is reported)
SEEDS = (0, 1)
LEARNING_RATE = 1.2e-2  # configs/sweeps/switch_vs_dense.py's tuned dense rate
RECIPE = {"top1": "switch", "top2": "mixtral", "scratch": "mixtral"}  # configs/finetune/upcycle.py
ARGS = tuple(f"{kind}/{arm}" for kind in ("long", "cooldown") for arm in ARMS)


def long_dir(arm: str) -> str:
  return f"{ROOT}/long/{arm}"


def cooldown_dir(arm: str) -> str:
  return f"{ROOT}/cooldown/{arm}"


def _model(arm: str):
  """The base config of an arm: switch.py:tiny's family at d_model 64, 4
  layers (MoE in layers 1 and 3), 16 x 128 tokens a step."""
  c = cfglib.load_config("configs/switch.py:tiny")
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff, m.max_len = 64, 4, 4, 256, 128
  m.init_scale, m.moe.jitter = 1.0, 0.0
  m.moe.every, m.moe.offset, m.moe.dispatch = 2, 1, "dropless"
  c.data.batch_size, c.data.seq_len = 16, 128  # 2,048 tokens a step
  if arm == "dense":
    m.moe.num_experts = 1
  else:
    upcycle = cfglib.load_module("configs/finetune/upcycle.py")
    upcycle.apply_recipe(c, RECIPE[arm])
    if arm == "scratch":  # the recipe's init_from keys do not apply
      c.train.init_gate_scale, c.train.init_router = "none", "fresh"
      c.train.init_reinit_fraction = 0.0
  return c


@functools.cache
def flops_per_token(arm: str) -> float:
  """Training FLOPs per token of the arm's model (sparse_lm.inspect.summarize)."""
  from sparse_lm import inspect as inspectlib  # pylint: disable=g-import-not-at-top

  c = _model(arm)
  return inspectlib.summarize(c, vocab_size=c.data.vocab_size)["train_flops_per_token"]


def steps(arm: str, compute: float) -> int:
  """The arm's steps for `compute` in dense-parent steps (1 = one dense step's
  FLOPs), rounded to ROUND."""
  exact = compute * flops_per_token("dense") / flops_per_token(arm)
  return int(round(exact / ROUND) * ROUND)


def plan(arm: str) -> dict:
  """{"end": the arm's long run's last step, "branches": {extra: the branch's
  end step}, "save_every": the long run's checkpoint interval} in the arm's own
  steps (an upcycled run's step 0 is the parent's PARENT_STEPS)."""
  extra = EXTRA if FULL else EXTRA_OF[arm]
  if arm == "dense":
    ends = {x: PARENT_STEPS + steps("dense", x * PARENT_STEPS) for x in extra}
    if FULL:
      ends = {0.0: PARENT_STEPS, **ends}  # 0: the parent's own cooldown (a reference)
  elif arm == "scratch":
    ends = {x: steps(arm, (1 + x) * PARENT_STEPS) for x in extra}
  else:
    ends = {x: steps(arm, x * PARENT_STEPS) for x in extra}
  starts = [e - COOLDOWN for e in ends.values()] + ([PARENT_STEPS] if arm == "dense" else [])
  return {"end": max(ends.values()), "branches": ends, "save_every": math.gcd(*starts)}


def _parse(arg: str) -> tuple[str, str]:
  kind, _, arm = (arg or "").partition("/")
  if kind not in ("long", "cooldown") or arm not in ARMS:
    raise cfglib.ConfigError(
      f"upcycling arg {arg!r} is unknown: long/ARM or cooldown/ARM, ARM one of {ARMS}"
    )
  return kind, arm


def get_config(arg: str = "long/dense"):
  kind, arm = _parse(arg)
  c = _model(arm)
  t = c.train
  t.learning_rate, t.schedule, t.warmup_steps = LEARNING_RATE, "rsqrt", 100
  t.num_steps, t.cooldown_steps = plan(arm)["end"], 0
  t.eval_every, t.eval_batches, t.log_every = 100, 16, 25
  # Saved at every branch start (and, dense, at the upcycling step), all kept.
  t.checkpoint_every, t.keep_checkpoints = plan(arm)["save_every"], 1000
  if arm in ("top1", "top2"):
    t.init_data = "continue"  # the parent's next batch: unseen data
    t.schedule_offset = PARENT_STEPS  # the parent's rsqrt schedule goes on, no second warmup
  if kind == "cooldown":
    t.eval_every = COOLDOWN  # the end (and, for a branch of 100 steps, only the end)
  return c


def parent(seed: int) -> str:
  return f"{long_dir('dense')}/seed={seed}:{PARENT_STEPS}"


def sweep(add, arg: str = "long/dense"):
  kind, arm = _parse(arg)
  for seed in SEEDS:
    point = {"train.seed": seed}
    if arm in ("top1", "top2"):
      point["train.init_from"] = parent(seed)
    if kind == "long":
      add(**point)
      continue
    for end in plan(arm)["branches"].values():
      add(**point, **{"train.num_steps": end, "train.cooldown_steps": COOLDOWN})
