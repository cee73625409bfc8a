"""Scaling curves and expert-load pictures from run folders (matplotlib, PNG).

Everything reads what the trainer wrote (metrics.jsonl), so a plot can be
redrawn from any finished or running sweep without touching a checkpoint.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from sparse_lm import metrics as metricslib  # pylint: disable=g-import-not-at-top,wrong-import-position


def eval_curve(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, eval losses) of one run."""
  rows = [
    r for r in metricslib.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval_loss" in r
  ]
  return np.array([r["step"] for r in rows]), np.array([r["eval_loss"] for r in rows])


def _dirs(runs: str | list[str]) -> list[str]:
  return [runs] if isinstance(runs, str) else list(runs)


def mean_curve(runs: str | list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps, mean, sample std) of the eval curves of one run or several seeds,
  over the eval steps they all have (std 0 for one run)."""
  curves = [dict(zip(*eval_curve(d))) for d in _dirs(runs)]
  steps = np.array(sorted(set.intersection(*(set(c) for c in curves))))
  losses_NxS = np.array([[c[s] for s in steps] for c in curves])
  std = losses_NxS.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
  return steps, losses_NxS.mean(0), std


def train_seconds(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """(logged steps, training seconds to reach each) from the logged tokens/s
  (evaluation and checkpoint time inside a log interval count; compilation is
  in the first interval, which is replaced by the run's median speed)."""
  rows = [
    r for r in metricslib.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "tokens_per_s" in r
  ]
  steps = np.array([r["step"] for r in rows])
  tps = np.array([r["tokens_per_s"] for r in rows], float)
  if len(tps) > 1:
    tps[0] = np.median(tps[1:])
  tok_per_step = rows[0]["tokens"] / rows[0]["step"]
  return steps, np.cumsum(np.diff(np.concatenate([[0], steps])) * tok_per_step / tps)


def loss_curves(
  runs: dict[str, str | list[str]],
  out: str,
  title: str = "",
  x: str = "step",
  relative_to: str | list[str] | None = None,
) -> str:
  """Eval loss against step (or "wall", training seconds) for several runs.

  A value of `runs` is one run folder or a list of seeds of one point: their
  mean is drawn, with a band of +- one standard deviation. With `relative_to`
  (a run folder or seeds), minus its mean loss at the same step."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  base = None
  if relative_to:
    b_steps, b_mean, _ = mean_curve(relative_to)
    base = dict(zip(b_steps, b_mean))
  for name, dirs in runs.items():
    steps, losses, std = mean_curve(dirs)
    if base is not None:
      keep = np.array([s in base for s in steps])
      steps, losses, std = (
        steps[keep],
        losses[keep] - np.array([base[s] for s in steps[keep]]),
        std[keep],
      )
    xs = steps
    if x == "wall":
      xs = np.mean([np.interp(steps, *train_seconds(d)) for d in _dirs(dirs)], axis=0)
    n = len(_dirs(dirs))
    (line,) = ax.plot(xs, losses, marker=".", label=name + (f" ({n} seeds)" if n > 1 else ""))
    if n > 1:
      ax.fill_between(xs, losses - std, losses + std, color=line.get_color(), alpha=0.2)
  ax.set_xlabel("training step" if x == "step" else "training time (s)")
  ax.set_ylabel("validation loss" + (" minus the reference's" if base is not None else ""))
  if base is not None:
    ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
  return _finish(fig, ax, out, title)


def gap_curves(pairs: dict[str, tuple], out: str, title: str = "") -> str:
  """Eval loss of one run minus another's at their common steps, per pair:
  {label: (runs, reference runs)}, each a run folder or a list of seeds."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, (runs, ref) in pairs.items():
    steps, losses, _ = mean_curve(runs)
    base = dict(zip(*mean_curve(ref)[:2]))
    keep = [i for i, s in enumerate(steps) if s in base]
    ax.plot(steps[keep], losses[keep] - [base[steps[i]] for i in keep], marker=".", label=name)
  ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
  ax.set_xlabel("training step")
  ax.set_ylabel("validation loss minus the reference's")
  return _finish(fig, ax, out, title)


def _finish(fig, ax, out: str, title: str) -> str:
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def loss_vs_experts(
  experts: list[int],
  losses: list[float],
  out: str,
  dense_loss=None,
  title: str = "",
  stds: list[float] | None = None,
  fits: dict | None = None,
) -> str:
  """Eval loss at a fixed step against the number of experts (log2 x axis).

  stds: error bars (+- one standard deviation over seeds; 0 = one seed).
  fits: {label: callable E -> loss}, drawn as lines over the experts' range."""
  fig, ax = plt.subplots(figsize=(5.6, 4.0))
  ax.errorbar(
    experts,
    losses,
    yerr=stds,
    marker="o",
    capsize=3,
    linestyle="none" if fits else "-",
    label="Switch (top-1)",
  )
  for label, fn in (fits or {}).items():
    grid = np.geomspace(min(experts), max(experts), 100)
    ax.plot(grid, [fn(e) for e in grid], linewidth=1, label=label)
  if dense_loss is not None:
    ax.axhline(dense_loss, color="gray", linestyle="--", label="dense")
  ax.set_xscale("log", base=2)
  ax.set_xticks(experts, [str(e) for e in experts])
  ax.set_xlabel("number of experts")
  ax.set_ylabel("validation loss")
  return _finish(fig, ax, out, title)


def speedup_vs_experts(
  experts: list[int],
  step_speedup: list[float],
  time_speedup: list[float],
  out: str,
  title: str = "",
) -> str:
  """Fedus et al. figure 4 (right) / figure 1 form: how many times fewer steps
  (and training seconds) each E needs to reach the dense model's final loss."""
  fig, ax = plt.subplots(figsize=(5.6, 4.0))
  ax.plot(experts, step_speedup, marker="o", label="steps")
  ax.plot(experts, time_speedup, marker="s", label="training time (this CPU)")
  ax.axhline(1.0, color="gray", linestyle="--", label="dense")
  ax.set_xscale("log", base=2)
  ax.set_xticks(experts, [str(e) for e in experts])
  ax.set_xlabel("number of experts")
  ax.set_ylabel("speed-up to the dense model's final loss")
  return _finish(fig, ax, out, title or "sample efficiency against dense")


def expert_load(workdir: str, out: str) -> str:
  """Per MoE layer: fraction of tokens per expert over training (a heatmap)."""
  rows = metricslib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  keys = sorted(
    {k for r in rows for k in r if k.endswith("/expert_fraction") and k.startswith("moe/layer")},
    key=lambda k: int(k.split("/")[1][5:]),
  )
  if not keys:
    raise ValueError(f"{workdir}/metrics.jsonl has no MoE expert_fraction rows (a dense run?)")
  fig, axes = plt.subplots(len(keys), 1, figsize=(6.4, 1.0 + 2.0 * len(keys)), squeeze=False)
  for ax, k in zip(axes[:, 0], keys):
    steps = [r["step"] for r in rows if k in r]
    load_SxE = np.array([r[k] for r in rows if k in r])
    E = load_SxE.shape[1]
    im = ax.imshow(
      (load_SxE * E).T,
      aspect="auto",
      cmap="viridis",
      origin="lower",
      extent=(steps[0], steps[-1], -0.5, E - 0.5),
      vmin=0,
      vmax=2,
    )
    ax.set_ylabel(f"{k.split('/')[1]}\nexpert")
    fig.colorbar(im, ax=ax, label="load / uniform")
  axes[-1, 0].set_xlabel("training step")
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def drift_curves(runs: dict[str, str], out: str, key: str = "kl", title: str = "") -> str:
  """Routing drift from the base model against the fine-tuning step
  (drift/mean/<key>, and its _prompt / _response variants where logged), one
  colour per run of `runs` ({label: workdir}). key: "kl" or "top1_changed"."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for (label, wd), color in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
    rows = [r for r in metricslib.read_jsonl(os.path.join(wd, "metrics.jsonl"))]
    for suffix, style in (("", "-"), ("_prompt", ":"), ("_response", "--")):
      pts = [
        (r["step"], r[f"drift/mean/{key}{suffix}"])
        for r in rows
        if f"drift/mean/{key}{suffix}" in r
      ]
      if pts:
        ax.plot(*zip(*pts), style, color=color, label=f"{label} {suffix[1:] or 'all'}")
  ax.set_xlabel("fine-tuning step")
  ax.set_ylabel({"kl": "KL(base || now) of the router, nats", "top1_changed": "top-1 changed"}[key])
  ax.legend(fontsize=7)
  return _finish(fig, ax, out, title or "Routing drift from the base model")
