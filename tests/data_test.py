"""Data package: stdlib corpus builder, tokenizers, and the tf.data pipeline.

The stdlib corpus is prepared once per test process into the session's
temporary TFDS data dir (a few seconds); every test shares it and its cached
tokenizer.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sparse_lm import config as cfglib
from sparse_lm.config import ConfigError
from sparse_lm.data import eval_batches
from sparse_lm.data import make_input
from sparse_lm.data import make_tokenizer
from sparse_lm.data import pipeline
from sparse_lm.data import stdlib_corpus
from sparse_lm.data import tokenizer as toklib

B, L = 8, 32


def data_cfg(data_dir, **kw):
  d = cfglib.base_config().data
  d.data_dir = str(data_dir)
  d.batch_size, d.seq_len, d.shuffle_buffer, d.vocab_size = B, L, 64, 512
  d.num_streams = 2  # each stream is its own tf.data pipeline: fewer build faster
  for k, v in kw.items():
    d[k] = v
  return d


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def batches_equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.fixture(scope="module")
def data_dir(tfds_dir):
  """A TFDS data dir with the stdlib corpus prepared and a tokenizer trained:
  the session's (conftest.py), so the training runs of the other test files
  in this process find them ready, or this module finds theirs."""
  d = pathlib.Path(tfds_dir)
  cfg = data_cfg(d)
  t0 = time.perf_counter()
  pipeline._open_source(cfg)  # pylint: disable=protected-access
  t1 = time.perf_counter()
  make_tokenizer(cfg)
  t2 = time.perf_counter()
  print(
    f"\nstdlib corpus prepared in {t1 - t0:.1f}s, sentencepiece ({cfg.vocab_size}) "
    f"trained in {t2 - t1:.1f}s"
  )
  return d


@pytest.fixture
def cfg(data_dir):
  return data_cfg(data_dir)


def write_files(root, contents: dict[str, str]):
  for name, text in contents.items():
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------ corpus


def test_stdlib_corpus_fingerprint_counts_the_files(data_dir):
  builder = stdlib_corpus.PythonStdlib(data_dir=str(data_dir))
  assert builder.is_prepared()
  fp = stdlib_corpus.fingerprint(builder)
  files = stdlib_corpus.list_files()
  assert fp["dataset"] == f"python_stdlib/{stdlib_corpus.config_name()}:1.0.0"
  for split in ("train", "validation"):
    n = builder.info.splits[split].num_examples
    assert fp["splits"][split]["files"] == len(files[split]) == n
    assert fp["splits"][split]["bytes"] > 0
  assert fp["splits"]["train"]["bytes"] > 1_000_000
  assert 0.01 < len(files["validation"]) / len(files["train"]) < 0.12
  assert not any("/test/" in f"/{p}" or "site-packages" in p for p in files["train"])
  # The split is a function of the path alone, and the builder wrote that split.
  paths = {ex["path"].decode() for ex in builder.as_dataset(split="validation").as_numpy_iterator()}
  assert paths == set(files["validation"])
  assert all(stdlib_corpus.split_of(p) == "validation" for p in paths)


def test_input_fingerprint_records_data_and_tokenizer(cfg):
  inp = make_input(cfg, seed=0, process_index=0, process_count=1)
  fp = json.loads(json.dumps(inp.fingerprint))  # JSON-serialisable
  assert fp["dataset"].startswith("python_stdlib/py")
  assert fp["splits"]["train"]["files"] > 100
  assert fp["tokenizer"]["kind"] == "sentencepiece" and fp["tokenizer"]["vocab_size"] == 512


# ------------------------------------------------------------------ tokenizers

TEXTS = [
  "",
  "def f(x):\n\treturn  x  # two spaces\r\n",
  "   leading and trailing   ",
  "héllo wörld, naïve café",
  "日本語のテキスト",
  "emoji 🙂🚀 and \u00a0nbsp",
  "\n\n\n",
  "x" * 1000,
]


@pytest.mark.parametrize("kind", ["sentencepiece", "byte"])
def test_tokenizer_round_trips_any_text(cfg, kind):
  cfg.tokenizer = kind
  tok = make_tokenizer(cfg)
  assert tok.pad_id == 0 and tok.eos_id == 1
  assert tok.vocab_size == (512 if kind == "sentencepiece" else 259)
  for text in TEXTS:
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size for i in ids), text  # no pad, eos or unk
    assert tok.decode(ids) == text
  if kind == "sentencepiece":  # it learned merges: fewer tokens than bytes
    src = stdlib_corpus.read_source(os.path.join(stdlib_corpus.stdlib_dir(), "json/decoder.py"))
    assert len(src) / len(tok.encode(src)) > 1.5


def test_tokenizer_cache_is_reused_not_retrained(data_dir, cfg):
  tok = make_tokenizer(cfg)
  path = tok.fingerprint["path"]
  assert path.startswith(os.path.join(str(data_dir), "sparse_lm_tokenizers") + os.sep)
  mtime, count = os.stat(path).st_mtime_ns, toklib.TRAIN_COUNT
  tok2 = make_tokenizer(cfg)
  make_input(cfg, seed=1, process_index=0, process_count=1)
  assert toklib.TRAIN_COUNT == count
  assert os.stat(path).st_mtime_ns == mtime
  assert tok2.fingerprint == tok.fingerprint
  # A different vocab size is a different model, in its own file.
  cfg.vocab_size = 640
  tok3 = make_tokenizer(cfg)
  assert toklib.TRAIN_COUNT == count + 1 and tok3.vocab_size == 640
  assert tok3.fingerprint["path"] != path
  assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]


def test_too_small_vocab_names_the_key(cfg):
  cfg.vocab_size = 100
  with pytest.raises(
    ConfigError, match=r"^config\.data\.vocab_size=100 is invalid: .*needs at least \d+"
  ):
    make_tokenizer(cfg)


# ------------------------------------------------------------------ batches


def test_batches_are_packed_and_shifted(cfg):
  inp = make_input(cfg, seed=0, process_index=0, process_count=1)
  assert iter(inp) is inp
  for b in take(inp, 3):
    assert set(b) == {"inputs", "targets", "weights"}
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (B, L)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    assert b["weights"].dtype == np.float32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    np.testing.assert_array_equal(b["weights"], (b["targets"] != 0).astype(np.float32))
    assert b["inputs"].min() >= 1 and b["inputs"].max() < inp.vocab_size  # packed: no pad
  # By default the process share comes from JAX (one process here).
  default = make_input(cfg, seed=0)
  assert jax.process_count() == 1
  assert next(default)["inputs"].shape == (B, L)  # B // process_count rows
  # Documents are concatenated with EOS between them.
  rows = np.concatenate([b["inputs"] for b in take(inp, 300)])  # ~10 documents
  assert (rows == inp.tokenizer.eos_id).any()


def test_same_seed_same_batches_different_seed_different(cfg):
  a = take(make_input(cfg, seed=3, process_index=0, process_count=1), 4)
  b = take(make_input(cfg, seed=3, process_index=0, process_count=1), 4)
  c = take(make_input(cfg, seed=4, process_index=0, process_count=1), 4)
  assert_batches_equal(a, b)
  assert not batches_equal(a, c)


def test_resume_from_state_continues_exactly(cfg):
  inp = make_input(cfg, seed=5, process_index=0, process_count=1)
  take(inp, 7)
  state = json.loads(json.dumps(inp.get_state()))
  assert state["batches"] == 7
  expected = take(inp, 3)
  resumed = make_input(cfg, seed=5, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)
  assert resumed.get_state() == inp.get_state()
  # close() stops reading; the stream goes on from the same place.
  inp.close()
  more = next(inp)
  resumed.set_state(json.loads(json.dumps(resumed.get_state())))
  assert_batches_equal([next(resumed)], [more])
  with pytest.raises(ValueError, match="seed"):
    make_input(cfg, seed=6, process_index=0, process_count=1).set_state(state)


def test_epochs_repeat_forever_and_reshuffle(tmp_path):
  write_files(tmp_path, {f"d{i}.txt": f"doc{i:02d}-" * 5 + "x" for i in range(12)})
  cfg = data_cfg(
    tmp_path,
    dataset=f"files:{tmp_path}/*.txt",
    tokenizer="byte",
    batch_size=2,
    seq_len=15,
    shuffle_buffer=1,
    num_streams=1,
  )
  inp = make_input(cfg, seed=0, process_index=0, process_count=1)
  n_train = inp.fingerprint["splits"]["train"]["files"]
  # Each document is 31 bytes + EOS = 32 tokens = 2 rows of 16: an epoch is n_train batches.
  epochs = [np.concatenate([b["inputs"] for b in take(inp, n_train)]) for _ in range(3)]
  firsts = [tuple(sorted(tuple(r[:7]) for r in e[::2])) for e in epochs]
  assert firsts[0] == firsts[1] == firsts[2]  # every epoch has every document once
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


# ------------------------------------------------------------------ processes


def letter_files(root, n_train=16, n_val=16, length=100):
  """Files that are each one repeated letter (a row's bytes say which file it came
  from), named so that n_train fall in "train" and n_val in "validation"."""
  letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
  want, files, i = {"train": n_train, "validation": n_val}, {}, 0
  while any(want.values()):
    split = stdlib_corpus.split_of(f"f{i}.txt")
    if want[split]:
      want[split] -= 1
      files[f"f{i}.txt"] = next(letters) * length
    i += 1
  write_files(root, files)


def letters_of(batches):
  ids = np.unique(np.concatenate([b["inputs"].ravel() for b in batches]))
  return {chr(i - 3) for i in ids if i >= 3}


def test_process_shares_concatenate_to_the_one_process_batch(tmp_path):
  letter_files(tmp_path)
  cfg = data_cfg(tmp_path, dataset=f"files:{tmp_path}/*.txt", tokenizer="byte", num_streams=8)
  n = 6
  one = {
    "train": take(make_input(cfg, seed=0, process_index=0, process_count=1), n),
    "eval": eval_batches(cfg, n, process_index=0, process_count=1),
  }
  for P in (2, 4):
    inputs = [make_input(cfg, seed=0, process_index=p, process_count=P) for p in range(P)]
    shares = {
      "train": [take(inp, n) for inp in inputs],
      "eval": [eval_batches(cfg, n, process_index=p, process_count=P) for p in range(P)],
    }
    for kind, per_process in shares.items():
      assert all(b["inputs"].shape == (B // P, L) for bs in per_process for b in bs)
      glued = [
        {k: np.concatenate([bs[i][k] for bs in per_process]) for k in one[kind][i]}
        for i in range(n)
      ]
      assert_batches_equal(glued, one[kind])
      seen = [letters_of(bs) for bs in per_process]  # each process reads its own documents
      assert all(seen) and sum(map(len, seen)) == len(set().union(*seen)), (kind, P, seen)
    # A position saved under P processes resumes under one (and the reverse).
    state = json.loads(json.dumps(inputs[1].get_state()))
    assert state == inputs[0].get_state() and state["batches"] == n
    resumed = make_input(cfg, seed=0, process_index=0, process_count=1)
    resumed.set_state(state)
    glued = [
      np.concatenate(rows) for rows in zip(*[[b["inputs"] for b in take(i, 2)] for i in inputs])
    ]
    np.testing.assert_array_equal(
      np.stack(glued), np.stack([b["inputs"] for b in take(resumed, 2)])
    )
  # The streams cycle through the documents of a split: all 16 appear.
  assert len(letters_of(one["train"])) == 16


def test_process_shares_are_disjoint_and_sized(tmp_path):
  # Each file is one repeated letter, so a row's bytes say which file it came from.
  letters = "abcdefghijklmnopqrstuvwxyz"
  write_files(tmp_path, {f"{c}.txt": c * 200 for c in letters})
  cfg = data_cfg(tmp_path, dataset=f"files:{tmp_path}/*.txt", tokenizer="byte")
  seen = []
  for pi in range(2):
    batches = take(make_input(cfg, seed=0, process_index=pi, process_count=2), 10)
    assert all(b["inputs"].shape == (B // 2, L) for b in batches)
    seen.append(letters_of(batches))
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_tfds_streams_partition_the_split(cfg):
  cfg.num_streams = 4
  source = pipeline._open_source(cfg)  # pylint: disable=protected-access
  S = cfg.num_streams
  streams = [
    list(source.docs("validation", s, S, shuffle=False, seed=0).as_numpy_iterator())
    for s in range(S)
  ]
  alltexts = list(source.docs("validation", 0, 1, shuffle=False, seed=0).as_numpy_iterator())
  assert all(streams) and sum(map(len, streams)) == len(alltexts)
  assert sum(streams, []) == alltexts  # contiguous ranges, in order
  one = next(make_input(cfg, seed=0, process_index=0, process_count=1))
  b0 = next(make_input(cfg, seed=0, process_index=0, process_count=2))
  b1 = next(make_input(cfg, seed=0, process_index=1, process_count=2))
  assert b0["inputs"].shape == b1["inputs"].shape == (B // 2, L)
  np.testing.assert_array_equal(np.concatenate([b0["inputs"], b1["inputs"]]), one["inputs"])


def test_streams_must_divide_batch_and_among_processes(cfg):
  with pytest.raises(
    ConfigError,
    match=r"^config\.data\.num_streams=2 is invalid: must be "
    r"divisible by the process count 4$",
  ):
    make_input(cfg, seed=0, process_index=0, process_count=4)
  cfg.num_streams = 3
  with pytest.raises(
    ConfigError,
    match=r"^config\.data\.num_streams=3 is invalid: must divide "
    r"data\.batch_size=8$",
  ):
    make_input(cfg, seed=0, process_index=0, process_count=1)
  c = cfglib.base_config()
  c.data.num_streams = 3
  with pytest.raises(ConfigError, match=r"^config\.data\.num_streams=3 is invalid"):
    cfglib.validate(c)


# ------------------------------------------------------------------ eval


def test_eval_batches_are_the_split_in_order_and_fixed(cfg):
  ev = eval_batches(cfg, 3, process_index=0, process_count=1)
  assert len(ev) == 3 and all(b["inputs"].shape == (B, L) for b in ev)
  assert_batches_equal(ev, eval_batches(cfg, 3, process_index=0, process_count=1))
  # Unshuffled: block s of rows (R = B / S rows) of each batch is stream s's
  # validation documents, in order, EOS-joined and cut.
  tok = make_tokenizer(cfg)
  source = pipeline._open_source(cfg)  # pylint: disable=protected-access
  S = cfg.num_streams
  R = B // S
  for s in range(S):
    stream = []
    for text in source.docs("validation", s, S, shuffle=False, seed=0).as_numpy_iterator():
      stream += tok.encode(text.decode("utf-8")) + [tok.eos_id]
      if len(stream) > 3 * R * (L + 1):
        break
    rows = np.array(stream[: 3 * R * (L + 1)]).reshape(3 * R, L + 1)
    block = slice(s * R, (s + 1) * R)
    np.testing.assert_array_equal(np.concatenate([b["inputs"][block] for b in ev]), rows[:, :-1])
    np.testing.assert_array_equal(np.concatenate([b["targets"][block] for b in ev]), rows[:, 1:])
  # Training batches are shuffled, so they differ from these.
  train = next(make_input(cfg, seed=0, process_index=0, process_count=1))
  assert not np.array_equal(train["inputs"], ev[0]["inputs"])


def test_eval_batches_repeat_a_small_split(tmp_path):
  write_files(tmp_path, {f"f{i}.txt": f"file {i}\n" for i in range(40)})
  cfg = data_cfg(tmp_path, dataset=f"files:{tmp_path}/*.txt", tokenizer="byte")
  source = pipeline._open_source(cfg)  # pylint: disable=protected-access
  n_bytes = source.fingerprint["splits"]["validation"]["bytes"]
  assert 0 < n_bytes < B * (L + 1)  # the whole split is less than one batch
  ev = eval_batches(cfg, 4, process_index=0, process_count=1)
  assert len(ev) == 4 and all(b["inputs"].shape == (B, L) for b in ev)
  text = make_tokenizer(cfg).decode(ev[3]["inputs"].ravel())
  assert all(
    f"file {i}\n" in text for i in range(40) if stdlib_corpus.split_of(f"f{i}.txt") == "validation"
  )


# ------------------------------------------------------------------ other sources


def test_files_glob_source_splits_by_path_and_reads_the_text(tmp_path):
  write_files(
    tmp_path, {f"sub/{i:02d}.txt": f"the quick brown fox {i} jumps\n" * 20 for i in range(30)}
  )
  write_files(tmp_path, {"sub/skip.md": "not matched"})
  cfg = data_cfg(tmp_path, dataset=f"files:{tmp_path}/**/*.txt", vocab_size=300)
  inp = make_input(cfg, seed=0, process_index=0, process_count=1)
  fp = inp.fingerprint["splits"]
  expected_val = [
    f"sub/{i:02d}.txt"
    for i in range(30)
    if stdlib_corpus.split_of(f"sub/{i:02d}.txt") == "validation"
  ]
  assert fp["validation"]["files"] == len(expected_val)
  assert fp["train"]["files"] == 30 - len(expected_val)
  text = inp.tokenizer.decode(np.concatenate([b["inputs"].ravel() for b in take(inp, 3)]))
  assert "the quick brown fox" in text and "not matched" not in text
  assert (
    inp.tokenizer.decode(inp.tokenizer.encode("the quick brown fox 7 jumps\n"))
    == "the quick brown fox 7 jumps\n"
  )


def test_tfds_dataset_by_name_mocked(tmp_path):
  cfg = data_cfg(tmp_path, dataset="lm1b", vocab_size=300)
  with tfds.testing.mock_data(num_examples=40):
    inp = make_input(cfg, seed=0, process_index=0, process_count=1)
    assert inp.fingerprint["dataset"].startswith("lm1b/")
    a = take(inp, 2)
    assert a[0]["inputs"].shape == (B, L) and a[0]["inputs"].max() < inp.vocab_size
    assert_batches_equal(a, take(make_input(cfg, seed=0, process_index=0, process_count=1), 2))
    ev = eval_batches(cfg, 2, process_index=1, process_count=2)
    assert len(ev) == 2 and ev[0]["inputs"].shape == (B // 2, L)
    cfg.text_key = "body"
    with pytest.raises(
      ConfigError, match=r"^config\.data\.text_key='body' is invalid: .*\['text'\]"
    ):
      make_input(cfg, seed=0, process_index=0, process_count=1)


@pytest.mark.parametrize(
  "dataset,match",
  [
    (
      "files:{tmp}/nothing/*.txt",
      r"config\.data\.dataset='files:.*' is invalid: the glob matches no files",
    ),
    (
      "no_such_dataset_xyz",
      r"config\.data\.dataset='no_such_dataset_xyz' is invalid: .*known TFDS",
    ),
  ],
)
def test_bad_dataset_is_a_one_line_error_naming_the_key(tmp_path, dataset, match):
  cfg = data_cfg(tmp_path, dataset=dataset.format(tmp=tmp_path))
  for fn in (make_tokenizer, lambda d: make_input(d, seed=0, process_index=0, process_count=1)):
    with pytest.raises(ConfigError, match="^" + match) as e:
      fn(cfg)
    assert "\n" not in str(e.value)


def test_unknown_split_names_the_key(cfg):
  cfg.eval_split = "test"
  with pytest.raises(
    ConfigError, match=r"^config\.data\.eval_split='test' is invalid: .*'validation'"
  ):
    eval_batches(cfg, 1, process_index=0, process_count=1)


_PREPARE_TOGETHER = r"""
import json, os, sys, time
from sparse_lm import config as cfglib
from sparse_lm.data import make_tokenizer, pipeline
d = cfglib.base_config().data
d.data_dir, d.vocab_size = sys.argv[1], 512
open(os.path.join(sys.argv[2], sys.argv[3]), "w").close()
while len(os.listdir(sys.argv[2])) < 2:  # start preparing together
  time.sleep(0.01)
src = pipeline._open_source(d)
print(json.dumps([src.fingerprint, make_tokenizer(d).fingerprint], sort_keys=True))
"""


def test_processes_preparing_one_data_dir_together_agree(tmp_path):
  """Two processes (as a multi-host job's) prepare the corpus and train the
  tokenizer in one fresh data dir at once: both succeed with the same data."""
  ready = tmp_path / "ready"
  ready.mkdir()
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _PREPARE_TOGETHER, str(tmp_path / "tfds"), str(ready), str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  assert outs[0][0].splitlines()[-1] == outs[1][0].splitlines()[-1]


def test_empty_tfds_data_dir_env_counts_as_unset(tmp_path, monkeypatch):
  # Issue 17, smell 9: `export TFDS_DATA_DIR=` ended a run in FileNotFoundError: ''.
  monkeypatch.setenv("TFDS_DATA_DIR", "")
  monkeypatch.setenv("HOME", str(tmp_path))
  d = cfglib.base_config().data
  assert pipeline.data_dir(d) == str(tmp_path / "tensorflow_datasets")
  with pipeline._prepare_lock(d):  # pylint: disable=protected-access
    pass
  assert (tmp_path / "tensorflow_datasets").is_dir()
