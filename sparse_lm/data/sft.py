"""Instruction data: (prompt, response) examples from JSONL, packed with segment ids.

`data.dataset = "sft:<file.jsonl>"`: one JSON object per line with a `prompt`
and a `response` string (other fields are kept for the record, not used).
"sft:<dir>": the split's file <dir>/<split>.jsonl. "sft:stdlib": the
instruction tasks of the embedded corpus (data/stdlib_tasks.py: body from
signature + docstring, docstring, name, signature; training modules /
held-out modules as train / validation), built on first use into the data
dir with examples of at most 2 x data.seq_len characters.
Each example becomes
    the tokenizer's leading special tokens (prefix_ids: a <s>)
    + tokens(data.sft_template up to "{response}", with the prompt)
    + tokens(response) + [end-of-text]
(the middle two without the tokenizer's special tokens: one that also puts an
</s> after every text puts none inside an example)
and the loss counts the response and end-of-text tokens only (the prompt's
targets get weight 0). Examples are packed in order into rows of seq_len + 1
tokens, a new row when the next one does not fit (no example is split across
rows): each row carries segment ids (1, 2, ... per example, 0 on the padding
at its end) and positions that restart at 0 per example, so attention never
crosses examples (layers.Attention) and a packed example computes exactly as
it would alone. An example longer than seq_len + 1 tokens is truncated
(data.sft_overlong = "truncate"; it is dropped if no response token is left)
or refused ("refuse": a one-line error naming the file and line); both are
counted in the fingerprint.

`data.dataset = "chat:<file.jsonl>"` (or "chat:<dir>"): conversations, one
{"messages": [...]} per line, rendered by the tokenizer's chat template with
the loss on the assistant turns (sparse_lm/data/chat.py); packed, split,
truncated and batched as above.

Splits: data.train_split "train" is every line not held out; data.eval_split
"validation" is the ~5% of lines whose crc32 % 100 < 5 (stable under
appending lines), or, when it ends in ".jsonl", another file. Each epoch
visits the training examples in a fresh order drawn from (train.seed, epoch);
the batches do not depend on the process count (each process takes its rows
[p B/P, (p+1) B/P) of every global batch), and the position is a count of
batches, so a run resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import numpy as np

from sparse_lm.data import chat
from sparse_lm.errors import ConfigError

VALIDATION_PERCENT = 5
OVERLONG = ("truncate", "refuse")


def _fail(key, value, why):
  raise ConfigError(f"config.{key}={value!r} is invalid: {why}")


def kind_of(dataset: str) -> str:
  """ "sft" or "chat": the data.dataset prefix of instruction data."""
  return dataset.partition(":")[0]


def _label(kind: str) -> str:
  return "data.dataset chat:" if kind == "chat" else "sft data"


def read_split(path: str, split: str, label: str, what: str, check) -> list[tuple[int, dict]]:
  """(line number, example) of `split` ("train", "validation", or a .jsonl
  path) of a JSONL file or directory: a line is held out for validation by the
  CRC32 of its text (VALIDATION_PERCENT). `check(example)` returns why a line
  is bad or None; bad lines are one-line errors naming file:line. `label`
  names the data in errors, `what` the dataset kind in data.eval_split's."""
  if split.endswith(".jsonl"):
    path, split = os.path.expanduser(split), "all"
  elif os.path.isdir(path):
    path, split = os.path.join(path, f"{split}.jsonl"), "all"
  elif split not in ("train", "validation"):
    _fail("data.eval_split", split, f"{what} has splits 'train', 'validation' or a .jsonl")
  if not os.path.isfile(path):
    raise ConfigError(f"{label} {path}: no such file")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      held = zlib.crc32(line.strip().encode()) % 100 < VALIDATION_PERCENT
      if split != "all" and held != (split == "validation"):
        continue
      try:
        ex = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{label} {path}:{n}: not JSON ({e.msg})") from None
      why = check(ex)
      if why:
        raise ConfigError(f"{label} {path}:{n}: {why}")
      out.append((n, ex))
  if not out:
    raise ConfigError(f"{label} {path}: no examples in split {split!r}")
  return out


def string_fields(ex, fields) -> str | None:
  """Why `ex` is not an object with these string fields, or None."""
  for field in fields:
    if not isinstance(ex, dict) or not isinstance(ex.get(field), str):
      return f"no string field {field!r}"
  return None


def _check_sft(ex) -> str | None:
  why = string_fields(ex, ("prompt", "response"))
  if not why and not ex["response"].strip():
    why = "the response is empty"
  return why


def read_examples(path: str, split: str, kind: str = "sft") -> list[tuple[int, dict]]:
  """(line number, example) of `split` of the JSONL file or directory
  (read_split); kind "chat": examples hold a "messages" list."""
  check = chat.check_messages if kind == "chat" else _check_sft
  return read_split(path, split, _label(kind), f"an {kind}: dataset", check)


def check_template(template: str):
  if "{prompt}" not in template or not template.endswith("{response}"):
    _fail(
      "data.sft_template",
      template,
      "must contain {prompt} and end with {response} (the loss starts where the response does)",
    )


def _tokens(ex, tok, data_cfg, prefix: str | None, path: str, n: int):
  """(tokens, loss mask) of one example: the template's prompt part (with the
  tokenizer's own leading specials), then the response and end-of-text; or a
  rendered conversation and its assistant tokens."""
  if prefix is None:
    try:
      toks, mask = chat.encode(tok, ex["messages"])
    except chat.TemplateError as e:
      raise ConfigError(f"{_label('chat')} {path}:{n}: {e}") from None
    return np.asarray(toks, np.int32), np.asarray(mask, bool)
  p = list(tok.prefix_ids) + tok.encode(prefix.replace("{prompt}", ex["prompt"]), False)
  r = tok.encode(ex["response"], False) + [tok.eos_id]
  loss = np.concatenate([np.zeros(len(p), bool), np.ones(len(r), bool)])
  return np.asarray(p + r, np.int32), loss


def encode(examples, tok, data_cfg, path: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
  """[(tokens, loss mask)] per kept example, and the counts (examples,
  truncated, dropped, tokens, response tokens)."""
  kind = kind_of(data_cfg.dataset)
  if kind == "chat":
    chat.template_of(tok, data_cfg.dataset)
    prefix = None
  else:
    check_template(data_cfg.sft_template)
    prefix = data_cfg.sft_template[: -len("{response}")]
  limit = data_cfg.seq_len + 1
  out, counts = [], {"examples": 0, "truncated": 0, "dropped": 0, "tokens": 0, "response_tokens": 0}
  for n, ex in examples:
    toks, loss = _tokens(ex, tok, data_cfg, prefix, path, n)
    if len(toks) > limit:
      if data_cfg.sft_overlong == "refuse":
        raise ConfigError(
          f"{_label(kind)} {path}:{n}: {len(toks)} tokens, more than data.seq_len + 1 = {limit} "
          "(data.sft_overlong='truncate' cuts such examples)"
        )
      toks, loss = toks[:limit], loss[:limit]
      counts["truncated"] += 1
      if not loss[1:].any():  # no response target left
        counts["dropped"] += 1
        continue
    out.append((toks, loss))
    counts["examples"] += 1
    counts["tokens"] += len(toks)
    counts["response_tokens"] += int(loss.sum())
  if not out:
    raise ConfigError(f"{_label(kind)} {path}: every example is longer than data.seq_len allows")
  return out, counts


def pack(encoded, order, seq_len: int) -> dict[str, np.ndarray]:
  """Packs examples (in `order`) into rows of seq_len + 1 tokens. Returns
  tokens, segment ids, positions and loss masks [R, seq_len + 1]."""
  n = seq_len + 1
  rows: list[list[int]] = []
  used = n  # start a row at the first example
  for i in order:
    k = len(encoded[i][0])
    if used + k > n:
      rows.append([])
      used = 0
    rows[-1].append(i)
    used += k
  R = len(rows)
  out = {k: np.zeros((R, n), np.int32) for k in ("tokens", "segments", "positions")}
  out["loss"] = np.zeros((R, n), bool)
  for r, idx in enumerate(rows):
    at = 0
    for s, i in enumerate(idx, 1):
      toks, loss = encoded[i]
      sl = slice(at, at + len(toks))
      out["tokens"][r, sl], out["loss"][r, sl] = toks, loss
      out["segments"][r, sl], out["positions"][r, sl] = s, np.arange(len(toks))
      at += len(toks)
  return out


def to_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Model inputs and targets of packed rows [B, L + 1] -> [B, L] each. A
  target is weighted when it is a response token of the same example as its
  input (never across examples, never on padding). "mask": the real tokens;
  "response_mask": the inputs that are response tokens (routing drift)."""
  seg = rows["segments"]
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  return {
    "inputs": rows["tokens"][:, :-1],
    "targets": rows["tokens"][:, 1:],
    "weights": (rows["loss"][:, 1:] & same).astype(np.float32),
    "mask": (seg[:, :-1] > 0).astype(np.float32),
    "segment_ids": seg[:, :-1],
    "positions": rows["positions"][:, :-1],
    "response_mask": (rows["loss"][:, :-1] & (seg[:, :-1] > 0)).astype(np.float32),
  }


def _fingerprint(path, split, counts, tok, kind) -> dict:
  if os.path.isdir(path):
    path = os.path.join(path, f"{split}.jsonl")
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:16]
  return {
    "dataset": f"{kind}:{path}",
    "sha256": digest,
    "split": split,
    **counts,
    "tokenizer": tok.fingerprint,
  }


class SftInput:
  """An infinite, deterministic, resumable stream of packed instruction batches
  (the same interface as pipeline.Input: next(), get_state, set_state)."""

  def __init__(self, data_cfg, tok, path, *, seed: int, process_index: int, process_count: int):
    self.path, self._kind = path, kind_of(data_cfg.dataset)
    self.tokenizer, self.vocab_size = tok, tok.vocab_size
    examples = read_examples(self.path, data_cfg.train_split, self._kind)
    self._encoded, counts = encode(examples, tok, data_cfg, self.path)
    self.fingerprint = _fingerprint(self.path, data_cfg.train_split, counts, tok, self._kind)
    B = data_cfg.batch_size
    if B % process_count:
      _fail("data.batch_size", B, f"must be divisible by the process count {process_count}")
    self._B, self._L, self._seed = B, data_cfg.seq_len, seed
    self._rows_of = slice(
      process_index * B // process_count, (process_index + 1) * B // process_count
    )
    self._batches = 0
    self._epoch, self._rows, self._at = -1, None, 0

  def _next_epoch(self):
    self._epoch += 1
    order = np.random.default_rng([self._seed, self._epoch]).permutation(len(self._encoded))
    self._rows, self._at = pack(self._encoded, order, self._L), 0

  def _take(self, n: int) -> dict[str, np.ndarray]:
    parts = []
    while n:
      if self._rows is None or self._at == len(self._rows["tokens"]):
        self._next_epoch()
      k = min(n, len(self._rows["tokens"]) - self._at)
      parts.append({key: v[self._at : self._at + k] for key, v in self._rows.items()})
      self._at, n = self._at + k, n - k
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self._take(self._B)
    self._batches += 1
    return {k: v[self._rows_of] for k, v in to_batch(rows).items()}

  def close(self):
    pass

  def get_state(self) -> dict:
    return {"batches": self._batches, "seed": self._seed, "dataset": f"{self._kind}:{self.path}"}

  def set_state(self, state: dict) -> None:
    """Continues exactly after `state`'s position (re-packs the epochs before it)."""
    if state.get("seed", self._seed) != self._seed:
      raise ValueError(f"input state is for seed {state['seed']}, this input has {self._seed}")
    self._epoch, self._rows, self._at, self._batches = -1, None, 0, 0
    for _ in range(int(state["batches"])):
      self._take(self._B)
      self._batches += 1


def eval_batches(data_cfg, tok, path, num_batches: int, *, process_index: int, process_count: int):
  """The first num_batches batches of the eval split, in file order, packed
  (repeated if short)."""
  examples = read_examples(path, data_cfg.eval_split, kind_of(data_cfg.dataset))
  enc, _ = encode(examples, tok, data_cfg, path)
  rows = pack(enc, range(len(enc)), data_cfg.seq_len)
  B = data_cfg.batch_size
  need = num_batches * B
  idx = np.arange(need) % len(rows["tokens"])
  batch = to_batch({k: v[idx] for k, v in rows.items()})
  lo, hi = process_index * B // process_count, (process_index + 1) * B // process_count
  return [{k: v[b * B + lo : b * B + hi] for k, v in batch.items()} for b in range(num_batches)]
