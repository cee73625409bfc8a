"""OLMoE (OlmoeForCausalLM): RMSNorm over all heads' queries and keys
(qk_norm "full"), clip_qkv, gates renormalised or not (norm_topk_prob)."""

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.families import shared

FAMILY = Family(
  name="olmoe",
  architecture="OlmoeForCausalLM",
  keys=(
    *shared.EXPERTS_ONLY,
    Key("model.moe.num_experts", "num_experts"),
    shared.NORM_TOPK_PROB,
    Key("model.clip_qkv", "clip_qkv", default=0.0, to_ours=float, to_hf=shared.or_none),
    shared.NO_SHARED_EXPERTS,
    shared.NO_QKV_BIAS,
    shared.NO_DENSE_LAYERS,
    shared.qk_norm("full"),
  ),
  rules=shared.llama_rules(),
)
