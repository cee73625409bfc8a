"""Intervals for differences measured on the same held-out examples.

The held-out examples of a study come in clusters (the functions of one
module share names, style and length), so examples are not independent
draws: resampling examples one by one understates the variance whenever
the examples of a cluster move together. The clustered (block) bootstrap
resamples whole clusters with replacement (Davison & Hinkley 1997, section
3.8; Cameron, Gelbach & Miller 2008, "Bootstrap-based improvements for
inference with clustered errors", the pairs cluster bootstrap), and its
percentile interval is the 95% interval reported for every difference.

  d = bootstrap(values, clusters)             # mean of per-example values
  d = paired(a, b, clusters, weights=tokens)  # a - b on the same examples
  verdict(d, claim="negative")                # "holds" / "does not hold" / "inconclusive"

values may be [N] (one number per example) or [S, N] (S replicate runs, e.g.
base seeds, each on the same N examples): the statistic is the weighted mean
over every row and example; `resample_rows=True` also resamples the rows with
replacement (a two-way bootstrap: clusters x seeds), so that the interval
carries the seed-to-seed variance as well.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

VERDICTS = ("holds", "does not hold", "inconclusive")


@dataclasses.dataclass(frozen=True)
class Interval:
  """A statistic and its bootstrap interval."""

  mean: float
  lo: float
  hi: float
  level: float
  n: int  # examples
  clusters: int
  rows: int  # replicate runs (seeds) averaged

  def excludes_zero(self) -> bool:
    return self.lo > 0 or self.hi < 0

  def text(self, spec: str = "+.4f") -> str:
    """ "-0.0123 [-0.0200, -0.0051]"."""
    return f"{self.mean:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]"

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def bootstrap(
  values,
  clusters: Sequence,
  weights=None,
  *,
  n_boot: int = 10_000,
  seed: int = 0,
  level: float = 0.95,
  resample_rows: bool = False,
) -> Interval:
  """The weighted mean of `values` ([N] or [S, N]; weights alike or [N]) and
  its percentile interval from resampling the clusters (one label per
  example) with replacement, `n_boot` times, seeded. A cluster drawn twice
  counts twice; the statistic of a replicate is sum(w v) / sum(w) over the
  drawn clusters' examples (and rows, when `resample_rows`)."""
  v_SxN = np.atleast_2d(np.asarray(values, np.float64))
  S, N = v_SxN.shape
  w_SxN = (
    np.ones_like(v_SxN)
    if weights is None
    else np.broadcast_to(np.asarray(weights, np.float64), (S, N))
  )
  if len(clusters) != N:
    raise ValueError(f"{len(clusters)} cluster labels for {N} examples")
  if N == 0:
    raise ValueError("no examples")
  if not np.all(np.isfinite(v_SxN)):
    raise ValueError("values must be finite")
  _, cid_N = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
  G = int(cid_N.max()) + 1
  # Per row and cluster: sum of w v and of w ([S, G]).
  wv_SxG = np.zeros((S, G))
  w_SxG = np.zeros((S, G))
  for s in range(S):
    wv_SxG[s] = np.bincount(cid_N, weights=w_SxN[s] * v_SxN[s], minlength=G)
    w_SxG[s] = np.bincount(cid_N, weights=w_SxN[s], minlength=G)
  rng = np.random.default_rng(seed)
  # G clusters drawn with replacement per replicate (and S rows, when resampled).
  g_BxG = rng.integers(0, G, size=(n_boot, G))
  if resample_rows and S > 1:
    s_BxS = rng.integers(0, S, size=(n_boot, S))
    num = np.zeros(n_boot)
    den = np.zeros(n_boot)
    for j in range(S):
      num += wv_SxG[s_BxS[:, j, None], g_BxG].sum(1)
      den += w_SxG[s_BxS[:, j, None], g_BxG].sum(1)
  else:
    num, den = wv_SxG.sum(0)[g_BxG].sum(1), w_SxG.sum(0)[g_BxG].sum(1)
  stat_B = num / np.maximum(den, 1e-300)
  a = (1.0 - level) / 2
  lo, hi = np.quantile(stat_B, [a, 1.0 - a])
  mean = float(wv_SxG.sum() / w_SxG.sum())
  return Interval(mean, float(lo), float(hi), level, N, G, S)


def paired(a, b, clusters: Sequence, weights=None, **kw) -> Interval:
  """bootstrap of a - b: two measurements of the same examples (and rows)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired values differ in shape: {a.shape} and {b.shape}")
  return bootstrap(a - b, clusters, weights, **kw)


def verdict(interval: Interval, claim: str) -> str:
  """Whether a claim about the sign of a difference holds: "holds" when the
  interval excludes zero on the claimed side, "does not hold" when it
  excludes zero on the other side, else "inconclusive". claim: "negative"
  (e.g. a lower loss) or "positive"."""
  if claim not in ("negative", "positive"):
    raise ValueError(f"claim {claim!r}: 'negative' or 'positive'")
  if not interval.excludes_zero():
    return "inconclusive"
  below = interval.hi < 0
  return "holds" if below == (claim == "negative") else "does not hold"
