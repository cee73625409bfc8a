"""config.json both ways (sparse_lm/convert/): the released config.json of
each family (tests/fixtures/released, README there) mapped at full size with
abstract shapes, the exported config.json read as transformers 4.x and vLLM
read it (plain JSON, no transformers), and the balance loss of an imported
run against transformers' load_balancing_loss_func written out in numpy."""

import json
import pathlib
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from sparse_lm import config as cfglib
from sparse_lm import convert
from sparse_lm import decode
from sparse_lm import inspect as inspectlib
from sparse_lm import state as statelib
from sparse_lm.convert import describe
from sparse_lm.models.moe import routing

FIX = pathlib.Path(__file__).parent / "fixtures"
RELEASED = FIX / "released"

# The model cards' totals (tests/fixtures/released/README.md).
CARD_PARAMS = {
  "Mixtral-8x7B-v0.1": 46.7e9,
  "Mixtral-8x7B-Instruct-v0.1": 46.7e9,
  "Qwen1.5-MoE-A2.7B": 14.3e9,
  "Qwen3-30B-A3B": 30.5e9,
  "OLMoE-1B-7B-0924": 6.9e9,
  "dbrx-instruct": 132e9,
}


def _released(name) -> dict:
  return json.loads((RELEASED / name / "config.json").read_text())


def read_as_transformers_4(cfg: dict) -> dict:
  """What a transformers-4-style reader (4.x's *Config classes, vLLM) takes
  from config.json: top-level rope_theta (absent: the class default, 10,000
  for Qwen-MoE and OLMoE, 1e6 for Mixtral; DBRX's attn_config.rope_theta),
  rope_scaling (null: unscaled), torch_dtype, and the balance coefficient."""
  if cfg["model_type"] == "dbrx":
    attn, ffn = cfg.get("attn_config") or {}, cfg.get("ffn_config") or {}
    theta, coef = attn.get("rope_theta", 10_000.0), ffn.get("moe_loss_weight", 0.01)
  else:
    default = 1e6 if cfg["model_type"] == "mixtral" else 10_000.0
    theta, coef = cfg.get("rope_theta", default), cfg.get("router_aux_loss_coef", 0.001)
  return {
    "rope_theta": float(theta),
    "rope_scaling": cfg.get("rope_scaling"),
    "torch_dtype": cfg.get("torch_dtype", "float32"),
    "router_aux_loss_coef": coef,
    "architectures": cfg["architectures"],
  }


def _full_size(name):
  hf = _released(name)
  fam = convert.family_of(hf, name)
  c = convert.config_of(fam, hf)
  cfglib.validate(c)
  return fam, hf, c


# ---------------------------------------------------------------- released


@pytest.mark.parametrize("name", sorted(CARD_PARAMS))
def test_released_config_maps_at_full_size(name):
  """Each released config.json maps to a config whose parameter count
  (inspect's, from the abstract model: no weights) is the model card's
  within 0.5%, with theta and the coefficient as published; exported back
  (in bfloat16) a transformers-4-style reader reads what the release says."""
  fam, hf, c = _full_size(name)
  total = inspectlib.summarize(c, c.data.vocab_size)["total_params"]
  assert abs(total / CARD_PARAMS[name] - 1) < 0.005, (name, total)
  published = read_as_transformers_4(hf)
  assert c.model.rope_theta == published["rope_theta"]
  m = cfglib.model_spec(c)
  n = m.num_layers - m.moe.first_dense_layers
  assert c.model.moe.load_balance_weight == pytest.approx(
    published["router_aux_loss_coef"] * m.moe.top_k / n, rel=1e-12
  )
  back = read_as_transformers_4(convert.hf_config(fam, c, hf, "bfloat16"))
  assert back == published, name


def test_released_qwen1_5_shared_expert_is_four_routed_widths():
  """Qwen1.5-MoE's shared expert (5632) is 4 x moe_intermediate_size
  (1408): 4 shared experts of d_ff 1408, one FFN of width 5632."""
  _, hf, c = _full_size("Qwen1.5-MoE-A2.7B")
  assert c.model.moe.num_shared_experts * c.model.moe.d_ff == hf["shared_expert_intermediate_size"]
  assert c.model.moe.shared_expert_gate and c.model.qkv_bias


def test_qwen3_yarn_long_context_imports_as_transformers(tmp_path):
  """Qwen3's long context (the model cards' rope_scaling: yarn, factor 4 from
  32,768 positions): tests/fixtures/hf/qwen3_moe/yarn (make_fixtures.py
  --only=qwen3_moe_yarn) is the qwen3_moe fixture's weights under that
  scaling in transformers 5's rope_parameters; imported, model.rope_scaling
  says it and the forward gives transformers' logits within 1e-4 (they are
  7.5 away from the unscaled model's) and its 16 greedy tokens, and export
  writes the source's rope_parameters back. The released Qwen3-30B-A3B
  config.json with the cards' top-level rope_scaling reads the same scaling
  (theta 1e6) and exports it in both spellings."""
  fix = FIX / "hf" / "qwen3_moe"
  src = tmp_path / "src"
  shutil.copytree(fix, src, ignore=shutil.ignore_patterns("yarn"))
  shutil.copy(fix / "yarn" / "config.json", src / "config.json")
  convert.import_checkpoint(str(src), str(tmp_path / "run"), say=lambda *a: None)
  model, c, _ = statelib.load_model(str(tmp_path / "run"), inference=True)
  yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
  assert c.model.rope_scaling.to_dict() == yarn
  g = load_file(fix / "yarn" / "golden.safetensors")
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0])  # eager: 20 s
  logits = np.asarray(forward(state, jnp.asarray(g["input_ids"])))
  assert np.abs(logits - g["logits"]).max() < 1e-4
  out = decode.generate(model, [g["prompt"][0].tolist()], max_new_tokens=16)
  assert out.tokens[0] == g["generated"][0].tolist()
  hf_cfg = json.loads((src / "config.json").read_text())
  fam = convert.FAMILIES["qwen3_moe"]
  out_cfg = convert.hf_config(fam, c, hf_cfg, "float32")
  assert out_cfg["rope_parameters"] == hf_cfg["rope_parameters"]

  hf = {**_released("Qwen3-30B-A3B"), "rope_scaling": yarn}
  cfg = convert.config_of(convert.family_of(hf, "config.json"), hf)
  cfglib.validate(cfg)
  assert cfg.model.rope_scaling.to_dict() == yarn and cfg.model.rope_theta == 1e6
  back = convert.hf_config(fam, cfg, hf, "bfloat16")
  assert read_as_transformers_4(back)["rope_scaling"] == yarn
  assert back["rope_parameters"] == {**yarn, "rope_theta": 1e6}


# ---------------------------------------------------------------- config.json


def _has_rope(family) -> bool:
  """A family whose fixture has RoPE (not switch_transformers' relative buckets)."""
  return "rope_parameters" in json.loads((FIX / "hf" / family / "config.json").read_text())


@pytest.mark.parametrize("family", [f for f in sorted(convert.FAMILIES) if _has_rope(f)])
def test_config_json_reads_alike_in_transformers_4_and_5(family):
  """From a transformers 5 config.json (rope_parameters, dtype: the fixtures)
  and a source whose torch_dtype says bfloat16, the export writes both
  spellings with the exported dtype; either reader finds the same theta and
  scaling."""
  fam = convert.FAMILIES[family]
  src = json.loads((FIX / "hf" / family / "config.json").read_text())
  c = convert.config_of(fam, src)
  theta = describe.lookup(src, "rope_parameters.rope_theta")
  out = convert.hf_config(fam, c, {**src, "torch_dtype": "bfloat16"}, "float32")
  old = read_as_transformers_4(out)
  assert old["rope_theta"] == theta and old["torch_dtype"] == out["dtype"] == "float32"
  # Unscaled RoPE: rope_scaling null; a scaled one (the gpt_oss fixture's
  # yarn) is 4.x's rope_scaling, rope_parameters less the theta.
  params = describe.lookup(src, "rope_parameters")
  scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  assert old["rope_scaling"] == (None if params["rope_type"] == "default" else scaling)
  assert old["architectures"] == [fam.architecture]
  assert out["rope_parameters"] == params
  # Import reads either spelling: transformers 5's alone, or 4.x's alone.
  legacy = {k: v for k, v in out.items() if k not in ("rope_parameters", "dtype")}
  for cfg in (out, legacy):
    assert convert.config_of(fam, cfg).model.to_dict() == c.model.to_dict(), family
  assert convert.source_dtype(legacy) == convert.source_dtype(out) == "float32"


def test_export_writes_theta_dtype_and_generation_config(tmp_path):
  """A Qwen3-MoE checkpoint with theta 1e6 and no generation_config.json,
  imported and exported: config.json has theta under both spellings, its
  dtype is the tensors', and generation_config.json has its token ids."""
  src = tmp_path / "src"
  shutil.copytree(FIX / "hf" / "qwen3_moe", src)
  (src / "generation_config.json").unlink()
  cfg = json.loads((src / "config.json").read_text())
  cfg["rope_parameters"]["rope_theta"] = 1e6
  (src / "config.json").write_text(json.dumps(cfg))
  convert.import_checkpoint(str(src), str(tmp_path / "run"), say=lambda *a: None)
  out = tmp_path / "out"
  convert.export_checkpoint(str(tmp_path / "run"), str(out), say=lambda *a: None)
  got = json.loads((out / "config.json").read_text())
  dtypes = {str(v.dtype) for v in load_file(out / "model.safetensors").values()}
  assert read_as_transformers_4(got)["rope_theta"] == 1e6
  assert {got["torch_dtype"], got["dtype"]} == dtypes
  gen = json.loads((out / "generation_config.json").read_text())
  assert gen == {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}
  imported = json.loads((tmp_path / "run" / "hf" / "import.json").read_text())
  assert imported["family"] == "qwen3_moe" and imported["dtype"] == "float32"


# ---------------------------------------------------------------- balance loss


def transformers_balance_loss(probs_layers, top_k: int, mask=None) -> float:
  """transformers' load_balancing_loss_func (models/mixtral/modeling_mixtral.py,
  shared by Qwen2/3-MoE and OLMoE) in numpy: the router outputs of all
  layers concatenated, softmax, top-k, then E * sum over (k, e) of the
  fraction of tokens whose k-th choice is e times e's mean probability, the
  means over the (attention-masked) rows of every layer. `probs_layers`:
  per layer [T, E] softmax probabilities (transformers softmaxes the
  logits; softmax(log p) = p); `mask`: [T] 1 for real tokens."""
  p = np.concatenate(probs_layers, 0).astype(np.float64)
  E = p.shape[-1]
  w = np.ones(len(p)) if mask is None else np.tile(mask, len(probs_layers)).astype(np.float64)
  chosen = np.argsort(-p, -1, kind="stable")[:, :top_k]  # torch.topk's order
  expert_mask = np.eye(E)[chosen]  # [N, K, E]
  tokens_per_expert = (expert_mask * w[:, None, None]).sum(0) / w.sum()
  router_prob_per_expert = (p * w[:, None]).sum(0) / w.sum()
  return float(np.sum(tokens_per_expert * router_prob_per_expert[None]) * E)


def _our_router_loss(moe, logits_layers, mask):
  """The router losses of an imported run's MoE layers summed, as loss_fn
  adds them (routing.route: each layer's load_balance_weight * its loss)."""
  total = 0.0
  for lg in logits_layers:
    r = routing.route(moe, mask_T=jnp.asarray(mask), train=False, router=jnp.asarray(lg))
    total += float(r.aux["router_loss"])
  return total


@pytest.mark.parametrize("name", ["Mixtral-8x7B-v0.1", "Qwen3-30B-A3B", "OLMoE-1B-7B-0924"])
def test_imported_balance_loss_means_the_model_cards(name):
  """At the released config's coefficient, E, top-k and MoE layer count:
  our summed per-layer term equals coef x transformers' loss whenever the
  layers' routing statistics agree (here: the same logits in every layer,
  with padding masked), and is in general coef x the mean over layers of
  transformers' per-layer loss; the pooled loss transformers computes
  differs from that mean by the cross-layer term balance_weight's
  docstring derives (checked here), not by a factor."""
  _, hf, c = _full_size(name)
  moe, coef = cfglib.model_spec(c).moe, hf["router_aux_loss_coef"]
  n = c.model.num_layers - c.model.moe.first_dense_layers
  T, E, K = 64, moe.num_experts, moe.top_k
  rng = np.random.default_rng(0)
  mask = (np.arange(T) < 52).astype(np.float32)  # 12 padding tokens
  softmax = lambda lg: (
    np.exp(lg - lg.max(-1, keepdims=True))
    / np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)
  )

  same = [rng.normal(size=(T, E)).astype(np.float32) * 2] * n
  ref = coef * transformers_balance_loss([softmax(x) for x in same], K, mask)
  assert _our_router_loss(moe, same, mask) == pytest.approx(ref, rel=1e-5)

  layers = [rng.normal(size=(T, E)).astype(np.float32) * 2 for _ in range(n)]
  probs = [softmax(x) for x in layers]
  per_layer = np.mean([transformers_balance_loss([p], K, mask) for p in probs])
  assert _our_router_loss(moe, layers, mask) == pytest.approx(coef * per_layer, rel=1e-5)
  pooled = transformers_balance_loss(probs, K, mask)
  real = mask > 0
  f = [np.eye(E)[np.argsort(-p[real], -1, kind="stable")[:, :K]].sum((0, 1)) for p in probs]
  f = [x / x.sum() for x in f]
  P = [p[real].mean(0) for p in probs]
  cross = sum(E * (f[a] - f[b]) @ (P[a] - P[b]) for a in range(n) for b in range(n)) / 2
  assert per_layer - pooled == pytest.approx(K * cross / n**2, rel=1e-6, abs=1e-9)
  assert per_layer != pytest.approx(pooled, rel=1e-6)  # they do differ


def test_imported_run_balance_loss_in_the_model(tmp_path):
  """Through the model: the imported Mixtral fixture's forward (2 MoE layers,
  4 experts, top-2, router_aux_loss_coef 0.001) adds coef x the mean over its
  layers of transformers' loss on each layer's router probabilities."""
  wd = tmp_path / "mixtral"
  convert.import_checkpoint(str(FIX / "hf" / "mixtral"), str(wd), say=lambda *a: None)
  model, c, _ = statelib.load_model(str(wd))
  ids = jnp.asarray(load_file(FIX / "hf" / "mixtral" / "golden.safetensors")["input_ids"])
  out = model(ids, return_experts=True)
  coef = json.loads((FIX / "hf" / "mixtral" / "config.json").read_text())["router_aux_loss_coef"]
  probs = [np.asarray(a["probs_TxE"]) for a in out.moe_aux]
  assert len(probs) == 2 and c.model.moe.load_balance_weight == coef * 2 / 2
  want = coef * np.mean([transformers_balance_loss([p], 2) for p in probs])
  got = sum(float(a["router_loss"]) for a in out.moe_aux)
  assert got == pytest.approx(want, rel=1e-5)
