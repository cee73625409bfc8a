"""Encoder-decoder Transformer, T5.1.1 style (model.arch="encoder_decoder"; issue 30).

The Switch Transformer (Fedus et al. 2021) is T5 with the FFN of every other
layer an MoE, in the encoder and in the decoder; NLLB-200's MoE (NLLB Team
2022) is an encoder-decoder with MoE in every 4th layer of both stacks. This
is that model, built from layers.py's pieces and the MoE layer unchanged:

- T5.1.1 (Raffel et al. 2020, section 2.1; the "1.1" changes: GeGLU, no
  dropout in pre-training, no biases): pre-norm blocks with RMSNorm (model.norm)
  and no bias anywhere; encoder self-attention, decoder causal self-attention
  then cross-attention to the encoder's output, then the FFN; a final norm per
  stack. Dense FFNs are layers.Mlp (model.activation: "geglu" for T5.1.1,
  "relu" for T5 1.0 and the released Switch checkpoints).
- Relative position biases (T5 section 2.1, "a scalar added to the
  corresponding logit"): NUM_BUCKETS (32) buckets of the key's offset from
  the query, exact up to half of them and logarithmic up to MAX_DISTANCE
  (128), beyond it the last bucket (T5's and Switch's values)
  (`relative_position_bucket`); bidirectional in the encoder, causal in the
  decoder, none in cross-attention. One [buckets, heads] table per stack,
  computed once and added in every layer of the stack (T5 keeps it in the
  first layer and shares it; here it belongs to the stack: "encoder/rel_bias").
- T5's attention has no 1 / sqrt(Z) scaling: it is folded into the query
  projection's init (Mesh TensorFlow's; std sqrt(s / (D Z))), so the
  function is the same as at init of the scaled form and released weights
  read as they are.
- One token embedding for both stacks (T5's shared input embedding); with
  model.tie_embeddings it is also the output layer, and the decoder's output
  is scaled by d_model ** -0.5 first (T5's tied-logits rescaling), else a
  separate "unembed" [D, V] (T5.1.1). The embedding is drawn with std 1 (T5's).
- MoE: model.moe.every / offset pick the MoE layers of each stack (Switch:
  every 2, offset 1: layers 1, 3, 5, ...; as transformers'
  SwitchTransformers' sparse_step). The encoder's and the decoder's tokens
  route separately: each MoE layer sees its own stack's tokens (padding
  routed nowhere: its mask is segment id > 0). Output.moe_aux holds the
  encoder's MoE layers' aux, then the decoder's (`moe_layer_ids` numbers them
  as one stack: decoder layer j is num_layers + j), and the router losses of
  both are summed by the loss like the decoder-only model's.
- Packing (sparse_lm/data/seq2seq.py): encoder tokens attend within their
  segment, decoder tokens within theirs (and causally), and cross-attention
  joins a decoder token to the encoder tokens of its own segment only. The
  relative position of two tokens of one segment is the same whether measured
  from the row or from the segment's start, so the biases are computed once
  for the row (as T5X does).

NLLB-200's MoE (NLLB Team 2022; fairseq's transformer with its MoE layer, as
transformers' modeling_nllb_moe.py) is the same stack with these config keys
set (configs/nllb_moe.py); each is off by default, and off, the T5 program
above is unchanged:

- model.position="sinusoidal": fairseq's sinusoidal table added to the token
  embedding of each stack (`sinusoidal_positions`: sin of the first half of
  the features, cos of the second, frequencies 10000 ** (-i / (D/2 - 1))),
  read at position + SINUSOID_OFFSET (fairseq numbers a sequence's tokens from
  padding_idx + 1 = 2); positions restart at each packed segment. No relative
  biases, and the attention is Vaswani et al.'s, scaled by 1 / sqrt(Z).
- model.scale_embedding: the token embedding times sqrt(D) on input; the tied
  output layer is the embedding itself (no d_model ** -0.5), drawn with std
  1 / sqrt(D) (fairseq's).
- model.qkv_bias, model.attn_out_bias: biases on q, k, v and the output
  projection of every attention; model.mlp_bias: on the dense FFN's two
  projections; model.moe.expert_bias: on the experts' (ReLU: up and out).
- model.norm="layer" (LayerNorm with its bias, eps model.norm_eps: torch's 1e-5).
- Routing: top-2 with the two gates renormalised, MoE every 4th layer
  (model.moe.every=4, offset=3: fairseq's moe_freq, transformers'
  sparse_step), Expert Output Masking (model.moe.eom_rate; MoeFfn).

Decoding (start_decoding, decode, greedy): the encoder runs once; each
decoder layer keeps its cross-attention keys and values of the encoder's
output, computed once, and a self-attention KV cache written a step at a
time (decode.seq2seq_generate drives them for the generate and evaluate
CLIs). train.remat applies to each block of both stacks, and
train.microbatches splits a step's rows as for the decoder-only model
(state.micro_grads). Not yet: model.scan_layers (config.py refuses it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from flax import nnx
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from sparse_lm.models import layers
from sparse_lm.models import transformer
from sparse_lm.models.moe.layer import MoeFfn
from sparse_lm.models.spec import ModelSpec
from sparse_lm.models.transformer import Output
from sparse_lm.sharding import constrain

# T5's (and T5.1.1's, Switch's, mT5's): transformers' relative_attention_num_buckets
# and relative_attention_max_distance.
NUM_BUCKETS = 32
MAX_DISTANCE = 128
# fairseq's make_positions numbers a sequence's tokens from padding_idx + 1
# (NLLB's pad id is 1): the first token reads row 2 of the sinusoidal table.
SINUSOID_OFFSET = 2


def sinusoidal_positions(positions_BxL, d_model: int):
  """fairseq's SinusoidalPositionalEmbedding.get_embedding (transformers'
  NllbMoeSinusoidalPositionalEmbedding) at rows positions + SINUSOID_OFFSET:
  [sin(p w_i) for i < D/2] ++ [cos(p w_i)], w_i = 10000 ** (-i / (D/2 - 1));
  [B, L, D] float32 (a zero feature last when D is odd)."""
  half = d_model // 2
  inv_freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  p = (positions_BxL + SINUSOID_OFFSET).astype(jnp.float32)[..., None] * inv_freq[None, None]
  out = jnp.concatenate([jnp.sin(p), jnp.cos(p)], -1)
  if d_model % 2:
    out = jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, 1)])
  return out


def segment_positions(segments_BxL):
  """Each token's position within its packed segment (0 at a segment's first
  token): [B, L] int32."""
  L = segments_BxL.shape[1]
  i_L = jnp.arange(L, dtype=jnp.int32)
  prev = jnp.pad(segments_BxL[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  start = jax.lax.cummax(jnp.where(segments_BxL != prev, i_L[None], 0), axis=1)
  return i_L[None] - start


def relative_position_bucket(
  rel, bidirectional: bool, num_buckets: int = NUM_BUCKETS, max_distance: int = MAX_DISTANCE
):
  """T5's bucket of each relative position rel = key position - query position
  (int array): Mesh TensorFlow's _relative_position_bucket, as transformers'
  T5Attention._relative_position_bucket. Bidirectional: half the buckets for
  keys after the query (rel > 0), half for the others; causal: only rel <= 0
  is distinguished (rel > 0 is bucket 0, never seen under the causal mask).
  Of each half, the first half of the buckets are the offsets 0 .. n/2 - 1
  exactly, the rest logarithmic up to max_distance, beyond it the last."""
  ret = jnp.zeros_like(rel)
  n = -rel
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(rel.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(
    max_distance / max_exact
  )
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(rel.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


class DecodeState(NamedTuple):
  """EncoderDecoder's decoding state (start_decoding, decode)."""

  caches: tuple[layers.KVCache, ...]  # each decoder layer's self-attention [B, S, J, Z]
  cross: tuple[layers.KVCache, ...]  # each decoder layer's keys / values of the encoder's output
  encoder_valid_BxS: jax.Array  # bool: the real source tokens (cross-attention sees only them)
  index: jax.Array  # int32: the next slot to write, shared by the rows


class T5Embed(layers.Embed):
  """layers.Embed drawn with T5's std 1 (the decoder-only Embed: 1 / sqrt(D))."""

  def __init__(self, vocab: int, d_model: int, *, rngs: nnx.Rngs):
    self.embedding = layers.param(
      rngs, nnx.initializers.normal(1.0), (vocab, d_model), ("vocab", "embed")
    )


class T5Attention(nnx.Module):
  """Multi-head attention: self-attention (x_kv is x_q) or cross-attention
  (x_kv the encoder's output), with an additive bias [1, H, L, S] (relative
  positions) and a mask [B, L, S]. T5's (model.position="relative"): no biases,
  no 1 / sqrt(Z) (module docstring); else scaled by 1 / sqrt(Z), with
  model.qkv_bias / attn_out_bias's biases (fairseq's MultiheadAttention)."""

  def __init__(self, m: ModelSpec, *, rngs: nnx.Rngs):
    D, H, J, Z = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    self.scale = 1.0 if m.position == "relative" else Z**-0.5
    self.qkv_bias, self.out_bias = m.qkv_bias, m.attn_out_bias
    init = layers.fan_in_init((0,), m.init_scale)
    t5 = m.position == "relative"
    q_init = layers.fan_in_init((0,), m.init_scale / Z if t5 else m.init_scale)  # T5: folded in
    self.wq = layers.param(rngs, q_init, (D, H, Z), ("embed", "heads", "head_dim"))
    self.wk = layers.param(rngs, init, (D, J, Z), ("embed", "kv_heads", "head_dim"))
    self.wv = layers.param(rngs, init, (D, J, Z), ("embed", "kv_heads", "head_dim"))
    self.wo = layers.param(
      rngs, layers.fan_in_init((0, 1), m.init_scale), (H, Z, D), ("heads", "head_dim", "embed")
    )
    zeros = nnx.initializers.zeros
    if m.qkv_bias:
      self.bq = layers.param(rngs, zeros, (H, Z), ("heads", "head_dim"))
      self.bk = layers.param(rngs, zeros, (J, Z), ("kv_heads", "head_dim"))
      self.bv = layers.param(rngs, zeros, (J, Z), ("kv_heads", "head_dim"))
    if m.attn_out_bias:
      self.bo = layers.param(rngs, zeros, (D,), ("embed",))

  def kv(self, kv_BxSxD):
    """(keys, values) [B, S, J, Z] of the sequence attended to."""
    dt = kv_BxSxD.dtype
    k = jnp.einsum("bsd,djz->bsjz", kv_BxSxD, self.wk[...].astype(dt))
    v = jnp.einsum("bsd,djz->bsjz", kv_BxSxD, self.wv[...].astype(dt))
    if self.qkv_bias:
      k, v = k + self.bk[...].astype(dt)[None, None], v + self.bv[...].astype(dt)[None, None]
    return k, v

  def __call__(self, x_BxLxD, kv_BxSxD, mask_BxLxS, bias_1xHxLxS=None):
    return self.attend(x_BxLxD, *self.kv(kv_BxSxD), mask_BxLxS, bias_1xHxLxS)

  def attend(self, x_BxLxD, k_BxSxJxZ, v_BxSxJxZ, mask_BxLxS, bias_1xHxLxS=None):
    """The queries of x over given keys and values (a cache's, when decoding)."""
    dt = x_BxLxD.dtype
    q = jnp.einsum("bld,dhz->blhz", x_BxLxD, self.wq[...].astype(dt))
    if self.qkv_bias:
      q = q + self.bq[...].astype(dt)[None, None]
    q, k, v = (checkpoint_name(a, "attn_qkv") for a in (q, k_BxSxJxZ, v_BxSxJxZ))
    q = constrain(q, "batch", "length", "heads", "head_dim")
    bias = None if bias_1xHxLxS is None else bias_1xHxLxS.astype(dt)
    out_BxLxHxZ = jax.nn.dot_product_attention(
      q, k.astype(dt), v.astype(dt), bias=bias, mask=mask_BxLxS[:, None], scale=self.scale
    )
    out_BxLxHxZ = checkpoint_name(out_BxLxHxZ, "attn_context")
    out_BxLxD = jnp.einsum("blhz,hzd->bld", out_BxLxHxZ, self.wo[...].astype(dt))
    if self.out_bias:
      out_BxLxD = out_BxLxD + self.bo[...].astype(dt)[None, None]
    return checkpoint_name(out_BxLxD, "attn_out")


class BiasedMlp(layers.Mlp):
  """layers.Mlp with biases on both projections (model.mlp_bias; fairseq's
  FeedForwardNetwork fc1 / fc2: D -> F -> D)."""

  def __init__(self, d_model: int, d_ff: int, activation: str, *, rngs, init_scale: float):
    super().__init__(d_model, d_ff, activation, rngs=rngs, init_scale=init_scale)
    zeros = nnx.initializers.zeros
    self.bi = layers.param(rngs, zeros, (d_ff,), ("mlp",))
    if layers.is_gated(activation):
      self.bg = layers.param(rngs, zeros, (d_ff,), ("mlp",))
    self.bo = layers.param(rngs, zeros, (d_model,), ("embed",))

  def __call__(self, x_BxLxD):
    dt = x_BxLxD.dtype
    x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
    h_TxF = checkpoint_name(
      x_TxD @ self.wi[...].astype(dt) + self.bi[...].astype(dt)[None], "mlp_hidden"
    )
    g_TxF = None
    if layers.is_gated(self.activation):
      g_TxF = x_TxD @ self.wg[...].astype(dt) + self.bg[...].astype(dt)[None]
      g_TxF = checkpoint_name(g_TxF, "mlp_hidden")
    h_TxF = constrain(layers.activate(h_TxF, self.activation, g_TxF), "batch", "mlp")
    y_TxD = h_TxF @ self.wo[...].astype(dt) + self.bo[...].astype(dt)[None]
    return checkpoint_name(y_TxD, "mlp_out").reshape(x_BxLxD.shape)


class EncDecBlock(nnx.Module):
  """One pre-norm layer: x + attn(norm(x)) [+ x + cross(norm(x), enc)] + x +
  ffn(norm(x)); the FFN dense or MoE by model.moe.every / offset."""

  def __init__(self, m: ModelSpec, layer: int, cross: bool, *, rngs: nnx.Rngs):
    self.m, self.layer, self.is_moe = m, layer, m.moe_layer(layer)
    norm = lambda: layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)
    self.attn_norm = norm()
    self.attn = T5Attention(m, rngs=rngs)
    if cross:
      self.cross_norm = norm()
      self.cross_attn = T5Attention(m, rngs=rngs)
    self.ffn_norm = norm()
    if self.is_moe:
      self.ffn = MoeFfn(m, rngs=rngs)
    else:
      act = layers.spelled(m.activation, m)
      mlp = BiasedMlp if m.mlp_bias else layers.Mlp
      self.ffn = mlp(m.d_model, m.d_ff, act, rngs=rngs, init_scale=m.init_scale)

  def __call__(self, x_BxLxD, mask_BxLxL, bias, tokens_BxL, *, train, rng, enc=None):
    """enc: (the encoder's output [B, S, D], the cross mask [B, L, S]) in the decoder.
    -> (x, the MoE layer's aux dict or {})."""
    h = self.attn_norm(x_BxLxD)
    h = self.attn(h, h, mask_BxLxL, bias)
    x_BxLxD = x_BxLxD + self._dropout(h, train, rng, 0)
    if enc is not None:
      enc_BxSxD, cross_BxLxS = enc
      h = self.cross_attn(self.cross_norm(x_BxLxD), enc_BxSxD, cross_BxLxS)
      x_BxLxD = x_BxLxD + self._dropout(h, train, rng, 3)
    h = self.ffn_norm(x_BxLxD)
    aux = {}
    if self.is_moe:
      sub = None if rng is None else jax.random.fold_in(rng, 1)
      h, aux = self.ffn(h, mask_BxL=tokens_BxL, train=train, rng=sub)
    else:
      h = self.ffn(h)
    x_BxLxD = x_BxLxD + self._dropout(h, train, rng, 2)
    return constrain(x_BxLxD, "batch", "length", "act_embed"), aux

  def step(self, x_BxLxD, cache: layers.KVCache, cross: layers.KVCache, index, see, bias):
    """The decoder block on L new tokens at slots [index, index + L) with its
    self-attention cache and the cross-attention's keys and values (computed
    once from the encoder). see: (self mask [B, L, S], cross mask [B, L, Se]).
    -> (x, the updated cache)."""
    h = self.attn_norm(x_BxLxD)
    k, v = self.attn.kv(h)
    names = ("kv_heads", "head_dim")
    cache = layers.KVCache(
      layers.cache_write(cache.k, k, index, *names), layers.cache_write(cache.v, v, index, *names)
    )
    x_BxLxD = x_BxLxD + self.attn.attend(h, cache.k, cache.v, see[0], bias)
    h = self.cross_attn.attend(self.cross_norm(x_BxLxD), cross.k, cross.v, see[1])
    x_BxLxD = x_BxLxD + h
    h = self.ffn_norm(x_BxLxD)
    if self.is_moe:
      h, _ = self.ffn(h, train=False)
    else:
      h = self.ffn(h)
    return x_BxLxD + h, cache

  def _dropout(self, x, train, rng, salt):
    p = self.m.dropout
    if not train or p == 0.0 or rng is None:
      return x
    keep = jax.random.bernoulli(jax.random.fold_in(rng, salt), 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)


class Stack(nnx.Module):
  """The encoder (bidirectional) or the decoder (causal, with cross-attention):
  its relative position bias table [buckets, H] (model.position="relative"),
  its layers, its final norm."""

  def __init__(self, m: ModelSpec, decoder: bool, *, rngs: nnx.Rngs):
    self.m, self.decoder = m, decoder
    if m.position == "relative":
      self.rel_bias = layers.param(
        rngs, nnx.initializers.normal(m.d_model**-0.5), (NUM_BUCKETS, m.num_heads), (None, "heads")
      )
    self.blocks = nnx.List([EncDecBlock(m, i, decoder, rngs=rngs) for i in range(m.num_layers)])
    self.final_norm = layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)

  def position_bias(self, L: int, S: int | None = None, index=0):
    """[1, H, L, S] float32 (S = L by default): the table's value at the
    bucket of each (query, key) pair, the queries at slots [index, index + L)
    (a decoding step's), the keys at slots [0, S). None without relative
    positions."""
    if self.m.position != "relative":
      return None
    q_L = index + jnp.arange(L, dtype=jnp.int32)
    rel_LxS = jnp.arange(L if S is None else S, dtype=jnp.int32)[None, :] - q_L[:, None]
    bucket_LxS = relative_position_bucket(rel_LxS, not self.decoder)
    bias_LxSxH = jnp.take(self.rel_bias[...].astype(jnp.float32), bucket_LxS, axis=0)
    return jnp.transpose(bias_LxSxH, (2, 0, 1))[None]

  def __call__(self, x_BxLxD, segments_BxL, *, train, rng, enc=None):
    """-> (x after the final norm, the MoE layers' aux dicts in layer order)."""
    L = x_BxLxD.shape[1]
    mask_BxLxL = segments_BxL[:, :, None] == segments_BxL[:, None, :]
    if self.decoder:
      mask_BxLxL = mask_BxLxL & jnp.tril(jnp.ones((L, L), bool))[None]
    bias = self.position_bias(L)
    tokens_BxL = (segments_BxL > 0).astype(jnp.float32)
    aux = []
    for i, block in enumerate(self.blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      args = (mask_BxLxL, bias, tokens_BxL, layer_rng, enc)
      x_BxLxD, a = _remat(block, self.m.remat, train)(nnx.state(block), x_BxLxD, *args)
      if block.is_moe:
        aux.append(a)
    return self.final_norm(x_BxLxD), aux


def _remat(block: EncDecBlock, remat: str, train: bool):
  """fn(block's state, x, mask, bias, tokens, rng, enc) -> the block's (x,
  aux), its backward pass rematerialised by train.remat
  (transformer.REMAT_POLICIES: what it keeps, the rest recomputed)."""
  graphdef = nnx.graphdef(block)

  def fn(state, x_BxLxD, mask_BxLxL, bias, tokens_BxL, rng, enc):
    b = nnx.merge(graphdef, state)
    return b(x_BxLxD, mask_BxLxL, bias, tokens_BxL, train=train, rng=rng, enc=enc)

  if remat == "none":
    return fn
  return jax.checkpoint(fn, policy=transformer.REMAT_POLICIES[remat])


class EncoderDecoder(nnx.Module):
  """(encoder tokens [B, S], decoder input tokens [B, L]) -> Output(logits
  [B, L, V] float32, the MoE layers' aux dicts (encoder's, then decoder's),
  None). Segment ids (packed examples; 0 = padding) default to one example
  per row, all real."""

  def __init__(self, m: ModelSpec, vocab_size: int, *, rngs: nnx.Rngs):
    if not isinstance(m, ModelSpec):
      raise TypeError(f"EncoderDecoder takes a ModelSpec (config.model_spec(c)), not {type(m)}")
    self.m, self.vocab_size = m, vocab_size
    embed = layers.Embed if m.scale_embedding else T5Embed  # std 1 / sqrt(D) scaled up: 1
    self.embed = embed(vocab_size, m.d_model, rngs=rngs)
    self.encoder = Stack(m, False, rngs=rngs)
    self.decoder = Stack(m, True, rngs=rngs)
    if not m.tie_embeddings:
      self.unembed = layers.param(
        rngs, layers.fan_in_init(scale=m.init_scale), (m.d_model, vocab_size), ("embed", "vocab")
      )
    if m.param_dtype != "float32":  # drawn in float32, then rounded (as the Transformer)
      for _, v in nnx.iter_graph(self):
        if isinstance(v, nnx.Param):
          v.set_value(v.get_value().astype(m.param_dtype))

  def _embed(self, tokens_BxL, positions_BxL):
    """The stacks' input: the token embedding (times sqrt(D) with
    model.scale_embedding) plus, with sinusoidal positions, fairseq's table at
    positions_BxL (a callable, so that T5's program never builds them)."""
    m, dt = self.m, layers.dtype_of(self.m)
    x = self.embed(tokens_BxL, dt)
    if m.scale_embedding:
      x = x * jnp.asarray(math.sqrt(m.d_model), dt)
    if m.position == "sinusoidal":
      x = x + sinusoidal_positions(positions_BxL(), m.d_model).astype(dt)
    return constrain(x, "batch", "length", "act_embed")

  def encode(self, tokens_BxS, segments_BxS=None, *, train: bool = False, rng=None):
    """-> (the encoder's output [B, S, D] after its final norm, its MoE aux dicts)."""
    if segments_BxS is None:
      segments_BxS = jnp.ones(tokens_BxS.shape, jnp.int32)
    x = self._embed(tokens_BxS, lambda: segment_positions(segments_BxS))
    return self.encoder(x, segments_BxS, train=train, rng=rng)

  def __call__(
    self,
    encoder_tokens_BxS,
    decoder_tokens_BxL,
    *,
    encoder_segments_BxS=None,
    decoder_segments_BxL=None,
    train: bool = False,
    rng=None,
  ) -> Output:
    if encoder_segments_BxS is None:
      encoder_segments_BxS = jnp.ones(encoder_tokens_BxS.shape, jnp.int32)
    if decoder_segments_BxL is None:
      decoder_segments_BxL = jnp.ones(decoder_tokens_BxL.shape, jnp.int32)
    enc_rng, dec_rng = (None, None) if rng is None else jax.random.split(rng)
    enc_BxSxD, enc_aux = self.encode(
      encoder_tokens_BxS, encoder_segments_BxS, train=train, rng=enc_rng
    )
    cross_BxLxS = decoder_segments_BxL[:, :, None] == encoder_segments_BxS[:, None, :]
    x = self._embed(decoder_tokens_BxL, lambda: segment_positions(decoder_segments_BxL))
    x, dec_aux = self.decoder(
      x, decoder_segments_BxL, train=train, rng=dec_rng, enc=(enc_BxSxD, cross_BxLxS)
    )
    return Output(self._logits(x), [*enc_aux, *dec_aux], None)

  def _logits(self, x):
    dt = layers.dtype_of(self.m)
    if self.m.tie_embeddings and self.m.scale_embedding:  # fairseq's: the embedding as it is
      logits = self.embed.attend(x)
    elif self.m.tie_embeddings:
      logits = self.embed.attend(x * jnp.asarray(self.m.d_model**-0.5, dt))  # T5's rescaling
    else:
      logits = x @ self.unembed[...].astype(dt)
    return constrain(logits, "batch", "length", "vocab").astype(jnp.float32)

  def start_decoding(self, encoder_tokens_BxS, encoder_valid_BxS, max_len: int) -> DecodeState:
    """Runs the encoder once (encoder_valid_BxS: the real source tokens) and
    returns the decoding state: each decoder layer's cross-attention keys and
    values of the encoder's output, and an empty self-attention cache of
    max_len slots (model.dtype)."""
    seg_BxS = encoder_valid_BxS.astype(jnp.int32)
    enc_BxSxD, _ = self.encode(encoder_tokens_BxS, seg_BxS)
    B, dt, m = enc_BxSxD.shape[0], layers.dtype_of(self.m), self.m
    cross = tuple(layers.KVCache(*b.cross_attn.kv(enc_BxSxD)) for b in self.decoder.blocks)
    empty = jnp.zeros((B, max_len, m.num_kv_heads, m.head_dim), dt)
    caches = tuple(layers.KVCache(empty, empty) for _ in self.decoder.blocks)
    return DecodeState(caches, cross, encoder_valid_BxS.astype(bool), jnp.int32(0))

  def decode(self, tokens_BxL, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """The decoder on L new tokens per row (slots [state.index, state.index +
    L); every row at the same slot) -> (logits [B, L, V] float32, the new
    state). Equal to the full forward's logits at those positions
    (tests/encoder_decoder_test.py) where routing does not depend on the
    batch (dropless dispatch)."""
    L, S = tokens_BxL.shape[1], state.caches[0].k.shape[1]
    index = state.index
    B = tokens_BxL.shape[0]
    x = self._embed(
      tokens_BxL, lambda: jnp.broadcast_to(index + jnp.arange(L, dtype=jnp.int32), (B, L))
    )
    bias = self.decoder.position_bias(L, S, index)
    self_LxS = jnp.arange(S)[None, :] <= (index + jnp.arange(L))[:, None]
    valid_BxS = state.encoder_valid_BxS
    see = (
      jnp.broadcast_to(self_LxS[None], (B, L, S)),
      jnp.broadcast_to(valid_BxS[:, None, :], (B, L, valid_BxS.shape[1])),
    )
    caches = []
    for block, cache, cross in zip(self.decoder.blocks, state.caches, state.cross):
      x, cache = block.step(x, cache, cross, index, see, bias)
      caches.append(cache)
    logits = self._logits(self.decoder.final_norm(x))
    return logits, state._replace(caches=tuple(caches), index=index + L)

  def greedy(self, encoder_tokens_BxS, encoder_valid_BxS, steps: int, start_id: int = 0):
    """Greedy decoding of `steps` tokens per row from the decoder start token
    (T5's: 0; NLLB's: </s>) -> tokens [B, steps] (no early stop)."""
    state = self.start_decoding(encoder_tokens_BxS, encoder_valid_BxS, steps)
    B = encoder_tokens_BxS.shape[0]

    def body(i, carry):
      tok_B, state, out_BxN = carry
      logits, state = self.decode(tok_B[:, None], state)
      nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
      return nxt, state, out_BxN.at[:, i].set(nxt)

    start = jnp.full((B,), start_id, jnp.int32)
    out = jnp.zeros((B, steps), jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (start, state, out))[2]

  def apply_state_updates(self, moe_aux) -> None:
    """Writes the routing state a training forward returned (DeepSeek-V3's
    bias), per MoE layer in Output.moe_aux's order."""
    moe = [b for s in (self.encoder, self.decoder) for b in s.blocks if b.is_moe]
    for block, a in zip(moe, moe_aux):
      block.ffn.apply_state_updates(a)


def apply_state_updates(model, moe_aux, *rest) -> None:
  """The routing state updates of a train step (state.train_step), for either
  model: transformer.apply_state_updates for a Transformer."""
  if isinstance(model, EncoderDecoder):
    model.apply_state_updates(moe_aux)
  else:
    transformer.apply_state_updates(model, moe_aux, *rest)


def moe_layer_ids(m: ModelSpec) -> list[int]:
  """The MoE layers of both stacks numbered as one: encoder layer i is i,
  decoder layer j is num_layers + j (the metrics' moe/layer{id}/...)."""
  return [*m.moe_layers, *(m.num_layers + i for i in m.moe_layers)]
