"""DeepSeek-V3 (issue 31): the released config.json mapped at full size,
configs/deepseek_v3.py's sizes and MLA's cache bytes; the FP8 fixture's
dequantisation and import, and its multi-head latent attention cache
decoding as the full forward; the multi-token prediction layer (the
release's layer 61) imported, exported and skipped where absent. Three
tests, in process: tests/convert_test.py runs the float32 fixture too."""

import functools
import json
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm import config as cfglib
from sparse_lm import convert
from sparse_lm import decode
from sparse_lm import inspect as inspectlib
from sparse_lm.errors import ConvertError

RELEASED = pathlib.Path(__file__).parent / "fixtures" / "released"

# What configs/deepseek_v3.py:671b must equal in the imported released config.json.
ARCHITECTURE = (
  "d_model num_layers num_heads d_ff attention mla activation norm norm_eps position rope_theta "
  "rope_scaling rope_layout tie_embeddings mtp_depth moe.num_experts moe.top_k moe.d_ff "
  "moe.router moe.num_groups moe.top_k_groups moe.routed_scaling_factor moe.normalize_gates "
  "moe.num_shared_experts moe.first_dense_layers moe.every"
).split()


def test_released_config_and_configs_sizes_and_cache():
  """The released config.json (tests/fixtures/released/DeepSeek-V3: FP8,
  yarn as top-level rope_scaling, one MTP layer) maps at full size with
  abstract shapes to configs/deepseek_v3.py:671b in every architecture key
  and exports back its rope_theta / rope_scaling without
  quantization_config; a group-limited shape whose num_experts_per_tok //
  topk_group is not 2 (DeepSeek's group score: its top 2 experts) is refused
  on import and export. inspect's totals: 671B within 0.5% (671.03B), 37.55B
  active counting both embedding tables (the paper's "37B"), 36.63B without
  the input embedding (README_WEIGHTS.md: 36.6B "including 0.9B for the
  output Head"); its MTP module (model.mtp_depth=1, section 2.2) is counted
  apart: 11.61B (README_WEIGHTS: 11.5B unique, besides the shared 0.9B
  embedding and 0.9B head), 0.69B of it active, and with its copies of the
  embedding and head the hub's 685B within 0.5%. Its cache per token is
  (512 + 64) x 61 layers x 2 bytes, 1.76% of the MHA twin's (128 kv heads
  of 128: DeepSeek-V2 Table 1's 2 n_h d_h); :tiny validates, with one MTP
  module too; :1b (Moonlight-16B-A3B at half width) builds abstractly at
  4.18B total / 0.92B active."""
  hf = json.loads((RELEASED / "DeepSeek-V3" / "config.json").read_text())
  fam = convert.family_of(hf, "config.json")
  c = cfglib.validate(convert.config_of(fam, hf))
  ours = cfglib.load_config("configs/deepseek_v3.py:671b")
  for key in ARCHITECTURE:
    a, b = (functools.reduce(getattr, key.split("."), x.model) for x in (c, ours))
    a, b = (v.to_dict() if hasattr(v, "to_dict") else v for v in (a, b))
    assert a == b, key
  back = convert.hf_config(fam, c, hf, "bfloat16")
  scaling = {("rope_type" if k == "type" else k): v for k, v in hf["rope_scaling"].items()}
  assert back["rope_scaling"] == scaling and back["rope_theta"] == hf["rope_theta"]
  assert "quantization_config" not in back and back["num_nextn_predict_layers"] == 1
  # n_group 1 (Moonlight-16B-A3B, Kimi-K2): no group limit, router
  # sigmoid_bias (moe_routing_test's reference with G = 1), written back as 1 / 1.
  one = cfglib.validate(convert.config_of(fam, {**hf, "n_group": 1, "topk_group": 1}))
  assert (one.model.moe.router, one.model.moe.num_groups) == ("sigmoid_bias", 0)
  one_back = convert.hf_config(fam, one, hf, "bfloat16")
  assert (one_back["n_group"], one_back["topk_group"]) == (1, 1)
  one.model.moe.router = "topk"
  with pytest.raises(ConvertError, match=r"model\.moe\.router='topk'.*'sigmoid_bias'"):
    convert.check_exportable(one, fam)
  # DeepSeek scores a group by its top 2 experts, group_limited by its top
  # top_k // top_k_groups: any other ratio is refused both ways.
  with pytest.raises(ConvertError, match=r"num_experts_per_tok / topk_group=4: .*top 2"):
    convert.config_of(fam, {**hf, "topk_group": 2})
  c.model.moe.top_k_groups = 2
  with pytest.raises(ConvertError, match=r"model\.moe\.top_k=8 .*top_k // top_k_groups"):
    convert.check_exportable(c, fam)
  c.model.moe.top_k_groups = 4

  # inspect's counts of the first 4 and 5 layers (3 dense, then MoE): the 57
  # further MoE layers are each the 5th's (a 61-layer abstract model is 20 s).
  s4, s5 = [], []
  for n, out in ((4, s4), (5, s5)):
    c.model.num_layers = n
    out.append(inspectlib.summarize(c, c.data.vocab_size))
  total, active = (s4[0][k] + 57 * (s5[0][k] - s4[0][k]) for k in ("total_params", "active_params"))
  assert abs(total / 671e9 - 1) < 5e-3 and total == 671_026_404_352, total
  assert 37e9 <= active < 38e9 and active == 37_552_282_624, active
  emb = s4[0]["input_embedding_params"]
  assert emb == 129_280 * 7168 and abs((active - emb) / 36.6e9 - 1) < 5e-3
  assert s4[0]["mtp_params"] == s5[0]["mtp_params"] == 11_610_067_968
  assert s4[0]["mtp_active_params"] == 688_100_352
  assert abs((total + s4[0]["mtp_params"] + 2 * emb) / 685e9 - 1) < 5e-3
  c.model.num_layers = 61
  m = cfglib.model_spec(c).replace(dtype="bfloat16")
  assert decode.cache_bytes(m, 1, 1) == 576 * 61 * 2
  assert decode.cache_bytes(inspectlib.gqa_twin(m), 1, 1) == 2 * 128 * 128 * 61 * 2
  assert "(MHA twin 3.81 MiB: 1.76%)" in inspectlib.kv_cache_row(m)
  assert "(GQA twin (8 kv heads) " in inspectlib.kv_cache_row(m.replace(num_kv_heads=8))
  tiny = cfglib.model_spec(cfglib.load_config("configs/deepseek_v3.py:tiny"))
  assert tiny.attention == "mla" and tiny.mtp_depth == 1
  one_b = cfglib.load_config("configs/deepseek_v3.py:1b")
  s = inspectlib.summarize(one_b, one_b.data.vocab_size)
  assert (s["total_params"], s["active_params"]) == (4_180_808_192, 919_474_688)


def test_fp8_copy_imports_and_its_mla_cache_decodes_as_the_full_forward(tmp_path):
  """tests/fixtures/hf/deepseek_v3/fp8 (make_fixtures.py --deepseek_only: the
  release's format, F8_E4M3 weights with float32 weight_scale_inv per 16 x 16
  block here, partial blocks included): every FP8 weight dequantises
  bit-equal to transformers' _dequantize_fp8_weight (fp8_golden: layer 1's)
  and to the float32 fixture's tensor (its weights are FP8-rounded); the FP8
  copy imports (fp8.py through the importer) to transformers' logits within
  1e-4. On that model (yarn with mscale != mscale_all_dim, interleaved RoPE,
  group-limited routing x 2.5): the MLA cache is [B, S, kv_lora_rank] +
  [B, S, qk_rope_head_dim] per layer, decoding through it token by token
  (the absorbed form) after a 6-token prefill gives the full forward's
  logits, and decode.generate's greedy tokens for two prompts of 3 and 7
  tokens (left-padded) its argmax (the closest top-2 gap 0.008; with the
  short row's 4 pad slots attended 3 of its 4 tokens differ). (Training
  is not in CI, 15 s of compile: `python -m sparse_lm.main
  --config=configs/deepseek_v3.py:tiny` trains and generate decodes it.)
  tests/convert_test.py runs the float32 fixture through every family's
  tests (logits, greedy tokens, export -> import bit-exact with hub names)."""
  from safetensors.numpy import load_file

  from sparse_lm import state as statelib
  from sparse_lm.convert import fp8
  from sparse_lm.convert.safetensors_io import Tensors

  fix = pathlib.Path(__file__).parent / "fixtures" / "hf" / "deepseek_v3"
  view = fp8.dequantized(Tensors(str(fix / "fp8")))
  assert view.block == (16, 16) and len(view.pairs) == 3 * 5 + 2 * (8 + 1) * 3 + 3
  golden, full = load_file(fix / "fp8_golden.safetensors"), load_file(fix / "model.safetensors")
  assert golden and set(golden) <= view.pairs
  for name in view.names():
    w = view.get(name)
    assert w.dtype == full[name].dtype and np.array_equal(w, full[name]), name
    if name in golden:
      assert np.array_equal(w, golden[name]), name
  assert any(view.t.shape(p + fp8.SUFFIX)[0] * 16 > view.shape(p)[0] for p in view.pairs)

  convert.import_checkpoint(str(fix / "fp8"), str(tmp_path / "run"), say=lambda *a: None)
  model, _, _ = statelib.load_model(str(tmp_path / "run"))
  model = decode.for_inference(model)
  m = model.m
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda t: nnx.merge(graphdef, state)(t).logits)
  g = load_file(fix / "golden.safetensors")
  np.testing.assert_allclose(np.asarray(forward(g["input_ids"])), g["logits"], atol=1e-4)

  S, B, T, P = 24, 2, 20, 6
  toks = jax.random.randint(jax.random.key(3), (B, S), 3, 320)
  full = np.asarray(forward(toks))[:, :T]
  cache = decode.init_cache(m, B, S)
  assert [(lc.k.shape, lc.v.shape) for lc in cache.layers] == [((B, S, 32), (B, S, 8))] * 3
  assert decode.cache_bytes(m, B, S) == 3 * B * S * (32 + 8) * 4
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  ones = jnp.ones((B, T), jnp.float32)
  step = jax.jit(functools.partial(decode.forward, graphdef))
  lg, cache, _ = step(state, toks[:, :P], ones[:, :P], pos[:, :P], cache)
  got = [lg]
  for t in range(P, T):
    lg, cache, _ = step(state, toks[:, t : t + 1], ones[:, t : t + 1], pos[:, t : t + 1], cache)
    got.append(lg)
  np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-4)
  # Greedy decoding of two prompts of different lengths (left-padded: the
  # latent cache and the RoPE key of padded slots masked) = the argmax of the
  # full forward over each prompt and its tokens so far.
  prompts = [toks[0, :3].tolist(), toks[1, :7].tolist()]
  out = decode.generate(model, prompts, max_new_tokens=4)
  seqs = jnp.asarray([p + g + [0] * (S - len(p) - len(g)) for p, g in zip(prompts, out.tokens)])
  logits = np.asarray(forward(seqs))  # causal: the padding after a row changes nothing before it
  for row, (p, gen) in enumerate(zip(prompts, out.tokens)):
    assert gen == logits[row, len(p) - 1 : len(p) + 3].argmax(-1).tolist(), row


def _raw_safetensors(path) -> dict:
  """{name: (dtype code, shape, bytes)} of a safetensors file, any dtype (FP8 too)."""
  data = pathlib.Path(path).read_bytes()
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8 : 8 + n])
  header.pop("__metadata__", None)
  body = data[8 + n :]
  return {k: (v["dtype"], v["shape"], body[slice(*v["data_offsets"])]) for k, v in header.items()}


def _write_raw_safetensors(path, tensors: dict):
  header, off = {}, 0
  for k, (dt, shape, b) in tensors.items():
    header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(b)]}
    off += len(b)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + b"".join(b for _, _, b in tensors.values()))


def test_mtp_layer_imports_exports_bit_exact_and_is_skipped_where_absent(tmp_path):
  """The release's MTP layer (README_WEIGHTS.md; vLLM's deepseek_mtp.py):
  layer num_hidden_layers + k as model.mtp_depth's module k. The FP8
  fixture plus a layer 3 in the release's format (layer 1's FP8 MoE decoder
  layer with its weight_scale_inv, float32 enorm, hnorm, eh_proj [d, 2d] and
  shared_head.norm of its own, and the copies embed_tokens /
  shared_head.head) imports with mtp_depth 1, its block dequantised as
  layer 1; eh_proj's orientation and concat order are vLLM's
  (eh_proj(cat[enorm(emb), hnorm(h)]) equals MtpModule.project); export
  writes the dequantised tensors bit for bit under the hub's names (copies
  included) and num_nextn_predict_layers 1, and imports back to the same
  parameters, mtp/0/* included. The fixture itself (config.json says 1
  layer, transformers saved none) imports without MTP (mtp_depth 0) and says
  so in one line; a run without MTP exports num_nextn_predict_layers 0, and
  a family without MTP layers (Mixtral) refuses a run with them."""
  import shutil

  from safetensors.numpy import load_file

  from sparse_lm import params as paramslib
  from sparse_lm import state as statelib
  from sparse_lm.convert import fp8
  from sparse_lm.convert import importer
  from sparse_lm.convert.safetensors_io import Tensors

  fix = pathlib.Path(__file__).parent / "fixtures" / "hf" / "deepseek_v3"
  load = lambda wd: statelib.load_model(str(wd), keep_mtp=True)[0]
  flat = lambda model: {
    paramslib.path_str(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))
  }
  params = lambda wd: flat(load(wd))
  quiet = lambda *a: None

  # The fixture: config.json says num_nextn_predict_layers 1, no layer 3
  # (its whole import is tests/convert_test.py's and the FP8 test's above).
  fam, c = importer.hf_to_config(str(fix))
  rules = fam.rules(cfglib.model_spec(c), False)
  notes = []
  assert c.model.mtp_depth == 1 and any(r.hf[0].startswith("model.layers.3.") for r in rules)
  assert importer.without_mtp(fam, c, rules, Tensors(str(fix)), 8, say=notes.append)
  assert c.model.mtp_depth == 0 and len(notes) == 1, notes
  assert "num_nextn_predict_layers=1" in notes[0] and "model.mtp_depth=0" in notes[0], notes
  assert convert.hf_config(fam, c, {"num_nextn_predict_layers": 1})["num_nextn_predict_layers"] == 0
  # A copy (Rule.copy_of) that differs from what it repeats: a note, not a failure.
  from safetensors.numpy import save_file

  from sparse_lm.convert import describe

  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  for y, noted in ((x.copy(), False), (x + np.eye(4, 3, dtype=np.float32), True)):
    (tmp_path / "copies").mkdir(exist_ok=True)
    save_file({"x": x, "y": y}, tmp_path / "copies" / "model.safetensors")
    notes = []
    rule = describe.copy(describe.same("embed/embedding", "y"), "x")
    importer.check_copies([rule], Tensors(str(tmp_path / "copies")), say=notes.append)
    assert bool(notes and "y differs from x (max |difference| 1)" in notes[0]) == noted, notes
  mixtral = convert.FAMILIES["mixtral"]
  c = convert.config_of(mixtral, json.loads((fix.parent / "mixtral" / "config.json").read_text()))
  c.model.mtp_depth = 1
  with pytest.raises(ConvertError, match=r"mtp_depth=1 cannot be exported as Mixtral.*no mul"):
    convert.check_exportable(c, mixtral)

  # With an MTP layer, FP8 as the release's: layer 1's tensors as layer 3's.
  src, L, d = tmp_path / "src", 3, 64
  shutil.copytree(fix / "fp8", src)
  raw = _raw_safetensors(src / "model.safetensors")
  for name, v in list(raw.items()):
    if name.startswith("model.layers.1."):
      raw[name.replace("model.layers.1.", f"model.layers.{L}.")] = v
  p = f"model.layers.{L}."
  raw[p + "embed_tokens.weight"] = raw["model.embed_tokens.weight"]
  raw[p + "shared_head.head.weight"] = raw["lm_head.weight"]
  rng = np.random.default_rng(0)
  ours = {n: (1 + 0.1 * rng.standard_normal(d)) for n in ("enorm", "hnorm", "shared_head.norm")}
  ours["eh_proj"] = 0.1 * rng.standard_normal((d, 2 * d))
  for n, w in ours.items():
    ours[n] = w = w.astype(np.float32)
    raw[f"{p}{n}.weight"] = ("F32", w.shape, w.tobytes())
  assert raw[p + "mlp.experts.0.gate_proj.weight"][0] == "F8_E4M3"
  assert p + "mlp.experts.0.gate_proj.weight_scale_inv" in raw
  _write_raw_safetensors(src / "model.safetensors", raw)
  notes = []
  info = convert.import_checkpoint(str(src), str(tmp_path / "mtp"), say=notes.append)
  assert info["mtp_depth"] == 1 and not any("note" in n for n in notes), notes
  model = load(tmp_path / "mtp")
  a = flat(model)
  block = [k for k in a if k.startswith("mtp/0/block/")]
  assert len(block) == len([k for k in a if k.startswith("blocks/1/")]) == 17
  for k in block:
    assert np.array_equal(a[k], a[k.replace("mtp/0/block/", "blocks/1/")]), k
  assert not np.array_equal(a["mtp/0/block/ffn/wg"], a["blocks/2/ffn/wg"])
  assert np.array_equal(a["mtp/0/eh_proj"], ours["eh_proj"].T)

  # vLLM's DeepSeekMultiTokenPredictorLayer: eh_proj(cat([enorm(emb), hnorm(h)])).
  h, e = rng.standard_normal((2, 1, 5, d)).astype(np.float32)
  rms = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * w
  want = np.concatenate([rms(e, ours["enorm"]), rms(h, ours["hnorm"])], -1) @ ours["eh_proj"].T
  np.testing.assert_allclose(np.asarray(model.mtp[0].project(h, e)), want, atol=1e-5)

  convert.export_checkpoint(str(tmp_path / "mtp"), str(tmp_path / "out"), say=quiet)
  got = load_file(tmp_path / "out" / "model.safetensors")
  hub = fp8.dequantized(Tensors(str(src)))  # the hub's float tensors
  assert sorted(got) == hub.names() and p + "eh_proj.weight" in got
  for name in hub.names():
    want = hub.get(name)
    assert got[name].dtype == want.dtype and np.array_equal(got[name], want), name
  assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1
  convert.import_checkpoint(str(tmp_path / "out"), str(tmp_path / "again"), say=quiet)
  b = params(tmp_path / "again")
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.array_equal(a[k], b[k]), k
