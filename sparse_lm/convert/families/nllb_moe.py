"""NLLB-MoE (NllbMoeForConditionalGeneration: facebook/nllb-moe-54b; NLLB Team
2022) as our encoder-decoder (model.arch="encoder_decoder" with fairseq's
parts: sparse_lm/models/encoder_decoder.py, configs/nllb_moe.py).

What transformers computes (models/nllb_moe/modeling_nllb_moe.py, 5.25) and
what it is here:

- Embedding: `shared` [V, D] times sqrt(d_model) (scale_embedding: ours
  model.scale_embedding; transformers' False has no equivalent here and is
  refused), plus fairseq's sinusoidal table at position + padding_idx + 1
  (ours model.position="sinusoidal", SINUSOID_OFFSET 2: pad_token_id must be
  1) of each stack. Tied (tie_word_embeddings), lm_head is `shared` unscaled.
- Pre-norm blocks with torch LayerNorms (eps 1e-5, with bias): self-attention
  (q / k / v / out_proj with biases, scores scaled by head_dim ** -0.5), the
  decoder's cross_attention, then the FFN: fc1 / fc2 with biases and ReLU
  (activation_function), or the sparse MLP. A final LayerNorm per stack.
- Sparse layers: (i + 1) % sparse_step == 0 (ours every = step, offset =
  step - 1); both stacks share model.moe.every and model.num_layers, so the
  decoder's step and layer count must equal the encoder's.
- Router (NllbMoeTop2Router): classifier without bias in float32, softmax,
  top-1 then the top of the rest (second_expert_policy "all"; "sampling" /
  "random" map to ours, training only), the two gates renormalised over the
  kept pair (our router "topk", normalize_gates). Padding is never routed
  (as ours). Experts: fc1 / fc2 with biases, ReLU (ours
  model.moe.expert_bias). Expert Output Masking (moe_token_dropout: ours
  model.moe.eom_rate): in evaluation the experts' output times 1 - rate.
- Capacity: in evaluation transformers' capacity is
  ceil(moe_eval_capacity_token_fraction x tokens), 1.0 in the releases: no
  token is dropped, and an import dispatches dropless, the same function.
  expert_capacity and the fraction are kept on export (a run trained here:
  64 and 1.0, transformers' defaults).
- Router losses (NllbMoeForConditionalGeneration.forward with
  output_router_logits): router_aux_loss_coef x (aux_enc + aux_dec), each
  Mixtral's load_balancing_loss_func over the stack's sparse layers' logits
  concatenated (top-2, every choice counted, over the batch): ours
  load_balance_choices "all", balance_scope "global", weight coef / n (n the
  MoE layers of a stack). transformers computes no z-loss (router_z_loss_coef
  is unread): ours 0 on import, the source's coefficient kept on export.
- dropout is our model.dropout (attention_dropout, activation_dropout and
  the layerdrops are training-only and kept on export, not represented).

transformers 5.25's NllbMoeExperts routes wrongly: it one-hots the router's
top_1_mask (already one-hot [T, E]), so every token's first choice runs
expert_1 and its second expert_0 whatever the router chose (checked:
5.25's sparse MLP equals g1 expert_1(x) + g2 expert_0(x) within 1e-5, and
is 67 away from the top-2 of its own router). Ours is the routing the
router describes, as transformers 4.x's expert loop and fairseq's MOELayer;
the golden fixture (tests/fixtures/hf/make_fixtures.py) was made with 4.x's
loop patched into 5.25.

The hub's tensor names (transformers 5.25's save_pretrained): model.shared
.weight; model.{encoder,decoder}.layers.{i}.self_attn.{q,k,v,out}_proj
.{weight,bias} and self_attn_layer_norm; the decoder's cross_attention and
cross_attention_layer_norm; ff_layer_norm; ffn.fc1 / fc2, or
ffn.router.classifier.weight and ffn.experts.expert_{j}.fc1 / fc2;
model.{encoder,decoder}.layer_norm. Tied, lm_head.weight and the stacks'
embed_tokens repeat model.shared.weight: compared where present, never
written (Rule.optional); untied, lm_head.weight is our unembed."""

from __future__ import annotations

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import Rule
from sparse_lm.convert.describe import bias
from sparse_lm.convert.describe import copy
from sparse_lm.convert.describe import fixed
from sparse_lm.convert.describe import heads_in
from sparse_lm.convert.describe import heads_out
from sparse_lm.convert.describe import linear
from sparse_lm.convert.describe import preset
from sparse_lm.convert.describe import refuse
from sparse_lm.convert.describe import same
from sparse_lm.errors import ConvertError
from sparse_lm.models.encoder_decoder import SINUSOID_OFFSET


def _equal(enc: str, dec: str, what: str):
  """config.json's encoder value, refusing a decoder value that differs (our
  two stacks share it)."""

  def read(hf: dict):
    if enc not in hf:
      raise ConvertError(f"config.json has no {enc}")
    if hf.get(dec, hf[enc]) != hf[enc]:
      raise ConvertError(
        f"config.json {dec}={hf[dec]}: only as {enc}={hf[enc]} (both stacks share {what})"
      )
    return hf[enc]

  return read


_STEP = _equal("encoder_sparse_step", "decoder_sparse_step", "model.moe.every")


def _sparse_step(hf: dict) -> int:
  step = _STEP(hf)
  if step <= 0:
    raise ConvertError(f"config.json encoder_sparse_step={step}: only a sparse model (step >= 1)")
  return step


def _per_stack(c) -> int:
  return max(1, len(c.model.moe_layers))


def _aux_read(hf: dict) -> float:
  v = hf.get("router_aux_loss_coef")
  n = sum(1 for i in range(hf["encoder_layers"]) if (i + 1) % _sparse_step(hf) == 0)
  return float(0.001 if v is None else v) / max(1, n)


KEYS = (
  fixed("model.arch", "encoder_decoder", "{family} is an encoder-decoder"),
  fixed("model.position", "sinusoidal", "{family} has fairseq's sinusoidal positions"),
  Key(
    hf="pad_token_id",
    default=1,
    refuse=lambda p: p != SINUSOID_OFFSET - 1,
    why="only 1 (fairseq's padding_idx: positions from 2, models/encoder_decoder.py)",
    to_ours=None,
    to_hf=lambda: SINUSOID_OFFSET - 1,
  ),
  Key(
    "model.scale_embedding",
    "scale_embedding",
    default=True,
    values={True: True},
    why="only True (the embedding times sqrt(d_model), the releases')",
  ),
  Key("model.d_model", "d_model"),
  Key(
    ("model.num_heads", "model.num_kv_heads"),
    "encoder_attention_heads",
    read=_equal("encoder_attention_heads", "decoder_attention_heads", "model.num_heads"),
    to_ours=lambda h: (h, h),
    to_hf=lambda h, _: h,
  ),
  Key(hf="decoder_attention_heads", to_ours=None, write=lambda c: c.model.num_heads),
  fixed(
    "model.num_kv_heads",
    lambda c: c.model.num_heads,
    "{family} has no grouped-query attention",
    on_import=False,
  ),
  fixed(
    "model.head_dim",
    lambda c: c.model.d_model // c.model.num_heads,
    "{family}'s head_dim is d_model // heads",
    on_import=False,
  ),
  Key(
    ("model.d_ff", "model.moe.d_ff"),
    "encoder_ffn_dim",
    read=_equal("encoder_ffn_dim", "decoder_ffn_dim", "model.d_ff"),
    to_ours=lambda f: (f, f),
    to_hf=lambda f, _: f,
  ),
  Key(hf="decoder_ffn_dim", to_ours=None, write=lambda c: c.model.d_ff),
  fixed(
    "model.moe.d_ff",
    lambda c: c.model.d_ff,
    "{family}'s experts are as wide as its dense FFNs",
    on_import=False,
  ),
  Key(
    "model.num_layers",
    "encoder_layers",
    read=_equal("encoder_layers", "decoder_layers", "model.num_layers"),
  ),
  Key(hf="decoder_layers", to_ours=None, write=lambda c: c.model.num_layers),
  Key(
    "model.activation",
    "activation_function",
    default="relu",
    values={"relu": "relu"},
    why="only 'relu' (the releases')",
  ),
  fixed(
    "model.moe.activation",
    lambda c: c.model.activation,
    "{family}'s experts are its dense FFNs",
    on_import=False,
  ),
  fixed("model.norm", "layer", "{family} has LayerNorms"),
  fixed("model.norm_bias", True, "{family}'s LayerNorms have biases", on_import=False),
  fixed("model.norm_eps", 1e-5, "{family}'s LayerNorms are torch's (eps 1e-5)"),
  fixed("model.qkv_bias", True, "{family}'s q / k / v have biases"),
  fixed("model.attn_out_bias", True, "{family}'s attention output has a bias"),
  fixed("model.mlp_bias", True, "{family}'s FFNs have biases"),
  Key("model.dropout", "dropout", default=0.1, to_ours=float, to_hf=float),
  Key("model.tie_embeddings", "tie_word_embeddings", default=True, to_ours=bool, to_hf=bool),
  Key("data.vocab_size", "vocab_size"),
  Key(
    hf="is_encoder_decoder",
    default=True,
    refuse=lambda e: not e,
    why="NllbMoeForConditionalGeneration is an encoder-decoder",
    to_ours=None,
    to_hf=lambda: True,
  ),
  Key(
    hf="max_position_embeddings",
    to_ours=None,
    write=lambda c: max(1024, c.data.seq_len, c.data.get("targets_len", 0)),
    keep=True,
  ),
  # MoE: where, how many, the router.
  Key("model.moe.num_experts", "num_experts"),
  Key(
    ("model.moe.every", "model.moe.offset"),
    "encoder_sparse_step",
    read=_sparse_step,
    to_ours=lambda step: (step, step - 1),
    to_hf=lambda every, _: every,
  ),
  Key(hf="decoder_sparse_step", to_ours=None, write=lambda c: c.model.moe.every),
  fixed(
    "model.moe.offset",
    lambda c: c.model.moe.every - 1,
    "{family}'s MoE layers are (i + 1) % sparse_step == 0",
    on_import=False,
  ),
  fixed("model.moe.first_dense_layers", 0, "{family} has no dense prefix", on_import=False),
  fixed("model.moe.top_k", 2, "{family} routes top-2"),
  fixed("model.moe.router", "topk", "{family}'s router is top-2 renormalised: 'topk'"),
  fixed("model.moe.normalize_gates", True, "{family} renormalises the two gates"),
  Key(
    "model.moe.second_expert_policy",
    "second_expert_policy",
    default="all",
    values={"all": "all", "sampling": "sampling", "random": "random"},
    why="only 'all', 'sampling' or 'random'",
  ),
  Key(
    "model.moe.router_dtype",
    "router_dtype",
    default="float32",
    values={"float32": "float32"},
    why="only float32 routers (the releases')",
  ),
  refuse("router_bias", bool, "a router bias is not supported"),
  fixed("model.moe.router_logit_bias", False, "{family}'s router has no bias", on_import=False),
  fixed("model.moe.expert_bias", True, "{family}'s experts have biases"),
  Key("model.moe.eom_rate", "moe_token_dropout", default=0.2, to_ours=float, to_hf=float),
  Key(
    "model.moe.load_balance_weight",
    "router_aux_loss_coef",
    read=_aux_read,
    write=lambda c: float(f"{c.model.moe.load_balance_weight * _per_stack(c):.12g}"),
    to_ours=float,
  ),
  preset("model.moe.z_loss_weight", 0.0),  # transformers computes no z-loss
  Key(hf="router_z_loss_coef", to_ours=None, write=lambda c: 0.001, keep=True),
  Key(hf="expert_capacity", to_ours=None, write=lambda c: 64, keep=True),
  Key(hf="moe_eval_capacity_token_fraction", to_ours=None, write=lambda c: 1.0, keep=True),
  Key(hf="decoder_start_token_id", to_ours=None, write=lambda c: 2, keep=True),  # </s>
  preset("model.moe.dispatch", "dropless"),
  preset("model.moe.balance_scope", "global"),
  preset("model.moe.load_balance_choices", "all"),
  fixed("model.moe.num_shared_experts", 0, "{family} has no shared experts", on_import=False),
  fixed("model.moe.num_groups", 0, "{family} has no expert groups", on_import=False),
  fixed(
    "model.moe.routed_scaling_factor",
    1.0,
    "{family} has no routed_scaling_factor",
    on_import=False,
  ),
  # NLLB is a translation model: pairs in its layout (data/seq2seq.py).
  preset("data.objective", "seq2seq"),
  preset("data.dataset", "seq2seq:translation"),
  preset("data.seq_len", 512),
)


def _attention(m, ours: str, hf: str) -> list[Rule]:
  H, Z = m.num_heads, m.head_dim
  return [
    heads_in(f"{ours}/wq", f"{hf}.q_proj.weight", H, Z),
    heads_in(f"{ours}/wk", f"{hf}.k_proj.weight", H, Z),
    heads_in(f"{ours}/wv", f"{hf}.v_proj.weight", H, Z),
    heads_out(f"{ours}/wo", f"{hf}.out_proj.weight", H, Z),
    bias(f"{ours}/bq", f"{hf}.q_proj.bias", H, Z),
    bias(f"{ours}/bk", f"{hf}.k_proj.bias", H, Z),
    bias(f"{ours}/bv", f"{hf}.v_proj.bias", H, Z),
    same(f"{ours}/bo", f"{hf}.out_proj.bias"),
  ]


def _norm(ours: str, hf: str) -> list[Rule]:
  return [same(f"{ours}/scale", f"{hf}.weight"), same(f"{ours}/bias", f"{hf}.bias")]


def _expert_bias(ours: str, hf: str) -> Rule:
  return Rule((ours,), (hf,), lambda b: (b,), lambda a: (a,), per_expert=True, rows="same")


def _stack(m, stack: str) -> list[Rule]:
  decoder = stack == "decoder"
  top = f"model.{stack}"
  out = _norm(f"{stack}/final_norm", f"{top}.layer_norm")
  for i in range(m.num_layers):
    b, pre = f"{stack}/blocks/{i}", f"{top}.layers.{i}"
    out += _attention(m, f"{b}/attn", f"{pre}.self_attn")
    out += _norm(f"{b}/attn_norm", f"{pre}.self_attn_layer_norm")
    if decoder:
      out += _attention(m, f"{b}/cross_attn", f"{pre}.cross_attention")
      out += _norm(f"{b}/cross_norm", f"{pre}.cross_attention_layer_norm")
    out += _norm(f"{b}/ffn_norm", f"{pre}.ff_layer_norm")
    if m.moe_layer(i):
      ex = f"{pre}.ffn.experts.expert_{{j}}"
      out += [
        linear(f"{b}/ffn/router", f"{pre}.ffn.router.classifier.weight"),
        linear(f"{b}/ffn/wi", f"{ex}.fc1.weight", per_expert=True),
        linear(f"{b}/ffn/wo", f"{ex}.fc2.weight", per_expert=True),
        _expert_bias(f"{b}/ffn/bi", f"{ex}.fc1.bias"),
        _expert_bias(f"{b}/ffn/bo", f"{ex}.fc2.bias"),
      ]
    else:
      out += [
        linear(f"{b}/ffn/wi", f"{pre}.ffn.fc1.weight"),
        linear(f"{b}/ffn/wo", f"{pre}.ffn.fc2.weight"),
        same(f"{b}/ffn/bi", f"{pre}.ffn.fc1.bias"),
        same(f"{b}/ffn/bo", f"{pre}.ffn.fc2.bias"),
      ]
  return out


def rules(m, fused: bool) -> list[Rule]:
  del fused  # one layout: experts.expert_{j}
  out = [same("embed/embedding", "model.shared.weight")]
  tied = m.tie_embeddings
  out += [
    copy(same("embed/embedding", f"model.{s}.embed_tokens.weight"), "model.shared.weight", True)
    for s in ("encoder", "decoder")
  ]
  if tied:
    out.append(copy(same("embed/embedding", "lm_head.weight"), "model.shared.weight", True))
  else:
    out.append(linear("unembed", "lm_head.weight"))
  return out + _stack(m, "encoder") + _stack(m, "decoder")


FAMILY = Family(
  name="nllb_moe",
  architecture="NllbMoeForConditionalGeneration",
  keys=KEYS,
  rules=rules,
  model_type="nllb-moe",
)
