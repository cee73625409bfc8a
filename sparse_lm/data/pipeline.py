"""One input pipeline for every source: the stdlib corpus, TFDS, your own files.

`c.data.dataset` picks the source:
  "stdlib"          this Python's standard library (stdlib_corpus.py), prepared on
                    first use; its text feature is always "text"
  "files:<glob>"    text files; split by path hash like the stdlib corpus
                    (~5% "validation", the rest "train"), paths taken relative
                    to the glob's fixed leading directory
  "<tfds name>"     any TFDS text dataset ("lm1b", "c4/en", "lm1b:1.1.0"); the
                    text is feature `c.data.text_key`; it must be prepared
                    already or preparable offline

tf.data does the work, deterministically, once per stream: read the stream's
documents -> (train: seeded document shuffle) -> repeat -> tokenize -> append
EOS -> pack into rows of seq_len + 1 tokens (documents concatenated, then
chunked; no padding) -> (train: seeded row shuffle) -> batch -> numpy.

Streams make the global batch independent of the process count. The documents
of a split are divided into S = `c.data.num_streams` fixed streams (TFDS:
`even_splits(split, S)[s]`, contiguous ranges; files: every S-th file,
`files[s::S]`; a split with n < S documents gives stream s its document s % n).
Each stream is packed and shuffled on its own, with seeds derived from
(seed, s), and contributes a contiguous block of batch_size / S rows to every
global batch: row r comes from stream r // (batch_size / S). Process p of P
(S % P == 0) owns rows [p B/P, (p+1) B/P), i.e. streams [p S/P, (p+1) S/P),
and reads only those streams' documents. So for any P dividing S, the
processes' batches concatenated are exactly the one-process batch, and a
checkpoint's data position is valid for any process count. The row shuffle
buffer is divided among the streams (ceil(shuffle_buffer / S) rows each), so
it spans the same number of batches as one buffer of shuffle_buffer rows.
Eval batches are built the same way, unshuffled: each stream's documents in
order.

Resuming: `Input.get_state()` is {"batches": n, ...}; `set_state` rebuilds the
same deterministic dataset and skips n batches (`ds.skip`). That replays the
reader, tokenizer and packer up to there: measured ~1.2 s per 1,000 batches of
16 x 129 tokens (stdlib, SentencePiece, one core), i.e. ~12 s at step 10k;
minutes only for very long runs.
"""

from __future__ import annotations

import atexit
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import weakref

import filelock
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sparse_lm.data import seq2seq
from sparse_lm.data import sft
from sparse_lm.data import stdlib_corpus
from sparse_lm.data import stdlib_tasks
from sparse_lm.data import tokenizer as tokenizer_lib
from sparse_lm.errors import ConfigError

try:  # TF is only a reader here: keep it off the accelerators JAX uses.
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # already initialised, or no such device type
  pass
tf.get_logger().setLevel("ERROR")

Tokenizer = tokenizer_lib.Tokenizer
_DOC_SHUFFLE_BUFFER = 1024


def _fail(key, value, why):
  raise ConfigError(f"config.{key}={value!r} is invalid: {why}")


def data_dir(data_cfg) -> str:
  """The TFDS data dir in use: data.data_dir, else $TFDS_DATA_DIR, else
  ~/tensorflow_datasets (an empty $TFDS_DATA_DIR counts as unset: TFDS's own
  default would then be "")."""
  d = data_cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.expanduser(d)


def _prepare_lock(data_cfg) -> filelock.FileLock:
  """Serialises dataset preparation in one data dir: processes starting together
  (the processes of a multi-host job sharing a filesystem, a sweep's points)
  would otherwise all prepare it, and TFDS's final rename fails for all but one."""
  d = data_dir(data_cfg)
  os.makedirs(d, exist_ok=True)
  return filelock.FileLock(os.path.join(d, ".sparse_lm_prepare.lock"))


# ------------------------------------------------------------------ sources


def _excluded(data_cfg, relpaths: list[str]) -> list[str]:
  """The files data.exclude names (relative paths or fnmatch globs) among
  `relpaths`; an entry that matches none is a one-line error."""
  out = set()
  for entry in data_cfg.exclude:
    hit = [p for p in relpaths if fnmatch.fnmatchcase(p, entry)]
    if not hit:
      _fail("data.exclude", entry, f"matches no file of {data_cfg.dataset}'s training split")
    out.update(hit)
  return sorted(out)


def _exclusion_fingerprint(paths: list[str]) -> dict:
  digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
  return {"exclude": {"files": len(paths), "paths_sha256": digest}} if paths else {}


class _TfdsSource:
  """A prepared TFDS dataset (the stdlib corpus is one too). `exclude`: paths
  (the "path" feature) left out of split `exclude_split`."""

  def __init__(self, builder, text_key: str, fingerprint: dict, exclude=(), exclude_split=""):
    self.exclude, self.exclude_split = tuple(exclude), exclude_split
    self.fingerprint = {**fingerprint, **_exclusion_fingerprint(list(self.exclude))}
    self.builder, self.text_key = builder, text_key
    self.name = fingerprint["dataset"]

  def _as_dataset(self, split, **kw) -> tf.data.Dataset:
    ds = self.builder.as_dataset(split=split, **kw)
    name = split if isinstance(split, str) else split.split  # (even_splits gives _EvenSplit)
    if self.exclude and name.split("[")[0] == self.exclude_split:
      gone = tf.constant(self.exclude)
      ds = ds.filter(lambda ex: tf.logical_not(tf.reduce_any(tf.equal(ex["path"], gone))))
    return ds

  def check_split(self, split: str, key: str):
    known = list(self.builder.info.splits.keys())  # empty when TFDS is mocked
    if known and split.split("[")[0] not in known:
      _fail(key, split, f"{self.name} has splits {known}")

  def num_docs(self, split: str) -> int | None:
    try:
      return self.builder.info.splits[split].num_examples or None
    except Exception:  # pylint: disable=broad-except  (unknown under tfds mocking)
      return None

  def docs(self, split, stream, num_streams, *, shuffle, seed) -> tf.data.Dataset:
    """Stream `stream` of `num_streams`: a contiguous range of the split's documents."""
    n = self.num_docs(split)
    k = num_streams if n is None else min(n, num_streams)
    if k > 1:
      split = tfds.even_splits(split, k)[stream % k]
    read_config = tfds.ReadConfig(shuffle_seed=seed)
    ds = self._as_dataset(split, shuffle_files=shuffle, read_config=read_config)
    return ds.map(lambda ex: ex[self.text_key])

  def texts(self, split):
    ds = self._as_dataset(split, shuffle_files=False)
    for ex in ds.as_numpy_iterator():
      t = ex[self.text_key]
      yield t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)


class _FilesSource:
  """Text files matched by a glob, split by a hash of their relative path."""

  SPLITS = ("train", "validation")

  def __init__(self, dataset: str, data_cfg=None):
    pattern = os.path.expanduser(dataset[len("files:") :])
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
      _fail("data.dataset", dataset, "the glob matches no files")
    parts = pattern.split(os.sep)  # root: the glob's leading directories without wildcards
    i = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
    root = os.sep.join(parts[:i]) or (os.sep if pattern.startswith(os.sep) else ".")
    self.name = dataset
    self.files = {s: [] for s in self.SPLITS}
    for p in paths:
      rel = os.path.relpath(p, root).replace(os.sep, "/")
      self.files[stdlib_corpus.split_of(rel)].append((rel, p))
    gone = []
    if data_cfg is not None and data_cfg.exclude:
      split = data_cfg.train_split
      gone = _excluded(data_cfg, [r for r, _ in self.files.get(split, [])])
      self.files[split] = [(r, p) for r, p in self.files[split] if r not in set(gone)]
    self.fingerprint = {
      "dataset": dataset,
      "splits": {
        s: {
          "files": len(fs),
          "bytes": sum(os.path.getsize(p) for _, p in fs),
          "paths_sha256": hashlib.sha256("\n".join(r for r, _ in fs).encode()).hexdigest()[:16],
        }
        for s, fs in self.files.items()
      },
      **_exclusion_fingerprint(gone),
    }

  def check_split(self, split: str, key: str):
    if split not in self.SPLITS:
      _fail(key, split, f"'files:' datasets have splits {list(self.SPLITS)}")
    if not self.files[split]:
      _fail(
        key,
        split,
        f"no file of {self.name} falls in this split (by path hash, "
        f"~5% go to 'validation'); add files or use 'train'",
      )

  def num_docs(self, split: str) -> int:
    return len(self.files[split])

  def docs(self, split, stream, num_streams, *, shuffle, seed) -> tf.data.Dataset:
    """Stream `stream` of `num_streams`: every num_streams-th file."""
    del shuffle, seed  # the document shuffle after this covers file order
    paths = [p for _, p in self.files[split]]
    n = len(paths)
    paths = paths[stream::num_streams] if n >= num_streams else [paths[stream % n]]
    return tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string)).map(tf.io.read_file)

  def texts(self, split):
    for _, p in self.files[split]:
      with open(p, "rb") as f:
        yield f.read().decode("utf-8", errors="replace")


def _open_source(data_cfg):
  name = data_cfg.dataset
  ddir = data_dir(data_cfg)
  if name.startswith("files:"):
    if len(name) == len("files:"):
      _fail("data.dataset", name, "'files:' needs a glob, e.g. 'files:~/text/*.txt'")
    return _FilesSource(name, data_cfg)
  if data_cfg.exclude and name != "stdlib":
    _fail("data.exclude", data_cfg.exclude, "works for the 'stdlib' and 'files:' datasets only")
  if name == "stdlib":
    with _prepare_lock(data_cfg):
      builder = stdlib_corpus.PythonStdlib(data_dir=ddir)
      if not builder.is_prepared():
        logging.info(
          "Preparing the %s corpus (Python %s standard library) into %s; once per Python version.",
          stdlib_corpus.NAME,
          stdlib_corpus.config_name()[2:],
          builder.data_dir,
        )
        builder.download_and_prepare()
    files = stdlib_corpus.list_files().get(data_cfg.train_split, [])
    exclude = _excluded(data_cfg, files) if data_cfg.exclude else ()
    fp = stdlib_corpus.fingerprint(builder)
    return _TfdsSource(builder, "text", fp, exclude, data_cfg.train_split)
  try:
    builder = tfds.builder(name, data_dir=ddir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    _fail(
      "data.dataset",
      name,
      f"not 'stdlib', 'files:<glob>' or a known TFDS dataset ({str(e).splitlines()[0]})",
    )
  features = builder.info.features
  key = data_cfg.text_key
  if key not in features:
    _fail("data.text_key", key, f"{name} has features {sorted(features.keys())}")
  if features[key].tf_dtype != tf.string:
    _fail("data.text_key", key, f"feature of {name} is {features[key].tf_dtype.name}, not text")
  with _prepare_lock(data_cfg):
    if not builder.is_prepared():
      builder = tfds.builder(name, data_dir=ddir)  # another process may have prepared it
    if not builder.is_prepared():
      logging.info("Preparing TFDS dataset %s into %s.", name, builder.data_dir)
    builder.download_and_prepare()
  fp = {
    "dataset": builder.info.full_name,
    "splits": {
      s: {"examples": i.num_examples, "bytes": i.num_bytes} for s, i in builder.info.splits.items()
    },
  }
  return _TfdsSource(builder, key, fp)


def _tokenizer_for(data_cfg, source) -> Tokenizer:
  if data_cfg.tokenizer in ("byte", "huggingface"):
    return make_tokenizer(data_cfg)
  if data_cfg.tokenizer != "sentencepiece":
    _fail("data.tokenizer", data_cfg.tokenizer, "must be 'sentencepiece', 'byte' or 'huggingface'")
  split = data_cfg.train_split
  source.check_split(split, "data.train_split")
  key = json.dumps(
    [source.fingerprint, split, data_cfg.vocab_size, tokenizer_lib.RECIPE_VERSION], sort_keys=True
  )
  stem = re.sub(r"[^A-Za-z0-9.]+", "_", f"{source.name}_{split}").strip("_")[:80]
  digest = hashlib.sha256(key.encode()).hexdigest()[:8]
  path = os.path.join(
    data_dir(data_cfg), "sparse_lm_tokenizers", f"{stem}_spm{data_cfg.vocab_size}_{digest}.model"
  )
  return tokenizer_lib.cached_sentencepiece(path, lambda: source.texts(split), data_cfg.vocab_size)


def check_tokenizer(tok: Tokenizer, workdir: str) -> None:
  """A one-line ConfigError when `tok` is not the tokenizer `workdir`'s run was
  trained with (its data.json records the SentencePiece model's or the
  tokenizer.json's sha256)."""
  recorded = os.path.join(workdir, "data.json")
  if not os.path.exists(recorded) or tok.fingerprint.get("kind") not in (
    "sentencepiece",
    "huggingface",
  ):
    return
  with open(recorded) as f:
    want = json.load(f).get("tokenizer", {}).get("sha256")
  got = tok.fingerprint.get("sha256")
  if want and got != want:
    raise ConfigError(
      f"the tokenizer {tok.fingerprint.get('path')} (sha256 {got}) is not the one {workdir} "
      f"was trained with (sha256 {want}); "
      + (
        "set --config.data.data_dir to the run's data dir"
        if tok.fingerprint["kind"] == "sentencepiece"
        else "restore the run's data.tokenizer_file"
      )
    )


def _tokenizer_data(data_cfg):
  """The data config the tokenizer is made from: data.tokenizer_dataset's, if set."""
  if not data_cfg.tokenizer_dataset:
    return data_cfg
  d = ml_collections.ConfigDict(data_cfg.to_dict())
  d.dataset, d.train_split = data_cfg.tokenizer_dataset, "train"
  return d


INSTRUCTION_PREFIXES = ("sft:", "chat:")  # sparse_lm/data/sft.py's datasets


def sft_path(data_cfg) -> str:
  """The file or directory of an sft: or chat: dataset; "sft:stdlib" is built
  into the data dir on first use (stdlib_tasks.prepare_sft, examples of at
  most 2 x data.seq_len characters: about one row of tokens with the template)."""
  kind, _, name = data_cfg.dataset.partition(":")
  if name != "stdlib" or kind != "sft":
    return os.path.expanduser(name)
  max_chars = 2 * data_cfg.seq_len
  out = os.path.join(
    data_dir(data_cfg), "sparse_lm_sft", f"{stdlib_corpus.config_name()}_stdlib_tasks_{max_chars}"
  )
  with _prepare_lock(data_cfg):
    if not os.path.exists(os.path.join(out, "stats.json")):
      logging.info("Building the stdlib instruction tasks into %s.", out)
    stdlib_tasks.prepare_sft(out, max_chars)
  return out


def make_tokenizer(data_cfg) -> Tokenizer:
  """The tokenizer of `data_cfg`: trains and caches it, or loads the cached one.

  SentencePiece models are trained on the train split of data.tokenizer_dataset
  (default: data.dataset; an sft: dataset needs one, the base run's), preparing
  it if needed, and cached under <data_dir>/sparse_lm_tokenizers/.
  """
  if data_cfg.tokenizer == "byte":
    return tokenizer_lib.ByteTokenizer()
  if data_cfg.tokenizer == "huggingface":
    path = os.path.expanduser(data_cfg.tokenizer_file)
    return tokenizer_lib.HuggingFaceTokenizer(path, data_cfg.vocab_size)
  d = _tokenizer_data(data_cfg)
  if d.dataset.startswith("seq2seq:"):  # its sources and targets (issue 30)
    return _tokenizer_for(d, seq2seq.PairsSource(d))
  return _tokenizer_for(d, _open_source(d))


# ------------------------------------------------------------------ tf.data


def _pack(ds: tf.data.Dataset, n: int) -> tf.data.Dataset:
  """Concatenates token sequences and cuts them into rows of n (remainder carried)."""

  def step(buf, toks):
    buf = tf.concat([buf, toks], 0)
    k = tf.shape(buf)[0] // n
    return buf[k * n :], tf.reshape(buf[: k * n], [k, n])

  return ds.scan(tf.zeros([0], tf.int32), step).unbatch()


def stream_seed(seed: int, stream: int) -> int:
  """The seed of one stream: a hash of (seed, stream), so streams shuffle independently."""
  digest = hashlib.sha256(f"sparse_lm/{seed}/{stream}".encode()).digest()
  return int.from_bytes(digest[:4], "little") >> 1  # 31 bits: seed and seed + 1 fit int32


def streams_of(data_cfg, process_index: int, process_count: int) -> range:
  """The streams whose rows process `process_index` of `process_count` owns."""
  S = data_cfg.num_streams
  if not isinstance(S, int) or S < 1:
    _fail("data.num_streams", S, "must be an integer >= 1")
  if data_cfg.batch_size % S:
    _fail("data.num_streams", S, f"must divide data.batch_size={data_cfg.batch_size}")
  if S % process_count:
    _fail("data.num_streams", S, f"must be divisible by the process count {process_count}")
  per = S // process_count
  return range(process_index * per, (process_index + 1) * per)


def _stream(source, tok, data_cfg, split, stream, *, train, seed) -> tf.data.Dataset:
  """One stream's rows, batched batch_size / num_streams at a time: [R, L + 1]."""
  S, L = data_cfg.num_streams, data_cfg.seq_len
  seed = stream_seed(seed, stream)
  ds = source.docs(split, stream, S, shuffle=train, seed=seed)
  if train:
    ds = ds.shuffle(_DOC_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat()
  eos = tf.constant([tok.eos_id], tf.int32)
  ds = ds.map(lambda text: tf.concat([tok.tf_encode(text), eos], 0))
  ds = _pack(ds, L + 1)
  buffer = -(-data_cfg.shuffle_buffer // S)
  if train and buffer > 1:
    ds = ds.shuffle(buffer, seed=seed + 1, reshuffle_each_iteration=True)
  return ds.batch(data_cfg.batch_size // S, drop_remainder=True)


def _dataset(
  source, tok, data_cfg, split, *, train, seed, process_index, process_count, key
) -> tf.data.Dataset:
  """This process's rows of each global batch: its streams' blocks, in stream order."""
  streams = streams_of(data_cfg, process_index, process_count)
  source.check_split(split, key)
  if source.num_docs(split) == 0:
    _fail(key, split, f"{source.name} has no documents in it")
  parts = tuple(_stream(source, tok, data_cfg, split, s, train=train, seed=seed) for s in streams)
  ds = tf.data.Dataset.zip(parts).map(lambda *rows: tf.concat(rows, 0))

  def to_example(row_BxL1):
    # Packing never pads, so every target is real: weighting by "not the pad
    # id" would drop each end-of-text target of a tokenizer whose pad is its
    # eos (Qwen's base models).
    inputs, targets = row_BxL1[:, :-1], row_BxL1[:, 1:]
    return {"inputs": inputs, "targets": targets, "weights": tf.ones_like(targets, tf.float32)}

  ds = ds.map(to_example)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return process_index, process_count


# A tf.data iterator still running a Python callback (the SentencePiece
# tokenizer) when the interpreter shuts down can deadlock or abort the exit.
# Closing the live ones from atexit, while Python is still whole, avoids it.
_LIVE_INPUTS = weakref.WeakSet()


@atexit.register
def _close_inputs():
  for inp in list(_LIVE_INPUTS):
    inp.close()


class Input:
  """An infinite, deterministic, resumable stream of packed training batches.

  next() -> {"inputs": int32 [B_local, L], "targets": int32 [B_local, L]
  (inputs shifted by one), "weights": float32 [B_local, L] (all 1: packing never pads)},
  B_local = batch_size // process_count: rows [process_index * B_local,
  (process_index + 1) * B_local) of the global batch, which does not depend on
  process_count (see the module docstring).
  """

  def __init__(
    self,
    source,
    tok: Tokenizer,
    data_cfg,
    split: str,
    *,
    seed: int,
    process_index: int,
    process_count: int,
  ):
    self.tokenizer = tok
    self.vocab_size = tok.vocab_size
    self.fingerprint = {**source.fingerprint, "split": split, "tokenizer": tok.fingerprint}
    self._source, self._cfg, self._split, self._seed = source, data_cfg, split, seed
    self._pi, self._pc = process_index, process_count
    self._batches = 0
    self._it = None  # built on first next(), after any set_state
    self._dataset()  # fail now on a bad config
    _LIVE_INPUTS.add(self)

  def _dataset(self) -> tf.data.Dataset:
    key = "data.train_split" if self._split == self._cfg.train_split else "data.eval_split"
    return _dataset(
      self._source,
      self.tokenizer,
      self._cfg,
      self._split,
      train=True,
      seed=self._seed,
      process_index=self._pi,
      process_count=self._pc,
      key=key,
    )

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self._dataset().skip(self._batches).prefetch(2).as_numpy_iterator()
    batch = next(self._it)
    self._batches += 1
    return batch

  def close(self) -> None:
    """Stops the background reading; a later next() resumes where it was."""
    self._it = None

  def get_state(self) -> dict:
    """JSON-serialisable position: the number of (global) batches consumed.

    It holds nothing of the process layout: a state saved by P processes
    resumes under any other process count that divides data.num_streams.
    """
    return {
      "batches": self._batches,
      "seed": self._seed,
      "split": self._split,
      "num_streams": self._cfg.num_streams,
    }

  def set_state(self, state: dict) -> None:
    """Continues exactly after `state`'s position (replays the stream to it)."""
    mine = self.get_state()
    for k in ("seed", "split", "num_streams"):
      if k in state and state[k] != mine[k]:
        raise ValueError(f"input state is for {k}={state[k]!r}, this input has {mine[k]!r}")
    self._batches = int(state["batches"])
    self._it = None  # rebuilt lazily, skipping to the position


def make_input(
  data_cfg, *, seed: int, split: str | None = None, process_index=None, process_count=None
) -> Input:
  """The training stream of this process (split defaults to data.train_split)."""
  pi, pc = _process(process_index, process_count)
  objective = data_cfg.get("objective", "lm")  # encoder-decoder data (issue 30): seq2seq.py
  if objective == "span_corruption":
    inner = make_input(
      seq2seq.raw_cfg(data_cfg), seed=seed, split=split, process_index=pi, process_count=pc
    )
    return seq2seq.SpanCorruptionInput(
      inner, data_cfg, seed=seed, process_index=pi, process_count=pc
    )
  if objective == "seq2seq":
    d = data_cfg if split in (None, data_cfg.train_split) else seq2seq.with_split(data_cfg, split)
    tok = make_tokenizer(d)
    return seq2seq.Seq2SeqInput(d, tok, seed=seed, process_index=pi, process_count=pc)
  if data_cfg.dataset.startswith(INSTRUCTION_PREFIXES):
    tok = make_tokenizer(data_cfg)
    path = sft_path(data_cfg)
    return sft.SftInput(data_cfg, tok, path, seed=seed, process_index=pi, process_count=pc)
  if data_cfg.tokenizer_dataset:
    _fail("data.tokenizer_dataset", data_cfg.tokenizer_dataset, "is for sft: datasets only")
  source = _open_source(data_cfg)
  tok = _tokenizer_for(data_cfg, source)
  return Input(
    source,
    tok,
    data_cfg,
    split or data_cfg.train_split,
    seed=seed,
    process_index=pi,
    process_count=pc,
  )


def eval_batches(
  data_cfg, num_batches: int, *, process_index=None, process_count=None, tokenizer=None
) -> list[dict[str, np.ndarray]]:
  """The first num_batches batches of data.eval_split: no shuffle, repeated if short.
  tokenizer: tokenize with this one (a run's own, on other data) instead of data_cfg's."""
  pi, pc = _process(process_index, process_count)
  objective = data_cfg.get("objective", "lm")  # encoder-decoder data (issue 30): seq2seq.py
  if objective == "span_corruption":
    raw = seq2seq.raw_cfg(data_cfg)
    tok = tokenizer or make_tokenizer(raw)
    batches = eval_batches(raw, num_batches, process_index=pi, process_count=pc, tokenizer=tok)
    return seq2seq.corrupt_eval(batches, data_cfg, tok, pi * data_cfg.batch_size // pc)
  if objective == "seq2seq":
    tok = tokenizer or make_tokenizer(data_cfg)
    return seq2seq.eval_batches(data_cfg, tok, num_batches, process_index=pi, process_count=pc)
  if data_cfg.dataset.startswith(INSTRUCTION_PREFIXES):
    tok, path = tokenizer or make_tokenizer(data_cfg), sft_path(data_cfg)
    return sft.eval_batches(data_cfg, tok, path, num_batches, process_index=pi, process_count=pc)
  source = _open_source(data_cfg)
  tok = tokenizer or _tokenizer_for(data_cfg, source)
  ds = _dataset(
    source,
    tok,
    data_cfg,
    data_cfg.eval_split,
    train=False,
    seed=0,
    process_index=pi,
    process_count=pc,
    key="data.eval_split",
  )
  return list(ds.take(num_batches).as_numpy_iterator())
