"""The study's instruction data: the stdlib tasks (sparse_lm/data/stdlib_tasks.py,
prepare_sft: an instruction line per task) at MAX_CHARS, plus the files the
sweeps read:

  train.jsonl / validation.jsonl   every task, training / held-out modules
  train_all.jsonl                  = train.jsonl (multi-task tuning)
  train_body.jsonl                 the body task alone (single-task tuning)
  train_it.jsonl                   docstring, name and signature (FLAN-MoE's
                                   instruction tuning: the body task held out)
  eval_<task>.jsonl                each task on the held-out modules
  eval_<task>_dev.jsonl            ... of the dev modules (choosing rates and
  eval_<task>_test.jsonl           horizons) / the test modules (reported),
                                   stdlib_tasks.heldout_part; each example of the
                                   body and docstring tasks carries its
                                   contamination flags, every example "flagged"
                                   (its function's body or docstring is)
  choices_dev.jsonl / choices_test.jsonl   multiple-choice items (name among 4,
                                   body among 3: stdlib_tasks.choice_items),
                                   with "flagged" likewise
  contamination.json               the per-example flags and their counts
  stats.json                       counts, dedup removals, n-gram overlap

Examples are capped at MAX_CHARS characters of prompt + response: a 256-token
training row holds one or two.
"""

from __future__ import annotations

import json
import os
import shutil

from sparse_lm.data import stdlib_corpus
from sparse_lm.data import stdlib_tasks

MAX_CHARS = 600
IT_TASKS = ("docstring", "name", "signature")  # the body task stays held out
PARTS = ("dev", "test")


def _read(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _write(path: str, rows: list[dict]):
  with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  os.replace(path + ".tmp", path)


def prepare(out: str) -> dict:
  """Writes the files into `out` once and returns the stats."""
  stats = stdlib_tasks.prepare_sft(out, MAX_CHARS)
  if not os.path.exists(os.path.join(out, "train_body.jsonl")):
    shutil.copyfile(os.path.join(out, "train.jsonl"), os.path.join(out, "train_all.jsonl"))
    with open(os.path.join(out, "train.jsonl"), encoding="utf-8") as f:
      body = [line for line in f if json.loads(line)["task"] == "body"]
    with open(os.path.join(out, "train_body.jsonl.tmp"), "w", encoding="utf-8") as f:
      f.writelines(body)
    os.replace(os.path.join(out, "train_body.jsonl.tmp"), os.path.join(out, "train_body.jsonl"))
  prepare_flan(out)
  return stats


def pretraining_sources() -> list[str]:
  """The pretraining text: the corpus train files without the held-out modules
  (what the bases read: data.exclude)."""
  root = stdlib_corpus.stdlib_dir()
  files = stdlib_corpus.list_files(root)
  return [
    stdlib_corpus.read_source(os.path.join(root, p))
    for p in files["train"]
    if stdlib_tasks.module_split(p) == "train"
  ]


def prepare_flan(out: str) -> dict:
  """The FLAN-MoE files (train_it, dev / test evals, choices, contamination)
  once; returns contamination.json's counts and the parts' sizes."""
  path = os.path.join(out, "contamination.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)["summary"]
  train = _read(os.path.join(out, "train.jsonl"))
  _write(os.path.join(out, "train_it.jsonl"), [e for e in train if e["task"] in IT_TASKS])
  held = _read(os.path.join(out, "validation.jsonl"))
  flags, counts = stdlib_tasks.contamination(held, pretraining_sources())
  key = lambda e: (e["module"], e["function"], e["task"])
  by = {key(f): f for f in flags}
  bad_fns = {(f["module"], f["function"]) for f in flags if f["flagged"]}
  for e in held:
    f = by.get(key(e), {})
    e.update({k: f[k] for k in ("ngram", "near_duplicate", "ratio") if k in f})
    e["flagged"] = (e["module"], e["function"]) in bad_fns
  items = stdlib_tasks.choice_items(held)
  for it in items:
    it["flagged"] = (it["module"], it["function"]) in bad_fns
  sizes = {}
  for part in PARTS:
    mine = [e for e in held if stdlib_tasks.heldout_part(e["module"]) == part]
    for task in stdlib_tasks.TASKS:
      _write(os.path.join(out, f"eval_{task}_{part}.jsonl"), [e for e in mine if e["task"] == task])
    ch = [it for it in items if stdlib_tasks.heldout_part(it["module"]) == part]
    _write(os.path.join(out, f"choices_{part}.jsonl"), ch)
    sizes[part] = {
      "modules": len({e["module"] for e in mine}),
      "examples": {t: sum(e["task"] == t for e in mine) for t in stdlib_tasks.TASKS},
      "flagged_functions": len({(e["module"], e["function"]) for e in mine if e["flagged"]}),
      "choices": {t: sum(it["task"] == t for it in ch) for t in stdlib_tasks.CHOICES},
      "choices_flagged": sum(it["flagged"] for it in ch),
    }
  summary = {"contamination": counts, "flagged_functions": len(bad_fns), "parts": sizes}
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"summary": summary, "flags": flags}, f, indent=1)
  os.replace(path + ".tmp", path)
  return summary


def examples(out: str, task: str, part: str) -> list[dict]:
  """The held-out examples of a task in one part ("dev" / "test"), with flags."""
  return _read(os.path.join(out, f"eval_{task}_{part}.jsonl"))


def choices(out: str, part: str) -> list[dict]:
  """The multiple-choice items of one part, with flags."""
  return _read(os.path.join(out, f"choices_{part}.jsonl"))
