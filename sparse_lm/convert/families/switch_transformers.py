"""Switch Transformers (SwitchTransformersForConditionalGeneration: google/
switch-base-8 ... switch-c-2048; Fedus et al. 2021) as our encoder-decoder
(model.arch="encoder_decoder", sparse_lm/models/encoder_decoder.py).

What transformers computes (models/switch_transformers/
modeling_switch_transformers.py, 5.25) and what it is here:

- T5 blocks: pre-norm RMSNorm without bias (SwitchTransformersLayerNorm:
  variance in float32), q / k / v / o without biases or 1 / sqrt(d_kv)
  (ours: T5Attention, scale 1), the relative position bias table
  (relative_attention_bias, [num_buckets, heads]) held by block 0 of each
  stack and shared by its layers (ours: "encoder/rel_bias",
  "decoder/rel_bias"), bidirectional in the encoder, causal in the decoder;
  only T5's 32 buckets up to distance 128 (the released configs') are
  represented. One embedding `shared` for both stacks; tied
  (tie_word_embeddings, every release) it is the output layer too, the
  decoder output scaled by d_model ** -0.5 first, as ours.
- FFNs: DenseActDense wi / wo, dense_act_fn "relu" (the releases'; there is
  no gated FFN in SwitchTransformers). The sparse layers of a stack are
  i % sparse_step == 1 (sparse_step 1: all), sparse_step = num_layers //
  num_sparse_*_layers: our model.moe.every = sparse_step, offset = 1 % it.
  Our two stacks share every / offset and model.num_layers, so
  num_decoder_layers and the decoder's step must equal the encoder's.
- Router (SwitchTransformersTop1Router): classifier in float32 (router_dtype
  "float32": our moe.router_dtype "float32"), softmax, top-1, the gate the
  top-1 probability (our router "switch"); jitter multiplies the router's
  input by U(1 - eps, 1 + eps) in training only (our moe.jitter; transformers
  multiplies the float32 copy in place, which is the experts' input too
  when the model is float32; ours jitters the router's input only, as the
  paper). router_ignore_padding_tokens is not read by 5.25's router (ours
  never routes padding).
- Capacity: transformers drops, per sequence, the tokens past
  expert_capacity of an expert in position order (their MoE output is 0).
  That absolute count per sequence has no equivalent in our capacity factor
  over the batch: an import dispatches dropless, which equals transformers
  wherever no expert receives more than expert_capacity tokens of one
  sequence (switch-base-8: 64; the fixture keeps its inputs under it).
  Export keeps the source's expert_capacity; a run trained here writes
  data.seq_len (nothing dropped) for dropless dispatch, else ceil(
  eval_capacity_factor x data.seq_len / E).
- Router losses (SwitchTransformersForConditionalGeneration.forward, with
  output_router_logits): router_z_loss_coef x (z_enc + z_dec) +
  router_aux_loss_coef x (aux_enc + aux_dec), each over the router logits of
  all sparse layers of its stack concatenated: z the mean over layers and
  tokens of logsumexp^2 (ours per layer: weight = coef / n, n the MoE layers
  of a stack, is the same loss), aux E * sum_e f_e P_e per sequence ("group"),
  averaged (ours: balance_scope "sequence", weight = coef / n: the mean of
  the per-layer losses, equal at balance; families/shared.py,
  balance_weight, for what differs from the pooled statistics).
  transformers 5.25 adds neither where a stack's sparse_step is 1.
- dropout_rate is our model.dropout (transformers also drops inside the
  FFN, on the attention weights, the embedding and the final norm's output;
  ours on each residual branch only: training differs, evaluation not).

The hub's tensor names: shared.weight; {encoder,decoder}.block.{i}.layer.0
.SelfAttention.{q,k,v,o}.weight and .layer_norm.weight (block 0: also
.relative_attention_bias.weight); the decoder's layer.1.EncDecAttention.*;
the FFN layer (encoder 1, decoder 2): layer_norm.weight and mlp.wi / mlp.wo,
or mlp.router.classifier.weight and mlp.experts.expert_{j}.wi / wo;
{encoder,decoder}.final_layer_norm.weight. Untied, transformers 5.25 saves
lm_head.weight and the stacks' own embed_tokens (copies of shared here:
Rule.copy_of); tied, it saves shared.weight alone, and the copies
encoder / decoder.embed_tokens.weight and lm_head.weight an older
checkpoint may hold are compared with it where present (Rule.optional) and
not written."""

from __future__ import annotations

import math

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import Rule
from sparse_lm.convert.describe import copy
from sparse_lm.convert.describe import fixed
from sparse_lm.convert.describe import heads_in
from sparse_lm.convert.describe import heads_out
from sparse_lm.convert.describe import linear
from sparse_lm.convert.describe import preset
from sparse_lm.convert.describe import refuse
from sparse_lm.convert.describe import same
from sparse_lm.errors import ConvertError
from sparse_lm.models.encoder_decoder import MAX_DISTANCE
from sparse_lm.models.encoder_decoder import NUM_BUCKETS


def _steps(hf: dict) -> tuple[int, int]:
  """(encoder, decoder) sparse_step as SwitchTransformersConfig derives them."""
  out = []
  for n_key, s_key in (("num_layers", "num_sparse_encoder_layers"),) + (
    ("num_decoder_layers", "num_sparse_decoder_layers"),
  ):
    n = hf.get(n_key) or hf["num_layers"]
    sparse = hf.get(s_key, 3)
    out.append(n // sparse if sparse > 0 else n)
  return out[0], out[1]


def _sparse_step(hf: dict) -> int:
  enc, dec = _steps(hf)
  if dec != enc:
    raise ConvertError(
      f"config.json num_sparse_decoder_layers={hf.get('num_sparse_decoder_layers')}: the "
      f"decoder's sparse step {dec} differs from the encoder's {enc}; both stacks share "
      "model.moe.every"
    )
  return enc


def _decoder_layers(hf: dict) -> int:
  n = hf.get("num_decoder_layers") or hf["num_layers"]
  if n != hf["num_layers"]:
    raise ConvertError(
      f"config.json num_decoder_layers={n}: only as many as num_layers={hf['num_layers']} "
      "(model.num_layers in each stack)"
    )
  return n


def _moe_layers(hf: dict) -> int:
  """The sparse layers of a stack (transformers' i % step == 1, or all)."""
  step = _sparse_step(hf)
  return sum(1 for i in range(hf["num_layers"]) if step == 1 or i % step == 1)


def _per_stack(c) -> int:
  return max(1, len(c.model.moe_layers))


def _coef(hf_key: str):
  """router_aux_loss_coef / router_z_loss_coef <-> our per-layer weight
  (coef / n, n the MoE layers of a stack: module docstring)."""

  def read(hf: dict) -> float:
    v = hf.get(hf_key)
    return float(0.001 if v is None else v) / _moe_layers(hf)

  def write(weight: str):
    return lambda c: float(f"{getattr(c.model.moe, weight) * _per_stack(c):.12g}")

  return read, write


_AUX, _Z = _coef("router_aux_loss_coef"), _coef("router_z_loss_coef")


def _expert_capacity(c) -> int:
  """For a run without a source config.json: data.seq_len (dropless: nothing
  dropped), else the evaluation capacity of one sequence."""
  if c.model.moe.dispatch == "dropless":
    return int(c.data.seq_len)
  return math.ceil(c.model.moe.eval_capacity_factor * c.data.seq_len / c.model.moe.num_experts)


KEYS = (
  fixed("model.arch", "encoder_decoder", "{family} is an encoder-decoder"),
  fixed("model.position", "relative", "{family} has T5's relative position buckets"),
  Key(
    hf="relative_attention_num_buckets",
    default=NUM_BUCKETS,
    refuse=lambda n: n != NUM_BUCKETS,
    why=f"only T5's {NUM_BUCKETS} buckets (models/encoder_decoder.py)",
    to_ours=None,
    to_hf=lambda: NUM_BUCKETS,
  ),
  Key(
    hf="relative_attention_max_distance",
    default=MAX_DISTANCE,
    refuse=lambda n: n != MAX_DISTANCE,
    why=f"only T5's {MAX_DISTANCE} (models/encoder_decoder.py)",
    to_ours=None,
    to_hf=lambda: MAX_DISTANCE,
  ),
  Key("model.d_model", "d_model"),
  Key("model.head_dim", "d_kv"),
  Key(
    ("model.num_heads", "model.num_kv_heads"),
    "num_heads",
    to_ours=lambda h: (h, h),
    to_hf=lambda h, _: h,
  ),
  fixed(
    "model.num_kv_heads",
    lambda c: c.model.num_heads,
    "{family} has no grouped-query attention",
    on_import=False,
  ),
  Key(("model.d_ff", "model.moe.d_ff"), "d_ff", to_ours=lambda f: (f, f), to_hf=lambda f, _: f),
  fixed(
    "model.moe.d_ff",
    lambda c: c.model.d_ff,
    "{family}'s experts are as wide as its dense FFNs (d_ff)",
    on_import=False,
  ),
  Key("model.num_layers", "num_layers"),
  Key("model.num_layers", "num_decoder_layers", read=_decoder_layers, to_ours=None),
  Key(
    "model.activation",
    "dense_act_fn",
    default="relu",
    values={"relu": "relu"},
    why="only 'relu' (the released checkpoints'; transformers' SwitchTransformers has no "
    "gated FFN)",
  ),
  fixed(
    "model.moe.activation",
    lambda c: c.model.activation,
    "{family}'s experts are its dense FFNs",
    on_import=False,
  ),
  fixed("model.norm", "rms"),
  Key("model.norm_eps", "layer_norm_epsilon", default=1e-6, to_ours=float),
  Key("model.dropout", "dropout_rate", default=0.1, to_ours=float, to_hf=float),
  Key("model.tie_embeddings", "tie_word_embeddings", default=True, to_ours=bool, to_hf=bool),
  Key("data.vocab_size", "vocab_size"),
  Key(
    hf="is_encoder_decoder",
    default=True,
    refuse=lambda e: not e,
    why="SwitchTransformersForConditionalGeneration is an encoder-decoder",
    to_ours=None,
    to_hf=lambda: True,
  ),
  # MoE: where, how many, the router.
  Key("model.moe.num_experts", "num_experts"),
  Key(
    ("model.moe.every", "model.moe.offset"),
    "num_sparse_encoder_layers",
    read=_sparse_step,
    to_ours=lambda step: (step, 1 % step),
    to_hf=None,
  ),
  fixed(
    "model.moe.every",
    lambda c: c.model.num_layers // _per_stack(c),
    "{family}'s sparse step is num_layers // the MoE layers of a stack",
    on_import=False,
  ),
  fixed(
    "model.moe.offset",
    lambda c: 1 % c.model.moe.every,
    "{family}'s MoE layers are i % sparse_step == 1",
    on_import=False,
  ),
  fixed("model.moe.first_dense_layers", 0, "{family} has no dense prefix", on_import=False),
  *(
    Key(hf=name, to_ours=None, write=_per_stack)
    for name in ("num_sparse_encoder_layers", "num_sparse_decoder_layers")
  ),
  *(
    Key(hf=name, to_ours=None, write=lambda c: c.model.moe.every)
    for name in ("encoder_sparse_step", "decoder_sparse_step")
  ),
  fixed("model.moe.top_k", 1, "{family} routes top-1"),
  fixed("model.moe.router", "switch", "{family}'s router is Switch's top-1: 'switch'"),
  Key(
    "model.moe.router_dtype",
    "router_dtype",
    default="float32",
    values={"float32": "float32"},
    why="only float32 routers (the releases'; Fedus et al. section 2.4)",
  ),
  refuse("router_bias", bool, "a router bias is not supported"),
  fixed("model.moe.router_logit_bias", False, "{family}'s router has no bias", on_import=False),
  Key("model.moe.jitter", "router_jitter_noise", default=0.01, to_ours=float, to_hf=float),
  Key(
    "model.moe.load_balance_weight",
    "router_aux_loss_coef",
    read=_AUX[0],
    write=_AUX[1]("load_balance_weight"),
    to_ours=float,
  ),
  Key(
    "model.moe.z_loss_weight",
    "router_z_loss_coef",
    read=_Z[0],
    write=_Z[1]("z_loss_weight"),
    to_ours=float,
  ),
  Key(hf="expert_capacity", to_ours=None, write=_expert_capacity, keep=True),
  Key(hf="decoder_start_token_id", to_ours=None, write=lambda c: 0, keep=True),  # T5's (pad)
  preset("model.moe.dispatch", "dropless"),
  preset("model.moe.balance_scope", "sequence"),
  preset("model.moe.load_balance_choices", "all"),
  fixed("model.moe.num_shared_experts", 0, "{family} has no shared experts", on_import=False),
  fixed("model.moe.num_groups", 0, "{family} has no expert groups", on_import=False),
  fixed("model.moe.expert_bias", False, "{family}'s experts have no biases", on_import=False),
  fixed(
    "model.moe.routed_scaling_factor",
    1.0,
    "{family} has no routed_scaling_factor",
    on_import=False,
  ),
  # A pre-trained Switch checkpoint's objective (T5's span corruption; the
  # tokenizer's <extra_id_k> are its sentinels) and input length.
  preset("data.objective", "span_corruption"),
  preset("data.seq_len", 512),
)


def _attention(m, ours: str, hf: str) -> list[Rule]:
  H, Z = m.num_heads, m.head_dim
  return [
    heads_in(f"{ours}/wq", f"{hf}.q.weight", H, Z),
    heads_in(f"{ours}/wk", f"{hf}.k.weight", H, Z),
    heads_in(f"{ours}/wv", f"{hf}.v.weight", H, Z),
    heads_out(f"{ours}/wo", f"{hf}.o.weight", H, Z),
  ]


def _stack(m, stack: str) -> list[Rule]:
  decoder = stack == "decoder"
  out = [
    same(
      f"{stack}/rel_bias", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    ),
    same(f"{stack}/final_norm/scale", f"{stack}.final_layer_norm.weight"),
  ]
  for i in range(m.num_layers):
    b, pre = f"{stack}/blocks/{i}", f"{stack}.block.{i}.layer"
    out += _attention(m, f"{b}/attn", f"{pre}.0.SelfAttention")
    out.append(same(f"{b}/attn_norm/scale", f"{pre}.0.layer_norm.weight"))
    if decoder:
      out += _attention(m, f"{b}/cross_attn", f"{pre}.1.EncDecAttention")
      out.append(same(f"{b}/cross_norm/scale", f"{pre}.1.layer_norm.weight"))
    ff = f"{pre}.{2 if decoder else 1}"
    out.append(same(f"{b}/ffn_norm/scale", f"{ff}.layer_norm.weight"))
    if m.moe_layer(i):
      out.append(linear(f"{b}/ffn/router", f"{ff}.mlp.router.classifier.weight"))
      out += [
        linear(f"{b}/ffn/{w}", f"{ff}.mlp.experts.expert_{{j}}.{w}.weight", per_expert=True)
        for w in ("wi", "wo")
      ]
    else:
      out += [linear(f"{b}/ffn/{w}", f"{ff}.mlp.{w}.weight") for w in ("wi", "wo")]
  return out


def rules(m, fused: bool) -> list[Rule]:
  del fused  # one layout: experts.expert_{j}
  out = [same("embed/embedding", "shared.weight")]
  # The stacks' embed_tokens (and, tied, lm_head) repeat shared.weight: 5.25
  # saves them untied only; an older checkpoint may hold them tied as well.
  tied = m.tie_embeddings
  out += [
    copy(same("embed/embedding", f"{s}.embed_tokens.weight"), "shared.weight", optional=tied)
    for s in ("encoder", "decoder")
  ]
  if tied:
    out.append(copy(same("embed/embedding", "lm_head.weight"), "shared.weight", optional=True))
  else:
    out.append(linear("unembed", "lm_head.weight"))
  return out + _stack(m, "encoder") + _stack(m, "decoder")


FAMILY = Family(
  name="switch_transformers",
  architecture="SwitchTransformersForConditionalGeneration",
  keys=KEYS,
  rules=rules,
)
