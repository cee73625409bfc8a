"""The model spec: what models/ are built from, frozen and fully resolved.

`sparse_lm.config.model_spec(c)` builds a `ModelSpec` from a validated config
(the one place where "0 = inherit" defaults are resolved: head_dim,
num_kv_heads, the MoE layer's d_ff / activation / init_scale); models/ never
read the config itself. Field names are the config's `model.*` and
`model.moe.*` keys (sparse_lm/config.py documents them), so `m.moe.top_k` reads
the same in a config and in a spec. Frozen and hashable: a module's graphdef
holds its spec and is a jit static.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from sparse_lm.models.moe import routing


class Impl(NamedTuple):
  """How the MoE layer computes, never what (model.moe.impl; policy.resolve
  turns "auto" into a choice per backend)."""

  capacity_layout: str = "auto"
  grouped_kernel: str = "auto"
  positions: str = "auto"


@dataclasses.dataclass(frozen=True)
class MoeSpec:
  """model.moe.*, resolved (d_ff, activation and init_scale never 0 / "")."""

  num_experts: int
  top_k: int
  every: int
  offset: int
  first_dense_layers: int
  d_ff: int
  activation: str
  router: str
  dispatch: str
  decode_dispatch: str
  impl: Impl
  capacity_factor: float
  eval_capacity_factor: float
  min_capacity: int
  second_expert_policy: str
  normalize_gates: bool
  jitter: float
  noisy_gating: bool
  init_scale: float
  num_shared_experts: int
  shared_expert_gate: bool
  router_dtype: str
  num_groups: int
  top_k_groups: int
  bias_update_rate: float
  expert_dropout: float
  eom_rate: float
  load_balance_weight: float
  load_balance_choices: str
  balance_scope: str
  z_loss_weight: float
  importance_weight: float
  # GPT-OSS (README, "Hugging Face checkpoints"): a trained bias on the router
  # logits [E], and biases on the experts' projections (up, gate [E, F], out [E, D]).
  router_logit_bias: bool = False
  expert_bias: bool = False
  # The shared experts' hidden width in all (config.model_spec resolves 0).
  shared_d_ff: int = 0
  # DeepSeek-V3's routed_scaling_factor: the routed gates times it.
  routed_scaling_factor: float = 1.0

  @property
  def router_facts(self) -> routing.Router:
    """The router's entry of routing.ROUTERS: the facts that hold for it
    (decodes, group_placement, assignments_per_token, ...)."""
    return routing.ROUTERS[self.router]


@dataclasses.dataclass(frozen=True)
class MlaSpec:
  """model.mla.*: multi-head latent attention's widths (DeepSeek-V2 section
  2.1; model.attention="mla"). q_lora_rank 0 = the query projected in full."""

  q_lora_rank: int = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """model.*, resolved (num_kv_heads and head_dim never 0), and train.remat."""

  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  activation: str
  norm: str
  norm_eps: float
  position: str
  rope_theta: float
  tie_embeddings: bool
  dtype: str
  init_scale: float
  dropout: float
  max_len: int
  rope_layout: str
  qk_norm: str
  qkv_bias: bool
  clip_qkv: float
  norm_bias: bool
  moe: MoeSpec
  # How the model computes and stores, never what it computes (README, "From
  # one CPU to a cluster"): the layers as one scan (transformer.scan_plan), the
  # Params' dtype, and train.remat's policy (config.model_spec passes it).
  scan_layers: bool = False
  param_dtype: str = "float32"
  remat: str = "none"
  # RoPE scaling (model.rope_scaling's items, sorted; () unscaled) and
  # GPT-OSS's attention and FFN parts (config.py documents the keys).
  rope_scaling: tuple = ()
  attn_sinks: bool = False
  attn_out_bias: bool = False
  sliding_window: int = 0
  layer_types: tuple = ()
  swiglu_alpha: float = 1.702
  swiglu_limit: float = 7.0
  # "mha" (Attention: multi-head / grouped-query) or "mla" (MLAttention:
  # DeepSeek-V2/V3's multi-head latent attention, with model.mla's widths).
  attention: str = "mha"
  mla: MlaSpec = MlaSpec()
  # DeepSeek-V3's multi-token prediction (section 2.2): model.mtp_depth
  # sequential MTP modules (transformer.MtpModule), their loss weight lambda.
  mtp_depth: int = 0
  mtp_loss_weight: float = 0.3
  # The encoder-decoder's fairseq / NLLB-200 parts (config.py documents them):
  # the input embedding times sqrt(d_model) (the tied logits then unscaled),
  # and biases on the dense FFN.
  scale_embedding: bool = False
  mlp_bias: bool = False

  def window(self, i: int) -> int:
    """Layer i's attention window (model.sliding_window on the layers that
    model.layer_types names "sliding_attention"); 0 = the whole causal past."""
    if self.sliding_window and self.layer_types[i] == "sliding_attention":
      return self.sliding_window
    return 0

  @property
  def is_moe(self) -> bool:
    return self.moe.num_experts > 1

  def moe_layer(self, i: int) -> bool:
    """Whether layer i's FFN is an MoE layer (model.moe.every / offset /
    first_dense_layers)."""
    moe = self.moe
    return self.is_moe and i >= moe.first_dense_layers and i % moe.every == moe.offset % moe.every

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.moe_layer(i))

  def replace(self, **changes) -> ModelSpec:
    """A copy with fields changed; `moe={...}` changes fields of the MoE spec."""
    if isinstance(changes.get("moe"), dict):
      changes["moe"] = dataclasses.replace(self.moe, **changes["moe"])
    return dataclasses.replace(self, **changes)
