"""The study's instruction data: the stdlib tasks (sparse_lm/data/stdlib_tasks.py,
prepare_sft: an instruction line per task) at MAX_CHARS, plus the files the
sweeps read:

  train.jsonl / validation.jsonl   every task, training / held-out modules
  train_all.jsonl                  = train.jsonl (multi-task tuning)
  train_body.jsonl                 the body task alone (single-task tuning)
  eval_<task>.jsonl                each task on the held-out modules
  stats.json                       counts, dedup removals, n-gram overlap

Examples are capped at MAX_CHARS characters of prompt + response: a 256-token
training row holds one or two.
"""

from __future__ import annotations

import json
import os
import shutil

from sparse_lm.data import stdlib_tasks

MAX_CHARS = 600


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
  return stats
