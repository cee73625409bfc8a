r"""Instruction tuning and upcycling at CPU scale (FLAN-MoE, sparse upcycling, ST-MoE).

  python experiments/instruction_tuning/report.py --run     # data, every sweep, the report

which prepares the instruction data (experiments/instruction_tuning/data.py,
into runs/instruction_tuning/data) and runs, two points at a time:
  python -m sparse_lm.sweep --config=configs/sweeps/instruction_tuning.py:base \
      --workdir=runs/instruction_tuning/base --parallel=2
  python -m sparse_lm.sweep --config=configs/sweeps/instruction_tuning.py:finetune \
      --workdir=runs/instruction_tuning/finetune --parallel=2
  ... :upcycle, :freeze, :rate likewise.

Arg (after ':'):
  base      dense and Switch E=8 at equal active FLOPs per token, pretrained
            on the stdlib corpus without the held-out modules (data.exclude):
            2,400 steps of 16 x 256 tokens (9.8M), the Switch-vs-dense
            study's tuned rate; checkpoints kept at 1,200 (the upcycling
            start) and 2,400.
  finetune  from each base: single-task (body from signature + docstring)
            or multi-task (all four tasks) instruction tuning at equal tokens,
            3 seeds each (12 runs); evaluated on the held-out modules' body
            task.
  upcycle   from the dense base at step 1,200: upcycle to Switch E=8 and
            train the 1,200 steps left on the dense run's own schedule
            (train.schedule_offset; the dense base's own steps 1,200 ->
            2,400 are continued dense training; the MoE base is the MoE
            trained from scratch with the same total compute).
  freeze    multi-task tuning of the MoE base with the routed experts frozen
            (ST-MoE: only the non-expert weights train), the router frozen,
            and the non-expert weights frozen; 3 seeds each.
  rate      the MoE base's multi-task tuning at 3x the rate (the rate is
            tuned for the dense model), seeds 0 and 1.
  calib     the calibration that chose the fine-tuning rate and horizon:
            the dense base's multi-task tuning at four rates, its single-task
            tuning and the MoE's, 800 steps each.
Sizes, horizon and rates: experiments/instruction_tuning/README.md ("Calibration").

FLAN-MoE as a held-out-task comparison (experiments/instruction_tuning/flan.py
runs these three in order and reports; README.md, "FLAN-MoE (redesigned)"):
  flan_base  dense and Switch E=8 pretrained as :base but FLAN_BASE_STEPS
             steps, 3 seeds each (the pretraining-seed variance is measured).
  flan_it    from each: instruction tuning on the docstring, name and
             signature tasks (train_it: the body task held out).
  flan_body  body fine-tuning (train_body) from each base (c: alone) and from
             each instruction-tuned model (b: after instruction tuning).
  flan_twin  the MoE's (c) again at fine-tuning seed TWIN_SEED + s: the
             routing drift's seed-versus-seed noise floor.
The training-time evaluation reads the dev modules' body task only
(eval_body_dev); the test modules are scored by flan.py. SPARSE_LM_FLAN_SMOKE=1
(flan.py --smoke) shrinks every step count and uses another folder.
"""

import os

from sparse_lm import config as cfglib
from sparse_lm.data import stdlib_tasks

ROOT = "runs/instruction_tuning"
DATA = f"{ROOT}/data"  # experiments/instruction_tuning/data.py writes it
BASE = f"{ROOT}/base"
LEARNING_RATE = 1.2e-2  # configs/sweeps/switch_vs_dense.py, tuned for its dense model
FT_LEARNING_RATE = 3e-4  # the calibration's best for the dense model (README.md, "Calibration")
BASE_STEPS, UPCYCLE_AT, COOLDOWN = 2400, 1200, 200
FT_STEPS = 400  # 1.6M tokens; README.md, "Calibration"
SEEDS = (0, 1, 2)
ARGS = (
  "base",
  "finetune",
  "upcycle",
  "freeze",
  "rate",
  "calib",
  "flan_base",
  "flan_it",
  "flan_body",
  "flan_twin",
)
SMOKE = os.environ.get("SPARSE_LM_FLAN_SMOKE", "") not in ("", "0")
FLAN_ROOT = f"{ROOT}/flan_smoke" if SMOKE else f"{ROOT}/flan"
# Sized to fit 2.5 hours on the 2-core machine (README.md, "FLAN-MoE (redesigned)").
FLAN_BASE_STEPS, FLAN_IT_STEPS, FLAN_BODY_STEPS = (40, 12, 12) if SMOKE else (1200, 400, 200)
FLAN_STARTS = ("base", "it")  # body fine-tuning from the base (c) or the tuned model (b)
# flan_twin: the MoE's body fine-tuning from its base again, at fine-tuning
# seed TWIN_SEED + s (another data order and dropout): the seed-versus-seed
# noise floor of the routing drift (flan.py's drift table).
TWIN_SEED = 100
CALIB_STEPS = 800
TEMPLATE = "{prompt}{response}"


def base_dir(experts: int) -> str:
  return f"{BASE}/num_experts={experts}"


def flan_point(grid: str, experts: int, seed: int, start: str = "base") -> dict:
  """The overrides of one point of a FLAN grid (its folder: sweep.point_name)."""
  p = {"model.moe.num_experts": experts, "train.seed": seed}
  if grid == "flan_it":
    p |= {"train.init_from": flan_dir("flan_base", experts, seed), "data.train_split": "train_it"}
  elif grid == "flan_body":
    src = flan_dir("flan_base" if start == "base" else "flan_it", experts, seed)
    p |= {"train.init_from": src, "data.train_split": "train_body"}
  return p


def flan_dir(grid: str, experts: int, seed: int, start: str = "base") -> str:
  from sparse_lm import sweep  # pylint: disable=g-import-not-at-top

  name = sweep.point_name(flan_point(grid, experts, seed, start))
  return f"{FLAN_ROOT}/{grid.removeprefix('flan_')}/{name}"


def _base(c):
  """The Switch-vs-dense study's model and rate (configs/sweeps/switch_vs_dense.py)."""
  m = c.model
  m.init_scale, m.moe.jitter = 1.0, 0.0
  m.moe.every, m.moe.offset = 1, 0
  m.moe.dispatch = "dropless"
  c.data.batch_size, c.data.seq_len = 16, 256  # 4096 tokens a step
  m.max_len = 256
  return c


def get_config(arg: str = "base"):
  arg = arg or "base"
  if arg not in ARGS:
    raise cfglib.ConfigError(f"instruction_tuning arg {arg!r} is unknown: one of {ARGS}")
  c = _base(cfglib.load_config("configs/switch.py:tiny"))
  t = c.train
  if arg == "flan_base":
    c.data.exclude = tuple(stdlib_tasks.heldout_modules(split="train"))
    t.learning_rate, t.schedule = LEARNING_RATE, "rsqrt"
    t.num_steps = FLAN_BASE_STEPS
    t.checkpoint_every = FLAN_BASE_STEPS // 3  # a killed base resumes (keep_checkpoints 1)
    t.warmup_steps, t.cooldown_steps = (5, 5) if SMOKE else (100, COOLDOWN)
    t.eval_every, t.eval_batches, t.log_every, t.keep_checkpoints = 100, 8, 25, 1
    return c
  if arg in ("base", "upcycle"):
    # Pretraining: the held-out modules' source is never seen.
    c.data.exclude = tuple(stdlib_tasks.heldout_modules(split="train"))
    t.learning_rate, t.schedule, t.warmup_steps = LEARNING_RATE, "rsqrt", 100
    t.num_steps, t.cooldown_steps = BASE_STEPS, COOLDOWN
    t.eval_every, t.eval_batches, t.log_every = 100, 16, 25
    t.checkpoint_every, t.keep_checkpoints = UPCYCLE_AT, 5
    if arg == "upcycle":
      # Switch top-1's gate is the chosen probability (about 1/E at first): the
      # copies' output is scaled by E to start near the dense model.
      t.init_from, t.init_gate_scale = f"{base_dir(1)}:{UPCYCLE_AT}", "expected"
      # The dense run's schedule continues (rsqrt from step 1,200, the same
      # cooldown at the end): no second warmup to the peak rate.
      t.num_steps, t.schedule_offset = BASE_STEPS - UPCYCLE_AT, UPCYCLE_AT
      t.checkpoint_every = t.num_steps
    return c
  # Instruction tuning from a base (train.init_from, set per point).
  c.data.dataset, c.data.train_split, c.data.eval_split = f"sft:{DATA}", "train_all", "eval_body"
  c.data.tokenizer_dataset = "stdlib"
  c.data.exclude = tuple(stdlib_tasks.heldout_modules(split="train"))  # the bases' tokenizer
  c.data.sft_template = TEMPLATE
  t.learning_rate, t.schedule, t.warmup_steps = FT_LEARNING_RATE, "constant", 20
  t.num_steps, t.cooldown_steps = FT_STEPS, 100
  t.eval_every, t.eval_batches, t.log_every = 50, 8, 25
  t.checkpoint_every, t.keep_checkpoints = FT_STEPS, 1
  if arg == "calib":
    t.num_steps = t.checkpoint_every = CALIB_STEPS
  if arg in ("flan_it", "flan_body", "flan_twin"):
    c.data.eval_split = "eval_body_dev"  # the test modules are never looked at while tuning
    t.num_steps = t.checkpoint_every = FLAN_IT_STEPS if arg == "flan_it" else FLAN_BODY_STEPS
    t.eval_batches = 4  # the dev body set (179 examples) about once
    t.cooldown_steps = min(t.cooldown_steps, t.num_steps // 4)
    t.warmup_steps = min(t.warmup_steps, t.num_steps // 4)
    if SMOKE:
      t.eval_every = t.log_every = 4
  return c


def sweep(add, arg: str = "base"):
  arg = arg or "base"
  if arg == "base":
    for e in (1, 8):
      add(**{"model.moe.num_experts": e})
  elif arg == "upcycle":
    add(**{"model.moe.num_experts": 8})
  elif arg == "flan_twin":
    for seed in SEEDS:
      add(**(flan_point("flan_body", 8, seed) | {"train.seed": TWIN_SEED + seed}))
  elif arg in ("flan_base", "flan_it", "flan_body"):
    for seed in SEEDS:
      for e in (1, 8):
        for start in FLAN_STARTS if arg == "flan_body" else ("base",):
          add(**flan_point(arg, e, seed, start))
  elif arg == "finetune":
    for seed in SEEDS:
      for e in (1, 8):
        for mix in ("body", "all"):
          add(**_ft(e, mix, seed))
  elif arg == "freeze":
    for seed in SEEDS:
      for frozen in (":experts", ":router", ":non_experts"):
        add(**{**_ft(8, "all", seed), "train.frozen": frozen})
  elif arg == "rate":
    for seed in SEEDS[:2]:  # a check of the rate, not a result of its own: 2 seeds
      add(**{**_ft(8, "all", seed), "train.learning_rate": FT_LEARNING_RATE * 3})
  elif arg == "calib":
    # The fine-tuning rate and horizon, on the dense base (README, "Calibration").
    for lr in (3e-4, 1e-3, 3e-3):
      add(**{**_ft(1, "all", 0), "train.learning_rate": lr})
    for e, mix in ((1, "body"), (8, "all")):
      add(**{**_ft(e, mix, 0), "train.learning_rate": 1e-3})
    add(**{**_ft(1, "all", 0), "train.learning_rate": 1e-4})  # 3e-4 was the best of the three


def _ft(experts: int, mix: str, seed: int) -> dict:
  return {
    "model.moe.num_experts": experts,
    "data.train_split": f"train_{mix}",
    "train.init_from": base_dir(experts),
    "train.seed": seed,
  }
