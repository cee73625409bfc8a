r"""Plots and a markdown table of the Switch-vs-dense sweep, from its run folders.

  python -m sparse_lm.sweep --config=configs/sweeps/switch_vs_dense.py --workdir=runs/switch_vs_dense
  python experiments/switch_vs_dense/report.py --workdir=runs/switch_vs_dense

Writes into this folder: loss_vs_step.png, loss_vs_wall.png, loss_vs_experts.png,
expert_load_e8.png, results.md and results.csv (a copy of the sweep's).
Every number comes from the runs' metrics.jsonl.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from sparse_lm import metrics as metricslib  # pylint: disable=wrong-import-position
from sparse_lm import plots  # pylint: disable=wrong-import-position
from sparse_lm import sweep as sweeplib  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = "configs/sweeps/switch_vs_dense.py"


def first_step_at(steps, losses, target):
  """First (linearly interpolated) step where the eval curve reaches `target`."""
  for i, (s, l) in enumerate(zip(steps, losses)):
    if l <= target:
      if i == 0:
        return float(s)
      s0, l0 = steps[i - 1], losses[i - 1]
      return float(s0 + (s - s0) * (l0 - target) / (l0 - l))
  return None


def wall_at_step(wd, step):
  """Training seconds to reach `step` from the logged tokens/s (excludes evals, compile)."""
  rows = [r for r in metricslib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
          if "tokens_per_s" in r]
  tok_step = rows[0]["tokens"] / rows[0]["step"]
  secs, prev = 0.0, 0
  tps_steady = np.median([r["tokens_per_s"] for r in rows[1:]])
  for r in rows:
    tps = r["tokens_per_s"] if r is not rows[0] else tps_steady  # first row includes compile
    n = min(r["step"], step) - prev
    if n <= 0:
      break
    secs += n * tok_step / tps
    prev = r["step"]
  return secs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="runs/switch_vs_dense")
  ap.add_argument("--sweep", default=SWEEP)
  ap.add_argument("--out", default=HERE)
  a = ap.parse_args()
  results = sweeplib.collect(a.sweep, a.workdir)
  shutil.copy(os.path.join(a.workdir, "results.csv"), os.path.join(a.out, "results.csv"))
  runs = {r["point"]: os.path.join(a.workdir, r["point"]) for r in results}
  dense = runs["num_experts=1"]
  d_steps, d_loss = plots.eval_curve(dense)
  d_final, d_last_step = d_loss[-1], d_steps[-1]
  d_wall = wall_at_step(dense, d_last_step)

  scaling = {"dense": dense} | {f"Switch E={e}": runs[f"num_experts={e}"]
                                for e in (2, 4, 8, 16, 32)}
  plots.loss_curves(scaling, os.path.join(a.out, "loss_vs_step.png"),
                    "Switch vs dense: equal FLOPs per token")
  plots.loss_curves(scaling, os.path.join(a.out, "loss_vs_wall.png"),
                    "Switch vs dense, against training time", x="wall")
  plots.loss_curves({k: v for k, v in scaling.items() if k != "dense"},
                    os.path.join(a.out, "loss_minus_dense.png"),
                    "Switch (init 0.1, jitter): eval loss minus dense", relative_to=dense)
  fair = {f"E={e}, init 1.0": runs[f"num_experts={e},init_scale=1.0,jitter=0.0"]
          for e in (4, 8, 32) if f"num_experts={e},init_scale=1.0,jitter=0.0" in runs}
  fair["top-2, E=8"] = runs["num_experts=8,router=topk,top_k=2"]
  plots.loss_curves(fair, os.path.join(a.out, "ablations_minus_dense.png"),
                    "dense init / top-2: eval loss minus dense", relative_to=dense)
  experts = [2, 4, 8, 16, 32]
  at_end = [plots.eval_curve(runs[f"num_experts={e}"])[1][-1] for e in experts]
  plots.loss_vs_experts(experts, at_end, os.path.join(a.out, "loss_vs_experts.png"),
                        dense_loss=d_final, title=f"eval loss at step {int(d_last_step)}")
  plots.expert_load(runs["num_experts=8"], os.path.join(a.out, "expert_load_e8.png"))

  lines = [
      f"Dense baseline: final eval loss {d_final:.4f} at step {int(d_last_step)} "
      f"({d_wall:.0f} s of training).", "",
      "| run | total params | active params | final eval loss | best eval loss | "
      "steps to dense final | step speed-up | time to dense final (s) | time speed-up | "
      "tokens/s | train dropped fraction |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    wd = runs[r["point"]]
    steps, losses = plots.eval_curve(wd)
    s = first_step_at(steps, losses, d_final)
    rows = metricslib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
    dropped = [x["moe/mean/dropped_fraction"] for x in rows if "moe/mean/dropped_fraction" in x]
    wall = wall_at_step(wd, s) if s else None
    lines.append(
        f"| {r['point']} | {r['total_params']:,} | {r['active_params']:,} | "
        f"{r['final_eval_loss']:.4f} | {r['best_eval_loss']:.4f} | "
        f"{'-' if s is None else f'{s:.0f}'} | "
        f"{'-' if s is None else f'{d_last_step / s:.2f}x'} | "
        f"{'-' if wall is None else f'{wall:.0f}'} | "
        f"{'-' if wall is None else f'{d_wall / wall:.2f}x'} | {r['tokens_per_s']:,.0f} | "
        f"{'-' if not dropped else f'{np.mean(dropped[len(dropped) // 2:]):.3f}'} |")
  lr_dir = os.path.join(os.path.dirname(os.path.abspath(a.workdir)), "dense_lr")
  if os.path.isdir(lr_dir):  # the baseline's learning-rate sweep, if it was run
    lines += ["", "Dense learning-rate sweep (configs/sweeps/dense_lr.py, same model and horizon):",
              "", "| learning rate | final eval loss |", "|---|---|"]
    for r in sweeplib.collect("configs/sweeps/dense_lr.py", lr_dir):
      lines.append(f"| {r['train.learning_rate']:g} | {r['final_eval_loss']:.4f} |")
  with open(os.path.join(a.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"wrote plots and results.md to {a.out}")


if __name__ == "__main__":
  main()
