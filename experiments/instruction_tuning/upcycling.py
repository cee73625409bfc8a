r"""The upcycling part of the study (issue 29): runner and report.

  python experiments/instruction_tuning/report.py --run --part upcycling

runs (or resumes) configs/sweeps/upcycling.py's grids two points at a time:
every arm's long run without cooldown (`:long/ARM`: the dense parents first,
the upcycled runs start from their step PARENT_STEPS), then every cooldown
branch (`:cooldown/ARM`), each started from a copy of its long run's
checkpoint at (branch end - COOLDOWN) (`copy_branch_starts`: parameters,
optimizer state and data position; the trainer resumes it with the branch's
num_steps and cooldown_steps). Then it writes into this folder
upcycling_results.csv (one row per cooldown branch), upcycling_results.json
(everything below), upcycling_results.md (the tables README.md quotes) and
upcycling_compute.png (loss against extra compute, per arm). Without --run
the report is made from what runs/upcycling holds.

Statistics: arms are paired by seed (a seed is one dense parent: its init and
data order; every arm of that seed starts from it or reads its data). With n
seeds a difference's interval is the t-interval mean +- t(0.975, n-1) s/sqrt(n)
(n = 2: t = 12.71, wide on purpose), and the range over seeds is given beside
it. A claim is "holds" or "does not hold" only when its interval excludes
zero, otherwise "inconclusive".
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import numpy as np

from sparse_lm import config as cfglib
from sparse_lm import metrics as metricslib
from sparse_lm import plots
from sparse_lm import sweep as sweeplib
from sparse_lm.errors import ConfigError

SWEEP = "configs/sweeps/upcycling.py"
NAMES = {
  "dense": "dense (continued)",
  "top1": "upcycled, Switch top-1 (zero router)",
  "top2": "upcycled, top-2",
  "scratch": "top-2 MoE from scratch",
}
# (a, b, the paper's claim about a - b, the direction it expects: -1 = a lower)
CLAIMS = (
  ("top2", "dense", "upcycled top-2 beats continued dense training at equal extra compute", -1),
  ("top1", "dense", "upcycled top-1 beats continued dense training at equal extra compute", -1),
  ("top2", "scratch", "upcycled top-2 beats the MoE from scratch at equal total compute", -1),
  ("scratch", "dense", "the MoE from scratch beats dense at equal total compute", -1),
  ("top1", "top2", "(ours) top-1 against top-2 upcycling", 0),
)


# The paper's setting for each claim (Komatsuzaki et al. 2022, arXiv 2212.05055).
PAPER = {
  ("top2", "dense"): "T5 and ViT parents, MoE every other layer; ahead of continued "
  "dense training at about +50 % of the parent's pretraining cost",
  ("top1", "dense"): "not run in the paper (top-2 / expert choice)",
  ("top2", "scratch"): "ahead of an MoE trained from scratch on the same budget",
  ("scratch", "dense"): "(context: the from-scratch MoE beats dense per FLOP)",
  ("top1", "top2"): "-",
}


def cfg():
  return cfglib.load_module(SWEEP)


def spec(kind: str, arm: str) -> str:
  return f"{SWEEP}:{kind}/{arm}"


def workdir(kind: str, arm: str) -> str:
  c = cfg()
  return c.long_dir(arm) if kind == "long" else c.cooldown_dir(arm)


def runs_of(kind: str, arm: str) -> list[tuple[dict, str]]:
  """(overrides, run folder) of every point of a grid, finished or not."""
  return [
    (p, os.path.join(workdir(kind, arm), sweeplib.point_name(p)))
    for p in sweeplib.points(spec(kind, arm))
  ]


def long_run(arm: str, point: dict) -> str:
  """The folder of the long run a cooldown point branches from (its point
  without the branch's num_steps and cooldown_steps)."""
  p = {k: v for k, v in point.items() if k not in ("train.num_steps", "train.cooldown_steps")}
  return os.path.join(workdir("long", arm), sweeplib.point_name(p))


def done(d: str) -> bool:
  return os.path.exists(os.path.join(d, "DONE"))


# ------------------------------------------------------------------ running


def copy_branch_starts(arm: str, log=print):
  """Puts each cooldown branch's start into its folder: the long run's
  checkpoint at (end - COOLDOWN), whole (Orbax step folder: parameters,
  optimizer state, data position). Skipped where the branch has checkpoints."""
  c = cfg()
  for p, d in runs_of("cooldown", arm):
    start = p["train.num_steps"] - c.COOLDOWN
    dst = os.path.join(d, "checkpoints", str(start))
    if os.path.isdir(os.path.join(d, "checkpoints")):
      continue
    src = os.path.join(long_run(arm, p), "checkpoints", str(start))
    if not os.path.isdir(src):
      raise ConfigError(f"{src} does not exist: run {spec('long', arm)} first")
    shutil.copytree(src, dst + ".tmp")
    os.rename(dst + ".tmp", dst)
    log(f"{d}: starts from {src}")


def run(parallel: int = 2, log=print) -> list[str]:
  """Every long run, then every cooldown branch (resumable); the failed points."""
  failed = []
  for arm in cfg().ARMS:
    failed += sweeplib.run_all(spec("long", arm), workdir("long", arm), parallel, log)
  if failed:
    return failed
  for arm in cfg().ARMS:
    copy_branch_starts(arm, log)
    failed += sweeplib.run_all(spec("cooldown", arm), workdir("cooldown", arm), parallel, log)
  return failed


# ------------------------------------------------------------------ reading


def ratio(arm: str) -> float:
  """The arm's training FLOPs per token over the dense model's."""
  c = cfg()
  return c.flops_per_token(arm) / c.flops_per_token("dense")


def extra_compute(arm: str, step) -> np.ndarray:
  """An arm's step as extra compute over the parent's (a fraction of it)."""
  c = cfg()
  step = np.asarray(step, float)
  if arm == "dense":
    return (step - c.PARENT_STEPS) / c.PARENT_STEPS
  if arm == "scratch":
    return step * ratio(arm) / c.PARENT_STEPS - 1
  return step * ratio(arm) / c.PARENT_STEPS


def eval_at(d: str, step: int) -> float | None:
  rows = metricslib.read_jsonl(os.path.join(d, "metrics.jsonl"))
  hit = [r["eval_loss"] for r in rows if r.get("step") == step and "eval_loss" in r]
  return float(hit[-1]) if hit else None


def branch_rows() -> list[dict]:
  """One row per finished cooldown branch: arm, seed, extra compute asked
  for and as run, its end loss, and its long run's loss at the branch start."""
  c, rows = cfg(), []
  for arm in c.ARMS:
    ends = {v: k for k, v in c.plan(arm)["branches"].items()}
    for p, d in runs_of("cooldown", arm):
      if not done(d):
        continue
      end = p["train.num_steps"]
      rows.append(
        {
          "arm": arm,
          "seed": p["train.seed"],
          "extra": ends[end],
          "extra_as_run": round(float(extra_compute(arm, end)), 4),
          "end_step": end,
          "loss": eval_at(d, end),
          "loss_no_cooldown": eval_at(long_run(arm, p), end),  # None off the eval grid
          "dir": d,
        }
      )
  return rows


def step0_rows() -> list[dict]:
  """The upcycled runs' eval loss at step 0 against their parent's at the
  upcycling step (the same eval batches): the function-preservation gap."""
  c, out = cfg(), []
  for arm in ("top1", "top2"):
    for p, d in runs_of("long", arm):
      parent = os.path.join(c.long_dir("dense"), f"seed={p['train.seed']}")
      up, dense = eval_at(d, 0), eval_at(parent, c.PARENT_STEPS)
      if up is None or dense is None:
        continue
      out.append(
        {"arm": arm, "seed": p["train.seed"], "loss": up, "parent": dense, "gap": up - dense}
      )
  return out


def knee_rows() -> list[dict]:
  """Each parent's eval loss curve around the upcycling step: how flat it is."""
  c, out = cfg(), []
  for p, d in runs_of("long", "dense"):
    s, l = plots.eval_curve(d)
    curve = dict(zip(s.tolist(), l.tolist()))
    N = c.PARENT_STEPS
    if not {N, N - 100, N - 300, 100, 200} <= set(curve):
      continue
    out.append(
      {
        "seed": p["train.seed"],
        "loss": curve[N],
        "drop_last_100": curve[N - 100] - curve[N],
        "drop_last_300_per_100": (curve[N - 300] - curve[N]) / 3,
        "drop_100_to_200": curve[100] - curve[200],
        "drop_100_to_end": curve[100] - curve[N],
      }
    )
  return out


def interval(xs: list[float]) -> dict:
  """Mean, the t-interval (95 %) and the range of paired differences."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  xs = [float(x) for x in xs]
  n, m = len(xs), float(np.mean(xs)) if xs else None
  if n < 2:
    return {"n": n, "mean": m, "lo": None, "hi": None, "min": m, "max": m, "values": xs}
  half = float(stats.t.ppf(0.975, n - 1) * np.std(xs, ddof=1) / math.sqrt(n))
  return {
    "n": n,
    "mean": m,
    "lo": m - half,
    "hi": m + half,
    "min": min(xs),
    "max": max(xs),
    "values": xs,
  }


def verdict(iv: dict, direction: int) -> str:
  if iv["lo"] is None:
    return "not measured" if not iv["n"] else "one seed: no interval"
  if direction == 0:
    return "difference" if iv["lo"] > 0 or iv["hi"] < 0 else "inconclusive"
  if (iv["hi"] < 0 and direction < 0) or (iv["lo"] > 0 and direction > 0):
    return "holds"
  if iv["lo"] > 0 or iv["hi"] < 0:
    return "does not hold"
  return "inconclusive"


def claim_rows(rows: list[dict]) -> list[dict]:
  """Each claim at each extra compute: (a - b) paired by seed."""
  by = {(r["arm"], r["extra"], r["seed"]): r["loss"] for r in rows if r["loss"] is not None}
  c, out = cfg(), []
  planned = lambda arm, x: x in c.plan(arm)["branches"]
  for extra in c.EXTRA:
    for a, b, claim, direction in CLAIMS:
      if not (planned(a, extra) and planned(b, extra)):
        continue  # not in this run's design (configs/sweeps/upcycling.py, FULL)
      seeds = sorted(s for (arm, x, s) in by if arm == a and x == extra and (b, extra, s) in by)
      iv = interval([by[(a, extra, s)] - by[(b, extra, s)] for s in seeds])
      out.append({"a": a, "b": b, "extra": extra, "claim": claim, **iv})
      out[-1]["verdict"] = verdict(iv, direction)
  return out


def curves() -> dict:
  """{arm: [(extra compute, eval loss) per seed]} of the long runs (no cooldown)."""
  out = {}
  for arm in cfg().ARMS:
    for _, d in runs_of("long", arm):
      if os.path.exists(os.path.join(d, "metrics.jsonl")):
        s, l = plots.eval_curve(d)
        out.setdefault(arm, []).append((extra_compute(arm, s).tolist(), l.tolist()))
  return out


def wall_minutes() -> dict:
  """Wall time of each grid's runs (wall_time.json), in minutes, summed."""
  out = {}
  for kind in ("long", "cooldown"):
    for arm in cfg().ARMS:
      total = 0.0
      for _, d in runs_of(kind, arm):
        path = os.path.join(d, "wall_time.json")
        if os.path.exists(path):
          with open(path) as f:
            total += float(json.load(f)["seconds"])
      out[f"{kind}/{arm}"] = round(total / 60, 1)
  return out


# ------------------------------------------------------------------ writing


def fmt(x, spec=".4f"):
  return "-" if x is None else format(x, spec)


def table(head, body) -> list[str]:
  return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
    "| " + " | ".join(str(x) for x in r) + " |" for r in body
  ]


def plot(rows, crv, out: str):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  colors = {"dense": "C0", "top1": "C1", "top2": "C2", "scratch": "C3"}
  for arm, seeds in crv.items():
    for i, (x, y) in enumerate(seeds):
      keep = [j for j, v in enumerate(x) if v >= -0.3]
      ax.plot(
        [x[j] for j in keep],
        [y[j] for j in keep],
        color=colors[arm],
        alpha=0.35,
        lw=1,
        ls="--",
        label=f"{NAMES[arm]}, no cooldown" if i == 0 else None,
      )
  for arm in cfg().ARMS:
    pts = {}
    for r in rows:
      if r["arm"] == arm and r["loss"] is not None:
        pts.setdefault(r["extra_as_run"], []).append(r["loss"])
    if not pts:
      continue
    xs = sorted(pts)
    mean = [float(np.mean(pts[x])) for x in xs]
    lo = [m - min(pts[x]) for m, x in zip(mean, xs)]
    hi = [max(pts[x]) - m for m, x in zip(mean, xs)]
    ax.errorbar(
      xs, mean, yerr=[lo, hi], color=colors[arm], marker="o", capsize=3, label=f"{NAMES[arm]}"
    )
  ax.axvline(0.0, color="gray", ls=":", lw=1)
  ax.set_xlabel("extra training compute over the dense parent's (FLOPs, fraction)")
  ax.set_ylabel("validation loss")
  all_y = [r["loss"] for r in rows if r["loss"] is not None]
  if all_y:
    ax.set_ylim(min(all_y) - 0.05, max(all_y) + 0.25)
  plots._finish(  # pylint: disable=protected-access
    fig,
    ax,
    out,
    "Upcycling: cooled-down branches (mean, bars: range over seeds)",
  )


def report(out_dir: str) -> list[str]:
  c = cfg()
  rows = branch_rows()
  if not rows:
    raise ConfigError(f"no finished cooldown branch under {c.ROOT}; use --run --part upcycling")
  s0, knee, cl, crv = step0_rows(), knee_rows(), claim_rows(rows), curves()
  flops = {arm: c.flops_per_token(arm) for arm in c.ARMS}
  lines = [
    "# Upcycling (redesigned): results",
    "",
    "Made by `python experiments/instruction_tuning/report.py --part upcycling`; "
    "README.md quotes these tables.",
    "",
    "## Compute",
    "",
  ]
  lines += table(
    ["arm", "train FLOPs / token", "ratio to dense", "long run steps", "branch ends (steps)"],
    [
      [
        NAMES[a],
        f"{flops[a] / 1e6:.4f}M",
        f"{flops[a] / flops['dense']:.4f}",
        c.plan(a)["end"],
        ", ".join(f"+{x:.0%}: {e}" for x, e in c.plan(a)["branches"].items()),
      ]
      for a in c.ARMS
    ],
  )
  lines += ["", "## Parent (dense, no cooldown): how flat at the upcycling step", ""]
  lines += table(
    [
      "seed",
      f"eval loss at {c.PARENT_STEPS}",
      f"drop {c.PARENT_STEPS - 100}->{c.PARENT_STEPS}",
      f"drop {c.PARENT_STEPS - 300}->{c.PARENT_STEPS} per 100 steps",
      "drop 100->200",
      f"drop 100->{c.PARENT_STEPS}",
    ],
    [
      [
        r["seed"],
        fmt(r["loss"]),
        fmt(r["drop_last_100"]),
        fmt(r["drop_last_300_per_100"]),
        fmt(r["drop_100_to_200"]),
        fmt(r["drop_100_to_end"]),
      ]
      for r in knee
    ],
  )
  lines += ["", "## Step 0: upcycled eval loss minus the parent's (same batches)", ""]
  lines += table(
    ["recipe", "seed", "upcycled at step 0", "parent", "gap"],
    [
      [NAMES[r["arm"]], r["seed"], fmt(r["loss"]), fmt(r["parent"]), fmt(r["gap"], ".2e")]
      for r in s0
    ],
  )
  lines += ["", "## Cooled-down branches (validation loss at the branch end)", ""]
  lines += table(
    ["arm", "extra (asked)", "extra (as run)", "seed", "end step", "loss", "no cooldown"],
    [
      [
        NAMES[r["arm"]],
        f"{r['extra']:.2f}",
        f"{r['extra_as_run']:.4f}",
        r["seed"],
        r["end_step"],
        fmt(r["loss"]),
        fmt(r["loss_no_cooldown"]),
      ]
      for r in sorted(rows, key=lambda r: (c.ARMS.index(r["arm"]), r["extra"], r["seed"]))
    ],
  )
  lines += [
    "",
    "## Differences, paired by seed (a - b; negative: a lower)",
    "",
    "Interval: 95 % t-interval over seeds; range: min..max over seeds.",
    "",
  ]
  lines += table(
    ["extra", "a - b", "n", "mean", "95 % t-interval", "range", "verdict"],
    [
      [
        f"+{r['extra']:.0%}",
        f"{r['a']} - {r['b']}",
        r["n"],
        fmt(r["mean"]),
        f"[{fmt(r['lo'])}, {fmt(r['hi'])}]",
        f"{fmt(r['min'])}..{fmt(r['max'])}",
        r["verdict"],
      ]
      for r in cl
    ],
  )
  lines += ["", "## Against the paper", ""]
  c_ = cfg()
  lines += table(
    ["claim", "paper's setting", "ours", "mean (a - b)", "95 % t-interval", "verdict"],
    [
      [
        r["claim"],
        PAPER[(r["a"], r["b"])],
        f"+{r['extra']:.0%} extra compute, parent {c_.PARENT_STEPS} steps, {r['n']} seeds",
        fmt(r["mean"]),
        f"[{fmt(r['lo'])}, {fmt(r['hi'])}]",
        r["verdict"],
      ]
      for r in cl
    ],
  )
  wall = wall_minutes()
  lines += ["", "## Wall time (minutes, summed over each grid's runs)", ""]
  lines += table(["grid", "minutes"], [[k, v] for k, v in wall.items()])
  plot(rows, crv, os.path.join(out_dir, "upcycling_compute.png"))
  with open(os.path.join(out_dir, "upcycling_results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  keys = [k for k in rows[0] if k != "dir"]
  with open(os.path.join(out_dir, "upcycling_results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  payload = {
    "design": {
      "parent_steps": c.PARENT_STEPS,
      "extra": list(c.EXTRA),
      "cooldown": c.COOLDOWN,
      "seeds": list(c.SEEDS),
      "plan": {a: {**c.plan(a), "branches": list(c.plan(a)["branches"].items())} for a in c.ARMS},
      "train_flops_per_token": flops,
    },
    "parent": knee,
    "step0": s0,
    "branches": [{k: v for k, v in r.items() if k != "dir"} for r in rows],
    "claims": cl,
    "curves_no_cooldown": crv,
    "wall_minutes": wall,
  }
  with open(os.path.join(out_dir, "upcycling_results.json"), "w") as f:
    json.dump(payload, f, indent=1, default=float)
  return lines
