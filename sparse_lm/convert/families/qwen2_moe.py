"""Qwen2-MoE (Qwen2MoeForCausalLM): q / k / v biases, shared experts behind
a sigmoid gate, a prefix of dense layers (mlp_only_layers)."""

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import fixed
from sparse_lm.convert.families import shared


def _shared_experts(hf: dict) -> tuple[int, int]:
  """shared_expert_intermediate_size as (shared experts, their width in all):
  S experts of the routed experts' size where it is a multiple of it (S x
  moe_intermediate_size), else one expert of its own width (shared_d_ff)."""
  size, F = hf.get("shared_expert_intermediate_size") or 0, hf["moe_intermediate_size"]
  if size % F:
    return 1, size
  return size // F, 0


def _shared_width(c) -> int:
  moe = c.model.moe
  return moe.shared_d_ff or moe.num_shared_experts * moe.d_ff


FAMILY = Family(
  name="qwen2_moe",
  architecture="Qwen2MoeForCausalLM",
  keys=(
    *shared.QWEN_MOE,
    Key("model.qkv_bias", "qkv_bias", default=True, to_ours=bool, to_hf=bool),
    Key(
      ("model.moe.num_shared_experts", "model.moe.shared_d_ff"),
      "shared_expert_intermediate_size",
      read=_shared_experts,
      write=_shared_width,
    ),
    fixed(
      "model.moe.shared_expert_gate",
      lambda c: c.model.moe.num_shared_experts > 0,
      "Qwen2-MoE gates its shared expert",
    ),
    shared.qk_norm("none"),
    shared.NO_CLIP_QKV,
  ),
  rules=shared.llama_rules(),
)
