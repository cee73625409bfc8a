r"""The Switch-vs-dense study in one command: run its sweeps, then plots, tables and a fit.

  python experiments/switch_vs_dense/report.py --run

--run runs, two points at a time, the core grid (configs/sweeps/switch_vs_dense.py,
about 1 hour on 2 CPU cores), the dense learning-rate check
(configs/sweeps/dense_lr.py, 10 minutes), the ablations (:ablations, about 45
minutes) and the why runs (:why, about 40 minutes) first, skipping finished
points and resuming interrupted ones; without it the report is made from
whatever the sweep folders hold (the core grid must be complete). Writes into
this folder: results.md (every table), results.csv (the core grid, seeds
aggregated), results.json (core, ablations, why runs and the fitted laws), and
the plots
loss_vs_step.png, loss_minus_dense.png, loss_vs_wall.png, loss_vs_experts.png,
speedup_vs_experts.png, ablations_minus_dense.png, expert_load_e32.png,
why_e32_minus_e8.png.

  python experiments/switch_vs_dense/report.py --grid=long --run

runs and reports on the core grid at twice the steps with dropless dispatch
(:long, 1 h 55 min here) alone, into long/ here (the same tables and plots,
without the side sweeps, which run at the core grid's horizon).
Every number comes from the runs' metrics.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from sparse_lm import config as cfglib  # noqa: E402
from sparse_lm import metrics as metricslib  # noqa: E402
from sparse_lm import plots  # noqa: E402
from sparse_lm import sweep as sweeplib  # noqa: E402
from sparse_lm.errors import ConfigError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = "configs/sweeps/switch_vs_dense.py"
CORE, ABLATIONS, WHY = SWEEP, SWEEP + ":ablations", SWEEP + ":why"
GRIDS = {"cpu": CORE, "long": SWEEP + ":long"}  # --grid: the grid the tables are made of
LR_SWEEP = "configs/sweeps/dense_lr.py"


# ------------------------------------------------------------------ reading


def seed_groups(sweep_file: str, workdir: str) -> dict[str, list[str]]:
  """{point name without the seed: [run folders of its seeds]}, in grid order."""
  out: dict[str, list[str]] = {}
  for p in sweeplib.points(sweep_file):
    key = sweeplib.point_name({k: v for k, v in p.items() if k != sweeplib.SEED_KEY})
    out.setdefault(key, []).append(os.path.join(workdir, sweeplib.point_name(p)))
  return out


# A run's end loss is its final eval, after the cooldown (the sweep's last
# COOLDOWN_STEPS decay the rate linearly to 0). Without the cooldown the
# rsqrt rate still moved the weights at the end, so one eval was noisy (dense
# seed 0: 2.875 / 2.833 / 2.884 at steps 1000 / 1100 / 1200); README.md,
# "Noise", has the numbers. Steps (and seconds) to the dense model's loss are
# read on the stable phase before the cooldown, where every run has the same
# rate at the same step: the trailing mean of STABLE_EVALS evals, up to step
# NUM_STEPS - COOLDOWN_STEPS, against the dense model's (mean of seeds) there.
STABLE_EVALS = 3


def trailing(losses, k=STABLE_EVALS):
  """Trailing mean over k evals (the first k - 1 points dropped)."""
  losses = np.asarray(losses, float)
  return np.convolve(losses, np.ones(k) / k, mode="valid")


def stable_curve(dirs: list[str], last_step: int):
  """(steps, trailing mean of the seeds' mean eval curve) up to last_step."""
  steps, mean, _ = plots.mean_curve(dirs)
  keep = steps <= last_step
  return steps[keep][STABLE_EVALS - 1 :], trailing(mean[keep])


def end_loss(d: str) -> float:
  return float(plots.eval_curve(d)[1][-1])


def no_cooldown_end(d: str) -> float | None:
  """The mean of the last 3 evals of the run's first pass without the cooldown
  (metrics_no_cooldown.jsonl: kept where a run was continued from its step
  before the cooldown; README.md, "Noise")."""
  path = os.path.join(d, "metrics_no_cooldown.jsonl")
  if not os.path.exists(path):
    return None
  ev = [r["eval_loss"] for r in metricslib.read_jsonl(path) if "eval_loss" in r]
  return float(np.mean(ev[-3:]))


def end_stats(dirs: list[str]) -> tuple[float, float, list[float]]:
  """(mean, sample std (0 for one seed), per seed) of the seeds' end losses."""
  xs = [end_loss(d) for d in dirs]
  return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, xs


def first_step_at(steps, losses, target):
  """First (linearly interpolated) step where the eval curve reaches `target`."""
  for i, (s, l) in enumerate(zip(steps, losses)):
    if l <= target:
      if i == 0:
        return float(s)
      s0, l0 = steps[i - 1], losses[i - 1]
      return float(s0 + (s - s0) * (l0 - target) / (l0 - l))
  return None


def seconds_at(dirs: list[str], step: float) -> float:
  """Mean over seeds of the training seconds to reach `step`."""
  return float(np.mean([np.interp(step, *plots.train_seconds(d)) for d in dirs]))


def dropped(dirs: list[str]) -> float | None:
  """Training dropped fraction over the second half of the runs (mean over seeds)."""
  vals = []
  for d in dirs:
    xs = [
      r["moe/mean/dropped_fraction"]
      for r in metricslib.read_jsonl(os.path.join(d, "metrics.jsonl"))
      if "moe/mean/dropped_fraction" in r
    ]
    if xs:
      vals.append(np.mean(xs[len(xs) // 2 :]))
  return float(np.mean(vals)) if vals else None


def routing_at_end(dirs: list[str], batches: int = 4) -> tuple[float | None, float | None]:
  """(chosen gate, router entropy) of the final checkpoints on `batches`
  validation batches, means over MoE layers and seeds (None for dense). The
  Switch gate is the chosen expert's probability (Fedus et al. eq. 2): a
  router that stays near uniform over E experts passes about 1/E of each
  expert's output on (README.md, "Why the gain peaks")."""
  gates, ents = [], []
  for d in dirs:
    ckpts = [int(x) for x in os.listdir(os.path.join(d, "checkpoints")) if x.isdigit()]
    # Cached in the run's folder, per checkpoint step: made once per run.
    path = os.path.join(d, f"evaluate_step{max(ckpts)}_batches{batches}.json")
    if not os.path.exists(path):
      cmd = [sys.executable, "-m", "sparse_lm.evaluate", f"--workdir={d}"]
      p = subprocess.run(
        cmd + [f"--batches={batches}", f"--output={path}"], capture_output=True, text=True
      )
      if p.returncode != 0:
        raise ConfigError(f"sparse_lm.evaluate failed on {d}: {p.stderr.strip()[-300:]}")
    with open(path) as f:
      layers = json.load(f)["moe_layers"].values()
    if not layers or "gate_mean" not in next(iter(layers)):
      return None, None
    gates.append(np.mean([s["gate_mean"] for s in layers]))
    ents.append(np.mean([s["router_entropy"] for s in layers]))
  return float(np.mean(gates)), float(np.mean(ents))


def experts_of(point: str) -> int:
  return int(dict(kv.split("=") for kv in point.split(","))["num_experts"])


@dataclasses.dataclass
class Core:
  """The core grid's runs and the dense numbers every point is read against."""

  sweep: str  # the grid's sweep file (GRIDS[--grid])
  points: dict[str, dict]  # sweeplib.collect's rows by point name
  groups: dict[str, list[str]]  # seed_groups
  cooldown_steps: int
  stop: int  # the stable phase's last step
  d_final: float  # the dense model's end loss (mean over seeds)
  d_last: float  # the dense model's last eval step
  d_target: float  # the dense loss steps are counted to
  d_wall: float  # the dense model's training seconds to `stop`
  moe_points: list[str]
  experts: list[int]
  learning_rate: float  # the study's (configs/sweeps/switch_vs_dense.py)

  @property
  def dense(self) -> list[str]:
    return self.groups["num_experts=1"]


def read_core(sweep_file: str, workdir: str) -> Core:
  """Reads the core grid (every point must be finished) into a Core."""
  points = {r["point"]: r for r in sweeplib.collect(sweep_file, workdir)}
  groups = seed_groups(sweep_file, workdir)
  missing = [p for p, r in points.items() if not r["done"]]
  if missing:
    raise ConfigError(
      f"{len(missing)} core point(s) of {workdir} are not finished "
      f"({', '.join(missing)}); run with --run"
    )
  dense = groups["num_experts=1"]
  train = cfglib.load_config(sweep_file).train
  stop = train.num_steps - train.cooldown_steps
  moe_points = [p for p in groups if p != "num_experts=1"]
  return Core(
    sweep=sweep_file,
    points=points,
    groups=groups,
    cooldown_steps=train.cooldown_steps,
    stop=stop,
    d_final=end_stats(dense)[0],
    d_last=float(plots.mean_curve(dense)[0][-1]),
    d_target=float(stable_curve(dense, stop)[1][-1]),
    d_wall=seconds_at(dense, stop),
    moe_points=moe_points,
    experts=[experts_of(p) for p in moe_points],
    learning_rate=cfglib.load_module(SWEEP).LEARNING_RATE,
  )


# ------------------------------------------------------------- scaling laws


def saturating_e(E, e_start: float, e_max: float):
  """Clark et al. 2022's saturating transformation of the expert count:
  1 / E_hat = 1 / (E - 1 + (1 / E_start - 1 / E_max)^-1) + 1 / E_max.
  E_hat(1) = E_start and E_hat -> E_max as E grows."""
  E = np.asarray(E, float)
  return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


def _linear_fit(x, y):
  b, a = np.polyfit(x, y, 1)
  return a, b


def fit_log_linear(E, L) -> dict:
  """log L = a + b log E (Clark et al. 2022 eq. 1 at a fixed dense size)."""
  a, b = _linear_fit(np.log(E), np.log(L))
  return {
    "form": "log L = a + b log E",
    "a": a,
    "b": b,
    "predict": lambda e: math.exp(a + b * math.log(e)),
  }


def fit_saturating(E, L) -> dict:
  """log L = a + b log E_hat(E; E_start, E_max): a, b by least squares on a
  log-spaced grid of (E_start, E_max), the pair with the smallest error kept."""
  x_E, y = np.asarray(E, float), np.log(L)
  best = None
  for e_start in np.geomspace(1.01, 64, 80):
    for e_max in np.geomspace(e_start * 1.05, 1e5, 120):
      xs = np.log(saturating_e(x_E, e_start, e_max))
      a, b = _linear_fit(xs, y)
      err = float(np.mean((a + b * xs - y) ** 2))
      if best is None or err < best[0]:
        best = (err, e_start, e_max, a, b)
  _, e_start, e_max, a, b = best
  return {
    "form": "log L = a + b log E_hat(E; E_start, E_max)",
    "a": a,
    "b": b,
    "E_start": float(e_start),
    "E_max": float(e_max),
    "predict": lambda e: math.exp(a + b * math.log(float(saturating_e(e, e_start, e_max)))),
  }


def fit_errors(fit_fn, E, L) -> dict:
  """In-sample RMSE and leave-one-out RMSE of the fitted loss, in nats."""
  pred = fit_fn(E, L)["predict"]
  rmse = math.sqrt(np.mean([(pred(e) - l) ** 2 for e, l in zip(E, L)]))
  loo = []
  for i in range(len(E)):
    keep = [j for j in range(len(E)) if j != i]
    p = fit_fn([E[j] for j in keep], [L[j] for j in keep])["predict"]
    loo.append((p(E[i]) - L[i]) ** 2)
  return {"rmse": rmse, "loo_rmse": math.sqrt(np.mean(loo))}


# --------------------------------------------------------------------- rows


def core_row(c: Core, p: str) -> dict:
  """The core table's (and results.csv's) row of point `p`, seeds aggregated."""
  r, dirs = c.points[p], c.groups[p]
  e_mean, e_std, per_seed_end = end_stats(dirs)
  s = first_step_at(*stable_curve(dirs, c.stop), c.d_target) if p != "num_experts=1" else c.stop
  per_seed = [first_step_at(*stable_curve([d], c.stop), c.d_target) for d in dirs]
  wall = seconds_at(dirs, s) if s is not None else None
  return {
    "point": p,
    "experts": experts_of(p),
    "n": r["n"],
    "seeds": r["seeds"],
    "total_params": r["total_params"],
    "active_params": r["active_params"],
    "train_flops_per_token": r["train_flops_per_token"],
    "end_loss": e_mean,
    "end_loss_std": e_std,
    "per_seed_end": per_seed_end,
    "last_eval_loss": r["final_eval_loss"],
    "last_eval_loss_std": r["final_eval_loss_std"],
    "minus_dense": e_mean - c.d_final,
    "no_cooldown_end": [no_cooldown_end(d) for d in dirs],
    "steps_to_dense": s,
    "per_seed_steps_to_dense": per_seed,
    "step_ratio": None if s is None else s / c.stop,
    "seconds_to_dense": wall,
    "time_ratio": None if wall is None else wall / c.d_wall,
    "tokens_per_s": r["tokens_per_s"],
    "dropped_fraction": dropped(dirs),
    **dict(zip(("end_gate", "end_router_entropy"), routing_at_end(dirs))),
  }


def core_rows(c: Core) -> list[dict]:
  """Dense, then every E: core_row with each seed's end loss minus dense's."""
  rows = [core_row(c, p) for p in ["num_experts=1"] + c.moe_points]
  # Paired by seed: a seed's dense and MoE runs share the data order, so their
  # difference removes the part of the seed-to-seed noise they have in common.
  d_seed = dict(zip(rows[0]["seeds"], rows[0]["per_seed_end"]))
  for row in rows:
    diffs = [x - d_seed[s] for s, x in zip(row["seeds"], row["per_seed_end"]) if s in d_seed]
    row["paired_minus_dense"] = diffs
    row["paired_std"] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
  return rows


@dataclasses.dataclass
class Summary:
  """The headline numbers of the core grid."""

  by_e: dict[int, dict]  # the core rows by expert count (1 = dense)
  means: list[float]  # end losses, dense then each E
  decreasing: bool  # means strictly decreasing
  e_max: int
  gain: float  # dense minus E=e_max end loss
  noise: float  # the larger seed-to-seed std of the two
  gain_x: float  # gain / noise


def summarize(c: Core, rows: list[dict]) -> Summary:
  """The headline numbers from the core rows."""
  by_e = {row["experts"]: row for row in rows}
  means = [by_e[e]["end_loss"] for e in [1] + c.experts]
  e_max = max(c.experts)
  gain = c.d_final - by_e[e_max]["end_loss"]
  noise = max(by_e[1]["end_loss_std"], by_e[e_max]["end_loss_std"])
  return Summary(
    by_e=by_e,
    means=means,
    decreasing=all(x > y for x, y in zip(means, means[1:])),
    e_max=e_max,
    gain=gain,
    noise=noise,
    gain_x=gain / noise if noise else math.inf,
  )


def fit_laws(E, L) -> tuple[dict, str]:
  """({form name: fit with its errors}, the form with the smaller leave-one-out error)."""
  fits = {}
  for name, fn in (("log-linear", fit_log_linear), ("saturating", fit_saturating)):
    f = fn(E, L)
    f.update(fit_errors(fn, E, L))
    fits[name] = f
  return fits, min(fits, key=lambda k: fits[k]["loo_rmse"])


def no_cooldown_rows(rows: list[dict]) -> list[dict]:
  """The core points whose every seed has a first pass without the cooldown
  (none unless dense has), with their end losses then and now."""
  nc = {r["experts"]: r["no_cooldown_end"] for r in rows if None not in r["no_cooldown_end"]}
  if 1 not in nc:
    return []
  nc_dense = float(np.mean(nc[1]))
  out = []
  for row in [r for r in rows if r["experts"] in nc]:
    xs = nc[row["experts"]]
    out.append(
      {
        "point": row["point"],
        "n": row["n"],
        "end_loss": np.mean(xs),
        "end_loss_std": np.std(xs, ddof=1) if len(xs) > 1 else None,
        "minus_dense": np.mean(xs) - nc_dense,
        "cooldown_end_loss": row["end_loss"],
        "cooldown_end_loss_std": row["end_loss_std"],
      }
    )
  return out


def side_rows(sweep_file: str, workdir: str, c: Core) -> list[dict]:
  """One row per finished point of a one-seed side sweep (ablations, why),
  against the core grid's seed-0 run of its E (E=8 where the grid has none)."""
  rows = []
  if not os.path.isdir(workdir):
    return rows
  side = {r["point"]: r for r in sweeplib.collect(sweep_file, workdir)}
  side_groups = seed_groups(sweep_file, workdir)
  for p, r in side.items():
    if not r["done"]:
      continue
    e = experts_of(p)
    ref = "num_experts=1" if e == 1 else f"num_experts={min(e, max(c.experts))}"
    if ref not in c.groups:
      ref = "num_experts=8"
    dirs = side_groups[p]
    r_end = end_loss(dirs[0])
    rows.append(
      {
        "point": p,
        "reference": f"{ref} (seed 0)",
        "total_params": r["total_params"],
        "active_params": r["active_params"],
        "train_flops_per_token": r["train_flops_per_token"],
        "end_loss": r_end,
        "last_eval_loss": r["final_eval_loss"],
        "minus_reference": r_end - end_loss(c.groups[ref][0]),
        "minus_dense": r_end - c.d_final,
        "steps_to_dense": first_step_at(*stable_curve(dirs[:1], c.stop), c.d_target),
        "tokens_per_s": r["tokens_per_s"],
        "dropped_fraction": dropped(dirs),
        **dict(zip(("end_gate", "end_router_entropy"), routing_at_end(dirs))),
        "dirs": dirs,
      }
    )
  return rows


def twin_rows(c: Core, s: Summary, abl_rows: list[dict]) -> list[dict]:
  """Per total-parameter-matched dense ablation: the Switch E nearest it in
  total parameters and how much of the dense-to-it gap that E closes."""
  out = []
  for r in [r for r in abl_rows if "d_ff=" in r["point"] and experts_of(r["point"]) == 1]:
    twin = min(c.experts, key=lambda x: abs(s.by_e[x]["total_params"] - r["total_params"]))
    gap = c.d_final - r["end_loss"]
    out.append(
      {
        "point": r["point"],
        "total_params": r["total_params"],
        "end_loss": r["end_loss"],
        "flops_ratio": r["train_flops_per_token"] / s.by_e[1]["train_flops_per_token"],
        "twin": twin,
        "closed": (c.d_final - s.by_e[twin]["end_loss"]) / gap if gap > 0 else float("nan"),
      }
    )
  return out


def lr_rows(c: Core, workdir: str) -> list[dict]:
  """The dense learning-rate check (configs/sweeps/dense_lr.py's finished
  points and the core grid's dense seed 0), by rate; none without its folder."""
  rows = []
  if not os.path.isdir(workdir):
    return rows
  for r in sweeplib.collect(LR_SWEEP, workdir):
    if r["done"]:
      d = os.path.join(workdir, r["point"])
      rows.append(
        {
          "train.learning_rate": r["train.learning_rate"],
          "end_loss": end_loss(d),
          "last_eval_loss": r["final_eval_loss"],
        }
      )
  seed0 = c.dense[0]
  rows.append(
    {
      "train.learning_rate": c.learning_rate,
      "end_loss": end_loss(seed0),
      "last_eval_loss": float(plots.eval_curve(seed0)[1][-1]),
    }
  )
  rows.sort(key=lambda r: r["train.learning_rate"])
  return rows


@dataclasses.dataclass
class Tables:
  """Every table's rows."""

  core: list[dict]
  summary: Summary
  no_cooldown: list[dict]
  fits: dict
  chosen: str  # the fits' form with the smaller leave-one-out error
  ablations: list[dict]
  why: list[dict]
  twins: list[dict]
  lr: list[dict]


def make_tables(
  c: Core, grid: str, ablations_workdir: str, why_workdir: str, lr_workdir: str
) -> Tables:
  """Every table's rows; the side sweeps only with the cpu grid (they run at its horizon)."""
  rows = core_rows(c)
  s = summarize(c, rows)
  fits, chosen = fit_laws([1] + c.experts, s.means)
  cpu = grid == "cpu"
  abl = side_rows(ABLATIONS, ablations_workdir, c) if cpu else []
  return Tables(
    core=rows,
    summary=s,
    no_cooldown=no_cooldown_rows(rows),
    fits=fits,
    chosen=chosen,
    ablations=abl,
    why=side_rows(WHY, why_workdir, c) if cpu else [],
    twins=twin_rows(c, s, abl),
    lr=lr_rows(c, lr_workdir) if cpu else [],
  )


def why_pairs(c: Core, why_rows: list[dict]) -> dict[str, tuple]:
  """{label: (E=32 runs, E=8 runs)}: the core grid's seed 0 and each why lever."""
  why = {r["point"]: r["dirs"] for r in why_rows}
  pairs = {
    f"core grid, {int(c.d_last)} steps (seed 0)": (
      c.groups["num_experts=32"][:1],
      c.groups["num_experts=8"][:1],
    )
  }
  for a_, b_, name in (
    ("num_experts=32,num_steps=", "num_experts=8,num_steps=", "twice the steps"),
    ("num_experts=32,dispatch=dropless", "num_experts=8,dispatch=dropless", "dropless"),
    ("num_experts=32,router=sigmoid_bias", "num_experts=8,router=sigmoid_bias", "sigmoid gate"),
  ):
    x = [v for k, v in why.items() if k.startswith(a_)]
    y = [v for k, v in why.items() if k.startswith(b_)]
    if x and y:
      pairs[name] = (x[0], y[0])
  return pairs


def speedups(s: Summary, experts: list[int], key: str, base: float) -> list[float]:
  """base / each E's `key` (steps or seconds to dense); nan where it never got there."""
  return [base / s.by_e[e][key] if s.by_e[e][key] else float("nan") for e in experts]


def strip(d: dict) -> dict:
  """d without what JSON cannot hold (a fit's function, a row's run folders)."""
  return {k: v for k, v in d.items() if k not in ("predict", "dirs")}


def results_json(c: Core, t: Tables) -> dict:
  """results.json: the core grid, the fits, the side sweeps and the learning rates."""
  return {
    "core_sweep": c.sweep,
    "ablations_sweep": ABLATIONS,
    "end": "final eval, after the cooldown",
    "stable_evals": STABLE_EVALS,
    "stable_last_step": c.stop,
    "dense_stable_loss": c.d_target,
    "learning_rate": c.learning_rate,
    "dense_end_loss": c.d_final,
    "dense_steps": c.d_last,
    "strictly_decreasing": t.summary.decreasing,
    "gain_over_std": t.summary.gain_x,
    "core": t.core,
    "fits": {k: strip(v) for k, v in t.fits.items()},
    "chosen_fit": t.chosen,
    "ablations": [strip(r) for r in t.ablations],
    "why_sweep": WHY,
    "why": [strip(r) for r in t.why],
    "dense_learning_rates": t.lr,
  }


# ------------------------------------------------------------------- render


def fmt(x, spec=".4f", none="-"):
  return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def label(point: str) -> str:
  return "dense" if point == "num_experts=1" else f"Switch E={experts_of(point)}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A markdown table's lines: the header, its rule, one line per row of cells."""
  line = lambda cells: "| " + " | ".join(cells) + " |"
  return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def titled(text: str, lines: list[str]) -> list[str]:
  """A paragraph and the lines under it, each after a blank line."""
  return ["", text, ""] + lines


def intro_lines(c: Core, t: Tables) -> list[str]:
  """What the grid is and how its numbers are read, then the headline findings."""
  by_e = t.summary.by_e
  n_runs = sum(len(v) for v in c.groups.values())
  return [
    f"Core grid: `{c.sweep}`, {n_runs} runs"
    + (f"; ablations: `{ABLATIONS}`, {len(t.ablations)} runs. " if t.ablations else ". ")
    + f"End loss = a run's final eval (step {int(c.d_last)}, after the last "
    f"{c.cooldown_steps} steps' cooldown to a rate of 0); +- is the sample "
    "standard deviation over seeds (a seed sets the init and the data order). Dense end "
    f"loss {c.d_final:.4f} +- {by_e[1]['end_loss_std']:.4f} ({by_e[1]['n']} seeds). Steps to "
    f"dense: the step at which a run's trailing mean of {STABLE_EVALS} evals reaches the "
    f"dense model's at step {c.stop}, the last before the cooldown ({c.d_target:.4f}; "
    f"{c.d_wall:.0f} s of training), so both are read at the same rate.",
    "",
  ] + finding_lines(c, t.summary)


def finding_lines(c: Core, s: Summary) -> list[str]:
  """The bullets: ordering, gain over noise, paired gain, steps and time to dense."""
  r_max = s.by_e[s.e_max]
  L = [
    "- End loss strictly decreasing dense -> "
    + " -> ".join(map(str, c.experts))
    + f": **{'yes' if s.decreasing else 'no'}** ("
    + ", ".join(f"{x:.4f}" for x in s.means)
    + ").",
    f"- E={s.e_max} gain over dense: {s.gain:.4f} nats = {s.gain_x:.1f}x the larger "
    f"seed-to-seed std ({s.noise:.4f}).",
  ]
  pd = r_max["paired_minus_dense"]
  if len(pd) > 1:
    L.append(
      f"- Paired by seed (same data order): E={s.e_max} minus dense = "
      + ", ".join(f"{x:+.4f}" for x in pd)
      + f"; mean {np.mean(pd):+.4f}, std {r_max['paired_std']:.4f} "
      f"({-np.mean(pd) / r_max['paired_std']:.1f}x)."
    )
  L.append(
    f"- E={s.e_max} reaches the dense model's step-{c.stop} loss at step "
    f"{fmt(r_max['steps_to_dense'], '.0f')} = {fmt(r_max['step_ratio'], '.2f')}x "
    f"the dense model's steps; in training time, {fmt(r_max['time_ratio'], '.2f')}x."
  )
  return L


CORE_HEADER = (
  "run | seeds | total / active params | train FLOPs/token | end loss | minus dense | last eval "
  "| steps to dense | x dense steps | time to dense (s) | x dense time | tokens/s "
  "| train dropped | end gate | end router entropy"
).split(" | ")


def core_table(rows: list[dict]) -> list[str]:
  """The core grid: one line per point, seeds aggregated."""
  cells = [
    [
      label(r["point"]),
      str(r["n"]),
      f"{r['total_params']:,} / {r['active_params']:,}",
      f"{r['train_flops_per_token']:.3g}",
      f"{r['end_loss']:.4f} +- {r['end_loss_std']:.4f}",
      f"{r['minus_dense']:+.4f}",
      f"{r['last_eval_loss']:.4f} +- {r['last_eval_loss_std']:.4f}",
      fmt(r["steps_to_dense"], ".0f"),
      fmt(r["step_ratio"], ".2f"),
      fmt(r["seconds_to_dense"], ".0f"),
      fmt(r["time_ratio"], ".2f"),
      f"{r['tokens_per_s']:,.0f}",
      fmt(r["dropped_fraction"], ".3f"),
      fmt(r["end_gate"], ".3f"),
      fmt(r["end_router_entropy"], ".2f"),
    ]
    for r in rows
  ]
  return [""] + table(CORE_HEADER, cells)


def per_seed_lines(rows: list[dict]) -> list[str]:
  """One bullet per point with several seeds: each seed's end loss / steps to dense."""
  return titled(
    "Per seed (end loss / steps to dense):",
    [
      f"- {label(r['point'])}: "
      + ", ".join(
        f"seed {s}: {x:.4f} / {fmt(st, '.0f')}"
        for s, x, st in zip(r["seeds"], r["per_seed_end"], r["per_seed_steps_to_dense"])
      )
      for r in rows
      if r["n"] > 1
    ],
  )


def no_cooldown_table(c: Core, rows: list[dict]) -> list[str]:
  """The runs' first passes without the cooldown (nothing without rows)."""
  if not rows:
    return []
  cells = [
    [
      label(r["point"]),
      str(r["n"]),
      f"{r['end_loss']:.4f}"
      + ("" if r["end_loss_std"] is None else f" +- {r['end_loss_std']:.4f}"),
      f"{r['minus_dense']:+.4f}",
      f"{r['cooldown_end_loss']:.4f} +- {r['cooldown_end_loss_std']:.4f}",
    ]
    for r in rows
  ]
  return titled(
    "The same runs before the cooldown was added (their first pass: rsqrt to the last "
    "step; end = the mean of the last 3 evals, since one eval was too noisy), continued "
    f"from their step-{c.stop} checkpoint with the cooldown to give the table above; the "
    "points not listed ran with the cooldown from the start):",
    table(["run", "seeds", "end loss without cooldown", "minus dense", "with cooldown"], cells),
  )


def fits_table(fits: dict, chosen: str) -> list[str]:
  """The fitted scaling laws and the form they call for."""
  cells = [
    [
      f"{name}: {f['form']}",
      f"{f['a']:.5f}",
      f"{f['b']:.5f}",
      fmt(f.get("E_start"), ".3g"),
      fmt(f.get("E_max"), ".3g"),
      f"{f['rmse']:.4f}",
      f"{f['loo_rmse']:.4f}",
    ]
    for name, f in fits.items()
  ]
  header = ["form", "a", "b", "E_start", "E_max", "RMSE", "leave-one-out RMSE"]
  return titled(
    "Scaling law over dense (E=1) and every E, fitted to the mean end losses (Clark et al. "
    "2022; RMSE of the fitted loss in nats; leave-one-out RMSE refits without each point in "
    "turn):",
    table(header, cells),
  ) + ["", f"The points call for the **{chosen}** form (smaller leave-one-out error)."]


SIDE_HEADER = (
  "run | reference | total / active params | train FLOPs/token | end loss | last eval "
  "| minus reference | minus dense | steps to dense | tokens/s | train dropped | end gate"
).split(" | ")


def side_table(title: str, rows: list[dict]) -> list[str]:
  """A side sweep's table under `title` (nothing without rows)."""
  if not rows:
    return []
  cells = [
    [
      r["point"],
      r["reference"],
      f"{r['total_params']:,} / {r['active_params']:,}",
      f"{r['train_flops_per_token']:.3g}",
      f"{r['end_loss']:.4f}",
      f"{r['last_eval_loss']:.4f}",
      f"{r['minus_reference']:+.4f}",
      f"{r['minus_dense']:+.4f}",
      fmt(r["steps_to_dense"], ".0f"),
      f"{r['tokens_per_s']:,.0f}",
      fmt(r["dropped_fraction"], ".3f"),
      fmt(r["end_gate"], ".3f"),
    ]
    for r in rows
  ]
  return titled(title, table(SIDE_HEADER, cells))


def twin_lines(c: Core, s: Summary, twins: list[dict]) -> list[str]:
  """A paragraph per total-parameter-matched dense ablation and its Switch twin."""
  L = []
  for r in twins:
    twin = s.by_e[r["twin"]]
    L += [
      "",
      f"Total-parameter-matched dense ({r['point']}, {r['total_params']:,} params, "
      f"{r['flops_ratio']:.2f}x the FLOPs per token): end loss {r['end_loss']:.4f}. "
      f"Switch E={r['twin']} ({twin['total_params']:,} params at the active-matched FLOPs, "
      f"end loss {twin['end_loss']:.4f}) closes {r['closed']:.0%} of the gap between the "
      f"active-matched dense model ({c.d_final:.4f}) and it.",
    ]
  return L


def lr_table(c: Core, rows: list[dict]) -> list[str]:
  """The dense learning-rate check (nothing without rows)."""
  if not rows:
    return []
  cells = [
    [f"{r['train.learning_rate']:g}", f"{r['end_loss']:.4f}", f"{r['last_eval_loss']:.4f}"]
    for r in rows
  ]
  return titled(
    f"Dense learning rate at this horizon (`{LR_SWEEP}` and the core grid's dense seed "
    f"0; the study uses {c.learning_rate:g}):",
    table(["learning rate", "end loss", "last eval"], cells),
  )


def results_md(c: Core, t: Tables) -> list[str]:
  """results.md's lines: the findings, then every table."""
  return (
    intro_lines(c, t)
    + core_table(t.core)
    + per_seed_lines(t.core)
    + no_cooldown_table(c, t.no_cooldown)
    + fits_table(t.fits, t.chosen)
    + side_table(
      "Ablations (one seed, seed 0; 'minus reference' is against the core grid's seed-0 "
      "run named there, whose seed-to-seed std is in the table above):",
      t.ablations,
    )
    + side_table(
      f"Why the gain peaks (`{WHY}`, seed 0; end gate: the mean chosen gate of the final "
      "checkpoint on 4 validation batches, mean over MoE layers):",
      t.why,
    )
    + twin_lines(c, t.summary, t.twins)
    + lr_table(c, t.lr)
  )


def write_plots(c: Core, t: Tables, out_dir: str):
  """Every plot of the module docstring (the side sweeps' where they have rows)."""
  out = lambda name: os.path.join(out_dir, name)
  s, experts = t.summary, [1] + c.experts
  scaling = {label(p): c.groups[p] for p in ["num_experts=1"] + c.moe_points}
  title = f"Switch vs dense at equal FLOPs per token ({int(c.d_last)} steps)"
  plots.loss_curves(scaling, out("loss_vs_step.png"), title)
  plots.loss_curves(
    scaling,
    out("loss_vs_wall.png"),
    "Switch vs dense, against training time on 2 CPU cores",
    x="wall",
  )
  plots.loss_curves(
    {k: v for k, v in scaling.items() if k != "dense"},
    out("loss_minus_dense.png"),
    "Switch: eval loss minus dense (means of seeds)",
    relative_to=c.dense,
  )
  plots.loss_vs_experts(
    experts,
    s.means,
    out("loss_vs_experts.png"),
    dense_loss=c.d_final,
    title="final eval loss (after the cooldown), +- std over seeds",
    stds=[s.by_e[e]["end_loss_std"] for e in experts],
    fits={f"{k} fit": t.fits[k]["predict"] for k in t.fits},
  )
  plots.speedup_vs_experts(
    c.experts,
    speedups(s, c.experts, "steps_to_dense", c.stop),
    speedups(s, c.experts, "seconds_to_dense", c.d_wall),
    out("speedup_vs_experts.png"),
  )
  if t.ablations:
    plots.loss_curves(
      {r["point"]: r["dirs"] for r in t.ablations},
      out("ablations_minus_dense.png"),
      "ablations (seed 0): eval loss minus dense (mean of seeds)",
      relative_to=c.dense,
    )
  plots.expert_load(c.groups[f"num_experts={s.e_max}"][0], out(f"expert_load_e{s.e_max}.png"))
  if t.why:
    title = "MoE E=32 minus E=8, seed 0 (core: Switch, capacity 1.25)"
    plots.gap_curves(why_pairs(c, t.why), out("why_e32_minus_e8.png"), title)


def write_results(out_dir: str, lines: list[str], c: Core, t: Tables):
  """results.md, results.csv (the core rows' non-list columns) and results.json."""
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  keys = [k for k in t.core[0] if not isinstance(t.core[0][k], list)]
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(t.core)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results_json(c, t), f, indent=1)


# --------------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run", action="store_true", help="run (or resume) every sweep first")
  ap.add_argument("--workdir", default="runs/switch_vs_dense", help="the core grid's sweep folder")
  ap.add_argument("--ablations_workdir", default="runs/switch_vs_dense_ablations")
  ap.add_argument("--why_workdir", default="runs/switch_vs_dense_why")
  ap.add_argument(
    "--lr_workdir",
    default="runs/dense_lr",
    help="configs/sweeps/dense_lr.py's folder, for the learning-rate table",
  )
  ap.add_argument(
    "--parallel",
    type=int,
    default=2,
    help="points at a time (--run); on 2 CPU cores, 2 at a time train at about the "
    "speed of one alone each (README.md, 'Wall time')",
  )
  ap.add_argument(
    "--grid",
    choices=sorted(GRIDS),
    default="cpu",
    help="cpu: the core grid with its ablations and why runs; long: the core grid at "
    "twice the steps with dropless dispatch (:long; default --workdir "
    "runs/switch_vs_dense_long, --out long/ here), on its own",
  )
  ap.add_argument("--out", default=None, help="where the report goes (default: this folder)")
  a = ap.parse_args()
  if a.grid == "long":
    if a.workdir == ap.get_default("workdir"):
      a.workdir = "runs/switch_vs_dense_long"
    a.out = a.out or os.path.join(HERE, "long")
  a.out = a.out or HERE
  os.makedirs(a.out, exist_ok=True)
  try:
    if a.run and a.grid == "long":
      if failed := sweeplib.run_all(GRIDS["long"], a.workdir, a.parallel):
        sys.exit(f"report.py: {len(failed)} point(s) failed ({', '.join(failed)}); rerun")
    elif a.run:
      failed = sweeplib.run_all(CORE, a.workdir, a.parallel)
      failed += sweeplib.run_all(LR_SWEEP, a.lr_workdir, a.parallel)
      failed += sweeplib.run_all(ABLATIONS, a.ablations_workdir, a.parallel)
      failed += sweeplib.run_all(WHY, a.why_workdir, a.parallel)
      if failed:
        sys.exit(
          f"report.py: {len(failed)} point(s) failed ({', '.join(failed)}); "
          "rerun the same command to retry them"
        )
    report(a)
  except ConfigError as e:
    sys.exit(f"report.py: {e}")


def report(a):
  """Reads the grid, makes every table's rows, writes the plots, results.md/.csv/.json."""
  c = read_core(GRIDS[a.grid], a.workdir)
  t = make_tables(c, a.grid, a.ablations_workdir, a.why_workdir, a.lr_workdir)
  write_plots(c, t, a.out)
  lines = results_md(c, t)
  write_results(a.out, lines, c, t)
  print("\n".join(lines))
  print(f"wrote plots, results.md, results.csv and results.json to {a.out}")


if __name__ == "__main__":
  main()
