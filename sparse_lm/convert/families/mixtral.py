"""Mixtral (MixtralForCausalLM): experts w1 / w3 / w2 under block_sparse_moe,
gates renormalised over the top-k (our router "mixtral")."""

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import fixed
from sparse_lm.convert.families import shared

FAMILY = Family(
  name="mixtral",
  architecture="MixtralForCausalLM",
  keys=(
    *shared.EXPERTS_ONLY,
    Key("model.moe.num_experts", "num_local_experts"),
    fixed("model.moe.router", "mixtral", "Mixtral renormalises its gates: 'mixtral'"),
    shared.NO_SHARED_EXPERTS,
    shared.NO_QKV_BIAS,
    shared.NO_DENSE_LAYERS,
    shared.qk_norm("none"),
    shared.NO_CLIP_QKV,
  ),
  rules=shared.llama_rules("block_sparse_moe", ("w1", "w3", "w2")),
)
