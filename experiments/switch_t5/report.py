r"""Switch vs T5 dense on span corruption in one command: the rate check, the grid, the report.

  python experiments/switch_t5/report.py --run
  python experiments/switch_t5/report.py --run --part lr     # one session: lr_results.*
  python experiments/switch_t5/report.py --run --part grid   # another: the grid, the report
  python experiments/switch_t5/report.py --run --smoke --out=/tmp/switch_t5_smoke   # the pipeline

--run runs, two points at a time, the dense learning-rate calibration
(configs/sweeps/switch_t5.py:lr: dense seed 0 at each rate of LR_GRID), picks
the rate with the lowest final eval loss, then the grid at that rate
(:cpu@<rate>: dense and Switch E=8 / E=32 with seeds), skipping finished
points and resuming interrupted ones; the calibration's run at the chosen rate
is the grid's dense seed 0 (the same config), so it is copied, not rerun
(where its folder is gone, the grid runs it). --part lr runs the calibration
only and writes lr_results.md / .json (the chosen rate, each rate's end loss
and speed); --part grid reads the rate from the calibration's folders, or
from that lr_results.json when they are gone (a later session).
Without --run the report is made from whatever the sweep folders hold (every
point must be finished). --smoke does the same at 12 steps and batch 8 in
runs/switch_t5_smoke (its numbers mean nothing; it proves the pipeline).

Writes into --out (default: this folder) results.md, results.csv (one row per
arm), results.json and loss_vs_step.png / loss_minus_dense.png. The
statistics, Fedus et al. 2021's (figure 5, table 1):
  - each MoE arm's final eval loss minus dense's, paired by seed (a seed sets
    the init and the data order of both), mean and a 95 % t interval over seeds;
  - the step ratio to dense's final quality: the step at which the MoE's eval
    curve (mean over seeds) first reaches dense's final eval loss (mean over
    seeds), linearly interpolated between evals, over dense's final step
    (figure 5's "time to quality" in steps); and, as the decoder-only study
    reads it, the same before the cooldown (trailing mean of 3 evals against
    dense's at the last step before the cooldown);
beside the decoder-only study's numbers (experiments/switch_vs_dense/results.json
and long/results.json). The reading helpers are that study's report.py's.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments.switch_vs_dense import report as svd  # noqa: E402  (its reading helpers)
from sparse_lm import config as cfglib  # noqa: E402
from sparse_lm import plots  # noqa: E402
from sparse_lm import sweep as sweeplib  # noqa: E402
from sparse_lm.errors import ConfigError  # noqa: E402

first_step_at, stable_curve, end_loss = svd.first_step_at, svd.stable_curve, svd.end_loss
fmt, table, titled, experts_of = svd.fmt, svd.table, svd.titled, svd.experts_of

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = "configs/sweeps/switch_t5.py"
DENSE = "num_experts=1"
DECODER_ONLY = {  # the decoder-only study's grids: results.json, and what they were
  "core": ("experiments/switch_vs_dense/results.json", "1200 steps, 4.9M tokens, cf 1.25"),
  "long": ("experiments/switch_vs_dense/long/results.json", "2400 steps, 9.8M tokens, dropless"),
}
# Two-sided 95 % Student t quantiles by degrees of freedom (n seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(xs: list[float]) -> tuple[float, float | None]:
  """(mean, half-width of the 95 % t interval; None for one value)."""
  if len(xs) < 2:
    return float(np.mean(xs)), None
  return float(np.mean(xs)), T95[len(xs) - 1] * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))


# ------------------------------------------------------------------ running


def grids(smoke: bool) -> tuple[str, str]:
  """(the rate calibration's sweep, the grid's sweep without its rate)."""
  s = "_smoke" if smoke else ""
  return f"{SWEEP}:lr{s}", f"{SWEEP}:cpu{s}"


def chosen_rate(lr_sweep: str, workdir: str) -> tuple[float, list[dict]]:
  """(the rate of the lowest final eval loss, the calibration's rows by rate);
  every point must be finished."""
  rows = []
  for p in sweeplib.points(lr_sweep):
    d = os.path.join(workdir, sweeplib.point_name(p))
    if not os.path.exists(os.path.join(d, "DONE")):
      raise ConfigError(f"the rate calibration's {d} is not finished; run with --run")
    rows.append({"learning_rate": p["train.learning_rate"], "end_loss": end_loss(d), "dir": d})
  rows.sort(key=lambda r: r["learning_rate"])
  return min(rows, key=lambda r: r["end_loss"])["learning_rate"], rows


def run_lr(lr_sweep: str, workdir: str, parallel: int):
  """Runs (or resumes) the rate calibration."""
  if failed := sweeplib.run_all(lr_sweep, os.path.join(workdir, "lr"), parallel):
    sys.exit(f"report.py: {len(failed)} calibration point(s) failed ({', '.join(failed)}); rerun")


def calibration(lr_sweep: str, workdir: str, out: str) -> tuple[float, list[dict]]:
  """(the chosen rate, the calibration's rows): from its run folders when
  they are finished, else from the lr_results.json that `--part lr` wrote
  into `out` (a later session's grid: the run folders do not survive)."""
  try:
    return chosen_rate(lr_sweep, os.path.join(workdir, "lr"))
  except ConfigError:
    path = os.path.join(out, "lr_results.json")
    if not os.path.exists(path):
      raise
    with open(path) as f:
      saved = json.load(f)
    if saved["sweep"] != lr_sweep:
      raise ConfigError(f"{path} is of {saved['sweep']}, not {lr_sweep}") from None
    return saved["rate"], saved["rows"]


def run_grid(lr_sweep: str, grid: str, workdir: str, out: str, parallel: int) -> str:
  """Runs the grid at the calibration's rate; returns the grid's sweep file."""
  rate, rows = calibration(lr_sweep, workdir, out)
  core = f"{grid}@{rate:g}"
  core_dir = os.path.join(workdir, core.partition(":")[2])
  # The calibration's run at the chosen rate is the grid's dense seed 0 (the
  # same config): copied where its folder is here, else run with the grid.
  seed0 = os.path.join(core_dir, sweeplib.point_name({"model.moe.num_experts": 1, "train.seed": 0}))
  src = next((r.get("dir") for r in rows if r["learning_rate"] == rate), None)
  done_src = src and os.path.exists(os.path.join(src, "DONE"))
  if done_src and not os.path.exists(os.path.join(seed0, "DONE")):
    shutil.rmtree(seed0, ignore_errors=True)
    shutil.copytree(src, seed0)
  if failed := sweeplib.run_all(core, core_dir, parallel):
    sys.exit(f"report.py: {len(failed)} point(s) failed ({', '.join(failed)}); rerun")
  return core


def write_lr(out: str, lr_sweep: str, rate: float, rows: list[dict]):
  """lr_results.md / .json: the calibration's table, the chosen rate and
  each run's speed (what `--part grid` reads in a later session)."""
  for r in rows:
    s = sweeplib.summarize_point(r["dir"])
    r |= {"tokens_per_s": s["tokens_per_s"], "wall_time_s": s["wall_time_s"]}
  lines = [
    "# Switch vs T5 dense: the dense rate calibration (`report.py --part lr`)",
    "",
    f"Dense (seed 0) at each rate of {lr_sweep}, the grid's horizon; the lowest final eval "
    f"loss chooses the grid's rate: **{rate:g}**.",
    "",
  ]
  lines += table(
    ["learning rate", "end loss", "tokens/s", "wall time (min)"],
    [
      [
        f"{r['learning_rate']:g}",
        f"{r['end_loss']:.4f}",
        f"{r['tokens_per_s']:,.0f}",
        "-" if r["wall_time_s"] is None else f"{r['wall_time_s'] / 60:.1f}",
      ]
      for r in rows
    ],
  )
  with open(os.path.join(out, "lr_results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  keep = [{k: v for k, v in r.items() if k != "dir"} for r in rows]
  with open(os.path.join(out, "lr_results.json"), "w") as f:
    json.dump({"sweep": lr_sweep, "rate": rate, "rows": keep}, f, indent=1)
  print("\n".join(lines))


def grids_lr(grid: str) -> str:
  return grid.replace(":cpu", ":lr")


# ------------------------------------------------------------------ reading


def ratio(step: float | None, base: float) -> float | None:
  return None if step is None else step / base


def arm_rows(core: str, workdir: str) -> tuple[list[dict], dict]:
  """One row per arm (dense first) and the dense numbers every arm is read against."""
  core_dir = os.path.join(workdir, core.partition(":")[2])
  points = {r["point"]: r for r in sweeplib.collect(core, core_dir)}
  if missing := [p for p, r in points.items() if not r["done"]]:
    raise ConfigError(f"{len(missing)} point(s) of {core_dir} are not finished; run with --run")
  groups = svd.seed_groups(core, core_dir)
  train = cfglib.load_config(core).train
  stop = train.num_steps - train.cooldown_steps
  dense = groups[DENSE]
  d_steps, d_mean, _ = plots.mean_curve(dense)
  d_seed = {s: end_loss(d) for s, d in zip(points[DENSE]["seeds"], dense)}
  d_st = stable_curve(dense, stop)
  ref = {
    "final": float(np.mean(list(d_seed.values()))),
    "final_step": int(d_steps[-1]),
    "stop": stop,
    # None where fewer than STABLE_EVALS evals precede the cooldown (--smoke).
    "stable": float(d_st[1][-1]) if (d_steps <= stop).sum() >= svd.STABLE_EVALS else None,
    "learning_rate": train.learning_rate,
    "dirs": dense,
  }
  rows = []
  for p in [DENSE] + [p for p in groups if p != DENSE]:
    r, dirs = points[p], groups[p]
    per_seed = [end_loss(d) for d in dirs]
    diffs = [x - d_seed[s] for s, x in zip(r["seeds"], per_seed) if s in d_seed]
    mean_diff, half = interval(diffs)
    steps, mean, _ = plots.mean_curve(dirs)
    fig5 = first_step_at(steps, mean, ref["final"])
    if ref["stable"] is None:
      stable = None
    else:  # dense reaches its own loss at the stop by definition
      stable = stop if p == DENSE else first_step_at(*stable_curve(dirs, stop), ref["stable"])
    rows.append(
      {
        "point": p,
        "experts": experts_of(p),
        "n": r["n"],
        "seeds": r["seeds"],
        "total_params": r["total_params"],
        "active_params": r["active_params"],
        "train_flops_per_token": r["train_flops_per_token"],
        "end_loss": float(np.mean(per_seed)),
        "end_loss_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
        "per_seed_end": per_seed,
        "paired_minus_dense": diffs,
        "minus_dense": mean_diff,
        "minus_dense_ci95": half,
        "steps_to_dense_final": fig5,
        "step_ratio": None if fig5 is None else fig5 / ref["final_step"],
        "per_seed_step_ratio": [
          ratio(first_step_at(*plots.eval_curve(d), d_seed[sd]), ref["final_step"])
          for sd, d in zip(r["seeds"], dirs)
        ],
        "steps_to_dense_stable": stable,
        "stable_step_ratio": ratio(stable, stop),
        "tokens_per_s": r["tokens_per_s"],
        "dropped_fraction": svd.dropped(dirs),
        "dirs": dirs,
      }
    )
  return rows, ref


def decoder_only_rows() -> list[dict]:
  """The decoder-only study's E=8 / E=32 rows (its grids' results.json), read the same way."""
  out = []
  for grid, (path, what) in DECODER_ONLY.items():
    full = os.path.join(ROOT, path)
    if not os.path.exists(full):
      continue
    with open(full) as f:
      study = json.load(f)
    for r in study["core"]:
      if r["experts"] not in (8, 32):
        continue
      mean_diff, half = interval(r["paired_minus_dense"])
      out.append(
        {
          "study": f"decoder-only LM, {grid} ({what})",
          "experts": r["experts"],
          "n": r["n"],
          "minus_dense": mean_diff,
          "minus_dense_ci95": half,
          "stable_step_ratio": r["step_ratio"],
        }
      )
  return out


# ------------------------------------------------------------------- render


def label(p: str) -> str:
  return "T5 dense" if p == DENSE else f"Switch E={experts_of(p)}"


def pm(mean: float | None, half: float | None) -> str:
  return fmt(mean, "+.4f") + ("" if half is None else f" +- {half:.4f}")


def results_md(core: str, rows: list[dict], ref: dict, lr_rows: list[dict], dec: list[dict]):
  n_runs = sum(r["n"] for r in rows)
  L = [
    f"Grid: `{core}`, {n_runs} runs, span corruption of the stdlib corpus (encoder-decoder, "
    f"MoE in every other layer of both stacks, top-1, capacity factor 1.25 / 2.0 eval). "
    f"End loss = a run's final eval (step {ref['final_step']}, after the last "
    f"{ref['final_step'] - ref['stop']} steps' cooldown); dense end loss {ref['final']:.4f}. "
    "Minus dense: paired by seed (same init seed and data order), mean +- the half-width of "
    "the 95 % t interval over seeds. Step ratio (Fedus et al. figure 5): the step at which "
    "the arm's eval curve (mean of seeds) first reaches dense's final eval loss, interpolated, "
    f"over dense's {ref['final_step']} steps; '-': never. Before the cooldown: the same with "
    f"trailing means of 3 evals against dense's at step {ref['stop']} ({fmt(ref['stable'])}), "
    "as the decoder-only study reads it.",
    "",
  ]
  header = (
    "arm | seeds | total / active params | train FLOPs/token | end loss | minus dense "
    "| paired per seed | step ratio (fig. 5) | per seed | step ratio before cooldown "
    "| tokens/s | train dropped"
  ).split(" | ")
  cells = [
    [
      label(r["point"]),
      str(r["n"]),
      f"{r['total_params']:,} / {r['active_params']:,}",
      f"{r['train_flops_per_token']:.3g}",
      f"{r['end_loss']:.4f} +- {r['end_loss_std']:.4f}",
      pm(r["minus_dense"], r["minus_dense_ci95"]),
      ", ".join(f"{x:+.4f}" for x in r["paired_minus_dense"]),
      fmt(r["step_ratio"], ".2f"),
      ", ".join(fmt(x, ".2f") for x in r["per_seed_step_ratio"]),
      fmt(r["stable_step_ratio"], ".2f"),
      f"{r['tokens_per_s']:,.0f}",
      fmt(r["dropped_fraction"], ".3f"),
    ]
    for r in rows
  ]
  L += table(header, cells)
  if dec:
    ours = [
      {
        "study": "encoder-decoder, span corruption (this grid)",
        **{k: r[k] for k in ("experts", "n", "minus_dense", "minus_dense_ci95")},
        "stable_step_ratio": r["stable_step_ratio"],
      }
      for r in rows
      if r["experts"] != 1
    ]
    L += titled(
      "Beside the decoder-only study (experiments/switch_vs_dense; its step ratio is the "
      "before-the-cooldown one):",
      table(
        ["study", "E", "seeds", "minus dense (95 % t)", "step ratio before cooldown"],
        [
          [
            r["study"],
            str(r["experts"]),
            str(r["n"]),
            pm(r["minus_dense"], r["minus_dense_ci95"]),
            fmt(r["stable_step_ratio"], ".2f"),
          ]
          for r in ours + dec
        ],
      ),
    )
  L += titled(
    f"Dense learning-rate calibration (`{grids_lr(core.partition('@')[0])}`, dense seed 0, "
    "the grid's horizon); the grid runs at the rate of the lowest end loss, "
    f"{ref['learning_rate']:g}:",
    table(
      ["learning rate", "end loss"],
      [[f"{r['learning_rate']:g}", f"{r['end_loss']:.4f}"] for r in lr_rows],
    ),
  )
  return L


def write(out: str, core: str, rows: list[dict], ref: dict, lr_rows: list[dict]):
  dec = decoder_only_rows()
  lines = results_md(core, rows, ref, lr_rows, dec)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  keys = [k for k in rows[0] if not isinstance(rows[0][k], list)]
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  strip = lambda r: {k: v for k, v in r.items() if k != "dirs"}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(
      {
        "sweep": core,
        "dense": strip(ref),
        "arms": [strip(r) for r in rows],
        "learning_rates": [strip(r) for r in lr_rows],
        "decoder_only": dec,
      },
      f,
      indent=1,
    )
  runs = {label(r["point"]): r["dirs"] for r in rows}
  title = f"Switch vs T5 dense, span corruption, equal FLOPs per token ({ref['final_step']} steps)"
  plots.loss_curves(runs, os.path.join(out, "loss_vs_step.png"), title)
  plots.loss_curves(
    {k: v for k, v in runs.items() if k != label(DENSE)},
    os.path.join(out, "loss_minus_dense.png"),
    "Switch: eval loss minus T5 dense (means of seeds)",
    relative_to=ref["dirs"],
  )
  print("\n".join(lines))
  print(f"wrote results.md, results.csv, results.json and the plots to {out}")


# --------------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run", action="store_true", help="run (or resume) the calibration and grid")
  ap.add_argument("--smoke", action="store_true", help="12-step grids in their own folder")
  ap.add_argument("--workdir", default=None, help="default runs/switch_t5 (--smoke: _smoke)")
  ap.add_argument("--parallel", type=int, default=2, help="points at a time (--run)")
  ap.add_argument("--out", default=None, help="where the report goes (default: this folder)")
  ap.add_argument(
    "--part",
    default="all",
    choices=("all", "lr", "grid"),
    help="lr: the rate calibration and lr_results.*; grid: the grid at its rate and the "
    "report (reads lr_results.json when the calibration's folders are gone); all: both",
  )
  a = ap.parse_args()
  workdir = a.workdir or ("runs/switch_t5_smoke" if a.smoke else "runs/switch_t5")
  out = a.out or HERE
  os.makedirs(out, exist_ok=True)
  lr_sweep, grid = grids(a.smoke)
  try:
    if a.run and a.part in ("all", "lr"):
      run_lr(lr_sweep, workdir, a.parallel)
    if a.part in ("all", "lr"):
      write_lr(out, lr_sweep, *chosen_rate(lr_sweep, os.path.join(workdir, "lr")))
    if a.part == "lr":
      return
    if a.run:
      core = run_grid(lr_sweep, grid, workdir, out, a.parallel)
    else:
      core = f"{grid}@{calibration(lr_sweep, workdir, out)[0]:g}"
    _, lr_rows = calibration(lr_sweep, workdir, out)
    rows, ref = arm_rows(core, workdir)
    write(out, core, rows, ref, [{k: v for k, v in r.items() if k != "dir"} for r in lr_rows])
  except ConfigError as e:
    sys.exit(f"report.py: {e}")


if __name__ == "__main__":
  main()
