"""Qwen3-MoE (Qwen3MoeForCausalLM): RMSNorm on each head's queries and keys
(qk_norm "head"), a head_dim of its own, no biases and no shared experts."""

from sparse_lm.convert.describe import Family
from sparse_lm.convert.families import shared

FAMILY = Family(
  name="qwen3_moe",
  architecture="Qwen3MoeForCausalLM",
  keys=(
    *shared.QWEN_MOE,
    shared.NO_SHARED_EXPERTS,
    shared.NO_QKV_BIAS,
    shared.qk_norm("head"),
    shared.NO_CLIP_QKV,
  ),
  rules=shared.llama_rules(),
)
