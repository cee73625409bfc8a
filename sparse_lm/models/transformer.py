"""Decoder-only Transformer LM; each layer's FFN slot is dense or MoE by the config.

`config.model.moe.every` / `.offset` pick the MoE layers (sparse_lm.config.moe_layer);
the trainer never needs to know which.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from sparse_lm import config as cfglib
from sparse_lm.models import layers
from sparse_lm.sharding import constrain


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)); x + ffn(norm(x)). FFN is dense or MoE."""

  def __init__(self, m, layer: int, *, rngs: nnx.Rngs):
    self.m, self.layer = m, layer
    self.is_moe = cfglib.moe_layer(m, layer)
    self.attn_norm = layers.Norm(m.d_model, m.norm, m.norm_eps)
    self.attn = layers.Attention(m, rngs=rngs)
    self.ffn_norm = layers.Norm(m.d_model, m.norm, m.norm_eps)
    if self.is_moe:
      from sparse_lm.models.moe.layer import MoeFfn  # pylint: disable=g-import-not-at-top

      self.ffn = MoeFfn(m, rngs=rngs)
    else:
      self.ffn = layers.Mlp(m.d_model, m.d_ff, m.activation, rngs=rngs, init_scale=m.init_scale)

  def __call__(self, x_BxLxD, positions_BxL, mask_BxL, *, train: bool, rng):
    aux = {}
    x_BxLxD = x_BxLxD + self._dropout(
      self.attn(self.attn_norm(x_BxLxD), positions_BxL), train, rng, 0
    )
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if self.is_moe:
      h_BxLxD, aux = self.ffn(
        h_BxLxD,
        mask_BxL=mask_BxL,
        train=train,
        rng=None if rng is None else jax.random.fold_in(rng, 1),
      )
    else:
      h_BxLxD = self.ffn(h_BxLxD)
    x_BxLxD = x_BxLxD + self._dropout(h_BxLxD, train, rng, 2)
    return constrain(x_BxLxD, "batch", "length", "act_embed"), aux

  def _dropout(self, x, train, rng, salt):
    p = self.m.dropout
    if not train or p == 0.0 or rng is None:
      return x
    keep = jax.random.bernoulli(jax.random.fold_in(rng, salt), 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)


class Transformer(nnx.Module):
  """tokens [B, L] -> logits [B, L, V] (float32) and a list of per-MoE-layer aux dicts."""

  def __init__(self, m, vocab_size: int, *, rngs: nnx.Rngs):
    self.m, self.vocab_size = m, vocab_size
    self.embed = layers.Embed(vocab_size, m.d_model, rngs=rngs)
    if m.position == "learned":
      self.pos_embed = layers.param(
        rngs, nnx.initializers.normal(0.02), (m.max_len, m.d_model), (None, "embed")
      )
    self.blocks = nnx.List([Block(m, i, rngs=rngs) for i in range(m.num_layers)])
    self.final_norm = layers.Norm(m.d_model, m.norm, m.norm_eps)
    if not m.tie_embeddings:
      self.unembed = layers.param(
        rngs, layers.fan_in_init(scale=m.init_scale), (m.d_model, vocab_size), ("embed", "vocab")
      )

  def __call__(self, tokens_BxL, *, mask_BxL=None, train: bool = False, rng=None):
    B, L = tokens_BxL.shape
    dt = layers.dtype_of(self.m)
    if mask_BxL is None:
      mask_BxL = jnp.ones((B, L), jnp.float32)
    positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    x_BxLxD = self.embed(tokens_BxL, dt)
    if self.m.position == "learned":
      x_BxLxD = x_BxLxD + self.pos_embed[...][None, :L].astype(dt)
    x_BxLxD = constrain(x_BxLxD, "batch", "length", "act_embed")
    moe_aux = []
    for i, block in enumerate(self.blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x_BxLxD, aux = block(x_BxLxD, positions_BxL, mask_BxL, train=train, rng=layer_rng)
      if block.is_moe:
        moe_aux.append(aux)
    x_BxLxD = self.final_norm(x_BxLxD)
    if self.m.tie_embeddings:
      logits_BxLxV = self.embed.attend(x_BxLxD)
    else:
      logits_BxLxV = x_BxLxD @ self.unembed[...].astype(dt)
    logits_BxLxV = constrain(logits_BxLxV, "batch", "length", "vocab")
    return logits_BxLxV.astype(jnp.float32), moe_aux


def apply_state_updates(model: Transformer, moe_aux: list[dict]):
  """Writes the routing state the MoE layers of a training forward returned."""
  for block, aux in zip([b for b in model.blocks if b.is_moe], moe_aux):
    block.ffn.apply_state_updates(aux)


def moe_layer_indices(m) -> list[int]:
  return [i for i in range(m.num_layers) if cfglib.moe_layer(m, i)]
