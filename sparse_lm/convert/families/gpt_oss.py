"""GPT-OSS (GptOssForCausalLM; OpenAI 2025, gpt-oss-20b / -120b): attention
sinks, sliding-window layers alternating with full ones (layer_types), biases
on q / k / v / o (attention_bias), on the router and on the experts, the
clamped SwiGLU (swiglu_alpha, swiglu_limit) with gate and up interleaved in
`gate_up_proj` [E, D, 2F] (gate at even columns), yarn RoPE.

The released checkpoints hold the experts in MXFP4 (`*_blocks` / `*_scales`,
config.json's quantization_config quant_method "mxfp4"): import dequantises
them tensor by tensor (sparse_lm/convert/mxfp4.py) to the chosen dtype.
Export writes the unquantised hub layout (`experts.gate_up_proj`, ...) in the
run's dtype (bfloat16 for the released configs) and drops
quantization_config: it never writes MXFP4."""

import numpy as np

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import Rule
from sparse_lm.convert.describe import fixed
from sparse_lm.convert.describe import linear
from sparse_lm.convert.describe import preset
from sparse_lm.convert.describe import same
from sparse_lm.convert.families import shared

_SCALING_KEYS = (
  "factor",
  "beta_fast",
  "beta_slow",
  "truncate",
  "original_max_position_embeddings",
  "attention_factor",
  "mscale",
  "mscale_all_dim",
  "low_freq_factor",
  "high_freq_factor",
  "max_position_embeddings",
)


def _read_rope(hf: dict):
  """(rope_theta, rope_scaling or None) from rope_parameters (transformers 5)
  or the older top-level rope_theta + rope_scaling (the released config.json)."""
  p = dict(hf.get("rope_parameters") or {})
  if not p:
    p = dict(hf.get("rope_scaling") or {})
    p.setdefault("rope_theta", hf.get("rope_theta", 150000.0))
  p.setdefault("rope_type", p.pop("type", "default"))
  theta = float(p.pop("rope_theta", 150000.0))
  if p["rope_type"] == "default":
    return theta, None
  if p["rope_type"] == "dynamic":
    p.setdefault("max_position_embeddings", hf.get("max_position_embeddings"))
  return theta, p  # unknown keys or types: refused by config validation, naming the key


def _rope_parameters(view) -> dict:
  s = dict(view.model.rope_scaling) or {"rope_type": "default"}
  return {**s, "rope_theta": float(view.model.rope_theta)}


def _rope_scaling(view):
  """The top-level rope_scaling that transformers 4.x and vLLM read."""
  s = dict(view.model.rope_scaling)
  return s or None


def _layer_types(hf: dict) -> list:
  """transformers' default: even layers sliding, odd ones full."""
  n = hf["num_hidden_layers"]
  return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]


KEYS = (
  Key("model.d_model", "hidden_size"),
  Key("model.num_layers", "num_hidden_layers"),
  Key("model.num_heads", "num_attention_heads"),
  Key("model.num_kv_heads", "num_key_value_heads", default=lambda hf: hf["num_attention_heads"]),
  Key(
    "model.head_dim", "head_dim", default=lambda hf: hf["hidden_size"] // hf["num_attention_heads"]
  ),
  Key(
    "model.activation",
    "hidden_act",
    default="silu",
    values={"silu": "swiglu_clamped"},
    why="only GPT-OSS's clamped SwiGLU (hidden_act 'silu')",
  ),
  fixed("model.moe.activation", "swiglu_clamped", on_import=False),  # "" inherits it
  Key("model.swiglu_alpha", "swiglu_alpha", default=1.702, to_ours=float, to_hf=float),
  Key("model.swiglu_limit", "swiglu_limit", default=7.0, to_ours=float, to_hf=float),
  shared.expert_ff("intermediate_size"),
  Key("model.moe.num_experts", "num_local_experts"),
  Key("model.moe.top_k", "num_experts_per_tok"),
  # topk of the biased logits, softmax over the chosen (GptOssTopKRouter).
  fixed("model.moe.router", "mixtral", "GPT-OSS softmaxes its top-k logits: 'mixtral'"),
  fixed("model.moe.router_logit_bias", True, "GPT-OSS's router has a bias"),
  fixed("model.moe.expert_bias", True, "GPT-OSS's experts have biases"),
  Key(
    ("model.qkv_bias", "model.attn_out_bias"),
    "attention_bias",
    default=True,
    values={True: (True, True), False: (False, False)},
    why="q / k / v and o biases together (attention_bias)",
  ),
  fixed("model.attn_sinks", True, "GPT-OSS's attention has sinks"),
  Key(
    "model.sliding_window",
    "sliding_window",
    default=None,
    to_ours=lambda w: int(w or 0),
    to_hf=lambda w: w or None,
  ),
  Key(
    "model.layer_types",
    "layer_types",
    default=_layer_types,
    to_ours=tuple,
    to_hf=list,
  ),
  fixed("model.norm", "rms"),
  Key("model.norm_eps", "rms_norm_eps", to_ours=float),
  Key("model.tie_embeddings", "tie_word_embeddings", default=False, to_ours=bool, to_hf=bool),
  Key("data.vocab_size", "vocab_size"),
  shared.balance_weight(
    "router_aux_loss_coef", lambda hf: hf["num_experts_per_tok"], lambda hf: hf["num_hidden_layers"]
  ),
  Key("model.moe.z_loss_weight", "router_z_loss_coef", default=0.0, to_ours=float, to_hf=None),
  # RoPE: theta and model.rope_scaling from rope_parameters (or the released
  # configs' rope_theta + rope_scaling); export writes all three spellings.
  Key(
    ("model.rope_theta", "model.rope_scaling"),
    "rope_parameters",
    legacy=("rope_scaling", "rope_theta"),
    read=_read_rope,
    write=_rope_parameters,
  ),
  Key("model.rope_theta", "rope_theta", to_ours=None, to_hf=float),
  Key(hf="rope_scaling", to_ours=None, write=_rope_scaling, default=None),
  shared.seq_len("max_position_embeddings"),
  # MXFP4 experts are dequantised on import (mxfp4.py); export drops the key.
  Key(
    hf="quantization_config.quant_method",
    legacy=("quantization_config",),
    default=None,
    refuse=lambda q: q not in (None, "mxfp4"),
    why="only MXFP4 quantised experts are read (dequantised on import)",
    to_ours=None,
    to_hf=None,
  ),
  fixed("model.position", "rope"),
  fixed("model.rope_layout", "half"),
  fixed("model.moe.every", 1, "must be 1 (every layer MoE)"),
  preset("model.moe.offset", 0),
  fixed("model.moe.num_groups", 0, on_import=False),
  preset("model.moe.dispatch", "dropless"),
  preset("model.moe.router_dtype", "compute"),
  preset("model.moe.load_balance_choices", "all"),
  preset("model.moe.balance_scope", "global"),
  shared.NO_SHARED_EXPERTS,
  shared.NO_DENSE_LAYERS,
  shared.qk_norm("none"),
  shared.NO_CLIP_QKV,
)


def _interleaved(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[..., 2F] with gate at even, up at odd columns -> (gate, up) [..., F]."""
  return a[..., 0::2], a[..., 1::2]


def _interleave(gate: np.ndarray, up: np.ndarray) -> tuple[np.ndarray]:
  return (np.stack([gate, up], -1).reshape(*gate.shape[:-1], -1),)


def rules(m, fused: bool) -> list[Rule]:
  del fused  # one layout (MXFP4 pairs read as it: mxfp4.py)
  out = shared.ends(m, "model.embed_tokens.weight", "model.norm.weight")
  for i in range(m.num_layers):
    pre, a, f = f"model.layers.{i}", f"blocks/{i}/attn", f"blocks/{i}/ffn"
    x = f"{pre}.mlp.experts"
    out += shared._attention(m, i, pre)  # pylint: disable=protected-access
    out += [
      same(f"{a}/sinks", f"{pre}.self_attn.sinks"),
      linear(f"{f}/router", f"{pre}.mlp.router.weight"),
      same(f"{f}/router_logit_bias", f"{pre}.mlp.router.bias"),
      # gate_up_proj [E, D, 2F] is used as x @ w (no transpose), as ours.
      Rule((f"{f}/wg", f"{f}/wi"), (f"{x}.gate_up_proj",), _interleaved, _interleave),
      Rule((f"{f}/bg", f"{f}/bi"), (f"{x}.gate_up_proj_bias",), _interleaved, _interleave),
      same(f"{f}/wo", f"{x}.down_proj"),
      same(f"{f}/bo", f"{x}.down_proj_bias"),
    ]
    if m.attn_out_bias:
      out.append(same(f"{a}/bo", f"{pre}.self_attn.o_proj.bias"))
  return out


FAMILY = Family(name="gpt_oss", architecture="GptOssForCausalLM", keys=KEYS, rules=rules)
