"""DeepSeek-V3 (issue 31): configs/deepseek_v3.py's sizes and MLA's cache
bytes; the FP8 fixture's dequantisation and import, and its multi-head latent
attention cache decoding as the full forward. Two tests,
in process: tests/convert_test.py runs the float32 fixture too."""

import functools
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm import config as cfglib
from sparse_lm import decode
from sparse_lm import inspect as inspectlib


def test_configs_sizes_and_cache():
  """configs/deepseek_v3.py:671b: 671B total within 0.5% (inspect: 671.03B),
  37.55B active counting both embedding tables (the paper's "37B"); its cache
  per token is (512 + 64) x 61 layers x 2 bytes, 1.76% of the MHA twin's (128
  kv heads of 128: DeepSeek-V2 Table 1's 2 n_h d_h); its MTP module
  (model.mtp_depth=1, section 2.2) is counted apart: 11.61B (the release's
  README_WEIGHTS: 11.5B unique, besides the shared 0.9B embedding and 0.9B
  head), 0.69B of it active; :tiny validates, with one MTP module too."""
  c = cfglib.load_config("configs/deepseek_v3.py:671b")
  # inspect's counts of the first 4 and 5 layers (3 dense, then MoE): the 57
  # further MoE layers are each the 5th's (a 61-layer abstract model is 20 s).
  s4, s5 = [], []
  for n, out in ((4, s4), (5, s5)):
    c.model.num_layers = n
    out.append(inspectlib.summarize(c, c.data.vocab_size))
  total, active = (s4[0][k] + 57 * (s5[0][k] - s4[0][k]) for k in ("total_params", "active_params"))
  assert abs(total / 671e9 - 1) < 5e-3 and total == 671_026_404_352, total
  assert 37e9 <= active < 38e9 and active == 37_552_282_624, active
  assert s4[0]["mtp_params"] == s5[0]["mtp_params"] == 11_610_067_968
  assert s4[0]["mtp_active_params"] == 688_100_352
  c.model.num_layers = 61
  m = cfglib.model_spec(c).replace(dtype="bfloat16")
  assert decode.cache_bytes(m, 1, 1) == 576 * 61 * 2
  assert decode.cache_bytes(inspectlib.gqa_twin(m), 1, 1) == 2 * 128 * 128 * 61 * 2
  assert "GQA twin" in inspectlib.kv_cache_row(m)
  tiny = cfglib.model_spec(cfglib.load_config("configs/deepseek_v3.py:tiny"))
  assert tiny.attention == "mla" and tiny.mtp_depth == 1


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
  logits. (Training is not in CI, 15 s of compile: `python -m sparse_lm.main
  --config=configs/deepseek_v3.py:tiny` trains and generate decodes it.)
  tests/convert_test.py runs the float32 fixture through every family's
  tests (logits, greedy tokens, export -> import bit-exact with hub names)."""
  from safetensors.numpy import load_file

  from sparse_lm import convert
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
