"""sparse_lm.generate and sparse_lm.evaluate on an encoder-decoder run (issue 30).

One tiny configs/switch_t5.py:tiny run on the translation task (Django's
English <-> German catalogue pairs, bytes, NLLB's language tokens) trained by
the real main; then, in this process (helpers.in_process), generate's tokens
against an uncached full-forward loop written here from the data layout's
rules (greedy; and sampled, with stop ids), evaluate's loss against the
run's logged eval loss and its chrF / BLEU against sacrebleu's on the
hypotheses it wrote. The encoder's and the decoder's inputs are checked as
generate hands them to decode.seq2seq_generate too: a model trained a few
steps hardly reads its source (a 30-step one's next-token logits moved by
1e-4 between two sources, on a range of 8), so equal tokens alone
would not show a wrong source (encoder_decoder_test.py checks the cached
logits with a source that matters). ~65 s of CPU in all (training ~30 s).
"""

import functools
import json
import os
import sys

from flax import nnx
from helpers import FAST_COMPILE
from helpers import cli
from helpers import in_process
from helpers import rows
from helpers import run
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu

from sparse_lm import decode
from sparse_lm import state as statelib
from sparse_lm.data import seq2seq

EN, DE, EOS = 260, 259, 1  # the run's languages take the ids above bytes' 259, sorted
LEN = 64  # data.seq_len = data.targets_len


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  wd = str(tmp_path_factory.mktemp("encdec") / "translate")
  p = run(
    cli(
      wd,
      tfds_dir,
      "--config.data.objective=seq2seq",
      "--config.data.dataset=seq2seq:translation",
      "--config.data.languages=('de',)",
      "--config.data.tokenizer=byte",
      f"--config.data.targets_len={LEN}",
      "--config.train.num_steps=4",
      "--config.train.eval_every=4",
      config="configs/switch_t5.py:tiny",
    )
  )
  assert p.returncode == 0, p.stderr[-3000:]
  return wd


def program(name, wd, *args, monkeypatch):
  cmd = [sys.executable, "-m", f"sparse_lm.{name}", f"--workdir={wd}", *args]
  return in_process(cmd, monkeypatch=monkeypatch)


def full_forward_decode(model, sources, N, temperature=0.0, seed=0):
  """Tokens after [</s>, <de>] of each English source, one uncached forward
  of the whole sequence per token: the source is [<en>] bytes </s> (NLLB's
  layout, README), token i is the argmax at the last position, or sampled
  from softmax(logits / temperature) with key fold_in(key(seed), i) as
  generate documents its --seed; a row ends at </s>."""
  src = [[EN, *(b + 3 for b in s.encode()), EOS] for s in sources]
  S, B, P = max(map(len, src)), len(src), 2
  src_BxS = np.zeros((B, S), np.int32)
  seg_BxS = np.zeros((B, S), np.int32)
  for b, s in enumerate(src):
    src_BxS[b, : len(s)], seg_BxS[b, : len(s)] = s, 1
  dec_BxL = np.zeros((B, P + N), np.int32)  # later positions do not reach earlier ones
  dec_BxL[:, :P] = [EOS, DE]
  key = jax.random.key(seed)
  for i in range(N):
    logits_BxV = _forward(*nnx.split(model), src_BxS, seg_BxS, dec_BxL)[:, P - 1 + i]
    if temperature:
      nxt = jax.random.categorical(jax.random.fold_in(key, i), logits_BxV / temperature, -1)
    else:
      nxt = jnp.argmax(logits_BxV, -1)
    dec_BxL[:, P + i] = np.asarray(nxt)
  return [row[: row.index(EOS)] if EOS in row else row for row in dec_BxL[:, P:].tolist()]


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, src_BxS, seg_BxS, dec_BxL):
  model = nnx.merge(graphdef, state)
  return model(src_BxS, dec_BxL, encoder_segments_BxS=seg_BxS).logits


def test_generate_and_evaluate_a_translation_run(trained, tmp_path, monkeypatch):
  assert json.load(open(os.path.join(trained, "data.json")))["languages"] == {"de": DE, "en": EN}
  model, c, _ = statelib.load_model(trained, inference=True)  # one device, dropless MoE
  assert model.vocab_size == 261 and c.model.arch == "encoder_decoder"
  first = next(p for p in seq2seq.read_pairs(c.data, "validation") if p["src_lang"] == "en")
  prompts = [first["source"], "Save and add another"]  # the first: evaluate translates it too

  # generate (greedy; the default mesh: the parameters over the 8 devices):
  # the full forward's tokens.
  out = tmp_path / "greedy.jsonl"
  calls, real = [], decode.seq2seq_generate
  monkeypatch.setattr(
    decode, "seq2seq_generate", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k)
  )
  p = program(
    "generate",
    trained,
    *(f"--prompt={s}" for s in prompts),
    "--src_lang=en",
    "--tgt_lang=de",
    f"--max_new_tokens={LEN - 1}",
    f"--output={out}",
    monkeypatch=monkeypatch,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert "=> " in p.stdout and "no compile in them" in p.stdout
  greedy = [json.loads(l) for l in open(out)]
  # The layout (README): [<en>] source </s> into the encoder; the decoder from </s>, <de> forced.
  src = [[EN, *(b + 3 for b in s.encode()), EOS] for s in prompts]
  assert calls == [(src, [[EOS, DE]] * 2)]
  monkeypatch.setattr(decode, "seq2seq_generate", real)
  assert greedy[0]["src_lang"] == "en" and greedy[0]["tgt_lang"] == "de"
  with jax.default_matmul_precision("highest"):
    want = full_forward_decode(model, prompts, LEN - 1)
    sampled = full_forward_decode(model, prompts, LEN - 1, temperature=1.0, seed=3)
  assert [r["tokens"] for r in greedy] == want

  # Sampled, and a row stops at its first stop id (</s>, or a token sampled
  # here), unrecorded.
  assert len(set(sampled[1])) > 5, sampled  # varied tokens: the comparison is a real one
  stop = sampled[1][len(sampled[1]) // 2]
  g = decode.seq2seq_generate(
    model,
    src,
    [[EOS, DE]] * 2,
    max_new_tokens=LEN - 1,
    sampling=decode.Sampling(1.0),
    seed=3,
    stop_ids=(EOS, stop),
  )
  assert g.tokens == [row[: row.index(stop)] if stop in row else row for row in sampled]

  # evaluate: the run's eval loss; chrF / BLEU are sacrebleu's on its hypotheses.
  out = tmp_path / "eval.json"
  p = program(
    "evaluate", trained, "--batches=2", "--examples=12", f"--output={out}", monkeypatch=monkeypatch
  )
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.load(open(out))
  logged = [x["eval_loss"] for x in rows(trained) if "eval_loss" in x][-1]
  assert abs(r["loss"] - logged) < 1e-4, (r["loss"], logged)
  assert r["step"] == 4 and r["split"] == "validation" and sorted(r["moe_layers"]) == ["1", "3"]
  t = r["translation"]
  hyps = [x["hypothesis"] for x in t["translations"]]
  refs = [x["target"] for x in t["translations"]]
  assert t["examples"] == len(hyps) == 12
  assert t["all"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
  assert t["all"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
  assert sorted(t["pairs"]) == ["de-en", "en-de"]
  for pair, s in t["pairs"].items():
    idx = [i for i, x in enumerate(t["translations"]) if f"{x['src_lang']}-{x['tgt_lang']}" == pair]
    h, ref = [hyps[i] for i in idx], [refs[i] for i in idx]
    assert s["examples"] == len(idx)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(h, [ref]).score)
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(h, [ref]).score)
  i = next(i for i, x in enumerate(t["translations"]) if x["source"] == first["source"])
  assert hyps[i] == greedy[0]["completion"]  # evaluate decodes as generate does
  assert "chrF" in p.stdout and "en-de" in p.stdout


@pytest.mark.parametrize(
  "args,needle",
  [
    (["--prompt=x"], "--src_lang: give one of the languages of"),
    (["--prompt=x", "--src_lang=en", "--tgt_lang=xx"], "--tgt_lang=xx is not one of"),
    (["--prompt=x", "--chat"], "--chat: decoder-only runs only"),
  ],
)
def test_generate_errors_are_one_line(trained, args, needle, monkeypatch):
  p = program("generate", trained, *args, monkeypatch=monkeypatch)
  assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert needle in p.stderr.strip().splitlines()[-1]
