"""experiments/multilingual_moe/report.py across sessions: a part's runs are archived and the
report reads them back once runs/ is gone (made-up run folders, no training)."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.multilingual_moe import report  # noqa: E402
from sparse_lm import sweep as sweeplib  # noqa: E402
from sparse_lm.errors import ConfigError  # noqa: E402

MESSAGES = ("Save", "Delete the file", "Add another", "Change password")
LANGS = ("cs", "uz")  # one high-resource, one low-resource language (the sweep file's groups)


def fake_run(d, good: float, seed: int, config: dict):
  """A translated run: each hypothesis is the reference with probability `good`, else a
  word of its own, plus the metrics.jsonl / wall_time.json the report reads."""
  rng = np.random.default_rng(seed)
  ts = []
  for m in MESSAGES:
    for g in LANGS:
      ref = f"{m} ({g})"
      for src, tgt, source, target in (("en", g, m, ref), (g, "en", ref, m)):
        hyp = target if rng.random() < good else "xyz"
        ts.append(dict(source=source, target=target, hypothesis=hyp, src_lang=src, tgt_lang=tgt))
  os.makedirs(d)
  with open(os.path.join(d, report.TRANSLATIONS), "w") as f:
    json.dump({"loss": 2.0, "translation": {"translations": ts, "pairs": {}}, "seconds": 5}, f)
  rows = [  # metrics.jsonl's layout: an eval step's row holds its training metrics too
    {"step": 5, "train_loss": 2.7, "tokens_per_s": 900.0, "eval_loss": 2.9},
    {"step": 8, "train_loss": 2.6, "tokens_per_s": 950.0},
    {"step": 10, "train_loss": 2.5, "tokens_per_s": 1100.0, "eval_loss": 3.0},
  ]
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(os.path.join(d, "wall_time.json"), "w") as f:
    json.dump({"seconds": 60.0}, f)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(config, f)


def test_parts_add_up_through_the_archive(tmp_path, monkeypatch):
  """seed0's runs translated in one session and archived, seed1's in the next (seed0's folders
  gone by then): the report reads both seeds, the same numbers as from the folders."""
  monkeypatch.chdir(ROOT)
  sweep, mod = report.SWEEP, report.sweep_module()
  for s in mod.SEEDS:  # a part's runs are the main grid's: the same folders and configs
    assert mod.get_config(f"seed{s}").to_json() == mod.get_config("main").to_json()
    assert [sweeplib.point_name(p) for p in sweeplib.points(f"{sweep}:seed{s}")] == [
      sweeplib.point_name(p) for p in sweeplib.points(sweep) if p["train.seed"] == s
    ]
  # :short is the main grid, the same points, at SHORT_STEPS steps and nothing else changed.
  assert sweeplib.points(f"{sweep}:short") == sweeplib.points(sweep)
  short, main = mod.get_config("short"), mod.get_config("main")
  assert short.train.num_steps == mod.SHORT_STEPS < main.train.num_steps
  short.train.num_steps = main.train.num_steps
  assert short.to_json() == main.to_json()
  config_of = lambda p: json.loads(sweeplib.apply_overrides(mod.get_config(), p).to_json())
  work, archive = tmp_path / "runs", tmp_path / "archive"
  good = {"dense": 0.5, "moe_eom": 0.8, "moe": 0.3}
  by_arm = report.runs_by_arm(sweep, str(work))
  for seed in (0, 1):
    part = report.runs_by_arm(f"{sweep}:seed{seed}", str(work))
    points = sweeplib.points(f"{sweep}:seed{seed}")
    for (arm, rs), p in zip(part.items(), points, strict=True):
      ((s, d),) = rs
      fake_run(d, good[arm], 10 * seed + len(arm), config_of(p))
      path = report.archive_run(d, str(archive))
      again = open(path, "rb").read()
      assert open(report.archive_run(d, str(archive)), "rb").read() == again  # reproducible
  from_folders = {
    a: [report.read_run(d, s, str(archive)) for s, d in rs if report.has_run(d, str(archive))]
    for a, rs in by_arm.items()
  }
  shutil.rmtree(work)  # runs/ does not outlive a session
  # --run's rule for a later session: an archived run whose folder is gone is not rerun.
  logs = []
  archived = lambda d: report.archived_earlier(d, str(archive))
  assert sweeplib.run_all(f"{sweep}:seed1", str(work), done=archived, log=logs.append) == []
  assert "3 points, 3 done, 0 to run" in logs[0], logs
  runs = {
    a: [report.read_run(d, s, str(archive)) for s, d in rs if report.has_run(d, str(archive))]
    for a, rs in by_arm.items()
  }
  assert {a: [r["seed"] for r in rs] for a, rs in runs.items()} == {a: [0, 1] for a in good}
  for a in good:
    for x, y in zip(from_folders[a], runs[a], strict=True):
      np.testing.assert_array_equal(x["chrf"], y["chrf"])
      keys = ("eval_loss", "train_seconds", "test_loss", "translate_seconds", "pairs", "config")
      keys += ("train_loss", "best_eval_loss", "best_eval_step", "tokens_per_s")
      assert [y[k] for k in keys] == [x[k] for k in keys]
      assert (y["eval_loss"], y["train_seconds"], y["test_loss"]) == (3.0, 60.0, 2.0)
      assert (y["train_loss"], y["best_eval_loss"], y["best_eval_step"]) == (2.5, 2.9, 5)
      assert y["tokens_per_s"] == 950.0  # the median of the logged steps
  report.check_same_recipe(runs)
  report.check_aligned(runs)
  # A part run after the sweep file changed (another NUM_STEPS) is not combined.
  runs["moe"][1]["config"]["train"]["num_steps"] += 1
  with pytest.raises(ConfigError, match=r"differs from .* in 1 key\(s\), train.num_steps="):
    report.check_same_recipe(runs)
  runs["moe"][1]["config"]["train"]["num_steps"] -= 1
  t = report.tables(runs, n_boot=200)
  diffs = {(r["difference"], r["group"]): r for r in t["differences"]}
  assert diffs[("moe_eom - dense", "low")]["seeds"] == 2
  assert len(t["runs"]) == 6
  with pytest.raises(FileNotFoundError):
    report.read_run(str(work / "missing"), 0, str(archive))
