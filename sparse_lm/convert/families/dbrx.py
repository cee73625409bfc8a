"""DBRX (DbrxForCausalLM): LayerNorm without bias, one fused Wqkv, clip_qkv,
experts fused its own way ([E * F, D]); keys nested in attn_config and
ffn_config."""

import numpy as np

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import Rule
from sparse_lm.convert.describe import fixed
from sparse_lm.convert.describe import heads_out
from sparse_lm.convert.describe import linear
from sparse_lm.convert.describe import preset
from sparse_lm.convert.describe import refuse
from sparse_lm.convert.describe import same
from sparse_lm.convert.describe import swap12
from sparse_lm.convert.families import shared

KEYS = (
  Key("model.d_model", "d_model"),
  Key("model.num_layers", "n_layers"),
  Key("model.num_heads", "n_heads"),
  Key("data.vocab_size", "vocab_size"),
  Key("model.tie_embeddings", "tie_word_embeddings", default=False, to_ours=bool, to_hf=bool),
  Key("model.num_kv_heads", "attn_config.kv_n_heads", default=lambda hf: hf["n_heads"]),
  Key("model.clip_qkv", "attn_config.clip_qkv", default=0.0, to_ours=float, to_hf=shared.or_none),
  Key("model.rope_theta", "attn_config.rope_theta", to_ours=None),  # read by rope()'s default
  shared.expert_ff("ffn_config.ffn_hidden_size"),
  Key("model.moe.num_experts", "ffn_config.moe_num_experts"),
  Key("model.moe.top_k", "ffn_config.moe_top_k"),
  # The gates divided by their p-norm: p = 1 renormalises them, null does not.
  Key(
    shared.ROUTER,
    "ffn_config.moe_normalize_expert_weights",
    default=1.0,
    values={1.0: shared.RENORMALISED, None: shared.NOT_RENORMALISED},
    why="only 1 (gates sum to 1) or null",
  ),
  # transformers' DbrxForCausalLM weighs load_balancing_loss_func by
  # moe_loss_weight (router_aux_loss_coef beside it is not read).
  shared.balance_weight(
    "ffn_config.moe_loss_weight",
    lambda hf: hf["ffn_config"]["moe_top_k"],
    lambda hf: hf["n_layers"],
  ),
  Key(
    "model.activation",
    "ffn_config.ffn_act_fn.name",
    default="silu",
    values={"silu": "swiglu"},
    why="only 'silu' (SwiGLU) is supported",
  ),
  refuse("ffn_config.moe_jitter_eps", bool, "router jitter is not supported"),
  # DBRX's readers (transformers 4.x, vLLM) take attn_config.rope_theta (above).
  *shared.rope(
    lambda hf: (hf.get("attn_config") or {}).get("rope_theta") or 10_000.0, top_level=False
  ),
  shared.seq_len("max_seq_len"),
  *shared.EVERY_FAMILY,
  fixed("model.norm", "layer"),
  preset("model.moe.z_loss_weight", 0.0),
  shared.NO_SHARED_EXPERTS,
  shared.NO_QKV_BIAS,
  shared.NO_DENSE_LAYERS,
  shared.qk_norm("none"),
  fixed("model.norm_bias", False, "DBRX's LayerNorm has no bias"),
  fixed("model.norm_eps", 1e-5, "DBRX's LayerNorm eps is 1e-5"),
  fixed(
    "model.head_dim", lambda c: c.model.d_model // c.model.num_heads, "must be d_model / num_heads"
  ),
)


def rules(m, fused: bool) -> list[Rule]:
  del fused  # DBRX has one layout of its own
  H, J, Z, D = m.num_heads, m.num_kv_heads, m.head_dim, m.d_model
  E, F = m.moe.num_experts, m.moe.d_ff
  out = shared.ends(m, "transformer.wte.weight", "transformer.norm_f.weight")
  # w1 (gate) and v1 (up) [E * F, D] are used as x @ w[e].T, w2 [E * F, D] as h @ w2[e].
  experts_t = lambda w: (swap12(w.reshape(E, F, D)),)
  experts_t_back = lambda a: (swap12(a).reshape(E * F, D),)
  for i in range(m.num_layers):
    b, a, f = f"transformer.blocks.{i}", f"blocks/{i}/attn", f"blocks/{i}/ffn"
    qkv = lambda w: (
      w[: H * Z].T.reshape(D, H, Z),
      w[H * Z : (H + J) * Z].T.reshape(D, J, Z),
      w[(H + J) * Z :].T.reshape(D, J, Z),
    )
    out += [
      Rule(
        (f"{a}/wq", f"{a}/wk", f"{a}/wv"),
        (f"{b}.norm_attn_norm.attn.Wqkv.weight",),
        qkv,
        lambda q, k, v: (np.concatenate([x.reshape(D, -1).T for x in (q, k, v)], 0),),
      ),
      heads_out(f"{a}/wo", f"{b}.norm_attn_norm.attn.out_proj.weight", H, Z),
      same(f"blocks/{i}/attn_norm/scale", f"{b}.norm_attn_norm.norm_1.weight"),
      same(f"blocks/{i}/ffn_norm/scale", f"{b}.norm_attn_norm.norm_2.weight"),
      linear(f"{f}/router", f"{b}.ffn.router.layer.weight"),
      Rule((f"{f}/wg",), (f"{b}.ffn.experts.mlp.w1",), experts_t, experts_t_back),
      Rule((f"{f}/wi",), (f"{b}.ffn.experts.mlp.v1",), experts_t, experts_t_back),
      Rule(
        (f"{f}/wo",),
        (f"{b}.ffn.experts.mlp.w2",),
        lambda w: (w.reshape(E, F, D),),
        lambda a: (a.reshape(E * F, D),),
      ),
    ]
  return out


FAMILY = Family(name="dbrx", architecture="DbrxForCausalLM", keys=KEYS, rules=rules)
