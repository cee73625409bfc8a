r"""NLLB-200's MoE recipe (NLLB Team 2022) at CPU scale: dense vs top-2 MoE, EOM on and off.

  python experiments/multilingual_moe/report.py --run     # the grid, then the report

which runs, two points at a time:
  python -m sparse_lm.sweep --config=configs/sweeps/multilingual_moe.py \
      --workdir=runs/multilingual_moe --parallel=2

Arg (after ':'):
  main    (default) 9 runs: dense, MoE with Expert Output Masking (EOM 0.2,
          NLLB's rate) and MoE without it, 3 seeds each, on Django's
          en<->X pairs of LANGUAGES (seq2seq:translation).
  calib   the learning-rate grid that chose LEARNING_RATE: the dense arm at
          CALIB_RATES, seed 0, CALIB_STEPS steps, final validation loss
          (experiments/multilingual_moe/README.md, "Calibration"). The rate is
          the dense baseline's, shared by the MoE arms (as in
          configs/sweeps/switch_vs_dense.py).
  short   the main grid (3 arms x 3 seeds) at SHORT_STEPS steps: the horizon of
          the main runs' lowest validation loss (step 600 in seeds 0 and 1's six
          runs, when this was chosen; seed 2's came at 600-800; every run then
          overfits: README.md, "Results") plus the cooldown, so that
          the arms are compared where they translate best, not after ~9 epochs.
          The horizon was chosen on the validation split; chrF is the test's.
  seed0, seed1, seed2
          the main grid's runs of one seed (its 3 arms): the parts
          `report.py --run --part seedN` runs, each inside one working
          session (the same configs and run folders as main's).
  smoke   the main grid shrunk to seconds (1 seed, a few steps), for
          `report.py --run --smoke`.

The model is configs/nllb_moe.py:tiny's encoder-decoder (fairseq's sinusoidal
positions, LayerNorm, biases, ReLU, scaled tied embeddings) at SIZE. The MoE
arms put top-2 of EXPERTS experts in every 4th layer of each stack (layer 3 of
4: NLLB's moe_freq 4) with the experts' hidden size half the dense FFN's, so a
token's routed FFN costs what dense's FFN costs (equal FLOPs per token; the
router's D x E is the only extra). The dense arm is the same config with
num_experts 0. EOM: a token's routed output is dropped with probability 0.2 in
training (paper section 6.2.2; `model.moe.eom_rate`); the no-EOM arm is 0.
train.seed sets the init draw and the data order together, so seed s of every
arm sees the same batches in the same order.

Languages (README.md's table, translation.HIGH_RESOURCE_PAIRS): a language
is high-resource with >= 700 English->X training pairs, low-resource below.
The study picks both groups far from the 700 line, so that the grouping
does not hinge on it: HIGH all have >= 765 pairs, LOW all <= 441 (the
smallest high group member has 1.7x the largest low one). Scripts and
families overlap across the groups (Latin, Cyrillic; Slavic, Turkic,
Germanic) so that a low-resource language has a related high-resource one
to transfer from, as in NLLB's language grouping.
"""

from sparse_lm import config as cfglib

# en->X training pairs (python -m sparse_lm.data.translation --table, Django 5.2.20).
HIGH = {"cs": 799, "pl": 783, "ko": 771, "sv": 771, "tr": 768, "he": 765}
LOW = {"uz": 441, "kk": 417, "bs": 379, "ast": 370, "ta": 222, "lb": 162}
LANGUAGES = tuple(HIGH) + tuple(LOW)
# d_model, layers per stack, heads, dense d_ff, experts, vocabulary, batch, encoder/decoder length
SIZE = (96, 4, 4, 384, 8, 2048, 32, 64)
LEARNING_RATE = 1e-2  # the :calib grid's best for the dense arm (README.md, "Calibration")
CALIB_RATES = (1e-3, 3e-3, 1e-2, 3e-2)
NUM_STEPS = 3600  # 1 h 54 min idle if two runs train as fast as one (README.md); 3 parts
SHORT_STEPS = 800  # :short: the main runs' best validation step (600) + COOLDOWN_STEPS
CALIB_STEPS = 300
WARMUP_STEPS = 100
COOLDOWN_STEPS = 200  # the last steps decay linearly to 0: the end eval is not a noisy rate's
SEEDS = (0, 1, 2)
EOM_RATE = 0.2  # NLLB's (paper section 6.2.2, the released 54.5B's moe_token_dropout)
ARMS = {  # name: overrides
  "dense": {"model.moe.num_experts": 0},
  "moe_eom": {"model.moe.eom_rate": EOM_RATE},
  "moe": {"model.moe.eom_rate": 0.0},
}
ARGS = ("main", "calib", "smoke", "short") + tuple(f"seed{s}" for s in SEEDS)


def get_config(arg: str = "main"):
  arg = arg or "main"
  if arg not in ARGS:
    raise cfglib.ConfigError(f"multilingual_moe arg {arg!r} is unknown: one of {', '.join(ARGS)}")
  c = cfglib.load_config("configs/nllb_moe.py:tiny")
  d, n, h, f, e, v, b, l = SIZE
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = d, n, h, f
  m.moe.num_experts, m.moe.d_ff = e, f // 2  # top-2 of f/2: dense's FFN FLOPs
  m.moe.eom_rate = EOM_RATE
  c.data.languages = LANGUAGES
  c.data.vocab_size, c.data.batch_size, c.data.seq_len = v, b, l
  t = c.train
  t.learning_rate, t.schedule, t.warmup_steps = (
    LEARNING_RATE,
    "rsqrt",
    WARMUP_STEPS,
  )  # fairseq's inverse_sqrt
  t.num_steps, t.cooldown_steps = NUM_STEPS, COOLDOWN_STEPS
  t.eval_every, t.eval_batches = 200, 8
  t.log_every, t.checkpoint_every, t.keep_checkpoints = 50, 500, 1
  if arg == "calib":
    t.num_steps, t.cooldown_steps, t.eval_every = CALIB_STEPS, CALIB_STEPS // 5, 100
    t.checkpoint_every = CALIB_STEPS
  if arg == "short":
    t.num_steps = SHORT_STEPS
  if arg == "smoke":
    t.num_steps, t.warmup_steps, t.cooldown_steps = 12, 4, 4
    t.eval_every, t.eval_batches, t.log_every, t.checkpoint_every = 6, 2, 3, 12
  return c


def sweep(add, arg: str = "main"):
  arg = arg or "main"
  if arg == "calib":
    for lr in CALIB_RATES:
      add(**ARMS["dense"], **{"train.learning_rate": lr})
    return
  # Seed 0 of every arm first: a grid cut short still compares the arms.
  seeds = {"smoke": SEEDS[:1], **{f"seed{s}": (s,) for s in SEEDS}}.get(arg, SEEDS)
  for seed in seeds:
    for arm in ARMS:
      add(**ARMS[arm], **{"train.seed": seed})
