"""Encoder-decoder data: seq2seq pairs and T5 span corruption, packed as T5X does.

`data.objective` picks what a run trains on ("lm", the default, is the
decoder-only pipeline of pipeline.py, unchanged):

  "seq2seq"          data.dataset = "seq2seq:<file.jsonl>" (or a directory of
                     <split>.jsonl files): one {"source", "target"[, "src_lang",
                     "tgt_lang"]} per line; or "seq2seq:translation" (the
                     message-catalogue translation task, translation.py).
                     Splits as sft.py's: "validation" is the ~5% of lines
                     whose crc32 % 100 < 5, or another .jsonl file.
  "span_corruption"  any text dataset of pipeline.py ("stdlib", "files:",
                     TFDS): T5's span corruption (span_corruption.py) of
                     chunks of the concatenated token stream.

Batches carry T5X's feature names, [B, Le] for the encoder and [B, Ld] for
the decoder (Le = data.seq_len; Ld = data.targets_len, or for span corruption
T5's random_spans_helper(seq_len) targets length):
  encoder_input_tokens, encoder_segment_ids, encoder_positions,
  decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
  decoder_positions, decoder_loss_weights.
Examples are packed in order, a new row when the next one does not fit the
encoder or the decoder row (T5X packs the same way, per feature): example k
of a row has segment id k (1, 2, ...) in both stacks, 0 is padding, and
positions restart at 0 per example. `attention_masks` gives the masks a model
must apply (encoder self-attention and cross-attention: same segment;
decoder: same segment and causal), so no token attends across examples.
decoder_input_tokens is decoder_target_tokens shifted right within each
segment behind a decoder start token (seqio's make_autoregressive_inputs with
sequence ids).

Language tokens (NLLB-200, transformers' NllbTokenizer with its default
legacy_behaviour=False): the source is [src_lang] source </s>; the decoder
starts with </s> (NLLB's decoder_start_token_id is its eos) and its first
target is [tgt_lang], then target </s>. Deviation: the [tgt_lang] target has
loss weight 0 (decoding forces it, as NLLB's forced_bos_token_id does, so
the loss measures the translation only). A language's id is the tokenizer's
token of that name when it has one (a Hugging Face tokenizer.json with
NLLB's codes); otherwise the languages of the dataset, sorted, take ids
reserved above the tokenizer's (tok.vocab_size + i), and the input's
vocab_size (the model's vocabulary) grows by them. Span corruption's
sentinels likewise: T5's <extra_id_k> tokens when the tokenizer has them,
else 100 ids reserved above the tokenizer's, the last of the model's
vocabulary (T5's 32,000 + 100 layout; `sentinel_top`).
Pairs without languages get T5's layout: source </s>, decoder start = the
pad id 0.

Overlong examples are truncated to the row (the encoder keeps its first
Le - 1 tokens and </s>; the decoder its first Ld targets) and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import ml_collections
import numpy as np

from sparse_lm.data import sft
from sparse_lm.data import span_corruption
from sparse_lm.errors import ConfigError

OBJECTIVES = ("lm", "span_corruption", "seq2seq")
PREFIX = "seq2seq:"
EXTRA_IDS = 100  # T5's sentinels
ENCODER_FEATURES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")
DECODER_FEATURES = (
  "decoder_input_tokens",
  "decoder_target_tokens",
  "decoder_segment_ids",
  "decoder_positions",
  "decoder_loss_weights",
)


def _fail(key, value, why):
  raise ConfigError(f"config.{key}={value!r} is invalid: {why}")


@dataclasses.dataclass
class Example:
  """One encoder-decoder example before packing."""

  encoder: np.ndarray  # int32 [n]
  targets: np.ndarray  # int32 [m]: the decoder's targets
  weights: np.ndarray  # float32 [m]
  decoder_start: int


def lengths(data_cfg) -> tuple[int, int]:
  """(encoder row length, decoder row length) of data_cfg's objective."""
  if data_cfg.objective == "span_corruption":
    return data_cfg.seq_len, span_corruption.random_spans_helper(
      data_cfg.seq_len, data_cfg.noise_density, data_cfg.mean_noise_span_length
    )[1]
  return data_cfg.seq_len, data_cfg.targets_len or data_cfg.seq_len


# ------------------------------------------------------------------ packing


def pack(examples: list[Example], order, enc_len: int, dec_len: int) -> dict[str, np.ndarray]:
  """Packs examples (in `order`, each already within the lengths) into rows:
  the T5X features [R, enc_len] and [R, dec_len]."""
  rows: list[list[int]] = []
  used_e = used_d = None
  for i in order:
    ne, nd = len(examples[i].encoder), len(examples[i].targets)
    if used_e is None or used_e + ne > enc_len or used_d + nd > dec_len:
      rows.append([])
      used_e = used_d = 0
    rows[-1].append(i)
    used_e, used_d = used_e + ne, used_d + nd
  R = len(rows)
  out = {k: np.zeros((R, enc_len), np.int32) for k in ENCODER_FEATURES}
  out.update({k: np.zeros((R, dec_len), np.int32) for k in DECODER_FEATURES})
  out["decoder_loss_weights"] = np.zeros((R, dec_len), np.float32)
  for r, idx in enumerate(rows):
    at_e = at_d = 0
    for s, i in enumerate(idx, 1):
      ex = examples[i]
      e, d = slice(at_e, at_e + len(ex.encoder)), slice(at_d, at_d + len(ex.targets))
      out["encoder_input_tokens"][r, e] = ex.encoder
      out["encoder_segment_ids"][r, e] = s
      out["encoder_positions"][r, e] = np.arange(len(ex.encoder))
      out["decoder_target_tokens"][r, d] = ex.targets
      out["decoder_input_tokens"][r, d] = np.concatenate([[ex.decoder_start], ex.targets[:-1]])
      out["decoder_segment_ids"][r, d] = s
      out["decoder_positions"][r, d] = np.arange(len(ex.targets))
      out["decoder_loss_weights"][r, d] = ex.weights
      at_e, at_d = e.stop, d.stop
  return out


def attention_masks(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """bool masks [B, q, k] an encoder-decoder must apply to packed batches:
  encoder self-attention and cross-attention within a segment, decoder
  self-attention within a segment and causal; padding attends nowhere."""
  es, ds = batch["encoder_segment_ids"], batch["decoder_segment_ids"]

  def same(q, k):
    return (q[:, :, None] == k[:, None, :]) & (q[:, :, None] > 0)

  Ld = ds.shape[1]
  causal = np.tril(np.ones((Ld, Ld), bool))[None]
  return {"encoder": same(es, es), "decoder": same(ds, ds) & causal, "cross": same(ds, es)}


# ------------------------------------------------------------------ seq2seq pairs


def _own_ids(tok, names) -> list[int] | None:
  """The ids of a Hugging Face tokenizer's own tokens of these names, if it has all."""
  inner = getattr(tok, "_tok", None)  # a tokenizers.Tokenizer
  ids = [inner.token_to_id(n) for n in names] if inner is not None and names else None
  return ids if ids is not None and None not in ids else None


def language_ids(tok, languages) -> dict[str, int]:
  """{language: token id}: the tokenizer's own tokens of those names, else
  ids reserved above the tokenizer's, tok.vocab_size + i for the i-th of the
  sorted languages (module docstring)."""
  langs = sorted(languages)
  own = _own_ids(tok, langs)
  return dict(zip(langs, own or range(tok.vocab_size, tok.vocab_size + len(langs))))


# NLLB-200's language codes (FLORES-200: ISO 639-3 and ISO 15924 script, eng_Latn).
LANGUAGE_CODE = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}")


def tokenizer_languages(tok) -> dict[str, int]:
  """{code: id} of a Hugging Face tokenizer's own NLLB language tokens: its
  added tokens named like FLORES-200 codes (eng_Latn, ...), as NLLB's
  released tokenizer.json adds all 202 after its pieces; {} for another
  tokenizer. An imported NLLB-MoE's languages (convert/importer.py)."""
  inner = getattr(tok, "_tok", None)
  if inner is None:
    return {}
  added = inner.get_added_tokens_decoder()
  return {t.content: int(i) for i, t in sorted(added.items()) if LANGUAGE_CODE.fullmatch(t.content)}


def sentinel_top(tok) -> tuple[int, int]:
  """(top, model vocab): sentinel k is id top - 1 - k. T5's layout: a
  tokenizer with T5's <extra_id_k> tokens uses them (<extra_id_0> = top - 1);
  otherwise EXTRA_IDS ids are reserved above the tokenizer's (T5: 32,000
  pieces + 100 extra ids, sentinels 32,099 down), the model's vocabulary
  grows by them, and sentinels are its last ids, as in T5."""
  own = _own_ids(tok, [f"<extra_id_{k}>" for k in range(EXTRA_IDS)])
  if own and own == list(range(own[0], own[0] - EXTRA_IDS, -1)):
    return own[0] + 1, tok.vocab_size
  return tok.vocab_size + EXTRA_IDS, tok.vocab_size + EXTRA_IDS


def _check_pair(ex) -> str | None:
  why = sft.string_fields(ex, ("source", "target"))
  if not why and ("src_lang" in ex) != ("tgt_lang" in ex):
    why = "src_lang and tgt_lang go together"
  return why


def read_jsonl(path: str, split: str) -> list[dict]:
  """The pairs of `split` ("train", "validation", or a .jsonl path) of a
  seq2seq JSONL file or directory (sft.read_split: the same held-out rule and
  file:line errors)."""
  rows = sft.read_split(path, split, "seq2seq data", "a seq2seq: file", _check_pair)
  return [ex for _, ex in rows]


def encode_pair(ex: dict, tok, lang_ids: dict, enc_len: int, dec_len: int) -> tuple[Example, bool]:
  """(Example, truncated) of one pair, with NLLB's language tokens when it has
  languages (module docstring)."""
  src, tgt = tok.encode(ex["source"], False), tok.encode(ex["target"], False)
  if "src_lang" in ex:
    lead, first = [lang_ids[ex["src_lang"]]], [lang_ids[ex["tgt_lang"]]]
    start = tok.eos_id  # NLLB's decoder_start_token_id
  else:
    lead, first, start = [], [], 0  # T5: the decoder starts at the pad id
  keep = enc_len - len(lead) - 1
  enc = [*lead, *src[:keep], tok.eos_id]
  targets = [*first, *tgt, tok.eos_id]
  weights = [0.0] * len(first) + [1.0] * (len(targets) - len(first))
  cut = len(src) > keep or len(targets) > dec_len
  example = Example(
    np.asarray(enc, np.int32),
    np.asarray(targets[:dec_len], np.int32),
    np.asarray(weights[:dec_len], np.float32),
    start,
  )
  return example, cut


def _dataset_path(dataset: str) -> str:
  return os.path.expanduser(dataset[len(PREFIX) :])


def read_pairs(data_cfg, split: str) -> list[dict]:
  """The pairs of `split` of a seq2seq: dataset."""
  name = data_cfg.dataset[len(PREFIX) :]
  if name == "translation":
    from sparse_lm.data import translation  # pylint: disable=g-import-not-at-top

    return translation.read_split(data_cfg, split)
  return read_jsonl(_dataset_path(data_cfg.dataset), split)


def _languages(data_cfg) -> list[str]:
  """Every language of the dataset (all splits), so ids agree across splits."""
  name = data_cfg.dataset[len(PREFIX) :]
  if name == "translation":
    from sparse_lm.data import translation  # pylint: disable=g-import-not-at-top

    return translation.languages(data_cfg)
  path = _dataset_path(data_cfg.dataset)
  files = [path]
  if os.path.isdir(path):
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))]
  langs = set()
  for p in files:
    if p.endswith(".jsonl"):
      for ex in read_jsonl(p, p):
        langs.update((ex["src_lang"], ex["tgt_lang"]) if "src_lang" in ex else ())
  return sorted(langs)


class PairsSource:
  """A seq2seq: dataset as pipeline.py's tokenizer wants a source: its name,
  fingerprint and the texts of a split (sources and targets)."""

  def __init__(self, data_cfg):
    self.cfg, self.name = data_cfg, data_cfg.dataset

  @property
  def fingerprint(self) -> dict:
    pairs = read_pairs(self.cfg, self.cfg.train_split)
    digest = hashlib.sha256(
      json.dumps([[p["source"], p["target"]] for p in pairs]).encode()
    ).hexdigest()[:16]
    return {"dataset": self.name, "train_pairs": len(pairs), "sha256": digest}

  def check_split(self, split, key):
    del split, key  # read_pairs fails with a one-line error

  def texts(self, split):
    for p in read_pairs(self.cfg, split):
      yield p["source"]
      yield p["target"]


def encode_split(data_cfg, tok, split: str) -> tuple[list[Example], dict]:
  """The Examples of a split and their counts."""
  enc_len, dec_len = lengths(data_cfg)
  pairs = read_pairs(data_cfg, split)
  ids = language_ids(tok, _languages(data_cfg))
  vocab = max([tok.vocab_size, *(i + 1 for i in ids.values())])
  out, cut = [], 0
  for p in pairs:
    ex, c = encode_pair(p, tok, ids, enc_len, dec_len)
    out.append(ex)
    cut += c
  counts = {"examples": len(out), "truncated": cut, "languages": ids, "vocab_size": vocab}
  return out, counts


class Seq2SeqInput:
  """An infinite, deterministic, resumable stream of packed seq2seq batches
  (pipeline.Input's interface). Each epoch visits the examples in an order
  drawn from (seed, epoch); process p takes rows [p B/P, (p+1) B/P)."""

  def __init__(self, data_cfg, tok, *, seed: int, process_index: int, process_count: int):
    self.tokenizer = tok
    self._examples, counts = encode_split(data_cfg, tok, data_cfg.train_split)
    self.vocab_size = counts["vocab_size"]  # the model's: the tokenizer's + the languages'
    self.fingerprint = {"dataset": data_cfg.dataset, "split": data_cfg.train_split, **counts}
    self.fingerprint["tokenizer"] = tok.fingerprint
    B = data_cfg.batch_size
    if B % process_count:
      _fail("data.batch_size", B, f"must be divisible by the process count {process_count}")
    self._B, self._lens, self._seed = B, lengths(data_cfg), seed
    self._rows_of = slice(
      process_index * B // process_count, (process_index + 1) * B // process_count
    )
    self._batches, self._epoch, self._rows, self._at = 0, -1, None, 0

  def _take(self, n: int) -> dict[str, np.ndarray]:
    parts = []
    while n:
      if self._rows is None or self._at == len(self._rows["encoder_input_tokens"]):
        self._epoch += 1
        order = np.random.default_rng([self._seed, self._epoch]).permutation(len(self._examples))
        self._rows, self._at = pack(self._examples, order, *self._lens), 0
      k = min(n, len(self._rows["encoder_input_tokens"]) - self._at)
      parts.append({key: v[self._at : self._at + k] for key, v in self._rows.items()})
      self._at, n = self._at + k, n - k
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self._take(self._B)
    self._batches += 1
    return {k: v[self._rows_of] for k, v in rows.items()}

  def close(self):
    pass

  def get_state(self) -> dict:
    return {"batches": self._batches, "seed": self._seed}

  def set_state(self, state: dict) -> None:
    if state.get("seed", self._seed) != self._seed:
      raise ValueError(f"input state is for seed {state['seed']}, this input has {self._seed}")
    self._batches, self._epoch, self._rows, self._at = 0, -1, None, 0
    for _ in range(int(state["batches"])):
      self._take(self._B)
      self._batches += 1


# ------------------------------------------------------------------ span corruption


def with_split(data_cfg, split: str):
  """data_cfg reading `split` as its training split."""
  d = ml_collections.ConfigDict(data_cfg.to_dict())
  d.train_split = split
  return d


def raw_cfg(data_cfg):
  """data_cfg for pipeline.py's LM stream with rows of T5's tokens_length."""
  d = ml_collections.ConfigDict(data_cfg.to_dict())
  tokens_length, _ = span_corruption.random_spans_helper(
    data_cfg.seq_len, data_cfg.noise_density, data_cfg.mean_noise_span_length
  )
  spans = span_corruption.noise_counts(
    tokens_length, data_cfg.noise_density, data_cfg.mean_noise_span_length
  )[1]
  if spans > EXTRA_IDS:
    _fail("data.seq_len", data_cfg.seq_len, f"needs {spans} sentinels, more than T5's {EXTRA_IDS}")
  d.objective, d.seq_len = "lm", tokens_length - 1  # rows of seq_len + 1 tokens
  return d


def corrupt_rows(rows, data_cfg, top: int, eos_id: int, seeds) -> dict[str, np.ndarray]:
  """T5 span corruption of raw rows [R, tokens_length], row r seeded by
  seeds[r], sentinels top - 1 down; packed one example per row (each fills it).

  Inputs and targets are cut to the row lengths as seqio's trim_and_pad does
  in T5: at some lengths (data.seq_len=172: 190 tokens, 28.5 noise tokens)
  the helper's float64 round and the mask's float32 one differ, and the
  example is one token and one span longer than the helper planned."""
  enc_len, dec_len = lengths(data_cfg)
  exs = []
  for row, s in zip(rows, seeds):
    i, t = span_corruption.corrupt(
      row, s, top, eos_id, data_cfg.noise_density, data_cfg.mean_noise_span_length
    )
    t = t[:dec_len]
    exs.append(Example(i[:enc_len], t, np.ones(len(t), np.float32), 0))  # T5: decoder start 0
  return pack(exs, range(len(exs)), enc_len, dec_len)


def _raw(batch) -> np.ndarray:
  """pipeline.Input's rows back from its (inputs, targets) split."""
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], 1)


class SpanCorruptionInput:
  """pipeline.py's token stream (documents + EOS, concatenated, cut into rows
  of T5's tokens_length, as T5's reduce_concat_tokens + split_tokens do),
  span-corrupted; the example at global row r of batch n is seeded by
  (seed, n, r), so batches do not depend on the process count and resume."""

  def __init__(self, inner, data_cfg, *, seed: int, process_index: int, process_count: int):
    self._inner, self._cfg, self._seed = inner, data_cfg, seed
    self.tokenizer = inner.tokenizer
    self._top, self.vocab_size = sentinel_top(inner.tokenizer)  # the model's vocabulary
    self.fingerprint = {**inner.fingerprint, "objective": "span_corruption"}
    self._row0 = process_index * data_cfg.batch_size // process_count

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    n = self._inner.get_state()["batches"]
    raw = _raw(next(self._inner))
    seeds = [(self._seed, n, self._row0 + r) for r in range(len(raw))]
    return corrupt_rows(raw, self._cfg, self._top, self.tokenizer.eos_id, seeds)

  def close(self):
    self._inner.close()

  def get_state(self) -> dict:
    return self._inner.get_state()

  def set_state(self, state: dict) -> None:
    self._inner.set_state(state)


# ------------------------------------------------------------------ evaluation


def corrupt_eval(raw_batches, data_cfg, tok, row0: int) -> list[dict[str, np.ndarray]]:
  """Span corruption of pipeline.py's eval batches: row r of batch n seeded by
  (0, n, row0 + r), the same whatever the process count."""
  return [
    corrupt_rows(
      _raw(b),
      data_cfg,
      sentinel_top(tok)[0],
      tok.eos_id,
      [(0, n, row0 + r) for r in range(len(b["inputs"]))],
    )
    for n, b in enumerate(raw_batches)
  ]


def eval_batches(data_cfg, tok, num_batches: int, *, process_index, process_count):
  """The first num_batches batches of a seq2seq: dataset's data.eval_split, in
  order, packed (repeated if short)."""
  B = data_cfg.batch_size
  lo, hi = process_index * B // process_count, (process_index + 1) * B // process_count
  exs, _ = encode_split(data_cfg, tok, data_cfg.eval_split)
  rows = pack(exs, range(len(exs)), *lengths(data_cfg))
  idx = np.arange(num_batches * B) % len(rows["encoder_input_tokens"])
  return [{k: v[idx[b * B + lo : b * B + hi]] for k, v in rows.items()} for b in range(num_batches)]
