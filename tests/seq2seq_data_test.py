"""Encoder-decoder data (issue 30): T5 span corruption, seq2seq packing and
masks, NLLB language tokens, the Django-catalogue translation task, chrF/BLEU."""

import json
import zlib

import numpy as np
import pytest

from sparse_lm import config as cfglib
from sparse_lm.data import pipeline
from sparse_lm.data import seq2seq
from sparse_lm.data import span_corruption as sc
from sparse_lm.data import translation
from sparse_lm.errors import ConfigError


def data_cfg(data_dir, **kw):
  d = cfglib.base_config().data
  d.data_dir = str(data_dir)
  d.batch_size, d.seq_len, d.shuffle_buffer, d.num_streams = 4, 64, 16, 2
  d.tokenizer = "byte"
  for k, v in kw.items():
    d[k] = v
  return d


def test_span_corruption_is_t5s():
  # T5's random_spans_helper(512, 0.15, 3, 1, 1), run by hand from its code:
  # 568 raw tokens -> 85 noise tokens in 28 spans -> inputs 483 + 28 + 1 = 512,
  # targets 85 + 28 + 1 = 114.
  assert sc.random_spans_helper(512, 0.15, 3.0) == (568, 114)
  assert sc.random_spans_helper(64, 0.15, 3.0) == (70, 14)
  V, eos = 1000, 1
  for length, (noise, spans) in {568: (85, 28), 70: (10, 3), 10: (2, 1), 2: (1, 1)}.items():
    assert sc.noise_counts(length, 0.15, 3.0) == (noise, spans)
    for seed in range(5):
      m = sc.random_spans_noise_mask(length, (seed, length))
      starts = m & ~np.concatenate([[False], m[:-1]])
      assert m.sum() == noise and starts.sum() == spans and not m[0]
      tokens = np.arange(3, 3 + length, dtype=np.int32)
      inputs, targets = sc.corrupt(tokens, (seed, length), V, eos)
      np.testing.assert_array_equal(sc.uncorrupt(inputs, targets, V), tokens)
      assert len(inputs) == length - noise + spans + 1 and len(targets) == noise + spans + 1
      assert inputs[-1] == targets[-1] == eos
      np.testing.assert_array_equal(inputs[inputs >= V - spans], V - 1 - np.arange(spans))
      assert targets[0] == V - 1  # targets open with the first sentinel
  np.testing.assert_array_equal(
    sc.random_spans_noise_mask(568, 7), sc.random_spans_noise_mask(568, 7)
  )
  assert (sc.random_spans_noise_mask(568, 7) != sc.random_spans_noise_mask(568, 8)).any()
  # seq_len=172: T5's helper rounds 190 * 0.15 = 28.5 noise tokens to 28
  # (float64), its mask to 29 (float32); the example is cut to the rows, as seqio trims.
  assert sc.random_spans_helper(172) == (190, 38) and sc.noise_counts(190, 0.15, 3.0)[0] == 29
  d = data_cfg("", objective="span_corruption", seq_len=172)
  rows = seq2seq.corrupt_rows(np.full((1, 190), 7), d, 400, 1, [0])
  assert rows["decoder_target_tokens"].shape == (1, 38) and (rows["decoder_segment_ids"] > 0).all()
  # All masks equally likely: span starts spread over the sequence.
  starts = sum(sc.random_spans_noise_mask(40, s).astype(float) for s in range(400))
  assert starts[1:].min() > 0 and starts[0] == 0


def _examples():
  rng = np.random.default_rng(0)
  return [
    seq2seq.Example(
      rng.integers(3, 200, n).astype(np.int32),
      rng.integers(3, 200, m).astype(np.int32),
      np.ones(m, np.float32),
      1,
    )
    for n, m in [(5, 3), (9, 7), (4, 2), (16, 1), (3, 12), (7, 7), (2, 2)]
  ]


def test_packing_never_attends_across_examples():
  exs = _examples()
  order = [3, 0, 5, 1, 6, 2, 4]
  rows = seq2seq.pack(exs, order, 16, 12)
  # Ground truth, independent of the packer: (row, example) per token.
  owner_e = np.full((len(rows["encoder_input_tokens"]), 16), -1)
  owner_d = np.full((len(rows["encoder_input_tokens"]), 12), -1)
  seen = []
  for r in range(len(owner_e)):
    for s in range(1, rows["encoder_segment_ids"][r].max() + 1):
      i = order[len(seen)]
      seen.append(i)
      e = np.flatnonzero(rows["encoder_segment_ids"][r] == s)
      d = np.flatnonzero(rows["decoder_segment_ids"][r] == s)
      np.testing.assert_array_equal(rows["encoder_input_tokens"][r, e], exs[i].encoder)
      np.testing.assert_array_equal(rows["decoder_target_tokens"][r, d], exs[i].targets)
      np.testing.assert_array_equal(rows["encoder_positions"][r, e], np.arange(len(e)))
      np.testing.assert_array_equal(rows["decoder_positions"][r, d], np.arange(len(d)))
      # decoder inputs: the start token, then the targets shifted right, per example
      np.testing.assert_array_equal(
        rows["decoder_input_tokens"][r, d], np.r_[1, exs[i].targets[:-1]]
      )
      owner_e[r, e], owner_d[r, d] = i, i
  assert seen == order and len(owner_e) == 4
  assert (rows["decoder_loss_weights"] == (owner_d >= 0)).all()
  m = seq2seq.attention_masks(rows)
  oe, od = owner_e[:, :, None], owner_d[:, :, None]
  np.testing.assert_array_equal(m["encoder"], (oe == owner_e[:, None]) & (oe >= 0))
  np.testing.assert_array_equal(m["cross"], (od == owner_e[:, None]) & (od >= 0))
  causal = np.arange(12)[:, None] >= np.arange(12)[None]
  np.testing.assert_array_equal(m["decoder"], (od == owner_d[:, None]) & (od >= 0) & causal)


def _write_pairs(path, n=60):
  langs = ["de", "fr", "sw"]
  with open(path, "w") as f:
    for i in range(n):
      ex = {"source": f"message {i}", "target": f"Nachricht {i}" * (1 + i % 3)}
      if i % 4:
        ex.update(src_lang="en", tgt_lang=langs[i % 3])
      f.write(json.dumps(ex) + "\n")


def test_seq2seq_jsonl_nllb_tokens_and_streams(tmp_path):
  path = tmp_path / "pairs.jsonl"
  _write_pairs(path)
  cfg = data_cfg(tmp_path, dataset=f"seq2seq:{path}", objective="seq2seq", seq_len=48)
  cfg.targets_len = 40
  cfglib.validate(_full(cfg))
  inp = pipeline.make_input(cfg, seed=3, process_index=0, process_count=1)
  tok = inp.tokenizer
  ids = seq2seq.language_ids(tok, ["de", "en", "fr", "sw"])
  # reserved above the byte tokenizer's 259 ids; the model's vocabulary grows by them
  assert ids == {"de": 259, "en": 260, "fr": 261, "sw": 262} and tok.vocab_size == 259
  assert inp.vocab_size == 263
  b = next(inp)
  assert b["encoder_input_tokens"].shape == (4, 48) and b["decoder_target_tokens"].shape == (4, 40)
  # Every example: NLLB's layout with languages, T5's without.
  lines = {json.loads(x)["source"]: json.loads(x) for x in open(path)}
  kinds = set()
  for r in range(4):
    for sid in range(1, b["encoder_segment_ids"][r].max() + 1):
      e = b["encoder_input_tokens"][r][b["encoder_segment_ids"][r] == sid]
      dec = b["decoder_segment_ids"][r] == sid
      d_in, d_out = b["decoder_input_tokens"][r][dec], b["decoder_target_tokens"][r][dec]
      w = b["decoder_loss_weights"][r][dec]
      line = lines[tok.decode([t for t in e if t < 259])]  # (259-262: the language ids)
      assert e[-1] == d_out[-1] == tok.eos_id
      assert tok.decode(d_out[d_out < 259]) == line["target"]
      kinds.add("src_lang" in line)
      if "src_lang" in line:
        assert e[0] == ids["en"] and d_out[0] == ids[line["tgt_lang"]] and d_in[0] == tok.eos_id
        assert w[0] == 0 and (w[1:] == 1).all()
      else:
        assert d_in[0] == 0 and (w == 1).all()
  assert kinds == {True, False}
  # Held-out lines by crc32; the two process shares concatenate to the batch.
  held = [x for x in open(path) if zlib.crc32(x.strip().encode()) % 100 < 5]
  assert len(seq2seq.read_jsonl(str(path), "validation")) == len(held)
  b2 = next(inp)
  parts = [pipeline.make_input(cfg, seed=3, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(2):
    got = [next(p) for p in parts]
  for k, v in b2.items():
    np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), v)
  again = pipeline.make_input(cfg, seed=3, process_index=0, process_count=1)
  again.set_state({"batches": 1, "seed": 3})
  np.testing.assert_array_equal(next(again)["decoder_target_tokens"], b2["decoder_target_tokens"])
  ev = pipeline.eval_batches(cfg, 1, process_index=0, process_count=1)
  assert ev[0]["encoder_input_tokens"].shape == (4, 48)


def _full(data):
  c = cfglib.base_config()
  c.data = data
  c.model.arch, c.model.position = "encoder_decoder", "relative"  # seq2seq data needs it
  return c


def test_config_keys_and_default_unchanged(tmp_path):
  c = cfglib.base_config()
  assert c.data.objective == "lm"
  (tmp_path / "a.txt").write_text("some text " * 50)
  d = data_cfg(tmp_path, dataset=f"files:{tmp_path}/*.txt")
  inp = pipeline.make_input(d, seed=0, process_index=0, process_count=1)
  assert type(inp) is pipeline.Input  # the decoder-only stream, untouched
  for kw, key in [
    ({"objective": "seq2seq"}, "data.objective"),
    ({"dataset": "seq2seq:x.jsonl"}, "data.objective"),
    ({"objective": "span"}, "data.objective"),
    ({"objective": "span_corruption", "noise_density": 1.5}, "data.noise_density"),
    ({"targets_len": 9}, "data.targets_len"),
    ({"languages": ("de",)}, "data.languages"),
  ]:
    c = cfglib.base_config()
    for k, v in kw.items():
      c.data[k] = v
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      cfglib.validate(c)
  c = cfglib.base_config()
  c.data.languages = []  # as a saved run's config.json reads back
  cfglib.validate(c)


def test_span_corruption_input_over_a_text_dataset(tmp_path):
  for i in range(6):
    (tmp_path / f"t{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor " * (10 + 7 * i))
  cfg = data_cfg(tmp_path, dataset=f"files:{tmp_path}/*.txt", objective="span_corruption")
  inp = pipeline.make_input(cfg, seed=1, process_index=0, process_count=1)
  raw = pipeline.make_input(seq2seq.raw_cfg(cfg), seed=1, process_index=0, process_count=1)
  V = inp.vocab_size
  assert V == inp.tokenizer.vocab_size + 100  # T5's 100 extra ids, sentinels V - 1 down
  first = None
  for _ in range(2):
    b, r = next(inp), seq2seq._raw(next(raw))
    first = first or b
    assert r.shape == (4, 70)
    assert b["encoder_input_tokens"].shape == (4, 64) and b["decoder_target_tokens"].shape == (
      4,
      14,
    )
    for row in range(4):
      enc = b["encoder_input_tokens"][row][b["encoder_segment_ids"][row] > 0]
      dec = b["decoder_target_tokens"][row][b["decoder_segment_ids"][row] > 0]
      assert len(enc) == 64 and len(dec) == 14  # T5's lengths: no padding
      np.testing.assert_array_equal(sc.uncorrupt(enc, dec, V), r[row])
      spans = (dec >= V - 100).sum()
      np.testing.assert_array_equal(enc[enc >= 259], V - 1 - np.arange(spans))
      assert b["decoder_input_tokens"][row, 0] == 0  # T5's decoder start: the pad id
  parts = [pipeline.make_input(cfg, seed=1, process_index=p, process_count=2) for p in (0, 1)]
  got = [next(p) for p in parts]
  for k, v in first.items():
    np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), v)
  cfg.eval_split = "train"  # (six files: none falls in "validation")
  ev = pipeline.eval_batches(cfg, 2, process_index=0, process_count=1)
  assert ev[1]["decoder_target_tokens"].shape == (4, 14)


PO = r"""# header comment
msgid ""
msgstr ""
"Language: de\n"

#: a.py:1
msgid "Save"
msgstr "Sichern"

#, fuzzy
msgid "Delete"
msgstr "Entfernen"

msgid "Untranslated"
msgstr ""

msgctxt "month"
msgid "May"
msgstr "Mai"

#, python-format
msgid "%(count)d item"
msgid_plural "%(count)d items"
msgstr[0] "%(count)d Element"
msgstr[1] "%(count)d Elemente"

msgid ""
"Two \"quoted\"\n"
"lines"
msgstr "Zwei \"zitierte\"\nZeilen"
#~ msgid "Old"
#~ msgstr "Alt"
"""


def test_translation_task_from_djangos_catalogues(tmp_path):
  po = tmp_path / "x.po"
  po.write_text(PO, encoding="utf-8")
  assert translation.parse_po(str(po)) == [
    ("", "Save", "Sichern"),
    ("month", "May", "Mai"),
    ("", "%(count)d item", "%(count)d Element"),
    ("", 'Two "quoted"\nlines', 'Zwei "zitierte"\nZeilen'),
  ]
  langs = ("de", "ja", "sw")
  b = translation.PoTranslation(languages=langs, data_dir=str(tmp_path))
  b.download_and_prepare()
  pairs = {s: translation.read_split(data_cfg(tmp_path, languages=langs), s) for s in b.info.splits}
  msgids = {s: {p["msgid"] for p in ps} for s, ps in pairs.items()}
  keys = {
    s: {(p["src_lang"], p["tgt_lang"], p["source"], p["target"]) for p in ps}
    for s, ps in pairs.items()
  }
  for s in pairs:
    assert len(keys[s]) == len(pairs[s])  # deduplicated
    assert all(translation.split_of(m) == s for m in msgids[s])
    for t in pairs:
      if s < t:
        assert not msgids[s] & msgids[t] and not keys[s] & keys[t]  # split by message
  train = keys["train"]
  assert ("en", "de", "Arabic", "Arabisch") in train and ("de", "en", "Arabisch", "Arabic") in train
  counts = b.info.metadata["pairs"]["train"]
  assert counts["en-de"] == counts["de-en"] > 600 and counts["de-ja"] > 500
  assert "de-sw" not in counts  # X -> Y among XY_LANGUAGES only
  table = translation.table(b)
  assert "| de |" in table and "| sw |" in table
  # The task through the pipeline: seq2seq:translation, language tokens per pair.
  cfg = data_cfg(tmp_path, dataset="seq2seq:translation", objective="seq2seq", languages=langs)
  cfglib.validate(_full(cfg))
  batch = next(pipeline.make_input(cfg, seed=0, process_index=0, process_count=1))
  assert set(np.unique(batch["encoder_input_tokens"][:, 0])) <= {259, 260, 261, 262}


def test_chrf_and_bleu_are_sacrebleus():
  # sacrebleu's README example: BLEU = 48.53, chrF2 = 59.73.
  refs = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
  ]
  hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
  s = translation.score(hyps, refs)
  assert round(s["bleu"], 2) == 48.53 and round(s["chrf"], 2) == 59.73
  one = translation.score(hyps, refs[0])
  assert one["bleu"] < s["bleu"] and 0 < one["chrf++"] < 100
