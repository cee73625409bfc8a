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
and drops quantization_config: it never writes FP8.

Multi-token prediction (section 2.2; README_WEIGHTS.md): config.json's
num_nextn_predict_layers is model.mtp_depth, and MTP module k is the hub's
layer num_hidden_layers + k (the release's layer 61: enorm, hnorm, eh_proj,
shared_head.norm, one MoE decoder layer named as the others, FP8 as they
are, and copies of the embedding and lm_head, embed_tokens and
shared_head.head, which import checks and compares but reads from the main
ones: ours share them). A checkpoint whose config.json names MTP layers but
that holds none of their tensors (what transformers saves: its DeepseekV3
ignores model.layers.61 on load, _keys_to_ignore_on_load_unexpected, and
does not build it) imports without MTP, mtp_depth 0, with a note. Export
writes a run's MTP modules as those layers, copies included (export ->
import is bit-exact with the hub's names), and num_nextn_predict_layers =
its mtp_depth: 0 for a run without MTP, whatever its source said."""

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import Rule
from sparse_lm.convert.describe import copy
from sparse_lm.convert.describe import fixed
from sparse_lm.convert.describe import heads_out
from sparse_lm.convert.describe import linear
from sparse_lm.convert.describe import preset
from sparse_lm.convert.describe import refuse
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
  # n_group 1 (Moonlight-16B-A3B, Kimi-K2: one group, no limit) is router
  # "sigmoid_bias" (the same choice: tests/moe_routing_test.py's reference
  # with G = 1); export writes it back as n_group 1, topk_group 1.
  Key(
    ("model.moe.num_groups", "model.moe.router"),
    "n_group",
    to_ours=lambda n: (0, "sigmoid_bias") if n == 1 else (n, "group_limited"),
    to_hf=lambda g, _router: g or 1,  # sigmoid_bias: num_groups 0 (config.py refuses others)
  ),
  Key(
    "model.moe.top_k_groups",
    "topk_group",
    write=lambda c: c.model.moe.top_k_groups if c.model.moe.num_groups else 1,
  ),
  Key("model.moe.top_k", "num_experts_per_tok"),
  # DeepSeek scores a group by the sum of its top 2 biased scores (inference/
  # model.py's Gate, transformers' DeepseekV3 MoE: topk(2)); group_limited
  # by its top top_k // top_k_groups (routing.py): the same only where that is 2.
  refuse(
    "num_experts_per_tok / topk_group",
    lambda r: r not in (None, 2),
    "DeepSeek-V3 scores an expert group by its top 2 experts, router 'group_limited' by "
    "its top num_experts_per_tok // topk_group: must be 2 (or n_group 1)",
    read=lambda hf: None if hf["n_group"] == 1 else hf["num_experts_per_tok"] // hf["topk_group"],
  ),
  fixed(
    "model.moe.top_k",
    lambda c: _top_k_scoring_groups_by_2(c.model.moe),
    "{family} scores an expert group by its top 2 experts, router 'group_limited' by its "
    "top top_k // top_k_groups: must be 2",
    on_import=False,
  ),
  Key("model.moe.first_dense_layers", "first_k_dense_replace"),
  Key("model.moe.normalize_gates", "norm_topk_prob", to_ours=bool, to_hf=bool),
  Key(
    "model.moe.router",
    values={"group_limited": "group_limited", "sigmoid_bias": "sigmoid_bias"},
    to_ours=None,
    why="{family}'s router is 'group_limited' (or 'sigmoid_bias': n_group 1)",
  ),
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
  # The MTP modules (section 2.2): layers num_hidden_layers + k. Import
  # reads none where the checkpoint holds none (importer.py: transformers
  # drops them on save); export writes the run's depth, 0 without MTP.
  Key("model.mtp_depth", "num_nextn_predict_layers", default=0, to_ours=int, to_hf=int),
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


def _top_k_scoring_groups_by_2(moe) -> int:
  """top_k where router group_limited scores a group as DeepSeek-V3 does
  (top_k // top_k_groups == 2) or another router is used, else 2 * top_k_groups."""
  if not moe.num_groups or moe.top_k // moe.top_k_groups == 2:  # groups: group_limited
    return moe.top_k
  return 2 * moe.top_k_groups


def rules(m, fused: bool) -> list[Rule]:
  del fused  # the hub's per-expert layout (transformers 5 saves it too)
  out = shared.ends(m, "model.embed_tokens.weight", "model.norm.weight")
  for i in range(m.num_layers):
    out += _layer(m, f"model.layers.{i}", f"blocks/{i}", m.moe_layer(i))
  for k in range(m.mtp_depth):
    out += _mtp(m, k)
  return out


def _layer(m, pre: str, ours: str, moe: bool) -> list[Rule]:
  """One decoder layer: the hub's `pre` ("model.layers.3") <-> our block
  `ours` ("blocks/3", or an MTP module's "mtp/0/block"), MoE or dense."""
  a, H = m.mla, m.num_heads
  N, R, Zv = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
  heads = lambda o, hf, z: Rule(  # [H * z, in] -> ours [in, H, z]
    (o,),
    (hf,),
    lambda w: (w.T.reshape(w.shape[1], H, z),),
    lambda x: (x.reshape(x.shape[0], -1).T,),
    rows="t",
  )
  at, f, s = f"{ours}/attn", f"{ours}/ffn", f"{pre}.self_attn"
  out = [
    same(f"{ours}/attn_norm/scale", f"{pre}.input_layernorm.weight"),
    same(f"{ours}/ffn_norm/scale", f"{pre}.post_attention_layernorm.weight"),
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
  if not moe:
    return out + shared._swiglu(f, f"{pre}.mlp")  # pylint: disable=protected-access
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


def _mtp(m, k: int) -> list[Rule]:
  """MTP module k (transformer.MtpModule) <-> the hub's layer
  num_hidden_layers + k (README_WEIGHTS.md; vLLM's deepseek_mtp.py): enorm,
  hnorm, eh_proj (torch Linear [d, 2d] over concat[enorm(emb), hnorm(h)],
  ours [2d, d]), a decoder layer of the last layer's kind (its
  self_attn / mlp / layernorms named as any layer's), shared_head.norm, and
  the copies embed_tokens and shared_head.head of the main model's embedding
  and output head (Rule.copy_of: read from the main ones, written from them)."""
  pre, p, emb = f"model.layers.{m.num_layers + k}", f"mtp/{k}", "model.embed_tokens.weight"
  if m.tie_embeddings:
    head = copy(same("embed/embedding", f"{pre}.shared_head.head.weight"), emb)
  else:
    head = copy(linear("unembed", f"{pre}.shared_head.head.weight"), "lm_head.weight")
  return [
    copy(same("embed/embedding", f"{pre}.embed_tokens.weight"), emb),
    same(f"{p}/enorm/scale", f"{pre}.enorm.weight"),
    same(f"{p}/hnorm/scale", f"{pre}.hnorm.weight"),
    linear(f"{p}/eh_proj", f"{pre}.eh_proj.weight"),
    *_layer(m, pre, f"{p}/block", m.moe_layer(m.num_layers - 1)),
    same(f"{p}/head_norm/scale", f"{pre}.shared_head.norm.weight"),
    head,
  ]


FAMILY = Family(name="deepseek_v3", architecture="DeepseekV3ForCausalLM", keys=KEYS, rules=rules)
