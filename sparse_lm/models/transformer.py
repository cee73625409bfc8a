"""Decoder-only Transformer LM; each layer's FFN slot is dense or MoE by the spec.

`model.moe.every` / `.offset` / `.first_dense_layers` pick the MoE layers
(ModelSpec.moe_layer); the trainer never needs to know which.
"""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from sparse_lm.models import layers
from sparse_lm.models.moe.layer import MoeFfn
from sparse_lm.models.spec import ModelSpec
from sparse_lm.sharding import constrain


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)); x + ffn(norm(x)). FFN is dense or MoE."""

  def __init__(self, m: ModelSpec, layer: int, *, rngs: nnx.Rngs):
    self.m, self.layer = m, layer
    self.is_moe = m.moe_layer(layer)
    self.attn_norm = layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)
    self.attn = layers.Attention(m, rngs=rngs)
    self.ffn_norm = layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)
    if self.is_moe:
      self.ffn = MoeFfn(m, rngs=rngs)
    else:
      self.ffn = layers.Mlp(m.d_model, m.d_ff, m.activation, rngs=rngs, init_scale=m.init_scale)

  def __call__(
    self,
    x_BxLxD,
    positions_BxL,
    mask_BxL,
    *,
    train: bool,
    rng,
    cache=None,
    index=None,
    valid_BxS=None,
    return_experts=False,
    segments_BxL=None,
  ):
    """-> (x [B, L, D], the MoE layer's aux dict ({} if dense), the layer's
    updated KVCache or None)."""
    aux = {}
    h_BxLxD = self.attn_norm(x_BxLxD)
    attn, cache = self.attn(h_BxLxD, positions_BxL, cache, index, valid_BxS, segments_BxL)
    x_BxLxD = x_BxLxD + self._dropout(attn, train, rng, 0)
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if self.is_moe:
      h_BxLxD, aux = self.ffn(
        h_BxLxD,
        mask_BxL=mask_BxL,
        train=train,
        rng=None if rng is None else jax.random.fold_in(rng, 1),
        return_experts=return_experts,
      )
    else:
      h_BxLxD = self.ffn(h_BxLxD)
    x_BxLxD = x_BxLxD + self._dropout(h_BxLxD, train, rng, 2)
    return constrain(x_BxLxD, "batch", "length", "act_embed"), aux, cache

  def _dropout(self, x, train, rng, salt):
    p = self.m.dropout
    if not train or p == 0.0 or rng is None:
      return x
    keep = jax.random.bernoulli(jax.random.fold_in(rng, salt), 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)


class Cache(NamedTuple):
  """The decoding state (sparse_lm/decode.py): every layer's KVCache, which
  cache slots hold real tokens, and the next slot to write (shared by all rows)."""

  layers: tuple[layers.KVCache, ...]
  valid_BxS: jax.Array  # bool
  index: jax.Array  # int32 scalar


class Output(NamedTuple):
  """What the Transformer returns, whatever its arguments."""

  logits: jax.Array  # [B, L, V] float32
  moe_aux: list[dict]  # one aux dict per MoE layer, in layer order
  cache: Cache | None  # the updated decoding Cache; None when not decoding


class Transformer(nnx.Module):
  """tokens [B, L] -> Output(logits [B, L, V] float32, per-MoE-layer aux dicts, cache).

  With `cache` (decoding), Output.cache is the updated Cache (else None): the
  tokens fill slots [cache.index, cache.index + L); `positions_BxL` gives each
  token's position in its own sequence (per-row positions: left-padded prompts
  start at 0). segments_BxL: packed examples (sft: data) attend only within
  their segment; give their restarting positions too. return_experts: the MoE
  layers' aux also hold each token's experts and router probabilities.
  """

  def __init__(self, m: ModelSpec, vocab_size: int, *, rngs: nnx.Rngs):
    if not isinstance(m, ModelSpec):
      raise TypeError(f"Transformer takes a ModelSpec (config.model_spec(c)), not {type(m)}")
    self.m, self.vocab_size = m, vocab_size
    self.embed = layers.Embed(vocab_size, m.d_model, rngs=rngs)
    if m.position == "learned":
      self.pos_embed = layers.param(
        rngs, nnx.initializers.normal(0.02), (m.max_len, m.d_model), (None, "embed")
      )
    self.blocks = nnx.List([Block(m, i, rngs=rngs) for i in range(m.num_layers)])
    self.final_norm = layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)
    if not m.tie_embeddings:
      self.unembed = layers.param(
        rngs, layers.fan_in_init(scale=m.init_scale), (m.d_model, vocab_size), ("embed", "vocab")
      )

  def __call__(
    self,
    tokens_BxL,
    *,
    mask_BxL=None,
    train: bool = False,
    rng=None,
    positions_BxL=None,
    cache: Cache | None = None,
    return_experts: bool = False,
    segments_BxL=None,
  ) -> Output:
    B, L = tokens_BxL.shape
    dt = layers.dtype_of(self.m)
    if mask_BxL is None:
      mask_BxL = jnp.ones((B, L), jnp.float32)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    x_BxLxD = self.embed(tokens_BxL, dt)
    if self.m.position == "learned":
      x_BxLxD = x_BxLxD + jnp.take(self.pos_embed[...], positions_BxL, axis=0).astype(dt)
    x_BxLxD = constrain(x_BxLxD, "batch", "length", "act_embed")
    valid_BxS = index = None
    if cache is not None:
      index = cache.index
      valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, mask_BxL > 0, index, 1)
    moe_aux, kv = [], []
    for i, block in enumerate(self.blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x_BxLxD, aux, layer_kv = block(
        x_BxLxD,
        positions_BxL,
        mask_BxL,
        train=train,
        rng=layer_rng,
        cache=None if cache is None else cache.layers[i],
        index=index,
        valid_BxS=valid_BxS,
        return_experts=return_experts,
        segments_BxL=segments_BxL,
      )
      kv.append(layer_kv)
      if block.is_moe:
        moe_aux.append(aux)
    x_BxLxD = self.final_norm(x_BxLxD)
    if self.m.tie_embeddings:
      logits_BxLxV = self.embed.attend(x_BxLxD)
    else:
      logits_BxLxV = x_BxLxD @ self.unembed[...].astype(dt)
    logits_BxLxV = constrain(logits_BxLxV, "batch", "length", "vocab")
    new_cache = None if cache is None else Cache(tuple(kv), valid_BxS, index + L)
    return Output(logits_BxLxV.astype(jnp.float32), moe_aux, new_cache)


def apply_state_updates(model: Transformer, moe_aux: list[dict]) -> None:
  """Writes the routing state the MoE layers of a training forward returned."""
  for block, aux in zip([b for b in model.blocks if b.is_moe], moe_aux):
    block.ffn.apply_state_updates(aux)
