"""The clustered bootstrap (sparse_lm/stats.py) against cases with a known answer."""

import numpy as np
import pytest

from sparse_lm import stats


def test_clustered_bootstrap_against_known_answers():
  rng = np.random.default_rng(1)
  # Clusters of identical values: resampling the clusters of the examples is
  # resampling the cluster means (same draws, same seed: the same numbers),
  # and the interval's half-width is about 1.96 sd(means) / sqrt(G).
  G, m = 40, 12
  means = rng.normal(0.0, 1.0, G)
  labels = [f"mod{g:02d}.py" for g in range(G)]
  values = np.repeat(means, m)
  clusters = np.repeat(labels, m)
  d = stats.bootstrap(values, clusters, n_boot=20_000, seed=3)
  ref = stats.bootstrap(means, labels, n_boot=20_000, seed=3)
  assert (d.mean, d.lo, d.hi) == pytest.approx((ref.mean, ref.lo, ref.hi), abs=1e-12)
  assert (d.n, d.clusters, d.rows) == (G * m, G, 1)
  half = 1.959964 * means.std() / np.sqrt(G)
  assert (d.hi - d.lo) / 2 == pytest.approx(half, rel=0.1)
  assert d.lo < means.mean() < d.hi
  # The naive bootstrap (every example its own cluster) is ~sqrt(m) too narrow.
  naive = stats.bootstrap(values, np.arange(G * m), n_boot=20_000, seed=3)
  assert (naive.hi - naive.lo) / 2 < 0.45 * half
  # Independent examples: close to the normal interval mean +- 1.96 sd / sqrt(N).
  x = rng.normal(0.3, 2.0, 1500)
  d = stats.bootstrap(x, np.arange(len(x)), n_boot=10_000, seed=0)
  se = x.std() / np.sqrt(len(x))
  assert d.mean == pytest.approx(x.mean())
  assert d.lo == pytest.approx(x.mean() - 1.959964 * se, abs=0.08 * se)
  assert d.hi == pytest.approx(x.mean() + 1.959964 * se, abs=0.08 * se)
  # Paired and weighted: the token-weighted mean difference sum(w (a - b)) / sum(w).
  a, b, w = rng.normal(size=50), rng.normal(size=50), rng.integers(1, 30, 50)
  p = stats.paired(a, b, np.arange(50) % 7, weights=w, n_boot=200)
  assert p.mean == pytest.approx(np.sum(w * (a - b)) / w.sum())
  # Rows (seeds) that differ by a common offset: resampling the rows too widens
  # the interval to the seeds' spread; the mean is the grand mean.
  rows = rng.normal(0.0, 0.01, (3, 200)) + np.array([[-0.5], [0.0], [0.5]])
  lab = np.arange(200) % 20
  one = stats.bootstrap(rows, lab, n_boot=4000)
  two = stats.bootstrap(rows, lab, n_boot=4000, resample_rows=True)
  assert one.mean == two.mean == pytest.approx(rows.mean())
  assert one.hi - one.lo < 0.01 and two.hi - two.lo > 0.5
  assert stats.bootstrap(values, clusters, seed=5) == stats.bootstrap(values, clusters, seed=5)
  with pytest.raises(ValueError, match="cluster labels"):
    stats.bootstrap(values, clusters[:-1])


def test_verdict_only_when_the_interval_excludes_zero():
  iv = lambda lo, hi: stats.Interval((lo + hi) / 2, lo, hi, 0.95, 10, 5, 1)
  assert stats.verdict(iv(-0.3, -0.1), "negative") == "holds"
  assert stats.verdict(iv(-0.3, -0.1), "positive") == "does not hold"
  assert stats.verdict(iv(0.1, 0.3), "negative") == "does not hold"
  assert stats.verdict(iv(0.1, 0.3), "positive") == "holds"
  assert stats.verdict(iv(-0.1, 0.3), "negative") == "inconclusive"
  assert stats.verdict(iv(-0.3, 0.0), "negative") == "inconclusive"  # touches zero
  assert iv(-0.3, -0.1).text() == "-0.2000 [-0.3000, -0.1000]"
  with pytest.raises(ValueError, match="claim"):
    stats.verdict(iv(0.1, 0.3), "lower")
