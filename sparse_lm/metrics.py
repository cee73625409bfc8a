"""Metrics: workdir/metrics.jsonl, TensorBoard event files, a console progress line.

Only process 0 writes. MoE diagnostics arrive as per-layer dicts and are
flattened to `moe/layer{i}/{name}` keys; vectors (expert_fraction) become
TensorBoard histograms and JSON lists.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np


def _scalar(v):
  a = np.asarray(v)
  return a.item() if a.ndim == 0 else a.tolist()


def flatten_moe(moe_aux: list[dict], layer_ids: list[int]) -> dict:
  """[{name: value}] per MoE layer -> {"moe/layer{i}/{name}": value} + layer means."""
  out = {}
  for i, aux in zip(layer_ids, moe_aux):
    for k, v in aux.items():
      if not isinstance(v, dict):  # (state_updates: written to the model, not logged)
        out[f"moe/layer{i}/{k}"] = v
  if moe_aux:
    for k, v in moe_aux[0].items():
      if not isinstance(v, dict) and np.ndim(v) == 0:
        out[f"moe/mean/{k}"] = np.mean([np.asarray(a[k]) for a in moe_aux])
  return out


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Writer:
  """Writes one JSON line per logged step and the same values to TensorBoard."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # A resumed run rewrites history after its checkpoint: rows logged after the
    # restored step (by the run that was killed) would be duplicates. A fresh
    # start (resume_step -1) drops rows of a run that died before its first save.
    rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(self.path + ".tmp", self.path)
    self._file = open(self.path, "a")
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    self._tf = tf
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in values.items()}
    self._file.write(json.dumps({"step": step, **values}) + "\n")
    self._file.flush()
    with self._tb.as_default(step=step):
      for k, v in values.items():
        if isinstance(v, list):
          self._tf.summary.histogram(k, np.asarray(v, np.float32))
          if k.endswith("expert_fraction"):  # load per expert id, as a bar shape
            self._tf.summary.histogram(
              k + "_by_expert",
              np.repeat(np.arange(len(v)), np.round(np.asarray(v) * 1000).astype(int)),
            )
        elif isinstance(v, (int, float)):
          self._tf.summary.scalar(k, v)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()


class Progress:
  """One console line per log step: step, loss, tokens/s, ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.start = total_steps, start_step
    self.t0 = time.time()
    self.enabled = jax.process_index() == 0

  def line(self, step: int, values: dict) -> str:
    done = step - self.start
    elapsed = time.time() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    parts = [f"step {step:>6}/{self.total}"]
    for k in ("train_loss", "eval_loss", "eval_ppl", "router_loss", "tokens_per_s", "lr"):
      if k in values:
        v = values[k]
        parts.append(f"{k} {v:.4g}" if k != "tokens_per_s" else f"tok/s {v:,.0f}")
    if "moe/mean/dropped_fraction" in values:
      parts.append(f"dropped {values['moe/mean/dropped_fraction']:.3f}")
    parts.append(f"ETA {_hms(eta)}")
    return "  ".join(parts)

  def print(self, step: int, values: dict):
    if self.enabled:
      print(self.line(step, values), flush=True, file=sys.stdout)


def _hms(s: float) -> str:
  s = int(s)
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
