r"""NLLB's dense-vs-MoE and EOM ablation (NLLB Team 2022) at CPU scale, in one command.

  python experiments/multilingual_moe/report.py --run      # train, translate, report
  python experiments/multilingual_moe/report.py --run --part seed0   # one seed's 3 runs
  python experiments/multilingual_moe/report.py --run --short    # the same at 800 steps
  python experiments/multilingual_moe/report.py --run --smoke --out=/tmp/mm_smoke

--run runs the grid of configs/sweeps/multilingual_moe.py (dense, MoE with
Expert Output Masking, MoE without it, 3 seeds each; two runs at a time:
sparse_lm.sweep.run_all, which skips finished runs and resumes interrupted
ones), then translates the test split with every finished run (python -m
sparse_lm.evaluate --split=test --examples=-1, two at a time; a run's
test_translations.json is kept, so a rerun only translates what is missing).
Without --run the report is made from whatever the folder holds. --part seedN
runs only seed N's three runs (one working session each: the grid does not fit
one, README.md "Calibration"); every translated run's results are gzipped into
archive/ (committed), and the report reads a run from there when its folder
(runs/, which does not outlive a session) is gone, so the parts add up across
sessions. --short runs the grid's :short variant (the same 9 runs at 800 steps:
the main runs' lowest validation loss came at step 600, or 800, plus the
cooldown) in runs/multilingual_moe_short, archived into archive_short/,
reported into short/. --smoke uses the grid's :smoke variant (1 seed, 12
steps) in runs/multilingual_moe_smoke.

Writes into --out (default: this folder) results.md, results.csv, results.json
and chrf.png: per arm the chrF of the test split's translations per language
group (high / low resource: the sweep file's HIGH and LOW), and the
differences MoE - dense and EOM on - EOM off per group with a 95% bootstrap
interval that resamples seeds and, within them, the English messages
(sparse_lm.stats.bootstrap, resample_rows: the pairs of one message, en->X
and X->en in every language, move together, so a message is one cluster).
The statistic is the mean sentence-level chrF (sacrebleu's sentence_chrf:
the bootstrap needs a number per sentence); corpus chrF, the metric
sparse_lm.evaluate prints, is tabled beside it. Each difference is paired:
seed s of one arm against seed s of the other (the same init seed and data
order), on the same sentences.

The claim checked (NLLB, section 6.2.2 and its ablation of EOM): MoE helps
low-resource pairs only with a regulariser such as EOM; MoE without it
overfits them. The verdict of a row is "holds" when its interval excludes 0
on the claimed side, "does not hold" on the other, "inconclusive" when it
contains 0 (sparse_lm.stats.verdict).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from sparse_lm import config as cfglib  # noqa: E402
from sparse_lm import metrics as metricslib  # noqa: E402
from sparse_lm import stats  # noqa: E402
from sparse_lm import sweep as sweeplib  # noqa: E402
from sparse_lm.data import translation  # noqa: E402
from sparse_lm.errors import ConfigError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = "configs/sweeps/multilingual_moe.py"
TRANSLATIONS = "test_translations.json"  # in each run's folder
ARCHIVE = os.path.join(HERE, "archive")  # each translated run's results, committed (archive_run)
ARM_LABELS = {"dense": "dense", "moe_eom": "MoE + EOM", "moe": "MoE, no EOM"}
GROUPS = ("high", "low")
# (a, b, group, claimed sign of a - b or None): NLLB's finding, row by row.
DIFFERENCES = (
  ("moe_eom", "dense", "low", "positive"),  # MoE helps low-resource pairs with EOM ...
  ("moe", "dense", "low", "negative"),  # ... and without it overfits them
  ("moe_eom", "moe", "low", "positive"),  # EOM is what makes the difference
  ("moe_eom", "dense", "high", "positive"),  # MoE helps high-resource pairs either way
  ("moe", "dense", "high", "positive"),
  ("moe_eom", "moe", "high", None),  # no claim: context
)


def sweep_module():
  return cfglib.load_module(os.path.join(ROOT, SWEEP))


# ------------------------------------------------------------------ running


def runs_by_arm(grid: str, workdir: str) -> dict[str, list[tuple[int, str]]]:
  """{arm: [(seed, run folder)]} in grid order, the arm named by the sweep file's ARMS."""
  arms = sweep_module().ARMS
  out: dict[str, list] = {a: [] for a in arms}
  for p in sweeplib.points(grid):
    arm = next(a for a, o in arms.items() if all(p.get(k) == v for k, v in o.items()))
    out[arm].append((p.get(sweeplib.SEED_KEY, 0), os.path.join(workdir, sweeplib.point_name(p))))
  return out


def translate_all(dirs: list[str], parallel: int = 2, log=print) -> list[str]:
  """Test-split translations of every finished run without them (two at a time):
  sparse_lm.evaluate's JSON into the run's TRANSLATIONS; returns the failures."""
  todo = [
    d
    for d in dirs
    if os.path.exists(os.path.join(d, "DONE")) and not os.path.exists(os.path.join(d, TRANSLATIONS))
  ]
  running, failed = {}, []
  while todo or running:
    while todo and len(running) < parallel:
      d = todo.pop(0)
      tmp = os.path.join(d, TRANSLATIONS + ".tmp")
      cmd = [sys.executable, "-m", "sparse_lm.evaluate", f"--workdir={d}", "--split=test"]
      cmd += ["--examples=-1", f"--output={tmp}"]
      logf = open(os.path.join(d, "translate_log.txt"), "w")
      log(f"translate {d}: start")
      running[d] = (
        subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT),
        logf,
        time.time(),
      )
    for d, (proc, logf, t0) in list(running.items()):
      if proc.poll() is None:
        continue
      logf.close()
      del running[d]
      if proc.returncode == 0:
        r = json.load(open(os.path.join(d, TRANSLATIONS + ".tmp")))
        r["seconds"] = time.time() - t0
        with open(os.path.join(d, TRANSLATIONS), "w") as f:
          json.dump(r, f, indent=1)
        os.remove(os.path.join(d, TRANSLATIONS + ".tmp"))
        log(
          f"translate {d}: done in {r['seconds']:.0f}s, chrF {r['translation']['all']['chrf']:.2f}"
        )
      else:
        failed.append(d)
        log(f"translate {d}: FAILED (exit {proc.returncode}); log: {d}/translate_log.txt")
    time.sleep(0.5)
  return failed


# ------------------------------------------------------------------ reading


def language_of(t: dict) -> str:
  return t["tgt_lang"] if t["src_lang"] == translation.ENGLISH else t["src_lang"]


def message_of(t: dict) -> str:
  """The English side: the msgid every pair of one message shares (the cluster)."""
  return t["source"] if t["src_lang"] == translation.ENGLISH else t["target"]


def sentence_chrf(translations: list[dict]) -> np.ndarray:
  import sacrebleu  # pylint: disable=g-import-not-at-top

  return np.array(
    [sacrebleu.sentence_chrf(t["hypothesis"], [t["target"]]).score for t in translations]
  )


def archive_path(d: str, archive: str = ARCHIVE) -> str:
  return os.path.join(archive, os.path.basename(os.path.normpath(d)) + ".json.gz")


def archive_run(d: str, archive: str = ARCHIVE) -> str:
  """What the report reads from a translated run, gzipped into `archive` (committed: runs/
  does not outlive a session, and the grid's parts run in different sessions)."""
  rows = metricslib.read_jsonl(os.path.join(d, "metrics.jsonl"))
  wall = os.path.join(d, "wall_time.json")
  rec = {
    "run": os.path.basename(os.path.normpath(d)),
    "config": json.load(open(os.path.join(d, "config.json"))),
    "translations": json.load(open(os.path.join(d, TRANSLATIONS))),
    "evals": [x for x in rows if "eval_loss" in x],
    "tokens_per_s": [x["tokens_per_s"] for x in rows if "tokens_per_s" in x],
    "wall_time": json.load(open(wall)) if os.path.exists(wall) else None,
  }
  os.makedirs(archive, exist_ok=True)
  path = archive_path(d, archive)
  # mtime 0 and no file name in the header: the same record gives the same bytes.
  with open(path + ".tmp", "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as f:
    f.write(json.dumps(rec).encode())
  os.replace(path + ".tmp", path)
  return path


def archived_earlier(d: str, archive: str = ARCHIVE) -> bool:
  """Archived in an earlier session: its folder is gone and its archive is here (--run
  does not rerun it)."""
  return not os.path.exists(d) and os.path.exists(archive_path(d, archive))


def has_run(d: str, archive: str = ARCHIVE) -> bool:
  return os.path.exists(os.path.join(d, TRANSLATIONS)) or os.path.exists(archive_path(d, archive))


def read_run(d: str, seed: int = 0, archive: str = ARCHIVE) -> dict:
  """One run's test translations, per-sentence chrF, losses and times: from its folder
  when it has been translated there, else from its archive (archive_run)."""
  if os.path.exists(os.path.join(d, TRANSLATIONS)):
    r = json.load(open(os.path.join(d, TRANSLATIONS)))
    rows = metricslib.read_jsonl(os.path.join(d, "metrics.jsonl"))
    evals = [x for x in rows if "eval_loss" in x]
    speeds = [x["tokens_per_s"] for x in rows if "tokens_per_s" in x]
    wall = os.path.join(d, "wall_time.json")
    wall = json.load(open(wall)) if os.path.exists(wall) else None
    config = json.load(open(os.path.join(d, "config.json")))
  else:
    with gzip.open(archive_path(d, archive), "rt") as f:
      rec = json.load(f)
    r, evals, wall, config = rec["translations"], rec["evals"], rec["wall_time"], rec["config"]
    speeds = rec["tokens_per_s"]
  ts = r["translation"]["translations"]
  best = min(evals, key=lambda x: x["eval_loss"]) if evals else None
  return {
    "dir": d,
    "seed": seed,
    "config": config,
    "translations": ts,
    "chrf": sentence_chrf(ts),
    "pairs": r["translation"]["pairs"],
    "test_loss": r["loss"],
    "eval_loss": evals[-1]["eval_loss"] if evals else None,
    # The training loss logged at the last eval step (the final step), the lowest
    # validation loss and its step (how far the run overfits), and the median
    # training speed (tokens/s of the logged steps; two runs train side by side).
    "train_loss": evals[-1].get("train_loss") if evals else None,
    "best_eval_loss": best["eval_loss"] if best else None,
    "best_eval_step": best["step"] if best else None,
    "tokens_per_s": float(np.median(speeds)) if speeds else None,
    "train_seconds": wall["seconds"] if wall else None,
    "translate_seconds": r.get("seconds"),
  }


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def check_same_recipe(runs: dict[str, list[dict]]):
  """Every run's config is the others' but for its arm's overrides and its seed: runs
  archived in different sessions come from one recipe (the sweep file's then)."""
  arms = sweep_module().ARMS
  own = {k for o in arms.values() for k in o} | {sweeplib.SEED_KEY}
  recipe = lambda r: {k: v for k, v in _flat(r["config"]).items() if k not in own}
  first = None
  for rs in runs.values():
    for r in rs:
      if first is None:
        first = r
        continue
      a, b = recipe(first), recipe(r)
      diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
      if diff:
        k = diff[0]
        raise ConfigError(
          f"{r['dir']}: its config differs from {first['dir']}'s in {len(diff)} key(s), "
          f"{k}={b.get(k)!r} against {a.get(k)!r}: not one recipe (rerun one of them)"
        )


def check_aligned(runs: dict[str, list[dict]]):
  """Every run translated the same sentences in the same order (the paired bootstrap needs it)."""
  ref = [
    (t["source"], t["src_lang"], t["tgt_lang"])
    for t in next(iter(runs.values()))[0]["translations"]
  ]
  for rs in runs.values():
    for r in rs:
      got = [(t["source"], t["src_lang"], t["tgt_lang"]) for t in r["translations"]]
      if got != ref:
        raise ConfigError(f"{r['dir']}: its test translations are not the other runs' sentences")


def corpus_chrf(run: dict, idx: np.ndarray) -> float:
  ts = [run["translations"][i] for i in idx]
  return translation.score([t["hypothesis"] for t in ts], [t["target"] for t in ts])["chrf"]


def mean_std(xs) -> tuple[float | None, float | None]:
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None
  return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def tables(runs: dict[str, list[dict]], n_boot: int = 10_000) -> dict:
  """Arm rows (per group), difference rows, per-language rows."""
  mod = sweep_module()
  group_of = {**{g: "high" for g in mod.HIGH}, **{g: "low" for g in mod.LOW}}
  ts = next(iter(runs.values()))[0]["translations"]
  langs = np.array([language_of(t) for t in ts])
  clusters = [message_of(t) for t in ts]
  grp = np.array([group_of.get(g, "other") for g in langs])
  chrf = {arm: np.stack([r["chrf"] for r in rs]) for arm, rs in runs.items()}  # [S, N]
  arm_rows = []
  for arm, rs in runs.items():
    for g in GROUPS:
      idx = np.flatnonzero(grp == g)
      ci = stats.bootstrap(
        chrf[arm][:, idx], [clusters[i] for i in idx], n_boot=n_boot, resample_rows=True
      )
      c_mean, c_std = mean_std([corpus_chrf(r, idx) for r in rs])
      arm_rows.append(
        {
          "arm": arm,
          "group": g,
          "seeds": len(rs),
          "sentences": len(idx),
          "languages": len(set(langs[idx])),
          "sentence_chrf": ci.mean,
          "lo": ci.lo,
          "hi": ci.hi,
          "corpus_chrf": c_mean,
          "corpus_chrf_std": c_std,
        }
      )
  diff_rows = []
  for a, b, g, claim in DIFFERENCES:
    if a not in runs or b not in runs:
      continue
    idx = np.flatnonzero(grp == g)
    seeds = sorted({r["seed"] for r in runs[a]} & {r["seed"] for r in runs[b]})
    S = len(seeds)
    if not S:
      continue
    ra_S = [next(r for r in runs[a] if r["seed"] == s) for s in seeds]
    rb_S = [next(r for r in runs[b] if r["seed"] == s) for s in seeds]
    ci = stats.paired(
      np.stack([r["chrf"][idx] for r in ra_S]),
      np.stack([r["chrf"][idx] for r in rb_S]),
      [clusters[i] for i in idx],
      n_boot=n_boot,
      resample_rows=True,
    )
    c_diff = [corpus_chrf(ra, idx) - corpus_chrf(rb, idx) for ra, rb in zip(ra_S, rb_S)]
    diff_rows.append(
      {
        "difference": f"{a} - {b}",
        "group": g,
        "seeds": S,
        "sentences": len(idx),
        "clusters": ci.clusters,
        "mean": ci.mean,
        "lo": ci.lo,
        "hi": ci.hi,
        "corpus_chrf_diff": float(np.mean(c_diff)),
        "claim": claim or "",
        "verdict": stats.verdict(ci, claim) if claim else "(no claim)",
      }
    )
  lang_rows, pairs_of = [], {**mod.HIGH, **mod.LOW}
  for g in sorted(set(langs), key=lambda g: (group_of.get(g, "other"), -pairs_of.get(g, 0))):
    idx = np.flatnonzero(langs == g)
    row = {
      "language": g,
      "group": group_of.get(g, "other"),
      "train_pairs": pairs_of.get(g),
      "test_sentences": len(idx),
    }
    for arm, rs in runs.items():
      row[arm] = mean_std([corpus_chrf(r, idx) for r in rs])[0]
    lang_rows.append(row)
  run_rows = [
    {
      "arm": arm,
      "run": os.path.basename(r["dir"]),
      "train_loss": r["train_loss"],
      "eval_loss": r["eval_loss"],
      "best_eval_loss": r["best_eval_loss"],
      "best_eval_step": r["best_eval_step"],
      "test_loss": r["test_loss"],
      "corpus_chrf": corpus_chrf(r, np.arange(len(ts))),
      "tokens_per_s": r["tokens_per_s"],
      "train_seconds": r["train_seconds"],
      "translate_seconds": r["translate_seconds"],
    }
    for arm, rs in runs.items()
    for r in rs
  ]
  return {"arms": arm_rows, "differences": diff_rows, "languages": lang_rows, "runs": run_rows}


# ------------------------------------------------------------------ writing


def fmt(x, spec=".2f"):
  return "-" if x is None else f"{x:{spec}}"


def md_table(head: list[str], body: list[list]) -> list[str]:
  return [
    "| " + " | ".join(head) + " |",
    "|" + "|".join("---" for _ in head) + "|",
    *("| " + " | ".join(str(c) for c in row) + " |" for row in body),
  ]


def results_md(t: dict, grid: str) -> list[str]:
  mod = sweep_module()
  lines = [
    f"# Multilingual MoE: dense vs top-2 MoE, EOM on and off ({grid})",
    "",
    "chrF of greedy translations of the test split (sacrebleu); groups: "
    f"high = {', '.join(mod.HIGH)}; low = {', '.join(mod.LOW)} (en->X and X->en). "
    "Sentence chrF: the mean of sentence-level chrF with a 95% bootstrap interval "
    "over seeds and English messages; corpus chrF: mean +- std over seeds.",
    "",
    "## Per arm",
    "",
  ]
  lines += md_table(
    ["arm", "group", "seeds", "sentences", "sentence chrF [95%]", "corpus chrF"],
    [
      [
        ARM_LABELS[r["arm"]],
        r["group"],
        r["seeds"],
        r["sentences"],
        f"{r['sentence_chrf']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]",
        f"{fmt(r['corpus_chrf'])} +- {fmt(r['corpus_chrf_std'])}",
      ]
      for r in t["arms"]
    ],
  )
  lines += [
    "",
    "## Differences against NLLB's finding",
    "",
    "MoE helps low-resource pairs only with EOM (NLLB Team 2022, section 6.2.2). "
    "Paired by seed, on the same sentences; verdict: the interval against the claimed sign.",
    "",
  ]
  lines += md_table(
    [
      "difference",
      "group",
      "seeds",
      "sentence chrF diff [95%]",
      "corpus chrF diff",
      "claim",
      "verdict",
    ],
    [
      [
        r["difference"].replace("moe_eom", "MoE+EOM").replace("moe", "MoE"),
        r["group"],
        r["seeds"],
        f"{r['mean']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]",
        f"{r['corpus_chrf_diff']:+.2f}",
        {"positive": "> 0", "negative": "< 0", "": "-"}[r["claim"]],
        r["verdict"],
      ]
      for r in t["differences"]
    ],
  )
  lines += ["", "## Per language (corpus chrF, mean over seeds)", ""]
  arms = [a for a in ARM_LABELS if any(r["arm"] == a for r in t["arms"])]
  lines += md_table(
    ["language", "group", "en->X train pairs", "test sentences"] + [ARM_LABELS[a] for a in arms],
    [
      [r["language"], r["group"], r["train_pairs"], r["test_sentences"]] + [fmt(r[a]) for a in arms]
      for r in t["languages"]
    ],
  )
  lines += ["", "## Runs", ""]
  lines += md_table(
    [
      "arm",
      "run",
      "train loss (last)",
      "eval loss (validation, last)",
      "lowest eval loss (step)",
      "test loss",
      "corpus chrF",
      "tokens/s (median)",
      "train s",
      "translate s",
    ],
    [
      [
        ARM_LABELS[r["arm"]],
        r["run"],
        fmt(r["train_loss"], ".4f"),
        fmt(r["eval_loss"], ".4f"),
        f"{fmt(r['best_eval_loss'], '.4f')} ({r['best_eval_step']})",
        fmt(r["test_loss"], ".4f"),
        fmt(r["corpus_chrf"]),
        fmt(r["tokens_per_s"], ".0f"),
        fmt(r["train_seconds"], ".0f"),
        fmt(r["translate_seconds"], ".0f"),
      ]
      for r in t["runs"]
    ],
  )
  return lines


def write_plot(t: dict, out: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  arms = list(dict.fromkeys(r["arm"] for r in t["arms"]))
  w = 0.8 / len(arms)
  for i, arm in enumerate(arms):
    rs = [next(r for r in t["arms"] if r["arm"] == arm and r["group"] == g) for g in GROUPS]
    x = np.arange(len(GROUPS)) + (i - (len(arms) - 1) / 2) * w
    m = np.array([r["sentence_chrf"] for r in rs])
    err = np.array(
      [[r["sentence_chrf"] - r["lo"] for r in rs], [r["hi"] - r["sentence_chrf"] for r in rs]]
    )
    ax1.bar(x, m, w, yerr=err, capsize=3, label=ARM_LABELS[arm])
  ax1.set_xticks(np.arange(len(GROUPS)), [f"{g}-resource" for g in GROUPS])
  ax1.set_ylabel("sentence chrF (test), 95% interval")
  ax1.legend()
  ax1.set_title("chrF per arm and language group")
  ds = t["differences"]
  y = np.arange(len(ds))
  ax2.errorbar(
    [r["mean"] for r in ds],
    y,
    xerr=[[r["mean"] - r["lo"] for r in ds], [r["hi"] - r["mean"] for r in ds]],
    fmt="o",
    capsize=3,
  )
  ax2.axvline(0, color="gray", lw=0.8)
  ax2.set_yticks(y, [f"{r['difference']} ({r['group']})" for r in ds])
  ax2.invert_yaxis()
  ax2.set_xlabel("chrF difference, 95% interval (seeds x messages)")
  ax2.set_title("differences")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def write_results(out_dir: str, t: dict, lines: list[str]):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  rows = [{"kind": "arm", **r} for r in t["arms"]] + [
    {"kind": "difference", **r} for r in t["differences"]
  ]
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(t, f, indent=1)
  write_plot(t, os.path.join(out_dir, "chrf.png"))


# --------------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run", action="store_true", help="run (or resume) the grid, then translate")
  ap.add_argument("--smoke", action="store_true", help="the :smoke grid (seconds of training)")
  ap.add_argument(
    "--short", action="store_true", help="the :short grid (800 steps; report into short/)"
  )
  ap.add_argument(
    "--workdir", default=None, help="sweep folder (default runs/multilingual_moe[_smoke|_short])"
  )
  ap.add_argument("--parallel", type=int, default=2, help="runs at a time (--run)")
  ap.add_argument(
    "--out", default=None, help="where the report goes (default: this folder; short/ with --short)"
  )
  ap.add_argument("--n_boot", type=int, default=10_000, help="bootstrap replicates")
  seeds = [f"seed{s}" for s in sweep_module().SEEDS]
  ap.add_argument(
    "--part",
    default="all",
    choices=["all"] + seeds,
    help="with --run: the runs of one seed (its 3 arms; one working session each) or all 9",
  )
  ap.add_argument(
    "--archive",
    default=None,
    help="where each translated run's results are kept (default: this folder's archive/ for "
    "the default --workdir, archive_short/ for --short's, else <workdir>/archive)",
  )
  a = ap.parse_args()
  if a.part != "all" and (a.smoke or a.short or not a.run):
    ap.error(f"--part={a.part} runs one seed of the main grid: with --run, not --smoke/--short")
  if a.smoke and a.short:
    ap.error("--smoke and --short are two different grids: one of them")
  variant = ":smoke" if a.smoke else ":short" if a.short else ""
  grid = SWEEP + variant
  default = "runs/multilingual_moe" + variant.replace(":", "_")
  workdir = a.workdir or default
  # The committed archives are the default grids' only: a trial elsewhere keeps its own.
  committed = {"runs/multilingual_moe": ARCHIVE, "runs/multilingual_moe_short": ARCHIVE + "_short"}
  archive = a.archive or committed.get(workdir, f"{workdir}/archive")
  out = a.out or (os.path.join(HERE, "short") if a.short else HERE)
  try:
    by_arm = runs_by_arm(grid, workdir)
    if a.run:
      part = grid if a.part == "all" else f"{SWEEP}:{a.part}"
      dirs = [d for rs in runs_by_arm(part, workdir).values() for _, d in rs]
      archived = lambda d: archived_earlier(d, archive)
      for d in filter(archived, dirs):
        print(f"{d}: archived in an earlier session ({archive_path(d, archive)}), not rerun")
      failed = sweeplib.run_all(part, workdir, a.parallel, done=archived)
      failed += translate_all(dirs, a.parallel)
      for d in dirs:
        if os.path.exists(os.path.join(d, TRANSLATIONS)):
          print(f"archived {d} -> {archive_run(d, archive)}")
      if failed:
        sys.exit(f"report.py: {len(failed)} run(s) failed ({', '.join(failed)}); rerun to retry")
    runs = {
      arm: [read_run(d, seed, archive) for seed, d in rs if has_run(d, archive)]
      for arm, rs in by_arm.items()
    }
    runs = {arm: rs for arm, rs in runs.items() if rs}
    if not runs:
      sys.exit(f"report.py: no translated runs in {workdir} or {archive}; run with --run")
    check_same_recipe(runs)
    check_aligned(runs)
    t = tables(runs, a.n_boot)
    lines = results_md(t, grid)
    write_results(out, t, lines)
    print("\n".join(lines))
    print(f"wrote results.md, results.csv, results.json and chrf.png to {out}")
  except ConfigError as e:
    sys.exit(f"report.py: {e}")


if __name__ == "__main__":
  main()
