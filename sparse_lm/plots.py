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
  rows = [r for r in metricslib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "eval_loss" in r]
  return np.array([r["step"] for r in rows]), np.array([r["eval_loss"] for r in rows])


def loss_curves(runs: dict[str, str], out: str, title: str = "", x: str = "step",
                relative_to: str | None = None) -> str:
  """Eval loss against step (or "wall", wall seconds) for several runs;
  with `relative_to` (a run folder), minus that run's loss at the same step."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  base = dict(zip(*eval_curve(relative_to))) if relative_to else None
  for name, wd in runs.items():
    steps, losses = eval_curve(wd)
    if base is not None:
      keep = np.array([s in base for s in steps])
      steps, losses = steps[keep], losses[keep] - np.array([base[s] for s in steps[keep]])
    if x == "wall":
      rows = metricslib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
      tps = {r["step"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
      tok_per_step = next((r["tokens"] / r["step"] for r in rows if r.get("tokens")), 1.0)
      secs = np.cumsum([tok_per_step / tps.get(s, np.nan) for s in range(1, int(steps.max()) + 1)
                        if s in tps])
      logged = sorted(tps)
      steps = np.interp(steps, logged, secs)
    ax.plot(steps, losses, marker=".", label=name)
  ax.set_xlabel("training step" if x == "step" else "wall time (s)")
  ax.set_ylabel("validation loss" + (" minus the reference's" if base is not None else ""))
  if base is not None:
    ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
  return _finish(fig, ax, out, title)


def _finish(fig, ax, out: str, title: str) -> str:
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def loss_vs_experts(experts: list[int], losses: list[float], out: str, dense_loss=None,
                    title: str = "") -> str:
  """Eval loss at a fixed step against the number of experts (log2 x axis)."""
  fig, ax = plt.subplots(figsize=(5.6, 4.0))
  ax.plot(experts, losses, marker="o", label="Switch (top-1)")
  if dense_loss is not None:
    ax.axhline(dense_loss, color="gray", linestyle="--", label="dense")
  ax.set_xscale("log", base=2)
  ax.set_xticks(experts, [str(e) for e in experts])
  ax.set_xlabel("number of experts")
  ax.set_ylabel("validation loss")
  return _finish(fig, ax, out, title)


def expert_load(workdir: str, out: str) -> str:
  """Per MoE layer: fraction of tokens per expert over training (a heatmap)."""
  rows = metricslib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  keys = sorted({k for r in rows for k in r if k.endswith("/expert_fraction")
                 and k.startswith("moe/layer")}, key=lambda k: int(k.split("/")[1][5:]))
  if not keys:
    raise ValueError(f"{workdir}/metrics.jsonl has no MoE expert_fraction rows (a dense run?)")
  fig, axes = plt.subplots(len(keys), 1, figsize=(6.4, 1.0 + 2.0 * len(keys)), squeeze=False)
  for ax, k in zip(axes[:, 0], keys):
    steps = [r["step"] for r in rows if k in r]
    load_SxE = np.array([r[k] for r in rows if k in r])
    E = load_SxE.shape[1]
    im = ax.imshow((load_SxE * E).T, aspect="auto", cmap="viridis", origin="lower",
                   extent=(steps[0], steps[-1], -0.5, E - 0.5), vmin=0, vmax=2)
    ax.set_ylabel(f"{k.split('/')[1]}\nexpert")
    fig.colorbar(im, ax=ax, label="load / uniform")
  axes[-1, 0].set_xlabel("training step")
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
