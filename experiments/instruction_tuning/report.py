r"""Instruction tuning and upcycling, measured, in one command: data, sweeps, tables, plots.

  python experiments/instruction_tuning/report.py --run

--run prepares the instruction data (data.py, into runs/instruction_tuning/data)
and runs, two points at a time, skipping finished points and resuming
interrupted ones (configs/sweeps/instruction_tuning.py):
  :base      dense and Switch E=8 pretrained without the held-out modules
  :finetune  single- vs multi-task instruction tuning of each base, 3 seeds
  :upcycle   the dense base at step 1,200 upcycled to E=8 for the 1,200 steps left
             (superseded by --part upcycling; kept so the old tables rebuild)
  :freeze    the MoE's multi-task tuning with experts / router / non-experts frozen
  :rate      the MoE's multi-task tuning at 3x the rate, 2 seeds
then evaluates every fine-tuned run on each held-out task (masked response loss,
sparse_lm.evaluate), generates the held-out short bodies and the functions with
doctests greedily (sparse_lm.generate; exact match after AST normalisation,
pass@1 by running the doctests in a sandbox), and writes into this folder
results.md (every table), results.csv (the fine-tuning grid, one row per run),
results.json and the plots ft_curves.png, upcycling.png, drift.png.
Without --run the report is made from what the sweep folders hold.

  python experiments/instruction_tuning/report.py --calib [--run]

the calibration grid (:calib) and its table instead (README.md, "Calibration").
Evaluations and generations are cached in each run's folder.

  python experiments/instruction_tuning/report.py --part upcycling [--run]

one part of the study on its own (PARTS; the default, "legacy", is the grids
above): "upcycling" is sparse upcycling as the paper compares it
(experiments/instruction_tuning/upcycling.py, configs/sweeps/upcycling.py),
which supersedes the :upcycle grid here; "flan" is FLAN-MoE with the body
task held out (experiments/instruction_tuning/flan.py; README.md, "FLAN-MoE
(redesigned)"), which supersedes the :finetune grid's FLAN tables;
"claims" runs nothing and writes claims.md, one table of every claim from the
committed parts' results.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments.instruction_tuning import data as datalib  # noqa: E402
from sparse_lm import config as cfglib  # noqa: E402
from sparse_lm import metrics as metricslib  # noqa: E402
from sparse_lm import plots  # noqa: E402
from sparse_lm import sweep as sweeplib  # noqa: E402
from sparse_lm.data import stdlib_tasks  # noqa: E402
from sparse_lm.errors import ConfigError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = "configs/sweeps/instruction_tuning.py"
RUNS = "runs/instruction_tuning"
DATA = f"{RUNS}/data"
GRIDS = ("base", "finetune", "upcycle", "freeze", "rate")
TASKS = tuple(stdlib_tasks.TASKS)
SHORT_BODY = 160  # characters: the bodies exact match is measured on
NEW_TOKENS = 96  # generated per held-out prompt (the short bodies are under ~60 tokens)


def sweep_of(grid: str) -> str:
  return f"{SWEEP}:{grid}"


def workdir_of(grid: str) -> str:
  return f"{RUNS}/{grid}"


def runs_of(grid: str) -> list[tuple[dict, str]]:
  """(overrides, run folder) of every point of a grid, finished or not."""
  return [
    (p, os.path.join(workdir_of(grid), sweeplib.point_name(p)))
    for p in sweeplib.points(sweep_of(grid))
  ]


def done(d: str) -> bool:
  return os.path.exists(os.path.join(d, "DONE"))


# ------------------------------------------------------------------ reading


def eval_batches_for(task: str) -> int:
  """Batches that hold each held-out example of `task` once (packed as training
  packs them, 16 rows of 256 tokens a batch), rounded down: no example twice."""
  from sparse_lm.data import make_tokenizer  # pylint: disable=g-import-not-at-top
  from sparse_lm.data import sft  # pylint: disable=g-import-not-at-top

  c = cfglib.load_config(sweep_of("finetune"))
  tok = make_tokenizer(c.data)
  enc, _ = sft.encode(sft.read_examples(DATA, f"eval_{task}"), tok, c.data, DATA)
  rows = len(sft.pack(enc, range(len(enc)), c.data.seq_len)["tokens"])
  return max(1, rows // c.data.batch_size)


def heldout_losses(d: str, batches: dict[str, int], tasks=TASKS, dataset=None) -> dict[str, float]:
  """Masked response loss of the run's final checkpoint on each held-out task
  (sparse_lm.evaluate, in this process; cached in the run's folder). dataset:
  for a run that was not trained on the instruction data (a base model)."""
  from sparse_lm import evaluate  # pylint: disable=g-import-not-at-top

  out = {}
  for task in tasks:
    name = f"evaluate_{'sft_' if dataset else ''}{task}_{batches[task]}.json"
    path = os.path.join(d, name)
    if not os.path.exists(path):
      r = evaluate.evaluate(d, split=f"eval_{task}", batches=batches[task], dataset=dataset)
      with open(path, "w") as f:
        json.dump(r, f, indent=1)
    with open(path) as f:
      out[task] = json.load(f)["loss"]
  return out


def generation_set() -> list[dict]:
  """The held-out body examples generated: short bodies (exact match) and
  functions with doctests (pass@1)."""
  out = []
  with open(os.path.join(DATA, "eval_body.jsonl"), encoding="utf-8") as f:
    for line in f:
      ex = json.loads(line)
      short = len(ex["response"]) <= SHORT_BODY
      doctest = ">>>" in ex["prompt"]
      if short or doctest:
        out.append({**ex, "short": short, "doctest": doctest})
  return out


def function_source(ex: dict, body: str) -> str:
  """The generated function: the prompt without its instruction line, then the body."""
  return ex["prompt"].split("\n", 1)[1] + body


def generation_metrics(d: str, examples: list[dict]) -> dict:
  """Exact match (short bodies) and pass@1 (doctests) of greedy bodies; cached."""
  path = os.path.join(d, f"generation_{len(examples)}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  prompts = os.path.join(d, "generation_prompts.jsonl")
  with open(prompts, "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"prompt": ex["prompt"]}) + "\n" for ex in examples)
  out = os.path.join(d, "generation.jsonl")
  cmd = [sys.executable, "-m", "sparse_lm.generate", f"--workdir={d}", f"--prompts={prompts}"]
  cmd += [f"--max_new_tokens={NEW_TOKENS}", f"--output={out}"]
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if p.returncode != 0:
    raise ConfigError(f"generate failed on {d}: {p.stderr.strip()[-400:]}")
  with open(out, encoding="utf-8") as f:
    bodies = [json.loads(line)["completion"] for line in f]
  return _score(examples, bodies, path)


def _score(examples, bodies, path) -> dict:
  exact = [
    stdlib_tasks.normalized_equal(b, ex["response"])
    for ex, b in zip(examples, bodies)
    if ex["short"]
  ]
  tested = [
    stdlib_tasks.run_doctests(function_source(ex, b), ex["module"], 10.0, qualname=_qual(ex)).status
    for ex, b in zip(examples, bodies)
    if ex["doctest"]
  ]
  r = {
    "exact_match": float(np.mean(exact)) if exact else None,
    "exact_n": len(exact),
    "pass_at_1": float(np.mean([s == "passed" for s in tested])) if tested else None,
    "pass_n": len(tested),
    "pass_statuses": {s: tested.count(s) for s in stdlib_tasks.STATUSES},
  }
  with open(path, "w") as f:
    json.dump(r, f, indent=1)
  return r


def _qual(ex: dict) -> str | None:
  """The qualname run_doctests needs for a method (a "." in the function name)."""
  return ex["function"] if "." in ex["function"] and "<locals>" not in ex["function"] else None


def reference_pass_rate(examples: list[dict]) -> dict:
  """pass@1 of the reference bodies: the ceiling the sandbox allows."""
  path = os.path.join(RUNS, f"reference_doctests_{len(examples)}.json")
  if not os.path.exists(path):
    tested = [
      stdlib_tasks.run_doctests(
        function_source(ex, ex["response"]), ex["module"], 10.0, qualname=_qual(ex)
      ).status
      for ex in examples
      if ex["doctest"]
    ]
    with open(path, "w") as f:
      json.dump({"passed": tested.count("passed"), "n": len(tested)}, f)
  with open(path) as f:
    return json.load(f)


def last_metrics(d: str) -> dict:
  rows = metricslib.read_jsonl(os.path.join(d, "metrics.jsonl"))
  evals = [r for r in rows if "eval_loss" in r]
  return evals[-1] if evals else {}


# ------------------------------------------------------------------ rows


def mean_std(xs) -> tuple[float | None, float | None]:
  xs = [x for x in xs if x is not None and not math.isnan(x)]
  if not xs:
    return None, None
  return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def ft_rows(grid: str, batches: dict[str, int], gen: list[dict] | None, tasks=TASKS) -> list[dict]:
  """One row per finished run of a fine-tuning grid: its point, seed, held-out
  loss per task, end-of-run drift, and (gen) exact match / pass@1."""
  rows = []
  for p, d in runs_of(grid):
    if not done(d):
      continue
    last = last_metrics(d)
    row = {
      "point": sweeplib.point_name(p),
      "experts": p["model.moe.num_experts"],
      "mix": p["data.train_split"].removeprefix("train_"),
      "seed": p.get("train.seed", 0),
      "frozen": p.get("train.frozen", ""),
      "learning_rate": p.get("train.learning_rate"),
      "dir": d,
      **{f"loss_{t}": v for t, v in heldout_losses(d, batches, tasks).items()},
      "curve_end": last.get("eval_loss"),  # the training-time eval: the first batches only
      **{k: v for k, v in last.items() if k.startswith("drift/mean/")},
    }
    if gen is not None:
      row.update(generation_metrics(d, gen))
    rows.append(row)
  return rows


def base_rows(batches: dict[str, int]) -> dict[int, dict[str, float]]:
  """Each base model's held-out losses before any tuning, by number of experts."""
  cfg = cfglib.load_module(SWEEP)
  return {e: heldout_losses(cfg.base_dir(e), batches, dataset=f"sft:{DATA}") for e in (1, 8)}


def flan_rows(rows, bases) -> list[dict]:
  """The FLAN-MoE table: held-out body loss per (base, mix), seeds aggregated;
  mix "none": the base before tuning."""
  out = []
  for e in (1, 8):
    name = "dense" if e == 1 else "MoE E=8"
    out.append(
      {"base": name, "mix": "none", "n": 1, "loss_body_std": None, "exact_match": None}
      | {"pass_at_1": None}
      | {f"loss_{t}": v for t, v in bases[e].items()}
    )
    for mix in ("body", "all"):
      sel = [r for r in rows if r["experts"] == e and r["mix"] == mix]
      m, s = mean_std([r["loss_body"] for r in sel])
      em, _ = mean_std([r.get("exact_match") for r in sel])
      pm, _ = mean_std([r.get("pass_at_1") for r in sel])
      out.append(
        {
          "base": "dense" if e == 1 else "MoE E=8",
          "mix": mix,
          "n": len(sel),
          "loss_body": m,
          "loss_body_std": s,
          "exact_match": em,
          "pass_at_1": pm,
          **{f"loss_{t}": mean_std([r[f"loss_{t}"] for r in sel])[0] for t in TASKS},
        }
      )
  return out


def claims(rows, bases=None, key: str = "loss_body") -> dict:
  """The differences the FLAN-MoE claim is about, paired by seed (the same
  fine-tuning data order; negative = lower loss). bases: each base's untuned
  losses (base_rows), for what tuning itself gives each."""
  by = lambda e, mix: {
    r["seed"]: r[key] for r in rows if r["experts"] == e and r["mix"] == mix and r.get(key)
  }
  runs = {(e, mix): by(e, mix) for e in (1, 8) for mix in ("body", "all")}
  seeds = sorted(set.intersection(*(set(v) for v in runs.values())))
  v = lambda e, mix, s: runs[(e, mix)][s]
  diff = lambda f: (*mean_std([f(s) for s in seeds]), len(seeds))
  out = {}
  if bases:  # tuned minus untuned, MoE's minus dense's
    for mix, name in (("all", "multi"), ("body", "single")):
      out[f"moe_tuning_gain_minus_dense_{name}"] = diff(
        lambda s, mix=mix: (v(8, mix, s) - bases[8]["body"]) - (v(1, mix, s) - bases[1]["body"])
      )
  out["dense_gain"] = diff(lambda s: v(1, "all", s) - v(1, "body", s))  # multi minus single
  out["moe_gain"] = diff(lambda s: v(8, "all", s) - v(8, "body", s))
  out["moe_gain_minus_dense_gain"] = diff(
    lambda s: (v(8, "all", s) - v(8, "body", s)) - (v(1, "all", s) - v(1, "body", s))
  )
  out["moe_minus_dense_single"] = diff(lambda s: v(8, "body", s) - v(1, "body", s))
  out["moe_minus_dense_multi"] = diff(lambda s: v(8, "all", s) - v(1, "all", s))
  return out


def upcycling_rows() -> dict:
  """Eval loss (pretraining validation) against total steps: the dense base
  (continued past the upcycling step), the upcycled MoE, the MoE from scratch."""
  cfg = cfglib.load_module(SWEEP)
  start = cfg.UPCYCLE_AT
  dense, moe = cfg.base_dir(1), cfg.base_dir(8)
  up = [d for _, d in runs_of("upcycle")][0]
  curves = {}
  for name, d, offset in (
    ("dense (continued)", dense, 0),
    ("MoE from scratch", moe, 0),
    ("upcycled from dense", up, start),
  ):
    if os.path.exists(os.path.join(d, "metrics.jsonl")):
      steps, losses = plots.eval_curve(d)
      curves[name] = (steps + offset, losses)
  end = {k: float(v[1][-1]) for k, v in curves.items() if len(v[1])}
  dense_c = curves.get("dense (continued)")
  reach = None
  if dense_c is not None and "upcycled from dense" in curves:
    target = float(dense_c[1][-1])
    s, l = curves["upcycled from dense"]
    hit = [int(x) for x, y in zip(s, l) if y <= target]
    reach = (hit[0] - start) / (int(dense_c[0][-1]) - start) if hit else None
  return {"curves": curves, "end": end, "start": start, "reach_fraction": reach}


def drift_rows(rows) -> list[dict]:
  """Routing drift at the end of each MoE fine-tuning (mean over seeds)."""
  out = []
  for mix in ("body", "all"):
    sel = [r for r in rows if r["experts"] == 8 and r["mix"] == mix and not r["frozen"]]
    if not sel:
      continue
    row = {"mix": mix, "n": len(sel)}
    for k in (
      "kl",
      "kl_prompt",
      "kl_response",
      "top1_changed",
      "top1_changed_prompt",
      "top1_changed_response",
    ):
      row[k] = mean_std([r.get(f"drift/mean/{k}") for r in sel])[0]
    out.append(row)
  return out


# ------------------------------------------------------------------ render


def fmt(x, spec=".4f"):
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def pm(m, s, spec=".4f"):
  return fmt(m, spec) + (f" ± {fmt(s, spec)}" if s else "")


def table(head: list[str], body: list[list]) -> list[str]:
  return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
    "| " + " | ".join(str(x) for x in r) + " |" for r in body
  ]


def _training_eval_batches() -> int:
  return cfglib.load_config(sweep_of("finetune")).train.eval_batches


def _tasks(counts: dict) -> str:
  return ", ".join(f"{t} {counts[t]}" for t in TASKS)


def results_md(data_stats, flan, cl, cl_sub, up, freeze, rate, drift, ref) -> list[str]:
  out = [
    "# Instruction tuning and upcycling: results",
    "",
    "Made by `python experiments/instruction_tuning/report.py`; README.md reads them.",
    "",
  ]
  fn, ex, ov = data_stats["functions"], data_stats["examples"], data_stats["ngram_overlap"]
  out += [
    "## Data",
    "",
    f"{fn['with_docstring']} functions with docstrings; kept {fn['kept']['train']} train / "
    f"{fn['kept']['eval']} held-out (at most {datalib.MAX_CHARS} characters), "
    f"{fn['kept_with_doctest']['eval']} held-out ones with doctests. Examples: train "
    f"{ex['train']['total']} ({_tasks(ex['train'])}), held out {ex['eval']['total']} "
    f"({_tasks(ex['eval'])}). Near-duplicate train functions removed: "
    f"{data_stats['dedup']['near_duplicate_train_functions']}. {ov['n']}-gram overlap of "
    f"held-out bodies with the pretraining text: {ov['body']:.2%} "
    f"({ov['per_task']['body']['overlapping']} of {ov['per_task']['body']['responses']}).",
    "",
  ]
  out += ["## FLAN-MoE: single-task vs multi-task tuning (held-out body loss)", ""]
  out += table(
    ["base", "tuning", "n", "body loss", "docstring", "name", "signature", "exact match", "pass@1"],
    [
      [
        r["base"],
        {"none": "none (base)", "body": "single (body)", "all": "multi (4 tasks)"}[r["mix"]],
        r["n"],
        pm(r["loss_body"], r["loss_body_std"]),
        fmt(r["loss_docstring"]),
        fmt(r["loss_name"]),
        fmt(r["loss_signature"]),
        fmt(r["exact_match"], ".3f"),
        fmt(r["pass_at_1"], ".3f"),
      ]
      for r in flan
    ],
  )
  names = {
    "moe_tuning_gain_minus_dense_multi": "multi-task: MoE's (tuned - base) minus dense's",
    "moe_tuning_gain_minus_dense_single": "single-task: MoE's (tuned - base) minus dense's",
    "dense_gain": "dense: multi minus single",
    "moe_gain": "MoE: multi minus single",
    "moe_gain_minus_dense_gain": "MoE's gain minus dense's gain",
    "moe_minus_dense_single": "MoE minus dense, single-task",
    "moe_minus_dense_multi": "MoE minus dense, multi-task",
  }
  out += ["", "Paired by seed (same fine-tuning data order; negative = lower loss):", ""]
  out += table(
    ["difference", "mean ± std", "seeds"], [[names[k], pm(v[0], v[1]), v[2]] for k, v in cl.items()]
  )
  out += [
    "",
    f"The same on the evaluation run during training ({_training_eval_batches()} batches: the "
    "first part of the held-out body set; ft_curves.png):",
    "",
  ]
  out += table(
    ["difference", "mean ± std", "seeds"],
    [[names[k], pm(v[0], v[1]), v[2]] for k, v in cl_sub.items()],
  )
  out += ["", f"pass@1 of the reference bodies in the sandbox: {ref['passed']} of {ref['n']}.", ""]
  out += ["## Upcycling (pretraining validation loss)", ""]
  out += table(["run", "end loss"], [[k, fmt(v)] for k, v in up["end"].items()])
  if up["reach_fraction"] is not None:
    out += [
      "",
      f"The upcycled MoE reaches the continued dense model's end loss after "
      f"{up['reach_fraction']:.2f} of the extra steps.",
    ]
  out += ["", "## Freezing (MoE base, multi-task tuning; held-out body loss)", ""]
  out += table(
    ["frozen", "n", "body loss", "minus all weights (paired)"],
    [[r["frozen"], r["n"], pm(r["loss"], r["std"]), pm(r["diff"], r["diff_std"])] for r in freeze],
  )
  out += ["", "## Learning rate check (MoE, multi-task)", ""]
  out += table(
    ["rate", "n", "body loss"], [[r["rate"], r["n"], pm(r["loss"], r["std"])] for r in rate]
  )
  out += ["", "## Routing drift at the end of tuning (MoE, mean over layers and seeds)", ""]
  out += table(
    ["tuning", "n", "KL all", "KL prompt", "KL response", "top-1 changed", "prompt", "response"],
    [
      [
        r["mix"],
        r["n"],
        fmt(r["kl"]),
        fmt(r["kl_prompt"]),
        fmt(r["kl_response"]),
        fmt(r["top1_changed"], ".3f"),
        fmt(r["top1_changed_prompt"], ".3f"),
        fmt(r["top1_changed_response"], ".3f"),
      ]
      for r in drift
    ],
  )
  return out


def variant_rows(rows, base_rows, key, values) -> list[dict]:
  """Rows of a side grid by `key` value, against the all-weights MoE multi runs."""
  ref = {r["seed"]: r["loss_body"] for r in base_rows if r["experts"] == 8 and r["mix"] == "all"}
  out = []
  for v in values:
    sel = [r for r in rows if r[key] == v]
    diffs = [r["loss_body"] - ref[r["seed"]] for r in sel if r["seed"] in ref]
    m, s = mean_std([r["loss_body"] for r in sel])
    dm, ds = mean_std(diffs)
    out.append(
      {
        key: v,
        "frozen": v,
        "rate": v,
        "n": len(sel),
        "loss": m,
        "std": s,
        "diff": dm,
        "diff_std": ds,
      }
    )
  return out


def write_plots(rows, up, out_dir):
  seeds = lambda e, mix: [r["dir"] for r in rows if r["experts"] == e and r["mix"] == mix]
  groups = {
    f"{'dense' if e == 1 else 'MoE'} {mix}": seeds(e, mix)
    for e in (1, 8)
    for mix in ("body", "all")
    if seeds(e, mix)
  }
  if groups:
    plots.loss_curves(
      groups,
      os.path.join(out_dir, "ft_curves.png"),
      title="Held-out body loss while instruction tuning (mean of seeds)",
    )
  if up["curves"]:
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (s, l) in up["curves"].items():
      ax.plot(s, l, marker=".", label=name)
    ax.axvline(up["start"], color="gray", linestyle=":", label="upcycling step")
    ax.set_xlabel("total training steps (4,096 tokens each)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    plots._finish(
      fig,
      ax,
      os.path.join(out_dir, "upcycling.png"),  # pylint: disable=protected-access
      "Upcycling vs continued dense training vs MoE from scratch",
    )
  moe = {
    f"MoE {r['mix']} seed {r['seed']}": r["dir"]
    for r in rows
    if r["experts"] == 8 and r["seed"] == 0
  }
  if moe:
    plots.drift_curves(moe, os.path.join(out_dir, "drift.png"))


def report(out_dir: str):
  stats = datalib.prepare(DATA)
  batches = {t: eval_batches_for(t) for t in TASKS}
  gen = generation_set()
  rows = ft_rows("finetune", batches, gen)
  if not rows:
    raise ConfigError(f"no finished fine-tuning run in {workdir_of('finetune')}; use --run")
  freeze = ft_rows("freeze", batches, None, ("body",))
  rate = ft_rows("rate", batches, None, ("body",))
  up = upcycling_rows()
  freeze_t = variant_rows(freeze, rows, "frozen", (":experts", ":router", ":non_experts"))
  rate_t = variant_rows(rate, rows, "learning_rate", sorted({r["learning_rate"] for r in rate}))
  bases = base_rows(batches)
  flan, cl = flan_rows(rows, bases), claims(rows, bases)
  drift = drift_rows(rows)
  ref = reference_pass_rate(gen)
  cl_sub = claims(rows, key="curve_end")
  lines = results_md(stats, flan, cl, cl_sub, up, freeze_t, rate_t, drift, ref)
  write_plots(rows, up, out_dir)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  all_rows = rows + freeze + rate
  keys = list(dict.fromkeys(k for r in all_rows for k in r if k != "pass_statuses"))
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(all_rows)
  payload = {
    "data": stats,
    "eval_batches": batches,
    "flan": flan,
    "claims": cl,
    "claims_training_eval": cl_sub,
    "runs": all_rows,
    "upcycling": {
      "end": up["end"],
      "reach_fraction": up["reach_fraction"],
      "curves": {k: [v[0].tolist(), v[1].tolist()] for k, v in up["curves"].items()},
    },
    "freeze": freeze_t,
    "rate": rate_t,
    "drift": drift,
    "reference_doctests": ref,
  }
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(payload, f, indent=1, default=float)
  print("\n".join(lines))


def calibration(out_dir: str):
  """The calibration grid's curves and table (held-out body eval loss by step)."""
  lines = ["| point | best eval (step) | end eval | tokens/s |", "|---|---|---|---|"]
  for p, d in runs_of("calib"):
    if not os.path.exists(os.path.join(d, "metrics.jsonl")):
      continue
    steps, losses = plots.eval_curve(d)
    s = sweeplib.summarize_point(d)
    i = int(np.argmin(losses))
    lines.append(
      f"| {sweeplib.point_name(p)} | {losses[i]:.4f} ({steps[i]}) | {losses[-1]:.4f} | "
      f"{s['tokens_per_s']:,.0f} |"
    )
  plots.loss_curves(
    {
      sweeplib.point_name(p): [d]
      for p, d in runs_of("calib")
      if os.path.exists(os.path.join(d, "metrics.jsonl"))
    },
    os.path.join(out_dir, "calibration.png"),
    title="Calibration: held-out body loss",
  )
  with open(os.path.join(out_dir, "calibration.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def _legacy(a) -> None:
  """The study before issue 29's parts: FLAN-MoE, the superseded upcycling
  grid (:upcycle; see the "upcycling" part), freezing, the rate check."""
  grids = ("base", "calib") if a.calib else GRIDS
  if a.run:
    failed = []
    for g in grids:
      failed += sweeplib.run_all(sweep_of(g), workdir_of(g), a.parallel)
    if failed:
      sys.exit(f"report.py: {len(failed)} point(s) failed ({', '.join(failed)}); rerun")
  calibration(a.out) if a.calib else report(a.out)


def _upcycling(a) -> None:
  """Sparse upcycling as the paper compares it (experiments/instruction_tuning/upcycling.py)."""
  from experiments.instruction_tuning import upcycling  # pylint: disable=g-import-not-at-top

  if a.run:
    failed = upcycling.run(a.parallel)
    if failed:
      sys.exit(f"report.py: {len(failed)} point(s) failed ({', '.join(failed)}); rerun")
  print("\n".join(upcycling.report(a.out)))


def _flan(a) -> None:
  """FLAN-MoE as a held-out-task comparison (experiments/instruction_tuning/flan.py)."""
  from experiments.instruction_tuning import flan  # pylint: disable=g-import-not-at-top

  datalib.prepare(DATA)
  if a.run:
    failed = flan.run(a.parallel)
    if failed:
      sys.exit(f"report.py: {len(failed)} point(s) failed ({', '.join(failed)}); rerun")
  flan.report(a.out, None, False)


# ST-MoE's fine-tuning claims (Zoph et al. 2022, section 4.2) on the legacy
# :freeze grid: (frozen, claim, paper's setting, the sign the claim expects
# of frozen - all weights: 0 = no difference claimed).
FREEZE_CLAIMS = (
  (
    ":experts",
    "ST-MoE: tuning only the non-expert weights is about as good as tuning all",
    "ST-MoE (Zoph et al. 2022, section 4): about as good as all weights",
    0,
  ),
  (
    ":non_experts",
    "ST-MoE: tuning only the experts (non-experts frozen) is worse than tuning all",
    "ST-MoE (section 4): freezing the non-expert weights hurts",
    1,
  ),
  (":router", "(ours) freezing the router costs nothing", "-", 0),
)


def freeze_claims(out_dir: str) -> list[dict]:
  """The :freeze grid's claims: frozen - all weights on the held-out body
  loss, paired by fine-tuning seed (results.csv; one base model, so the
  interval carries fine-tuning-seed variance only)."""
  from experiments.instruction_tuning import upcycling  # pylint: disable=g-import-not-at-top

  with open(os.path.join(out_dir, "results.csv")) as f:
    rows = [r for r in csv.DictReader(f) if r["experts"] == "8" and r["mix"] == "all"]
  ref = {
    r["seed"]: float(r["loss_body"]) for r in rows if not r["frozen"] and not r["learning_rate"]
  }
  out = []
  for frozen, claim, paper, direction in FREEZE_CLAIMS:
    xs = [float(r["loss_body"]) - ref[r["seed"]] for r in rows if r["frozen"] == frozen]
    iv = upcycling.interval(xs)
    v = upcycling.verdict(iv, direction)
    if direction == 0:  # a claim of no difference: refuted only by an interval off zero
      v = "does not hold" if v == "difference" else "inconclusive (no difference seen)"
    ours = f"MoE multi-task tuning, {frozen[1:]} frozen - all weights, body loss, {len(xs)} seeds"
    out.append(
      {"claim": claim, "paper": paper, "ours": ours, "mean": iv["mean"], "lo": iv["lo"]}
      | {"hi": iv["hi"], "verdict": v, "interval": "t, fine-tuning seeds (one base)"}
    )
  return out


def claims_part(a) -> None:
  """One table of the study's claims against the papers, from the committed
  parts' results (no run): upcycling_results.json, flan_results.json and
  the legacy grid's results.csv (freezing); writes claims.md."""
  out_dir, rows = a.out, []
  path = os.path.join(out_dir, "upcycling_results.json")
  if os.path.exists(path):
    from experiments.instruction_tuning import upcycling  # pylint: disable=g-import-not-at-top

    with open(path) as f:
      up = json.load(f)
    steps = up["design"]["parent_steps"]
    for r in up["claims"]:
      if r["a"] == "top1" and r["b"] == "top2":
        continue
      rows.append(
        {
          "claim": "Sparse upcycling: " + r["claim"],
          "paper": upcycling.PAPER[(r["a"], r["b"])],
          "ours": f"+{r['extra']:.0%} extra compute, {steps}-step parent, {r['n']} seeds",
          "interval": "t, parent seeds",
        }
        | {k: r[k] for k in ("mean", "lo", "hi", "verdict")}
      )
  path = os.path.join(out_dir, "flan_results.json")
  if os.path.exists(path):
    from experiments.instruction_tuning import flan  # pylint: disable=g-import-not-at-top

    with open(path) as f:
      res = json.load(f)["results"]
    same = all(
      d["verdict"] == res[key.replace("/all", "/unflagged")]["did"][name]["verdict"]
      for key in res
      if key.endswith("/all")
      for name, d in res[key]["did"].items()
    )
    flan_note = (
      "FLAN-MoE rows: every held-out test function; without the functions flagged as "
      "possibly contaminated every verdict is "
      + ("the same" if same else "not the same (flan_results.md)")
      + "."
    )
    for key, r in res.items():
      metric, subset = key.split("/")
      if subset != "all":
        continue
      for name, d in r["did"].items():
        rows.append(
          {
            "claim": "FLAN-MoE: the MoE gains more from instruction tuning than dense",
            "paper": flan.PAPER,
            "ours": f"{flan.DID_LABELS[name]}; {flan.METRICS[metric][0]}; {r['n']} held-out "
            f"test functions of {r['modules']} modules; 3 base seeds",
            "interval": "bootstrap, modules x base seeds",
          }
          | {k: d[k] for k in ("mean", "lo", "hi", "verdict")}
        )
  else:
    flan_note = ""
    rows.append(
      {"claim": "FLAN-MoE: the MoE gains more from instruction tuning than dense"}
      | {"paper": "-", "ours": "not yet run (--part flan)", "interval": "-", "verdict": "-"}
      | {"mean": None, "lo": None, "hi": None}
    )
  rows += freeze_claims(out_dir)
  f4 = lambda x: "-" if x is None else f"{x:+.4f}"
  lines = [
    "# Instruction tuning and upcycling: the claims against the papers",
    "",
    "Made by `python experiments/instruction_tuning/report.py --part claims` from the",
    "committed parts (upcycling_results.json, flan_results.json, results.csv). Each",
    "row's difference is the one its 'ours' column names, with its 95 % interval; the",
    "verdict reads the sign the claim predicts (a lower loss, a higher accuracy). A",
    "claim holds or does not only when its interval excludes zero; otherwise it is",
    "inconclusive (a claim of no difference: refuted only by an interval off zero).",
    "",
  ]
  lines += table(
    ["claim", "paper's setting", "ours", "mean", "95 % interval", "interval over", "verdict"],
    [
      [
        r["claim"],
        r["paper"],
        r["ours"],
        f4(r["mean"]),
        "-" if r["lo"] is None else f"[{f4(r['lo'])}, {f4(r['hi'])}]",
        r["interval"],
        r["verdict"],
      ]
      for r in rows
    ],
  )
  lines += ["", flan_note] if flan_note else []
  with open(os.path.join(out_dir, "claims.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, "claims.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("\n".join(lines))


# --part NAME: each part runs (--run) and reports on its own, and writes its
# own files into --out; a part finishes inside one working session. "claims"
# runs nothing: it combines the committed parts' results into one table.
PARTS = {"legacy": _legacy, "upcycling": _upcycling, "flan": _flan, "claims": claims_part}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run", action="store_true", help="run (or resume) the sweeps first")
  ap.add_argument("--calib", action="store_true", help="the calibration grid instead (legacy)")
  ap.add_argument("--part", default="legacy", choices=list(PARTS), help="which part of the study")
  ap.add_argument("--parallel", type=int, default=2, help="points at a time (--run)")
  ap.add_argument("--out", default=HERE, help="where the report goes (default: this folder)")
  a = ap.parse_args()
  os.chdir(ROOT)
  try:
    if a.part == "legacy":
      datalib.prepare(DATA)
    PARTS[a.part](a)
  except ConfigError as e:
    sys.exit(f"report.py: {e}")


if __name__ == "__main__":
  main()
