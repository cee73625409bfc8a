r"""FLAN-MoE as a held-out-task comparison: run, score and report (issue 29).

  python experiments/instruction_tuning/flan.py --run           # sweeps, scores, report
  python experiments/instruction_tuning/flan.py                 # report from what is there
  python experiments/instruction_tuning/flan.py --run --smoke   # tiny step counts, own folder

The design (configs/sweeps/instruction_tuning.py, args flan_base, flan_it,
flan_body; README.md, "FLAN-MoE (redesigned)"): dense and Switch
E=8 bases, 3 pretraining seeds each; each instruction-tuned on the docstring,
name and signature tasks (the body task held out); then
  (a) the body task zero-shot after instruction tuning (against the base's),
  (b) body fine-tuning after instruction tuning,
  (c) body fine-tuning alone (from the base).
The statistic the paper's claim is about: (MoE - dense) with instruction
tuning minus (MoE - dense) without: (b) against (c), and (a) against the
bases. Every model is scored on the held-out test modules (the dev modules
only steer training-time evaluation) by
  * body loss: each held-out body's mean response loss (evaluate.score_responses;
    token-weighted over examples),
  * multiple choice: the true name among 4 names of its module, the true
    body among 3 bodies of its module of similar length, by summed
    log-likelihood (evaluate.multiple_choice), accuracy,
each per example, with and without the functions whose body or docstring
has a near-duplicate (or a shared 13-gram) in the pretraining text. Every
difference gets a 95% interval from a bootstrap over modules and seeds
(sparse_lm/stats.py); a claim holds or fails only when its interval excludes
zero, else it is inconclusive.

Runs two points at a time, resumable (sparse_lm.sweep: finished points are
skipped, interrupted ones resume); scores are cached in each run's folder.
Writes flan_results.md / flan_results.json into --out (default this folder;
with --smoke the smoke's run folder, so smoke numbers are never committed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments.instruction_tuning import data as datalib  # noqa: E402
from sparse_lm import config as cfglib  # noqa: E402
from sparse_lm import stats  # noqa: E402
from sparse_lm import sweep as sweeplib  # noqa: E402
from sparse_lm.errors import ConfigError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = "configs/sweeps/instruction_tuning.py"
DATA = "runs/instruction_tuning/data"
GRIDS = ("flan_base", "flan_it", "flan_body", "flan_twin")
# Model arms: the grid and body-fine-tuning start of each.
ARMS = {
  "base": ("flan_base", "base"),  # pretrained only: the body task zero-shot
  "it": ("flan_it", "base"),  # (a) instruction-tuned, body zero-shot
  "body_after_it": ("flan_body", "it"),  # (b)
  "body_alone": ("flan_body", "base"),  # (c)
}
METRICS = {  # name -> (what it is, the claim's sign for "MoE gains more": lower loss, higher acc)
  "body_loss": ("held-out body loss (per token)", "negative"),
  "mc_name": ("multiple choice: name among 4 (accuracy)", "positive"),
  "mc_body": ("multiple choice: body among 3 (accuracy)", "positive"),
}
SUBSETS = ("all", "unflagged")
PAPER = (  # the claim's setting (Shen et al. 2023, arXiv 2305.14705)
  "Shen et al. 2023: the FLAN collection (1.8k tasks), held-out benchmarks, up to FLAN-MoE-32B"
)
DID_LABELS = {  # the two difference-in-differences (analyse's "did")
  "finetuned": "body fine-tuning after vs without instruction tuning (b - c)",
  "zero_shot": "body zero-shot after instruction tuning vs the base (a)",
}


def sweep_cfg():
  return cfglib.load_module(SWEEP)


def workdir_of(grid: str) -> str:
  return f"{sweep_cfg().FLAN_ROOT}/{grid.removeprefix('flan_')}"


def run_dir(arm: str, experts: int, seed: int) -> str:
  grid, start = ARMS[arm]
  return sweep_cfg().flan_dir(grid, experts, seed, start)


def done(d: str) -> bool:
  return os.path.exists(os.path.join(d, "DONE"))


# ------------------------------------------------------------------ scoring


def eval_sets(limit: int | None = None, parts=("test",)) -> dict:
  """Per part (the report reads "test"): the held-out body examples and the
  choice items (the first `limit` of each: smoke runs)."""
  out = {}
  for part in parts:
    items = datalib.choices(DATA, part)
    by_task = [[it for it in items if it["task"] == t][:limit] for t in ("name", "body")]
    body = datalib.examples(DATA, "body", part)[:limit]
    out[part] = {"body": body, "items": by_task[0] + by_task[1]}
  return out


def scores(d: str, sets: dict, tag: str) -> dict:
  """Per part: each body example's logprob and token count, each item's
  correctness; cached in the run's folder (flan_scores_<tag>.json)."""
  from sparse_lm import evaluate  # pylint: disable=g-import-not-at-top

  path = os.path.join(d, f"flan_scores_{tag}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  t0 = time.time()
  model, c, tok, mesh = evaluate.load_for_scoring(d, mesh="one")
  template = sweep_cfg().TEMPLATE
  out = {}
  for part, s in sets.items():
    b = evaluate.score_responses(model, c, tok, s["body"], template=template, mesh=mesh)
    m = evaluate.multiple_choice(model, c, tok, s["items"], template=template, mesh=mesh)
    out[part] = {
      "body_logprob": [None if math.isnan(x) else float(x) for x in b["logprob"]],
      "body_tokens": b["tokens"].tolist(),
      "choice_correct": m["correct"].astype(int).tolist(),
      "choice_truncated": m["truncated"].astype(int).tolist(),  # left out: a choice was cut
      # what each score is of (the eval files' order): held-out module, function, task
      "body_of": [[e["module"], e["function"]] for e in s["body"]],
      "choice_of": [[it["module"], it["function"], it["task"]] for it in s["items"]],
    }
  out["seconds"] = time.time() - t0
  with open(path + ".tmp", "w") as f:
    json.dump(out, f)
  os.replace(path + ".tmp", path)
  return out


def drift() -> list[dict]:
  """The MoE's routing drift (finetune.routing_drift: KL(from || to) of the
  router distribution per token, and the fraction of tokens whose top-1
  expert changed, mean over MoE layers) over all of the runs' evaluation
  batches of the dev bodies (sparse_lm.evaluate --compare_routing), per
  base seed: what instruction tuning and body fine-tuning move, against
  the noise floor of two body fine-tunings of the same base that differ
  only in their fine-tuning seed (flan_twin). Cached per run."""
  from sparse_lm import evaluate  # pylint: disable=g-import-not-at-top

  cfg = sweep_cfg()
  out = []
  for s in cfg.SEEDS:
    twin = os.path.join(
      workdir_of("flan_twin"),
      sweeplib.point_name(cfg.flan_point("flan_body", 8, s) | {"train.seed": cfg.TWIN_SEED + s}),
    )
    pairs = {
      "instruction tuning (base -> it)": (run_dir("base", 8, s), run_dir("it", 8, s)),
      "body fine-tuning (base -> c)": (run_dir("base", 8, s), run_dir("body_alone", 8, s)),
      "body fine-tuning after it (it -> b)": (run_dir("it", 8, s), run_dir("body_after_it", 8, s)),
      "noise floor: fine-tuning seed (c -> c')": (run_dir("body_alone", 8, s), twin),
    }
    for what, (src, dst) in pairs.items():
      if not (done(src) and done(dst)):
        continue
      path = os.path.join(dst, f"flan_drift_from_{os.path.basename(src)}.json")
      if os.path.exists(path):
        with open(path) as f:
          d = json.load(f)
      else:
        d = evaluate.evaluate(dst, compare_routing=src, mesh="one")["routing_drift"]
        with open(path + ".tmp", "w") as f:
          json.dump(d, f)
        os.replace(path + ".tmp", path)
      out.append({"pair": what, "seed": s} | d)
  return out


def drift_table(rows: list[dict]) -> list[str]:
  keys = (
    "drift/mean/kl",
    "drift/mean/kl_prompt",
    "drift/mean/kl_response",
    "drift/mean/top1_changed",
  )
  out = [
    "## Routing drift of the MoE (dev bodies, all evaluation batches; mean over base seeds)",
    "",
    "| pair | seeds | KL | KL prompt | KL response | top-1 changed |",
    "|---|---|---|---|---|---|",
  ]
  for pair in dict.fromkeys(r["pair"] for r in rows):
    sel = [r for r in rows if r["pair"] == pair]
    vals = [f"{np.mean([r[k] for r in sel]):.4f} ± {np.std([r[k] for r in sel]):.4f}" for k in keys]
    out.append(f"| {pair} | {len(sel)} | " + " | ".join(vals) + " |")
  return out + ["", "(± : std over base seeds.)", ""]


# ------------------------------------------------------------------ analysis


def per_example(sc: dict, part: str, sets: dict, metric: str, subset: str):
  """(values [N], weights [N], module labels) of one model's metric."""
  s = sets[part]
  of = [[e["module"], e["function"]] for e in s["body"]]
  if sc[part].get("body_of", of) != of or len(sc[part]["choice_correct"]) != len(s["items"]):
    raise ConfigError(f"cached scores ({part}) are of other examples: delete flan_scores_*.json")
  if metric == "body_loss":
    lp = np.array([np.nan if x is None else x for x in sc[part]["body_logprob"]], float)
    n = np.asarray(sc[part]["body_tokens"], float)
    keep = np.isfinite(lp) & (n > 0)
    ex = s["body"]
    v, w = np.where(keep, -lp / np.maximum(n, 1), 0.0), np.where(keep, n, 0.0)
  else:
    task = metric.removeprefix("mc_")
    ex = s["items"]
    sel = np.array([it["task"] == task for it in ex])
    v = np.asarray(sc[part]["choice_correct"], float)
    w = sel * (1.0 - np.asarray(sc[part]["choice_truncated"], float))
  if subset == "unflagged":
    w = w * np.array([not e.get("flagged", False) for e in ex], float)
  return v, w, [e["module"] for e in ex]


def analyse(all_scores: dict, sets: dict, part: str = "test", n_boot: int = 10_000) -> dict:
  """Per metric and subset: each arm's level per architecture, MoE - dense per
  arm, and the two difference-in-differences, each with its interval."""
  seeds = sweep_cfg().SEEDS
  out = {}
  for metric, (_, claim) in METRICS.items():
    for subset in SUBSETS:
      key = f"{metric}/{subset}"
      vals, w, mods = {}, None, None
      for arm in ARMS:
        for e in (1, 8):
          rows = []
          for s in seeds:
            sc = all_scores.get((arm, e, s))
            if sc is None:
              break
            v, w_, mods = per_example(sc, part, sets, metric, subset)
            w = w_ if w is None else np.minimum(w, w_)  # the examples every model scored
            rows.append(v)
          else:
            vals[(arm, e)] = np.stack(rows)
      if w is None or not w.sum():
        continue
      keep = w > 0
      w, mods = w[keep], list(np.asarray(mods, dtype=object)[keep])
      vals = {k: v[:, keep] for k, v in vals.items()}
      boot = lambda x: stats.bootstrap(x, mods, w, n_boot=n_boot, resample_rows=True)
      res = {"n": int(keep.sum()), "modules": len(set(mods)), "levels": {}, "moe_minus_dense": {}}
      for (arm, e), v in vals.items():
        res["levels"][f"{arm}/{e}"] = boot(v).as_dict()
      gap = {a: vals[(a, 8)] - vals[(a, 1)] for a in ARMS if (a, 1) in vals and (a, 8) in vals}
      for a, g in gap.items():
        res["moe_minus_dense"][a] = boot(g).as_dict()
      did = {}
      for name, (with_, without) in {
        "finetuned": ("body_after_it", "body_alone"),
        "zero_shot": ("it", "base"),
      }.items():
        if with_ in gap and without in gap:
          d = gap[with_] - gap[without]
          iv = boot(d)
          per_seed = [float(np.sum(w * r) / np.sum(w)) for r in d]
          did[name] = iv.as_dict() | {
            "verdict": stats.verdict(iv, claim),
            "module_only": stats.bootstrap(d, mods, w, n_boot=n_boot).as_dict(),
            "per_seed": per_seed,
          }
      res["did"] = did
      out[key] = res
  return out


# ------------------------------------------------------------------ report


def _iv(d: dict | None, spec="+.4f") -> str:
  if not d:
    return "-"
  return f"{d['mean']:{spec}} [{d['lo']:{spec}}, {d['hi']:{spec}}]"


def results_md(
  res: dict, summary: dict, timing: dict, smoke: bool, part: str = "test"
) -> list[str]:
  c = summary["contamination"]
  t = summary["parts"][part]
  out = [
    "# FLAN-MoE (held-out body task): results" + (" (SMOKE: tiny step counts)" if smoke else ""),
    "",
    f"Made by `python experiments/instruction_tuning/flan.py`; {part} modules "
    f"({t['modules']} modules, {t['examples']['body']} bodies, {t['choices']['name']} name and "
    f"{t['choices']['body']} body items). 95% intervals from a bootstrap over modules and base "
    "seeds (sparse_lm/stats.py). Negative loss / positive accuracy differences favour the MoE.",
    "",
    f"Contamination (all held-out modules): bodies with a near-duplicate (difflib ratio >= "
    f"{c['threshold']}) in the pretraining text {c['body']['near_duplicate']} of "
    f"{c['body']['examples']} ({c['body']['near_duplicate_shorter_than_ngram']} of them shorter "
    f"than a {c['n']}-gram), sharing a {c['n']}-gram {c['body']['ngram']}; docstrings "
    f"{c['docstring']['near_duplicate']} and {c['docstring']['ngram']} of "
    f"{c['docstring']['examples']}. Flagged functions (body or docstring): "
    f'{summary["flagged_functions"]}; "unflagged" rows leave them out.',
    "",
  ]
  claims = []
  for key, r in res.items():
    metric, subset = key.split("/")
    out += [f"## {METRICS[metric][0]}, {subset} ({r['n']} examples, {r['modules']} modules)", ""]
    out += ["| arm | dense | MoE | MoE - dense |", "|---|---|---|---|"]
    for arm in ARMS:
      out.append(
        f"| {arm} | {_iv(r['levels'].get(f'{arm}/1'), '.4f')} | "
        f"{_iv(r['levels'].get(f'{arm}/8'), '.4f')} | {_iv(r['moe_minus_dense'].get(arm))} |"
      )
    out += [
      "",
      "| (MoE - dense) with minus without instruction tuning | interval | seeds | verdict |",
    ]
    out += ["|---|---|---|---|"]
    for name, d in r["did"].items():
      seeds = ", ".join(f"{x:+.4f}" for x in d["per_seed"])
      out.append(
        f"| {name} | {_iv(d)} (modules only: {_iv(d['module_only'])}) | {seeds} | {d['verdict']} |"
      )
      claims.append((metric, subset, name, d))
    out.append("")
  out += [
    "## Claims",
    "",
    "| claim | paper's setting | ours | interval | verdict |",
    "|---|---|---|---|---|",
  ]
  for metric, subset, name, d in claims:
    if subset != "all":
      continue
    ours = DID_LABELS[name]
    out.append(
      f"| MoE gains more from instruction tuning than dense | {PAPER} "
      f"| {ours}, {METRICS[metric][0]}, 0.66M active "
      f"| {_iv(d)} | {d['verdict']} |"
    )
  out += [
    "",
    "Wall time (each run's wall_time.json: every attempt of a resumed run, at the load it had): "
    + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timing.items()),
    "",
  ]
  return out


def report(out_dir: str, limit: int | None, smoke: bool, part: str = "test") -> dict:
  """Scores every finished model (cached) on the held-out `part` and writes
  flan_results.md / .json (flan_results_dev.* for the dev part)."""
  summary = datalib.prepare_flan(DATA)
  sets = eval_sets(limit, (part,))
  tag = f"v1_{part}_{limit or 'all'}"
  all_scores, eval_s = {}, 0.0
  for arm in ARMS:
    for e in (1, 8):
      for s in sweep_cfg().SEEDS:
        d = run_dir(arm, e, s)
        if done(d):
          sc = scores(d, sets, tag)
          all_scores[(arm, e, s)] = sc
          eval_s += sc["seconds"]
  if not all_scores:
    raise ConfigError(f"no finished FLAN run in {sweep_cfg().FLAN_ROOT}; use --run")
  res = analyse(all_scores, sets, part)
  timing = {}
  for g in GRIDS:
    walls = [sweeplib.summarize_point(d)["wall_time_s"] for _, d in runs_of(g)]
    timing[g + " (sum of runs)"] = sum(w for w in walls if w)
  timing["scoring (sum)"] = eval_s
  lines = results_md(res, summary, timing, smoke, part)
  drift_rows = drift()
  if drift_rows:
    lines += drift_table(drift_rows)
  os.makedirs(out_dir, exist_ok=True)
  name = "flan_results" if part == "test" else f"flan_results_{part}"
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump({"data": summary, "results": res, "timing": timing, "drift": drift_rows}, f, indent=1)
  print("\n".join(lines))
  return res


def runs_of(grid: str) -> list[tuple[dict, str]]:
  return [
    (p, os.path.join(workdir_of(grid), sweeplib.point_name(p)))
    for p in sweeplib.points(f"{SWEEP}:{grid}")
  ]


def run(parallel: int) -> list[str]:
  """Every FLAN grid in order (each needs the one before), resumable."""
  failed = []
  for g in GRIDS:
    failed += sweeplib.run_all(f"{SWEEP}:{g}", workdir_of(g), parallel)
    if failed:
      break
  return failed


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run", action="store_true", help="run (or resume) the FLAN grids first")
  ap.add_argument("--parallel", type=int, default=2, help="points at a time (--run)")
  ap.add_argument("--smoke", action="store_true", help="tiny step counts, a separate folder")
  ap.add_argument("--limit", type=int, default=None, help="score the first N per set only")
  ap.add_argument(
    "--heldout", default="test", choices=datalib.PARTS, help="dev: for choosing, test: reported"
  )
  ap.add_argument("--out", default=None, help="report folder (default: this one; smoke: runs)")
  a = ap.parse_args(argv)
  if a.smoke:
    os.environ["SPARSE_LM_FLAN_SMOKE"] = "1"  # read by the sweep file, here and in each run
  os.chdir(ROOT)
  out = a.out or (sweep_cfg().FLAN_ROOT if a.smoke else HERE)
  try:
    datalib.prepare(DATA)
    if a.run:
      failed = run(a.parallel)
      if failed:
        sys.exit(f"flan.py: {len(failed)} point(s) failed ({', '.join(failed)}); rerun")
    report(out, a.limit, a.smoke, a.heldout)
  except ConfigError as e:
    sys.exit(f"flan.py: {e}")


if __name__ == "__main__":
  main()
