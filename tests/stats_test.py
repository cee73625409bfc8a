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


def test_flan_report_difference_in_differences():
  """experiments/instruction_tuning/flan.py's statistic on made-up scores:
  (MoE - dense) after instruction tuning minus without, per metric, with the
  flagged functions in and out, recovers the effect put in."""
  import os
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments.instruction_tuning import flan

  rng = np.random.default_rng(0)
  N, mods = 120, [f"m{i % 12}.py" for i in range(120)]
  flagged = np.arange(N) % 5 == 0
  body = [
    {"module": m, "function": f"f{i}", "flagged": bool(g)}
    for i, (m, g) in enumerate(zip(mods, flagged))
  ]
  items = [{**b, "task": t} for t in ("name", "body") for b in body]
  sets = {"test": {"body": body, "items": items}}
  tokens = rng.integers(5, 50, N)
  scores = {}
  for arm in flan.ARMS:
    for e in (1, 8):
      for s in (0, 1, 2):
        loss = 2.0 + rng.normal(0, 0.01, N)
        if e == 8 and arm == "body_after_it":
          loss = loss - 0.1 * ~flagged  # the MoE gains 0.1 more from tuning, unflagged only
        correct = rng.random(2 * N) < (0.9 if e == 8 and arm == "it" else 0.5)
        scores[(arm, e, s)] = {
          "test": {
            "body_logprob": list(-loss * tokens),
            "body_tokens": list(tokens),
            "choice_correct": list(correct.astype(int)),
            "choice_truncated": [0] * (2 * N),
          }
        }
  res = flan.analyse(scores, sets, n_boot=2000)
  ft = res["body_loss/unflagged"]["did"]["finetuned"]
  assert ft["mean"] == pytest.approx(-0.1, abs=0.003) and ft["verdict"] == "holds"
  assert res["body_loss/unflagged"]["n"] == (~flagged).sum()
  w = tokens * ~flagged
  assert res["body_loss/all"]["did"]["finetuned"]["mean"] == pytest.approx(
    -0.1 * w.sum() / tokens.sum(), abs=0.003
  )
  zs = res["body_loss/all"]["did"]["zero_shot"]
  assert abs(zs["mean"]) < 0.005 and zs["verdict"] == "inconclusive"
  # Accuracy: the instruction-tuned MoE (a) picks right 90% against 50%.
  assert res["mc_name/all"]["did"]["zero_shot"]["mean"] == pytest.approx(0.4, abs=0.06)
  assert res["mc_body/all"]["did"]["zero_shot"]["verdict"] == "holds"
  assert res["mc_name/all"]["moe_minus_dense"]["it"]["lo"] > 0.2


def test_instruction_tuning_claims_table_reads_the_committed_parts(tmp_path):
  """report.py --part claims: one row per claim from the parts' result files;
  the freezing rows' 95 % t-intervals recomputed here from results.csv; a
  part whose results are missing is a 'not yet run' row."""
  import argparse
  import csv
  import json
  import os
  import shutil
  import sys

  from scipy import stats as sps

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  from experiments.instruction_tuning import report

  here = os.path.join(root, "experiments", "instruction_tuning")
  for name in ("upcycling_results.json", "flan_results.json", "results.csv"):
    shutil.copy(os.path.join(here, name), tmp_path / name)
  report.claims_part(argparse.Namespace(out=str(tmp_path)))
  rows = json.load(open(tmp_path / "claims.json"))
  flan = json.load(open(tmp_path / "flan_results.json"))["results"]["body_loss/all"]["did"]
  ft = [r for r in rows if r["claim"].startswith("FLAN") and "(b - c)" in r["ours"]]
  assert (
    ft[0]["mean"] == flan["finetuned"]["mean"] and ft[0]["verdict"] == flan["finetuned"]["verdict"]
  )
  with open(tmp_path / "results.csv") as f:
    runs = [r for r in csv.DictReader(f) if r["experts"] == "8" and r["mix"] == "all"]
  # all weights tuned at the grid's rate (the :rate grid's rows have a learning_rate)
  ref = {r["seed"]: float(r["loss_body"]) for r in runs if not r["frozen"] + r["learning_rate"]}
  for frozen, verdict in ((":experts", "does not hold"), (":non_experts", "holds")):
    by_seed = {r["seed"]: float(r["loss_body"]) for r in runs if r["frozen"] == frozen}
    d = np.array([by_seed[s] - base for s, base in sorted(ref.items()) if s in by_seed])
    half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    row = next(r for r in rows if f"{frozen[1:]} frozen" in r["ours"])
    assert row["mean"] == pytest.approx(d.mean()) and row["lo"] == pytest.approx(d.mean() - half)
    assert row["verdict"] == verdict
  assert (
    "| claim | paper's setting | ours | mean | 95 % interval |"
    in open(tmp_path / "claims.md").read()
  )
  os.remove(tmp_path / "flan_results.json")
  report.claims_part(argparse.Namespace(out=str(tmp_path)))
  rows = json.load(open(tmp_path / "claims.json"))
  assert [r["ours"] for r in rows if r["claim"].startswith("FLAN")] == ["not yet run (--part flan)"]
