"""Qwen2-MoE (Qwen2MoeForCausalLM): q / k / v biases, shared experts behind
a sigmoid gate, a prefix of dense layers (mlp_only_layers)."""

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import fixed
from sparse_lm.convert.families import shared
from sparse_lm.errors import ConvertError


def _shared_experts(hf: dict) -> int:
  """shared_expert_intermediate_size as a number of shared experts of the
  routed experts' size."""
  size, F = hf.get("shared_expert_intermediate_size") or 0, hf["moe_intermediate_size"]
  if size % F:
    raise ConvertError(
      f"config.json shared_expert_intermediate_size={size} is not a multiple of "
      f"moe_intermediate_size={F} (model.moe.num_shared_experts x d_ff)"
    )
  return size // F


FAMILY = Family(
  name="qwen2_moe",
  architecture="Qwen2MoeForCausalLM",
  keys=(
    *shared.QWEN_MOE,
    Key("model.qkv_bias", "qkv_bias", default=True, to_ours=bool, to_hf=bool),
    Key(
      "model.moe.num_shared_experts",
      "shared_expert_intermediate_size",
      read=_shared_experts,
      write=lambda c: c.model.moe.num_shared_experts * c.model.moe.d_ff,
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
