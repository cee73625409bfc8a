"""Tokenizers: SentencePiece trained on the training split, raw bytes, or a
Hugging Face tokenizer.json (an imported checkpoint's own, sparse_lm/convert/).

All share one small interface (`Tokenizer`): `vocab_size`, `pad_id`, `eos_id`,
`stop_ids` (what ends decoding), `encode(str) -> list[int]`, `decode(list[int])
-> str`, and `tf_encode(string tensor) -> int32 [n]` for use inside tf.data.

SentencePiece is set up for exact round trips of any text, code included:
identity normalisation, whitespace kept as is, no dummy prefix, and byte
fallback, so characters outside the vocabulary become byte pieces instead of
<unk>. It is BPE rather than lm1b's unigram: on the stdlib corpus it compresses
the same (~2.6 chars/token at 2048) and trains ~20x faster (0.5 s vs 9 s).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from typing import Iterable
from typing import Protocol
import uuid

import numpy as np
import sentencepiece as spm
import tensorflow as tf

from sparse_lm.errors import ConfigError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

# Cap on the text sampled for SentencePiece training: a few seconds on 2 cores.
MAX_TRAIN_CHARS = 5_000_000
# Bump when the training recipe below changes, so cached models are retrained.
RECIPE_VERSION = 1

TRAIN_COUNT = 0  # models trained in this process (the tests check cache reuse)


# The files a Hugging Face checkpoint's tokenizer may consist of, carried with
# it through import (into workdir/hf/) and back out on export.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "chat_template.jinja",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "added_tokens.json",
)


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int | None
  eos_id: int
  stop_ids: tuple[int, ...]  # decoding stops at any of them (generation_config.json's eos list)
  prefix_ids: tuple[int, ...]  # what encode() puts in front of every text (a <s>)
  suffix_ids: tuple[int, ...]  # what encode() puts after every text (an </s>, for some)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
  def decode(self, ids: Iterable[int]) -> str: ...
  def tf_encode(self, text: tf.Tensor) -> tf.Tensor: ...
  @property
  def fingerprint(self) -> dict: ...


def _tf_encode(encode, text: tf.Tensor) -> tf.Tensor:
  """`encode` (str -> ids) on a string tensor, inside tf.data."""

  def enc(b):
    return np.asarray(encode(b.decode("utf-8", errors="replace")), np.int32)

  ids = tf.numpy_function(enc, [text], tf.int32, stateful=False)
  ids.set_shape([None])
  return ids


class ByteTokenizer:
  """UTF-8 bytes shifted past the specials (ByT5's layout): pad 0, eos 1, unk 2."""

  OFFSET = 3
  vocab_size = 256 + OFFSET
  pad_id, eos_id = PAD_ID, EOS_ID
  stop_ids, prefix_ids, suffix_ids = (EOS_ID,), (), ()

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    del add_special_tokens  # it adds none
    return [b + self.OFFSET for b in text.encode("utf-8")]

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size)
    return data.decode("utf-8", errors="replace")

  def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32) + self.OFFSET

  @property
  def fingerprint(self) -> dict:
    return {"kind": "byte", "vocab_size": self.vocab_size}


class SentencePieceTokenizer:
  """A trained SentencePiece model; pad 0, eos 1, unk 2, no bos."""

  pad_id, eos_id = PAD_ID, EOS_ID
  stop_ids, prefix_ids, suffix_ids = (EOS_ID,), (), ()

  def __init__(self, model_proto: bytes, path: str = ""):
    self.path = path
    self._sha = hashlib.sha256(model_proto).hexdigest()[:16]
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.vocab_size()
    assert self._sp.pad_id() == PAD_ID and self._sp.eos_id() == EOS_ID, path

  @classmethod
  def load(cls, path: str) -> SentencePieceTokenizer:
    with tf.io.gfile.GFile(path, "rb") as f:
      return cls(f.read(), path)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    del add_special_tokens  # trained without bos / eos pieces: it adds none
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
    return _tf_encode(self.encode, text)

  @property
  def fingerprint(self) -> dict:
    return {
      "kind": "sentencepiece",
      "vocab_size": self.vocab_size,
      "sha256": self._sha,
      "path": self.path,
    }


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` library): an imported
  checkpoint's own tokenizer (data.tokenizer="huggingface", data.tokenizer_file).

  encode() adds the tokenizer's own special tokens (the <s> of Llama / Mixtral
  tokenizers: prefix_ids; an </s> after the text for some: suffix_ids), as
  transformers' tokenizer(text) does; encode(text, add_special_tokens=False)
  adds none (a rendered chat template holds its own). decode() drops them.
  The files next to tokenizer.json say the rest, as transformers reads them:
  eos_id is tokenizer_config.json's eos_token; special_tokens holds every
  named special token's text (bos_token, eos_token, ...: what a chat template
  sees; special_tokens_map.json fills the names tokenizer_config.json lacks);
  stop_ids is generation_config.json's eos_token_id (an id or a list: chat
  models end a turn with their own token), else (eos_id,); chat_template is
  chat_template.jinja's, else tokenizer_config.json's chat_template, else None.
  vocab_size is the model's (data.vocab_size: checkpoints pad their embedding
  past the tokenizer's ids). pad_id is the pad_token if there is one, else
  None; the pipeline never weights targets by it (packing never pads, and a
  pad token that is also the eos is a real target), and decoding pads prompts
  with it or the eos id (masked, never attended to).
  """

  def __init__(self, path: str, vocab_size: int):
    import tokenizers  # pylint: disable=g-import-not-at-top

    if not os.path.exists(path):
      raise ConfigError(f"config.data.tokenizer_file={path!r}: no such file")
    self.path = path
    with open(path, "rb") as f:
      self._sha = hashlib.sha256(f.read()).hexdigest()[:16]
    self._tok = tokenizers.Tokenizer.from_file(path)
    n = self._tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
      raise ConfigError(f"config.data.vocab_size={vocab_size} is smaller than {path}'s {n} tokens")
    self.vocab_size = vocab_size
    folder = os.path.dirname(path)
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    self.special_tokens = _special_tokens(config)
    legacy = _read_json(os.path.join(folder, "special_tokens_map.json"))
    self.special_tokens = {**_special_tokens(legacy), **self.special_tokens}
    if "eos_token" not in self.special_tokens:
      raise ConfigError(f"{folder}/tokenizer_config.json names no eos_token")
    ids = {}
    for k in ("eos_token", "pad_token"):
      if k in self.special_tokens:
        ids[k] = self._tok.token_to_id(self.special_tokens[k])
        if ids[k] is None:
          raise ConfigError(
            f"{path}: tokenizer_config.json's {k} {self.special_tokens[k]!r} is not a token"
          )
    self.eos_id, self.pad_id = ids["eos_token"], ids.get("pad_token")
    self.prefix_ids, self.suffix_ids = self._added_around()
    self.stop_ids = _stop_ids(os.path.join(folder, "generation_config.json"), self.eos_id)
    self.chat_template = _chat_template(folder, config)

  def _added_around(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens encode() puts before and after a text: where a
    text's own tokens sit among those of its encoding with them (encode("")
    alone cannot tell an </s> after the text from a <s> before it)."""
    probe = "a"
    plain = self._tok.encode(probe, add_special_tokens=False).ids
    full = self._tok.encode(probe).ids
    for i in range(len(full) - len(plain) + 1):
      if full[i : i + len(plain)] == plain:
        return tuple(full[:i]), tuple(full[i + len(plain) :])
    raise ConfigError(f"{self.path}: its special tokens change the text's own tokens")

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokens of `text` without added special tokens, and each token's
    [start, end) character span in `text` (a chat's assistant spans -> tokens)."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
    return _tf_encode(self.encode, text)

  @property
  def fingerprint(self) -> dict:
    return {
      "kind": "huggingface",
      "vocab_size": self.vocab_size,
      "sha256": self._sha,
      "path": self.path,
    }


# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES): what a chat
# template is handed besides the messages.
SPECIAL_TOKEN_NAMES = (
  "bos_token",
  "eos_token",
  "unk_token",
  "sep_token",
  "pad_token",
  "cls_token",
  "mask_token",
)


def _read_json(path: str) -> dict:
  """A JSON file's object; {} when there is no such file."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      out = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not JSON ({e.msg})") from None
  if not isinstance(out, dict):
    raise ConfigError(f"{path}: not a JSON object")
  return out


def _special_tokens(cfg: dict) -> dict[str, str]:
  """The named special tokens of a tokenizer_config.json or
  special_tokens_map.json (a string, or a dict with "content")."""
  out = {}
  for k in SPECIAL_TOKEN_NAMES:
    v = cfg.get(k)
    if isinstance(v, dict):
      v = v.get("content")
    if isinstance(v, str):
      out[k] = v
  return out


def _stop_ids(path: str, eos_id: int) -> tuple[int, ...]:
  """generation_config.json's eos_token_id (an int or a list), else (eos_id,)."""
  eos = _read_json(path).get("eos_token_id")
  ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
    raise ConfigError(f"{path}: eos_token_id={eos!r} is not an id or a list of ids")
  return tuple(ids) or (eos_id,)


def _chat_template(folder: str, config: dict) -> str | None:
  """The chat template transformers would use: chat_template.jinja, else
  tokenizer_config.json's chat_template (a string, or a list of named ones:
  "default"'s)."""
  path = os.path.join(folder, "chat_template.jinja")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  t = config.get("chat_template")
  if isinstance(t, list):
    t = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}.get("default")
  return t if isinstance(t, str) else None


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
  """Trains a BPE model on (a sample of) `texts`; returns the model proto."""
  global TRAIN_COUNT
  lines, n = [], 0
  for text in texts:
    for line in text.split("\n"):
      if line:
        lines.append(line)
        n += len(line) + 1
    if n >= MAX_TRAIN_CHARS:
      break
  if not lines:
    raise ConfigError("config.data.dataset: the training split has no text to train a tokenizer on")
  spm.set_random_generator_seed(0)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      vocab_size=vocab_size,
      model_type="bpe",
      byte_fallback=True,
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      bos_id=-1,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      character_coverage=0.9995,
      input_sentence_size=1_000_000,
      shuffle_input_sentence=True,
      max_sentence_length=8192,
      hard_vocab_limit=False,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
    )
  except RuntimeError as e:
    m = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
    if m:
      raise ConfigError(
        f"config.data.vocab_size={vocab_size!r} is invalid: this corpus with byte fallback "
        f"needs at least {m.group(1)}; use a larger one or data.tokenizer='byte'"
      ) from None
    raise
  TRAIN_COUNT += 1
  return model.getvalue()


def cached_sentencepiece(path: str, texts_fn, vocab_size: int) -> SentencePieceTokenizer:
  """Loads the model at `path`, or trains it on `texts_fn()` and writes it there.

  The write is atomic and never replaces an existing file: the model goes to a
  temporary name and is renamed without overwrite, so a killed run leaves no
  half-written cache, and concurrent processes sharing the directory all end
  up loading the first finished model.
  """
  if tf.io.gfile.exists(path):
    return SentencePieceTokenizer.load(path)
  logging.info("Training a SentencePiece tokenizer (vocab %d) for %s.", vocab_size, path)
  proto = train_sentencepiece(texts_fn(), vocab_size)
  tf.io.gfile.makedirs(os.path.dirname(path))
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(proto)
  try:
    tf.io.gfile.rename(tmp, path, overwrite=False)
  except tf.errors.AlreadyExistsError:
    tf.io.gfile.remove(tmp)
  return SentencePieceTokenizer.load(path)
