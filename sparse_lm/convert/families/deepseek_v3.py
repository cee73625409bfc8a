"""DeepSeek-V3 (DeepseekV3ForCausalLM; DeepSeek-AI 2024, also R1, Kimi-K2 and
Moonlight's layout): multi-head latent attention (q_a_proj / q_a_layernorm /
q_b_proj, kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj), the sigmoid
router with e_score_correction_bias (our routing state router_bias) and
node-limited groups (n_group, topk_group: router "group_limited"),
routed_scaling_factor, shared experts, first_k_dense_replace dense layers,
yarn RoPE with interleaved pairs (rope_interleave).

The released checkpoints hold the Linears in FP8 with 128 x 128 block scales
(`weight_scale_inv`, quantization_config quant_method "fp8"): import
dequantises them tensor by tensor (sparse_lm/convert/fp8.py) to the chosen
dtype. Export writes the unquantised layout in bfloat16 or the run's dtype
and drops quantization_config: it never writes FP8. The multi-token
prediction layer (num_nextn_predict_layers; the release's layer 61) is not
built here."""

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import Rule
from sparse_lm.convert.describe import fixed
from sparse_lm.convert.describe import heads_out
from sparse_lm.convert.describe import linear
from sparse_lm.convert.describe import preset
from sparse_lm.convert.describe import same
from sparse_lm.convert.families import gpt_oss
from sparse_lm.convert.families import shared

_MLA = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

KEYS = (
  Key("model.d_model", "hidden_size"),
  Key("model.d_ff", "intermediate_size"),
  Key("model.moe.d_ff", "moe_intermediate_size"),
  Key("model.num_layers", "num_hidden_layers"),
  Key("model.num_heads", "num_attention_heads"),
  # MLA has no kv heads; transformers' config carries num_attention_heads.
  Key(hf="num_key_value_heads", default=None, to_ours=None, write=lambda c: c.model.num_heads),
  Key(
    "model.moe.num_shared_experts",
    "n_shared_experts",
    default=None,
    to_ours=lambda n: int(n or 0),
    to_hf=lambda n: n or None,
  ),
  Key("model.moe.num_experts", "n_routed_experts"),
  Key("model.moe.routed_scaling_factor", "routed_scaling_factor", to_ours=float, to_hf=float),
  fixed("model.attention", "mla", "{family}'s attention is latent (MLA)"),
  Key(
    "model.mla.q_lora_rank",
    "q_lora_rank",
    default=None,
    to_ours=lambda r: int(r or 0),
    to_hf=lambda r: r or None,
  ),
  *(Key(f"model.mla.{k}", k) for k in _MLA[1:]),
  Key("model.moe.num_groups", "n_group"),
  Key("model.moe.top_k_groups", "topk_group"),
  Key("model.moe.top_k", "num_experts_per_tok"),
  Key("model.moe.first_dense_layers", "first_k_dense_replace"),
  Key("model.moe.normalize_gates", "norm_topk_prob", to_ours=bool, to_hf=bool),
  fixed("model.moe.router", "group_limited", "{family}'s router is 'group_limited'"),
  # The released configs' (remote code) router spellings: only V3's is read.
  Key(
    hf="scoring_func",
    default="sigmoid",
    refuse=lambda f: f != "sigmoid",
    why="only sigmoid scores (DeepSeek-V3's router)",
    to_ours=None,
    to_hf=None,
  ),
  Key(
    hf="topk_method",
    default="noaux_tc",
    refuse=lambda f: f != "noaux_tc",
    why="only 'noaux_tc' (group-limited top-k of the bias-corrected scores)",
    to_ours=None,
    to_hf=None,
  ),
  Key(
    "model.activation",
    "hidden_act",
    default="silu",
    values={"silu": "swiglu"},
    why="only SwiGLU (hidden_act 'silu')",
  ),
  Key(
    "model.rope_layout",
    "rope_interleave",
    default=True,
    values={True: "interleaved", False: "half"},
    why="rope_interleave true or false",
  ),
  Key(
    hf="attention_bias",
    default=False,
    refuse=lambda b: bool(b),
    why="attention biases are not supported",
    to_ours=None,
    to_hf=lambda: False,
  ),
  fixed("model.norm", "rms"),
  Key("model.norm_eps", "rms_norm_eps", to_ours=float),
  Key("model.tie_embeddings", "tie_word_embeddings", default=False, to_ours=bool, to_hf=bool),
  Key("data.vocab_size", "vocab_size"),
  Key(
    ("model.rope_theta", "model.rope_scaling"),
    "rope_parameters",
    legacy=("rope_scaling", "rope_theta"),
    read=gpt_oss._read_rope,  # pylint: disable=protected-access
    write=gpt_oss._rope_parameters,  # pylint: disable=protected-access
  ),
  Key("model.rope_theta", "rope_theta", to_ours=None, to_hf=float),
  Key(hf="rope_scaling", to_ours=None, write=gpt_oss._rope_scaling, default=None),  # pylint: disable=protected-access
  shared.seq_len("max_position_embeddings"),
  Key(
    hf="quantization_config.quant_method",
    legacy=("quantization_config",),
    default=None,
    refuse=lambda q: q not in (None, "fp8"),
    why="only FP8 block-scaled weights are read (dequantised on import)",
    to_ours=None,
    to_hf=None,
  ),
  # The MTP module (section 2.2) is not built here: import does not read its
  # layer (transformers does not either), export keeps the source's value.
  Key(hf="num_nextn_predict_layers", default=0, to_ours=None, to_hf=None),
  fixed("model.position", "rope"),
  fixed("model.moe.every", 1, "must be 1 (every layer past the dense ones MoE)"),
  preset("model.moe.offset", 0),
  preset("model.moe.dispatch", "dropless"),
  preset("model.moe.load_balance_weight", 0.0),  # aux-loss-free: the bias balances
  preset("model.moe.load_balance_choices", "all"),
  preset("model.moe.balance_scope", "global"),
  shared.NO_QKV_BIAS,
  shared.qk_norm("none"),
  shared.NO_CLIP_QKV,
)


def rules(m, fused: bool) -> list[Rule]:
  del fused  # the hub's per-expert layout (transformers 5 saves it too)
  a, H = m.mla, m.num_heads
  N, R, Zv = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
  heads = lambda ours, hf, z: Rule(  # [H * z, in] -> ours [in, H, z]
    (ours,),
    (hf,),
    lambda w: (w.T.reshape(w.shape[1], H, z),),
    lambda x: (x.reshape(x.shape[0], -1).T,),
    rows="t",
  )
  out = shared.ends(m, "model.embed_tokens.weight", "model.norm.weight")
  for i in range(m.num_layers):
    pre, at, f = f"model.layers.{i}", f"blocks/{i}/attn", f"blocks/{i}/ffn"
    s = f"{pre}.self_attn"
    out += [
      same(f"blocks/{i}/attn_norm/scale", f"{pre}.input_layernorm.weight"),
      same(f"blocks/{i}/ffn_norm/scale", f"{pre}.post_attention_layernorm.weight"),
      linear(f"{at}/wkv_a", f"{s}.kv_a_proj_with_mqa.weight"),
      same(f"{at}/kv_norm/scale", f"{s}.kv_a_layernorm.weight"),
      heads(f"{at}/wkv_b", f"{s}.kv_b_proj.weight", N + Zv),
      heads_out(f"{at}/wo", f"{s}.o_proj.weight", H, Zv),
    ]
    if a.q_lora_rank:
      out += [
        linear(f"{at}/wq_a", f"{s}.q_a_proj.weight"),
        same(f"{at}/q_norm/scale", f"{s}.q_a_layernorm.weight"),
        heads(f"{at}/wq_b", f"{s}.q_b_proj.weight", N + R),
      ]
    else:
      out.append(heads(f"{at}/wq", f"{s}.q_proj.weight", N + R))
    if not m.moe_layer(i):
      out += shared._swiglu(f, f"{pre}.mlp")  # pylint: disable=protected-access
      continue
    out += [
      linear(f"{f}/router", f"{pre}.mlp.gate.weight"),
      same(f"{f}/router_bias", f"{pre}.mlp.gate.e_score_correction_bias"),
      *(
        linear(f"{f}/{o}", f"{pre}.mlp.experts.{{j}}.{h}.weight", per_expert=True)
        for o, h in (("wg", "gate_proj"), ("wi", "up_proj"), ("wo", "down_proj"))
      ),
    ]
    if m.moe.num_shared_experts:
      out += shared._swiglu(f, f"{pre}.mlp.shared_experts", "shared_")  # pylint: disable=protected-access
  return out


FAMILY = Family(name="deepseek_v3", architecture="DeepseekV3ForCausalLM", keys=KEYS, rules=rules)
