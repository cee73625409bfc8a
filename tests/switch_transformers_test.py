"""Hugging Face SwitchTransformersForConditionalGeneration in and out
(sparse_lm/convert/families/switch_transformers.py; issue 30) against the
golden fixture transformers made (tests/fixtures/hf/make_fixtures.py,
switch_transformers/): its float32 logits of two (encoder, decoder) pairs
and its 16 greedy tokens, read by our EncoderDecoder. The fixture's inputs
are shorter than its expert_capacity (64), so transformers drops no token
and our dropless import computes the same function. The export -> import
round trip with the hub's names runs in tests/convert_test.py, over every
fixture folder; here: config.json's sparse steps, loss coefficients and
what is refused, both ways."""

import functools
import json
import pathlib
import shutil

from flax import nnx
from helpers import FAST_COMPILE
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from sparse_lm import config as cfglib
from sparse_lm import convert
from sparse_lm import finetune
from sparse_lm import inspect as inspectlib
from sparse_lm import state as statelib
from sparse_lm.errors import ConvertError

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf" / "switch_transformers"
TOL = 1e-4  # float32
FAM = convert.FAMILIES["switch_transformers"]


def _hf() -> dict:
  return json.loads((FIX / "config.json").read_text())


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  wd = tmp_path_factory.mktemp("switch") / "run"
  convert.import_checkpoint(str(FIX), str(wd), say=lambda *a: None)
  return wd


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _forward_and_greedy(graphdef, start, state, enc, dec, prompt):
  """(logits of the (encoder, decoder) pairs, 16 greedy tokens after the
  prompt from decoder start `start`): one compile for every call."""
  model = nnx.merge(graphdef, state)
  tokens = model.greedy(prompt, jnp.ones(prompt.shape, bool), 16, start_id=start)
  return model(enc, dec).logits, tokens


def _run(model, g) -> tuple[float, list]:
  """(max |logit - transformers'|, the greedy tokens)."""
  graphdef, state = nnx.split(model)
  start = _hf()["decoder_start_token_id"]
  args = (jnp.asarray(g[k]) for k in ("input_ids", "decoder_input_ids", "prompt"))
  logits, tokens = _forward_and_greedy(graphdef, start, state, *args)
  return float(np.abs(np.asarray(logits) - g["logits"]).max()), np.asarray(tokens).tolist()


def test_import_matches_transformers(imported):
  """Logits within TOL of transformers' and its greedy tokens (cached
  decoding from decoder start 0); a wrong mapping (the two stacks' position
  tables swapped, or two experts of the decoder's MoE layer) is far off."""
  g = load_file(FIX / "golden.safetensors")
  model, c, _ = statelib.load_model(str(imported), inference=True)
  assert c.model.arch == "encoder_decoder" and c.model.moe.dispatch == "dropless"
  assert (c.model.moe.every, c.model.moe.offset, c.model.moe.router) == (2, 1, "switch")
  assert c.model.activation == "relu" and c.model.tie_embeddings
  diff, tokens = _run(model, g)
  assert diff < TOL
  assert tokens == g["generated"].tolist()

  enc, dec = model.encoder.rel_bias, model.decoder.rel_bias
  enc[...], dec[...] = dec[...], enc[...]
  assert _run(model, g)[0] > 1e-2
  enc[...], dec[...] = dec[...], enc[...]
  assert model.decoder.blocks[1].is_moe
  ffn = model.decoder.blocks[1].ffn
  for w in (ffn.wi, ffn.wo):
    w[...] = w[...][jnp.array([1, 0, 2, 3])]
  assert _run(model, g)[0] > 1e-2


def test_tied_copies_an_older_checkpoint_holds(imported, tmp_path):
  """encoder / decoder.embed_tokens.weight and lm_head.weight beside
  shared.weight (what transformers 4.x may have written tied): compared with
  it (a note where one differs), the parameters read from shared.weight."""
  src = tmp_path / "src"
  shutil.copytree(FIX, src)
  t = load_file(src / "model.safetensors")
  for s in ("encoder", "decoder"):
    t[f"{s}.embed_tokens.weight"] = t["shared.weight"]
  t["lm_head.weight"] = t["shared.weight"] + 1.0
  save_file(t, src / "model.safetensors")
  notes = []
  convert.import_checkpoint(str(src), str(tmp_path / "run"), say=notes.append)
  assert [n for n in notes if n.startswith("note:")] == [
    "note: lm_head.weight differs from shared.weight (max |difference| 1); imported as "
    "shared.weight (our model shares it)"
  ]
  params = lambda wd: nnx.to_flat_state(nnx.state(statelib.load_model(str(wd))[0], nnx.Param))
  for (path, a), (_, b) in zip(params(imported), params(tmp_path / "run")):
    assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), path


def test_config_json_both_ways():
  """Sparse steps as every / offset (transformers' i % step == 1), the loss
  coefficients per MoE layer of a stack, and config.json written back."""
  hf = {**_hf(), "num_layers": 12, "num_decoder_layers": 12}
  hf.update(num_sparse_encoder_layers=3, num_sparse_decoder_layers=3)  # step 4: 1, 5, 9
  c = convert.config_of(FAM, hf)
  cfglib.validate(c)
  m = cfglib.model_spec(c)
  assert m.moe_layers == (1, 5, 9)
  assert m.moe.load_balance_weight == pytest.approx(0.001 / 3)
  assert m.moe.z_loss_weight == pytest.approx(0.001 / 3)
  back = convert.hf_config(FAM, c, hf)
  for k in ("num_sparse_encoder_layers", "num_sparse_decoder_layers", "router_aux_loss_coef"):
    assert back[k] == hf[k], k
  assert back["encoder_sparse_step"] == back["decoder_sparse_step"] == 4
  hf.update(num_sparse_encoder_layers=12, num_sparse_decoder_layers=12)  # step 1: every layer
  assert cfglib.model_spec(convert.config_of(FAM, hf)).moe_layers == tuple(range(12))


def test_export_of_a_run_trained_here_and_its_refusals():
  """configs/switch_t5.py:tiny (GeGLU) is refused in one line naming the key;
  with ReLU it exports, expert_capacity from its evaluation capacity."""
  c = cfglib.load_config("configs/switch_t5.py:tiny")
  with pytest.raises(ConvertError, match=r"config.model.activation='geglu' cannot be exported"):
    convert.check_exportable(c, FAM)
  c.model.activation = "relu"
  convert.check_exportable(c, FAM)
  hf = convert.hf_config(FAM, c, {})
  assert hf["expert_capacity"] == 16  # ceil(2.0 x 64 / 8)
  assert hf["num_sparse_encoder_layers"] == 1 and hf["encoder_sparse_step"] == 2
  assert hf["decoder_start_token_id"] == 0 and hf["tie_word_embeddings"] is True
  assert hf["router_aux_loss_coef"] == pytest.approx(c.model.moe.load_balance_weight)
  c.model.num_kv_heads = 2
  with pytest.raises(ConvertError, match="no grouped-query attention"):
    convert.check_exportable(c, FAM)
  # Fine-tuning it (or an import: train.init_from) logs no routing drift yet:
  # finetune.router_probs runs the decoder-only model on its batch.
  c.train.init_from = "runs/imported"
  assert not finetune.drifts(c)


def test_switch_base_8_shape_both_ways():
  """configs/switch_t5.py:switch_base_8 (google/switch-base-8's shape) as
  config.json and back: the same model (inspect: 619,339,008 parameters, the
  README's count), d_kv / d_ff / sparse steps as transformers names them."""
  c = cfglib.load_config("configs/switch_t5.py:switch_base_8")
  hf = convert.hf_config(FAM, c, {})
  assert (hf["d_model"], hf["d_kv"], hf["d_ff"], hf["num_heads"]) == (768, 64, 3072, 12)
  assert (hf["num_layers"], hf["num_sparse_encoder_layers"], hf["encoder_sparse_step"]) == (
    12,
    6,
    2,
  )
  assert (hf["num_experts"], hf["vocab_size"], hf["dense_act_fn"]) == (8, 32128, "relu")
  back = convert.config_of(FAM, hf)
  cfglib.validate(back)
  assert (
    cfglib.model_spec(back).moe_layers == cfglib.model_spec(c).moe_layers == (1, 3, 5, 7, 9, 11)
  )
  assert inspectlib.summarize(back, back.data.vocab_size)["total_params"] == 619_339_008


BAD = [
  ({"num_sparse_decoder_layers": 2}, "num_sparse_decoder_layers=2: the decoder's sparse step 1"),
  ({"num_decoder_layers": 3}, "num_decoder_layers=3: only as many as num_layers=2"),
  ({"relative_attention_num_buckets": 64}, "relative_attention_num_buckets=64: only T5's 32"),
  ({"dense_act_fn": "gelu_new"}, "dense_act_fn='gelu_new': only 'relu'"),
  ({"router_bias": True}, "router_bias=True: a router bias is not supported"),
  ({"router_dtype": "bfloat16"}, "router_dtype='bfloat16': only float32 routers"),
]


@pytest.mark.parametrize("edit,message", BAD, ids=[next(iter(b[0])) for b in BAD])
def test_import_refuses_what_the_model_cannot_hold(edit, message):
  with pytest.raises(ConvertError) as e:
    convert.config_of(FAM, {**_hf(), **edit})
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
