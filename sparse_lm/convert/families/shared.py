"""What the families share (not a family: it defines no FAMILY).

The conventions every family here has (SwiGLU experts, RoPE, every layer
MoE), the keys of features a family lacks, and the Llama-style decoder of
Mixtral, Qwen-MoE and OLMoE: its config keys and its tensor rules.
"""

from __future__ import annotations

from sparse_lm.convert import describe
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import Rule
from sparse_lm.convert.describe import bias
from sparse_lm.convert.describe import fixed
from sparse_lm.convert.describe import fused_experts
from sparse_lm.convert.describe import heads_in
from sparse_lm.convert.describe import heads_out
from sparse_lm.convert.describe import linear
from sparse_lm.convert.describe import preset
from sparse_lm.convert.describe import refuse
from sparse_lm.convert.describe import same
from sparse_lm.errors import ConvertError

# ------------------------------------------------------------ every family

EVERY_FAMILY = [
  fixed("model.moe.activation", "swiglu", on_import=False),  # "" inherits model.activation
  fixed("model.position", "rope"),
  fixed("model.rope_layout", "half"),  # rotate-half pairs, as transformers
  fixed("model.moe.every", 1, "must be 1 (every layer MoE)"),
  preset("model.moe.offset", 0),
  fixed("model.moe.num_groups", 0, on_import=False),
  preset("model.moe.dispatch", "dropless"),
  preset("model.moe.router_dtype", "compute"),  # router logits in the model dtype, as transformers
  # The balance loss as transformers counts it (balance_weight): f over all k
  # choices, over every real token of the batch.
  preset("model.moe.load_balance_choices", "all"),
  preset("model.moe.balance_scope", "global"),
  # GPT-OSS's parts (families/gpt_oss.py): the others cannot hold them, so
  # export refuses a run that has them rather than dropping them.
  fixed("model.attn_sinks", False, "{family} has no attention sinks", on_import=False),
  fixed("model.attn_out_bias", False, "{family} has no o_proj bias", on_import=False),
  fixed("model.sliding_window", 0, "{family}: sliding windows are not supported", on_import=False),
  fixed("model.rope_scaling", (), "{family}: only unscaled RoPE is supported", on_import=False),
  fixed("model.moe.router_logit_bias", False, "{family}'s router has no bias", on_import=False),
  fixed("model.moe.expert_bias", False, "{family}'s experts have no biases", on_import=False),
  # DeepSeek-V3's (families/deepseek_v3.py): likewise refused on export.
  fixed("model.attention", "mha", "{family} has no latent attention (MLA)", on_import=False),
  fixed(
    "model.moe.routed_scaling_factor", 1.0, "{family} has no routed_scaling_factor", on_import=False
  ),
]

# Our router (and its normalize_gates) for the checkpoints' one softmax
# router: the top-k gates renormalised to sum 1 (softmax over the chosen:
# "mixtral") or not ("topk" without renormalising).
ROUTER = ("model.moe.router", "model.moe.normalize_gates")
RENORMALISED = ("mixtral", True)
NOT_RENORMALISED = ("topk", False)

NO_SHARED_EXPERTS = fixed("model.moe.num_shared_experts", 0, "{family} has no shared experts")
NO_QKV_BIAS = fixed("model.qkv_bias", False, "{family} has no q/k/v biases")
NO_DENSE_LAYERS = fixed("model.moe.first_dense_layers", 0, "{family} has no dense layers")
NO_CLIP_QKV = fixed("model.clip_qkv", 0.0, "{family} has no clip_qkv")


def or_none(v):
  """0 -> null: config.json's "off" for clip_qkv."""
  return v or None


def qk_norm(kind: str) -> Key:
  return fixed("model.qk_norm", kind, f"{{family}} needs {kind!r}")


def expert_ff(hf: str) -> Key:
  """The experts' hidden size; every layer is MoE, so the dense d_ff is
  unused and set alike."""
  return Key(
    ("model.d_ff", "model.moe.d_ff"), hf, to_ours=lambda f: (f, f), to_hf=lambda _, moe_f: moe_f
  )


def seq_len(hf: str) -> Key:
  """The training sequence length: the checkpoint's context, at most 2048."""
  return Key("data.seq_len", hf, default=2048, to_ours=lambda n: min(int(n), 2048), to_hf=None)


def rope(theta=10_000.0, top_level: bool = True) -> list[Key]:
  """Unscaled RoPE and its theta, in both spellings: transformers 5's
  rope_parameters {rope_type, rope_theta}, and (`top_level`) the top-level
  rope_theta and rope_scaling (null: unscaled) that transformers 4.x, vLLM
  and the released configs use; a reader of either finds the same theta
  (transformers 4's Qwen-MoE configs fall back to 10,000 without it). Import
  reads rope_parameters first, then the older spellings."""
  keys = [
    Key(
      hf="rope_parameters.rope_type",
      legacy=("rope_parameters.type", "rope_scaling.rope_type", "rope_scaling.type"),
      default="default",
      refuse=lambda kind: kind != "default",
      why="only unscaled RoPE ('default') is supported",
      to_ours=None,
      to_hf=lambda: "default",
    ),
    Key(
      "model.rope_theta",
      "rope_parameters.rope_theta",
      legacy=("rope_scaling.rope_theta", "rope_theta"),
      default=theta,
      to_ours=float,
    ),
  ]
  if top_level:  # export only (import read them above, as legacy spellings)
    keys += [
      Key("model.rope_theta", "rope_theta", to_ours=None, to_hf=float),
      Key(hf="rope_scaling", default=None, to_ours=None, to_hf=lambda: None),
    ]
  return keys


def moe_layers(hf: dict) -> int:
  """The MoE layers of a Llama-style config.json: all but mlp_only_layers
  (decoder_sparse_step other than 1 is refused)."""
  return hf["num_hidden_layers"] - len(hf.get("mlp_only_layers") or [])


def balance_weight(hf: str, top_k, layers) -> Key:
  """The load-balance coefficient `hf` (router_aux_loss_coef) as our
  model.moe.load_balance_weight, with the same meaning.

  transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DBRX:
  load_balancing_loss_func in models/mixtral/modeling_mixtral.py) adds
  coef * E * sum_k sum_e T[k, e] * P[e] to the loss, one term over the
  router logits of all n MoE layers concatenated: T[k, e] the fraction of
  tokens whose k-th choice is e, P[e] the mean softmax probability; it is
  K at balance (K = top_k). With f_e = sum_k T[k, e] / K, the fraction of
  all assignments (load_balance_choices "all"), that is coef * K * B, B =
  E * sum_e f_e P_e our load_balance_loss (1 at balance). Here each MoE
  layer adds weight * B_l, so weight = coef * K / n makes ours coef * K *
  mean_l B_l: equal at balance and whenever the layers' f and P agree, and
  in general the mean of the per-layer losses, not transformers' loss of
  the pooled statistics. They differ by a cross-layer term: n * sum_l
  B(l, l) - sum_{l, m} B(l, m) = 1/2 sum_{l, m} E (f_l - f_m).(P_l - P_m)
  (B(l, m) = E f_l.P_m), which is not zero for equal token counts (layers
  unbalanced in opposite directions pool to a balanced value). Ours
  penalises each layer's imbalance; the coefficient keeps its scale.
  transformers adds it only with output_router_logits (false in the
  released configs); an imported run trains with it. (transformers' DBRX
  passes the router's softmax probabilities as the "logits", softmaxed
  again there; ours is the loss on the probabilities, as Mixtral's.)

  `top_k`, `layers`: config.json -> K, n."""

  def read(hf_cfg: dict) -> float:
    coef = describe.lookup(hf_cfg, hf)
    coef = 0.0 if coef in (describe.MISSING, None) else float(coef)
    return coef * top_k(hf_cfg) / layers(hf_cfg)

  def write(c) -> float:
    n = c.model.num_layers - c.model.moe.first_dense_layers
    return float(f"{c.model.moe.load_balance_weight * n / c.model.moe.top_k:.12g}")

  return Key("model.moe.load_balance_weight", hf, read=read, write=write, to_ours=float)


# ------------------------------------------------------------ Llama-style


def _window_in_use(hf: dict):
  # Qwen's configs carry a sliding_window that use_sliding_window=false turns
  # off (the released Qwen1.5-MoE's says 32768): only a window in use is refused.
  return hf.get("sliding_window") if hf.get("use_sliding_window", True) else None


# The keys of Mixtral, Qwen-MoE and OLMoE; each family adds its FFN sizes,
# expert count, router and what it has or lacks.
LLAMA = [
  Key("model.d_model", "hidden_size"),
  Key("model.num_layers", "num_hidden_layers"),
  Key("model.num_heads", "num_attention_heads"),
  Key("model.num_kv_heads", "num_key_value_heads", default=lambda hf: hf["num_attention_heads"]),
  Key(
    "model.activation",
    "hidden_act",
    default="silu",
    values={"silu": "swiglu"},
    why="only SwiGLU experts (hidden_act 'silu')",
  ),
  *EVERY_FAMILY,
  fixed("model.norm", "rms"),
  Key("model.norm_eps", "rms_norm_eps", to_ours=float),
  Key("model.tie_embeddings", "tie_word_embeddings", default=False, to_ours=bool, to_hf=bool),
  Key("model.moe.top_k", "num_experts_per_tok"),
  Key("data.vocab_size", "vocab_size"),
  balance_weight("router_aux_loss_coef", lambda hf: hf["num_experts_per_tok"], moe_layers),
  Key("model.moe.z_loss_weight", "router_z_loss_coef", default=0.0, to_ours=float, to_hf=None),
  Key(
    "model.head_dim",
    "head_dim",
    default=lambda hf: hf["hidden_size"] // hf["num_attention_heads"],
    optional=True,
  ),
  *rope(),
  seq_len("max_position_embeddings"),
  refuse("sliding_window", bool, "sliding-window attention is not supported", read=_window_in_use),
  refuse("use_sliding_window", bool, "sliding-window attention is not supported"),
  refuse("attention_bias", bool, "attention biases on o_proj are not supported"),
  refuse("router_jitter_noise", bool, "router jitter on the expert input is not supported"),
]

# Mixtral and OLMoE: every layer MoE, intermediate_size is the experts'.
EXPERTS_ONLY = [*LLAMA, expert_ff("intermediate_size")]

# norm_topk_prob (Qwen-MoE, OLMoE) <-> our router.
NORM_TOPK_PROB = Key(
  ROUTER, "norm_topk_prob", default=False, values={True: RENORMALISED, False: NOT_RENORMALISED}
)


def _dense_prefix(hf: dict) -> int:
  """mlp_only_layers as first_dense_layers: the only pattern of dense layers
  we represent is a prefix."""
  dense = sorted(hf.get("mlp_only_layers") or [])
  if dense != list(range(len(dense))):
    raise ConvertError(
      f"config.json mlp_only_layers={dense}: only a prefix (0, 1, ...) is supported"
    )
  if len(dense) >= hf["num_hidden_layers"]:
    raise ConvertError(f"config.json mlp_only_layers={dense} leaves no MoE layer")
  return len(dense)


# The keys of Qwen2-MoE and Qwen3-MoE: a dense FFN size beside the experts',
# dense layers as mlp_only_layers, norm_topk_prob.
QWEN_MOE = [
  *LLAMA,
  Key("model.d_ff", "intermediate_size"),
  Key("model.moe.d_ff", "moe_intermediate_size"),
  NORM_TOPK_PROB,
  Key(
    hf="decoder_sparse_step",
    default=1,
    refuse=lambda step: step != 1,
    why="only 1 (every layer) is supported",
    to_ours=None,
    to_hf=lambda: 1,
  ),
  Key(
    "model.moe.first_dense_layers",
    "mlp_only_layers",
    read=_dense_prefix,
    to_hf=lambda n: list(range(n)),
  ),
  # The hub's configs say num_experts; transformers 5 writes Qwen3-MoE's as
  # num_local_experts (an alias): export keeps the source's spelling.
  Key("model.moe.num_experts", ("num_experts", "num_local_experts")),
]


def _swiglu(ours: str, hf: str, prefix: str = "") -> list[Rule]:
  """A SwiGLU MLP's gate_proj / up_proj / down_proj -> ours {prefix}wg / wi / wo."""
  names = {"wg": "gate_proj", "wi": "up_proj", "wo": "down_proj"}
  return [linear(f"{ours}/{prefix}{o}", f"{hf}.{h}.weight") for o, h in names.items()]


def _attention(m, i: int, pre: str) -> list[Rule]:
  H, J, Z = m.num_heads, m.num_kv_heads, m.head_dim
  a, s = f"blocks/{i}/attn", f"{pre}.self_attn"
  out = [
    heads_in(f"{a}/wq", f"{s}.q_proj.weight", H, Z),
    heads_in(f"{a}/wk", f"{s}.k_proj.weight", J, Z),
    heads_in(f"{a}/wv", f"{s}.v_proj.weight", J, Z),
    heads_out(f"{a}/wo", f"{s}.o_proj.weight", H, Z),
    same(f"blocks/{i}/attn_norm/scale", f"{pre}.input_layernorm.weight"),
    same(f"blocks/{i}/ffn_norm/scale", f"{pre}.post_attention_layernorm.weight"),
  ]
  if m.qkv_bias:
    out += [
      bias(f"{a}/bq", f"{s}.q_proj.bias", H, Z),
      bias(f"{a}/bk", f"{s}.k_proj.bias", J, Z),
      bias(f"{a}/bv", f"{s}.v_proj.bias", J, Z),
    ]
  if m.qk_norm != "none":
    out += [
      same(f"{a}/q_norm/scale", f"{s}.q_norm.weight"),
      same(f"{a}/k_norm/scale", f"{s}.k_norm.weight"),
    ]
  return out


def ends(m, embed: str, final_norm: str) -> list[Rule]:
  """The embedding, the final norm and (untied) the output projection."""
  out = [same("embed/embedding", embed), same("final_norm/scale", final_norm)]
  if not m.tie_embeddings:
    out.append(linear("unembed", "lm_head.weight"))
  return out


def llama_rules(moe: str = "mlp", experts=("gate_proj", "up_proj", "down_proj")):
  """The rules of a Llama-style family: its MoE module's name in the hub
  layout (Mixtral "block_sparse_moe", the others "mlp") and its experts'
  Linear names (gate, up, down); the fused layout is "mlp.experts" for all."""

  def rules(m, fused: bool) -> list[Rule]:
    out = ends(m, "model.embed_tokens.weight", "model.norm.weight")
    for i in range(m.num_layers):
      pre, f = f"model.layers.{i}", f"blocks/{i}/ffn"
      out += _attention(m, i, pre)
      if not m.moe_layer(i):
        out += _swiglu(f, f"{pre}.mlp")
        continue
      mod = f"{pre}.mlp" if fused else f"{pre}.{moe}"
      out.append(linear(f"{f}/router", f"{mod}.gate.weight"))
      if fused:
        out += fused_experts(f, f"{mod}.experts", m.moe.d_ff)
      else:
        out += [
          linear(f"{f}/{o}", f"{mod}.experts.{{j}}.{h}.weight", per_expert=True)
          for o, h in zip(("wg", "wi", "wo"), experts)
        ]
      if m.moe.num_shared_experts:
        out += _swiglu(f, f"{mod}.shared_expert", "shared_")
        out.append(linear(f"{f}/shared_gate", f"{mod}.shared_expert_gate.weight"))
    return out

  return rules
