r"""The Switch-vs-dense study in one command: run its sweeps, then plots, tables and a fit.

  python experiments/switch_vs_dense/report.py --run

--run runs the core grid (configs/sweeps/switch_vs_dense.py, about 2 hours on
2 CPU cores) and the ablations (:ablations, about 1 hour) first, skipping
finished points and resuming interrupted ones; without it the report is made
from whatever the two sweep folders hold. Writes into this folder:
results.md (every table), results.csv (the core grid, seeds aggregated),
results.json (core, ablations and the fitted laws), and the plots
loss_vs_step.png, loss_minus_dense.png, loss_vs_wall.png, loss_vs_experts.png,
speedup_vs_experts.png, ablations_minus_dense.png, expert_load_e32.png.
Every number comes from the runs' metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from sparse_lm import config as cfglib  # noqa: E402
from sparse_lm import metrics as metricslib  # noqa: E402
from sparse_lm import plots  # noqa: E402
from sparse_lm import sweep as sweeplib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = "configs/sweeps/switch_vs_dense.py"
CORE, ABLATIONS = SWEEP, SWEEP + ":ablations"
LR_SWEEP = "configs/sweeps/dense_lr.py"


# ------------------------------------------------------------------ reading


def seed_groups(sweep_file: str, workdir: str) -> dict[str, list[str]]:
  """{point name without the seed: [run folders of its seeds]}, in grid order."""
  out: dict[str, list[str]] = {}
  for p in sweeplib.points(sweep_file):
    key = sweeplib.point_name({k: v for k, v in p.items() if k != sweeplib.SEED_KEY})
    out.setdefault(key, []).append(os.path.join(workdir, sweeplib.point_name(p)))
  return out


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


def experts_of(point: str) -> int:
  return int(dict(kv.split("=") for kv in point.split(","))["num_experts"])


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


# ------------------------------------------------------------------ report


def fmt(x, spec=".4f", none="-"):
  return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run", action="store_true", help="run (or resume) both sweeps first")
  ap.add_argument("--workdir", default="runs/switch_vs_dense", help="the core grid's sweep folder")
  ap.add_argument("--ablations_workdir", default="runs/switch_vs_dense_ablations")
  ap.add_argument(
    "--lr_workdir",
    default="runs/dense_lr",
    help="configs/sweeps/dense_lr.py's folder, for the learning-rate table",
  )
  ap.add_argument("--parallel", type=int, default=1, help="points at a time (--run)")
  ap.add_argument("--out", default=HERE)
  a = ap.parse_args()
  try:
    if a.run:
      failed = sweeplib.run_all(CORE, a.workdir, a.parallel)
      failed += sweeplib.run_all(ABLATIONS, a.ablations_workdir, a.parallel)
      if failed:
        sys.exit(
          f"report.py: {len(failed)} point(s) failed ({', '.join(failed)}); "
          "rerun the same command to retry them"
        )
    report(a)
  except cfglib.ConfigError as e:
    sys.exit(f"report.py: {e}")


def report(a):
  core = {r["point"]: r for r in sweeplib.collect(CORE, a.workdir)}
  groups = seed_groups(CORE, a.workdir)
  missing = [p for p, r in core.items() if not r["done"]]
  if missing:
    raise cfglib.ConfigError(
      f"{len(missing)} core point(s) of {a.workdir} are not finished "
      f"({', '.join(missing)}); run with --run"
    )
  shutil.copy(os.path.join(a.workdir, "results.csv"), os.path.join(a.out, "results.csv"))
  sweep_mod = cfglib.load_module(SWEEP)
  dense = groups["num_experts=1"]
  d_steps, d_mean, d_std = plots.mean_curve(dense)
  d_final, d_last = float(d_mean[-1]), float(d_steps[-1])
  d_wall = seconds_at(dense, d_last)
  moe_points = [p for p in groups if p != "num_experts=1"]
  experts = [experts_of(p) for p in moe_points]

  # ---- core table
  rows = []
  for p in ["num_experts=1"] + moe_points:
    r, dirs = core[p], groups[p]
    steps, mean, _ = plots.mean_curve(dirs)
    s = first_step_at(steps, mean, d_final) if p != "num_experts=1" else d_last
    per_seed = [first_step_at(*plots.eval_curve(d), d_final) for d in dirs]
    wall = seconds_at(dirs, s) if s is not None else None
    rows.append(
      {
        "point": p,
        "experts": experts_of(p),
        "n": r["n"],
        "seeds": r["seeds"],
        "total_params": r["total_params"],
        "active_params": r["active_params"],
        "train_flops_per_token": r["train_flops_per_token"],
        "final_eval_loss": r["final_eval_loss"],
        "final_eval_loss_std": r["final_eval_loss_std"],
        "per_seed_final": [float(plots.eval_curve(d)[1][-1]) for d in dirs],
        "minus_dense": r["final_eval_loss"] - d_final,
        "steps_to_dense_final": s,
        "per_seed_steps_to_dense_final": per_seed,
        "step_ratio": None if s is None else s / d_last,
        "seconds_to_dense_final": wall,
        "time_ratio": None if wall is None else wall / d_wall,
        "tokens_per_s": r["tokens_per_s"],
        "dropped_fraction": dropped(dirs),
      }
    )
  by_e = {row["experts"]: row for row in rows}
  means = [by_e[e]["final_eval_loss"] for e in [1] + experts]
  decreasing = all(x > y for x, y in zip(means, means[1:]))
  e_max = max(experts)
  gain = d_final - by_e[e_max]["final_eval_loss"]
  noise = max(by_e[1]["final_eval_loss_std"], by_e[e_max]["final_eval_loss_std"])

  # ---- fits over dense (E=1) and every E
  E_all, L_all = [1] + experts, means
  fits = {}
  for name, fn in (("log-linear", fit_log_linear), ("saturating", fit_saturating)):
    f = fn(E_all, L_all)
    f.update(fit_errors(fn, E_all, L_all))
    fits[name] = f
  chosen = min(fits, key=lambda k: fits[k]["loo_rmse"])

  # ---- ablations (seed 0; compared with seed 0 of the core points)
  abl_rows = []
  if os.path.isdir(a.ablations_workdir):
    abl = {r["point"]: r for r in sweeplib.collect(ABLATIONS, a.ablations_workdir)}
    abl_groups = seed_groups(ABLATIONS, a.ablations_workdir)
    for p, r in abl.items():
      if not r["done"]:
        continue
      ref = "num_experts=1" if experts_of(p) == 1 else f"num_experts={min(experts_of(p), e_max)}"
      if ref not in groups:
        ref = "num_experts=8"
      ref_final = float(plots.eval_curve(groups[ref][0])[1][-1])
      steps, losses = plots.eval_curve(abl_groups[p][0])
      s = first_step_at(steps, losses, d_final)
      abl_rows.append(
        {
          "point": p,
          "reference": f"{ref} (seed 0)",
          "total_params": r["total_params"],
          "active_params": r["active_params"],
          "train_flops_per_token": r["train_flops_per_token"],
          "final_eval_loss": r["final_eval_loss"],
          "minus_reference": r["final_eval_loss"] - ref_final,
          "minus_dense": r["final_eval_loss"] - d_final,
          "steps_to_dense_final": s,
          "tokens_per_s": r["tokens_per_s"],
          "dropped_fraction": dropped(abl_groups[p]),
          "dirs": abl_groups[p],
        }
      )

  # ---- plots
  def label(p):
    return "dense" if p == "num_experts=1" else f"Switch E={experts_of(p)}"

  scaling = {label(p): groups[p] for p in ["num_experts=1"] + moe_points}
  out = lambda name: os.path.join(a.out, name)
  title = f"Switch vs dense at equal FLOPs per token ({int(d_last)} steps)"
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
    "Switch: eval loss minus dense (mean of seeds)",
    relative_to=dense,
  )
  fit_lines = {f"{k} fit": fits[k]["predict"] for k in fits}
  plots.loss_vs_experts(
    [1] + experts,
    means,
    out("loss_vs_experts.png"),
    dense_loss=d_final,
    title=f"final eval loss (step {int(d_last)}), +- std over seeds",
    stds=[by_e[e]["final_eval_loss_std"] for e in [1] + experts],
    fits=fit_lines,
  )
  plots.speedup_vs_experts(
    experts,
    [
      d_last / by_e[e]["steps_to_dense_final"] if by_e[e]["steps_to_dense_final"] else float("nan")
      for e in experts
    ],
    [
      d_wall / by_e[e]["seconds_to_dense_final"]
      if by_e[e]["seconds_to_dense_final"]
      else float("nan")
      for e in experts
    ],
    out("speedup_vs_experts.png"),
  )
  if abl_rows:
    plots.loss_curves(
      {r["point"]: r["dirs"] for r in abl_rows},
      out("ablations_minus_dense.png"),
      "ablations (seed 0): eval loss minus dense (mean of seeds)",
      relative_to=dense,
    )
  plots.expert_load(groups[f"num_experts={e_max}"][0], out(f"expert_load_e{e_max}.png"))

  # ---- results.md
  L = []
  L.append(
    f"Core grid: `{CORE}`, {sum(len(v) for v in groups.values())} runs; ablations: "
    f"`{ABLATIONS}`, {len(abl_rows)} runs. Dense baseline: final eval loss "
    f"{d_final:.4f} +- {by_e[1]['final_eval_loss_std']:.4f} (mean +- sample std over "
    f"{by_e[1]['n']} seeds) at step {int(d_last)}, {d_wall:.0f} s of training."
  )
  L.append("")
  L.append(
    "- Final eval loss strictly decreasing dense -> "
    + " -> ".join(map(str, experts))
    + f": **{'yes' if decreasing else 'no'}** ("
    + ", ".join(f"{m:.4f}" for m in means)
    + ")."
  )
  L.append(
    f"- E={e_max} gain over dense: {gain:.4f} nats = {gain / noise:.1f}x the larger "
    f"seed-to-seed std ({noise:.4f})."
  )
  r_max = by_e[e_max]
  L.append(
    f"- E={e_max} reaches the dense model's final loss at step "
    f"{fmt(r_max['steps_to_dense_final'], '.0f')} = "
    f"{fmt(r_max['step_ratio'], '.2f')}x the dense model's steps; in training time, "
    f"{fmt(r_max['time_ratio'], '.2f')}x."
  )
  L.append("")
  L.append(
    "| run | seeds | total / active params | train FLOPs/token | final eval loss | "
    "minus dense | steps to dense final | x dense steps | time to dense final (s) | "
    "x dense time | tokens/s | train dropped |"
  )
  L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for row in rows:
    L.append(
      f"| {label(row['point'])} | {row['n']} | {row['total_params']:,} / "
      f"{row['active_params']:,} | {row['train_flops_per_token']:.3g} | "
      f"{row['final_eval_loss']:.4f} +- {row['final_eval_loss_std']:.4f} | "
      f"{row['minus_dense']:+.4f} | {fmt(row['steps_to_dense_final'], '.0f')} | "
      f"{fmt(row['step_ratio'], '.2f')} | {fmt(row['seconds_to_dense_final'], '.0f')} | "
      f"{fmt(row['time_ratio'], '.2f')} | {row['tokens_per_s']:,.0f} | "
      f"{fmt(row['dropped_fraction'], '.3f')} |"
    )
  L.append("")
  L.append("Per seed (final eval loss; step at which the run reaches the dense mean's final loss):")
  L.append("")
  for row in rows:
    if row["n"] > 1:
      L.append(
        f"- {label(row['point'])}: "
        + ", ".join(
          f"seed {s}: {l:.4f} / {fmt(st, '.0f')}"
          for s, l, st in zip(
            row["seeds"], row["per_seed_final"], row["per_seed_steps_to_dense_final"]
          )
        )
      )
  L.append("")
  L.append(
    "Scaling law over dense (E=1) and every E, fitted to the mean final losses "
    "(Clark et al. 2022; RMSE of the fitted loss in nats; leave-one-out RMSE refits "
    "without each point in turn):"
  )
  L.append("")
  L.append("| form | a | b | E_start | E_max | RMSE | leave-one-out RMSE |")
  L.append("|---|---|---|---|---|---|---|")
  for name, f in fits.items():
    L.append(
      f"| {name}: {f['form']} | {f['a']:.5f} | {f['b']:.5f} | "
      f"{fmt(f.get('E_start'), '.3g')} | {fmt(f.get('E_max'), '.3g')} | "
      f"{f['rmse']:.4f} | {f['loo_rmse']:.4f} |"
    )
  L.append("")
  L.append(f"The points call for the **{chosen}** form (smaller leave-one-out error).")
  if abl_rows:
    L.append("")
    L.append(
      "Ablations (one seed, seed 0; 'minus reference' is against the core grid's seed-0 "
      "run named there, whose seed-to-seed std is in the table above):"
    )
    L.append("")
    L.append(
      "| run | reference | total / active params | train FLOPs/token | final eval loss | "
      "minus reference | minus dense mean | steps to dense final | tokens/s | "
      "train dropped |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in abl_rows:
      L.append(
        f"| {r['point']} | {r['reference']} | {r['total_params']:,} / "
        f"{r['active_params']:,} | {r['train_flops_per_token']:.3g} | "
        f"{r['final_eval_loss']:.4f} | {r['minus_reference']:+.4f} | "
        f"{r['minus_dense']:+.4f} | {fmt(r['steps_to_dense_final'], '.0f')} | "
        f"{r['tokens_per_s']:,.0f} | {fmt(r['dropped_fraction'], '.3f')} |"
      )
  total_matched = [r for r in abl_rows if "d_ff=" in r["point"] and experts_of(r["point"]) == 1]
  for r in total_matched:
    twin = min(experts, key=lambda x: abs(by_e[x]["total_params"] - r["total_params"]))
    gap = d_final - r["final_eval_loss"]
    closed = (d_final - by_e[twin]["final_eval_loss"]) / gap if gap > 0 else float("nan")
    L.append("")
    L.append(
      f"Total-parameter-matched dense ({r['point']}, {r['total_params']:,} params, "
      f"{r['train_flops_per_token'] / by_e[1]['train_flops_per_token']:.2f}x the FLOPs per "
      f"token): {r['final_eval_loss']:.4f}. Switch E={twin} ({by_e[twin]['total_params']:,} "
      f"params, the active-matched FLOPs) closes {closed:.0%} of the gap between the "
      f"active-matched dense model ({d_final:.4f}) and it."
    )
  lr_rows = []
  if os.path.isdir(a.lr_workdir):
    lr_rows = [r for r in sweeplib.collect(LR_SWEEP, a.lr_workdir) if r["done"]]
    seed0 = groups["num_experts=1"][0]
    lr_rows.append(
      {
        "train.learning_rate": sweep_mod.LEARNING_RATE,
        "final_eval_loss": float(plots.eval_curve(seed0)[1][-1]),
        "best_eval_loss": float(plots.eval_curve(seed0)[1].min()),
      }
    )
    lr_rows.sort(key=lambda r: r["train.learning_rate"])
  if lr_rows:
    L.append("")
    L.append(
      f"Dense learning rate at this horizon (`{LR_SWEEP}`, seed 0; the study uses "
      f"{sweep_mod.LEARNING_RATE:g}):"
    )
    L.append("")
    L.append("| learning rate | final eval loss | best eval loss |")
    L.append("|---|---|---|")
    for r in lr_rows:
      L.append(
        f"| {r['train.learning_rate']:g} | {r['final_eval_loss']:.4f} | {r['best_eval_loss']:.4f} |"
      )
  with open(os.path.join(a.out, "results.md"), "w") as f:
    f.write("\n".join(L) + "\n")
  strip = lambda d: {k: v for k, v in d.items() if k not in ("predict", "dirs")}
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(
      {
        "core_sweep": CORE,
        "ablations_sweep": ABLATIONS,
        "learning_rate": sweep_mod.LEARNING_RATE,
        "dense_final_eval_loss": d_final,
        "dense_steps": d_last,
        "strictly_decreasing": decreasing,
        "gain_over_std": gain / noise,
        "core": rows,
        "fits": {k: strip(v) for k, v in fits.items()},
        "chosen_fit": chosen,
        "ablations": [strip(r) for r in abl_rows],
        "dense_learning_rates": lr_rows,
      },
      f,
      indent=1,
    )
  print("\n".join(L))
  print(f"wrote plots, results.md, results.csv and results.json to {a.out}")


if __name__ == "__main__":
  main()
