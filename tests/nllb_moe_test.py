"""Hugging Face NllbMoeForConditionalGeneration in and out
(sparse_lm/convert/families/nllb_moe.py; issue 30) against the golden
fixture transformers made (tests/fixtures/hf/make_fixtures.py, nllb_moe/,
with transformers 4.x's expert loop: 5.25's routes every token to experts 1
and 0): its float32 logits of two (encoder, decoder) pairs and its 16 greedy
tokens from decoder start 2 (</s>), read by our EncoderDecoder with fairseq's
parts. The export -> import round trip with the hub's names runs in
tests/convert_test.py, over every fixture folder; here: config.json's keys
both ways and what is refused."""

import json
import pathlib

from flax import nnx
from helpers import FAST_COMPILE
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from sparse_lm import config as cfglib
from sparse_lm import convert
from sparse_lm import decode
from sparse_lm import evaluate
from sparse_lm import state as statelib
from sparse_lm.errors import ConfigError
from sparse_lm.errors import ConvertError

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf" / "nllb_moe"
TOL = 1e-4  # float32
FAM = convert.FAMILIES["nllb_moe"]


def _hf() -> dict:
  return json.loads((FIX / "config.json").read_text())


def test_import_matches_transformers(tmp_path):
  """Logits within TOL of transformers' and its greedy tokens (cached
  decoding from </s>); two experts of the encoder's MoE layer swapped are
  far off (tests/encoder_decoder_test.py checks the sinusoids' offset)."""
  convert.import_checkpoint(str(FIX), str(tmp_path / "run"), say=lambda *a: None)
  g = load_file(FIX / "golden.safetensors")
  model, c, tok = statelib.load_model(str(tmp_path / "run"), inference=True)
  m = c.model
  assert (m.arch, m.position, m.norm) == ("encoder_decoder", "sinusoidal", "layer")
  assert m.norm_eps == 1e-5
  assert m.scale_embedding and m.qkv_bias and m.attn_out_bias and m.mlp_bias and m.moe.expert_bias
  assert (m.moe.every, m.moe.offset, m.moe.top_k, m.moe.eom_rate) == (2, 1, 2, 0.2)
  assert m.moe.dispatch == "dropless" and m.moe.z_loss_weight == 0.0
  graphdef, state = nnx.split(model)
  start = _hf()["decoder_start_token_id"]

  def run(state, enc, dec, prompt):
    model = nnx.merge(graphdef, state)
    toks = model.greedy(prompt, jnp.ones(prompt.shape, bool), 16, start_id=start)
    return model(enc, dec).logits, toks

  run = jax.jit(run, compiler_options=FAST_COMPILE)
  args = [jnp.asarray(g[k]) for k in ("input_ids", "decoder_input_ids", "prompt")]
  logits, toks = run(state, *args)
  assert np.abs(np.asarray(logits) - g["logits"]).max() < TOL
  assert np.asarray(toks).tolist() == g["generated"].tolist()

  # NLLB's language tokens (lang_golden.json): the import's languages are its
  # tokenizer's codes; generate's layout ([src_lang] text </s>; the decoder from
  # </s> with [tgt_lang] forced) is NllbTokenizer's, its greedy tokens transformers'.
  lg = json.loads((FIX / "lang_golden.json").read_text())
  run_dir = str(tmp_path / "run")
  langs = statelib.seq2seq_languages(c, tok, run_dir)
  assert langs == lg["languages"]
  sources, prefixes = [], []
  for case in lg["cases"]:
    pair = (case["src_lang"], case["tgt_lang"])
    ex, cut = decode.seq2seq_example(c, tok, case["source"], langs, *pair)
    src, prefix = decode.seq2seq_prompt(ex)
    assert not cut and src == case["input_ids"]
    assert prefix == [start, langs[case["tgt_lang"]]]
    sources.append(src)
    prefixes.append(prefix)
  gen = decode.seq2seq_generate(model, sources, prefixes, max_new_tokens=16)
  assert gen.tokens == [case["generated"] for case in lg["cases"]]
  # Pairs named by Django's locales (seq2seq:translation's) are not this model's languages.
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text(json.dumps(dict(source="a", target="b", src_lang="en", tgt_lang="de")) + "\n")
  with pytest.raises(ConfigError) as e:
    evaluate.evaluate(run_dir, dataset=f"seq2seq:{pairs}", split="train", mesh="one")
  assert "2 of its languages take other token ids than the run's (de: " in str(e.value)

  ffn = model.encoder.blocks[1].ffn
  assert model.encoder.blocks[1].is_moe and not model.encoder.blocks[0].is_moe
  for w in (ffn.wi, ffn.wo, ffn.bi, ffn.bo):
    w[...] = w[...][jnp.array([1, 0, 2, 3])]
  assert np.abs(np.asarray(run(nnx.state(model), *args)[0]) - g["logits"]).max() > 1e-2


def test_config_json_both_ways():
  """The fixture's config.json -> ours -> config.json: the same keys; the
  released 54B shape (configs/nllb_moe.py:54b) as config.json and back: the
  same model block."""
  hf = _hf()
  c = convert.config_of(FAM, hf)
  m = cfglib.model_spec(c)
  assert m.moe_layers == (1,) and m.moe.load_balance_weight == pytest.approx(0.001)
  back = convert.hf_config(FAM, c, hf)
  for k, v in hf.items():
    if k != "transformers_version":
      assert back.get(k) == v, (k, back.get(k), v)
  big = cfglib.load_config("configs/nllb_moe.py:54b")
  convert.check_exportable(big, FAM)
  out = convert.hf_config(FAM, big, {})
  assert (out["d_model"], out["encoder_layers"], out["encoder_ffn_dim"]) == (2048, 24, 8192)
  assert (out["num_experts"], out["encoder_sparse_step"], out["vocab_size"]) == (128, 4, 256_206)
  assert out["model_type"] == "nllb-moe" and out["scale_embedding"] is True
  again = convert.config_of(FAM, out)
  assert cfglib.model_spec(again).moe_layers == (3, 7, 11, 15, 19, 23)
  for k in ("d_model", "num_layers", "num_heads", "d_ff", "position", "norm", "scale_embedding"):
    assert again.model[k] == big.model[k], k
  switch = cfglib.load_config("configs/switch_t5.py:tiny")
  with pytest.raises(ConvertError, match=r"config.model.position='relative' cannot be exported"):
    convert.check_exportable(switch, FAM)


BAD = [
  ({"decoder_sparse_step": 4}, "decoder_sparse_step=4: only as encoder_sparse_step=2"),
  ({"decoder_layers": 3}, "decoder_layers=3: only as encoder_layers=2"),
  ({"scale_embedding": False}, "scale_embedding=False: only True"),
  ({"pad_token_id": 0}, "pad_token_id=0: only 1"),
  ({"activation_function": "gelu"}, "activation_function='gelu': only 'relu'"),
  ({"router_bias": True}, "router_bias=True: a router bias is not supported"),
  ({"encoder_sparse_step": 0, "decoder_sparse_step": 0}, "encoder_sparse_step=0: only a sparse"),
]


@pytest.mark.parametrize("edit,message", BAD, ids=[next(iter(b[0])) for b in BAD])
def test_import_refuses_what_the_model_cannot_hold(edit, message):
  with pytest.raises(ConvertError) as e:
    convert.config_of(FAM, {**_hf(), **edit})
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
