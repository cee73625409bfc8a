"""Qwen3-MoE (Qwen3MoeForCausalLM): RMSNorm on each head's queries and keys
(qk_norm "head"), a head_dim of its own, no biases and no shared experts.

RoPE scaling: Qwen3's long context is yarn added to config.json (the Qwen3
model cards: rope_scaling {"rope_type": "yarn", "factor": 4.0,
"original_max_position_embeddings": 32768}, 131,072 positions), read into
model.rope_scaling as transformers 5's rope_parameters (or that top-level
rope_scaling) says, and written back in both spellings. transformers 5
computes it with the given factor (modeling_rope_utils'
_compute_yarn_parameters); some 4.x releases instead took max_position_embeddings
/ original_max_position_embeddings as the factor where both are present
(1.25 for the released 40,960), so a 4.x reader of the same file may
disagree: the factor here is config.json's."""

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.families import gpt_oss
from sparse_lm.convert.families import shared

_THETA = 10_000.0  # Qwen3MoeConfig's default rope_theta


def _read_rope(hf: dict):
  """(rope_theta, rope_scaling or None) from transformers 5's rope_parameters,
  or else the top-level rope_theta + rope_scaling (the released config.json
  and the model cards' yarn); "type" read as "rope_type"."""
  p = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = p.pop("rope_theta", None)
  theta = float(theta if theta is not None else hf.get("rope_theta", _THETA))
  kind = p.pop("rope_type", None) or p.pop("type", None) or "default"
  p.pop("type", None)
  if kind == "default":
    return theta, None
  if kind == "dynamic":
    p.setdefault("max_position_embeddings", hf.get("max_position_embeddings"))
  return theta, {"rope_type": kind, **p}  # unknown keys / types: refused by validation


ROPE = (
  Key(
    ("model.rope_theta", "model.rope_scaling"),
    "rope_parameters",
    legacy=("rope_scaling", "rope_theta"),
    read=_read_rope,
    write=gpt_oss._rope_parameters,  # pylint: disable=protected-access
  ),
  Key("model.rope_theta", "rope_theta", to_ours=None, to_hf=float),
  Key(hf="rope_scaling", to_ours=None, write=gpt_oss._rope_scaling, default=None),  # pylint: disable=protected-access
)


def _is_unscaled_rope(k: Key) -> bool:
  """shared.rope()'s keys (they refuse scaling) and EVERY_FAMILY's refusal of
  model.rope_scaling on export: ROPE replaces them."""
  hf = {"rope_parameters.rope_type", "rope_parameters.rope_theta", "rope_theta", "rope_scaling"}
  return bool(set(k.hf) & hf) or k.ours == ("model.rope_scaling",)


def _keys():
  out, placed = [], False
  for k in shared.QWEN_MOE:
    if _is_unscaled_rope(k):
      out += [] if placed else list(ROPE)
      placed = True
    else:
      out.append(k)
  return tuple(out)


FAMILY = Family(
  name="qwen3_moe",
  architecture="Qwen3MoeForCausalLM",
  keys=(
    *_keys(),
    shared.NO_SHARED_EXPERTS,
    shared.NO_QKV_BIAS,
    shared.qk_norm("head"),
    shared.NO_CLIP_QKV,
  ),
  rules=shared.llama_rules(),
)
