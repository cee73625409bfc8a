"""Building blocks: norms, embeddings, RoPE, causal GQA attention, dense FFN.

Modules take the resolved model spec (models/spec.py). Parameters carry
logical axis names (resolved by the config's rules in sparse_lm/sharding.py).
Shapes are in tensor names; letters in sparse_lm/config.py.
"""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from sparse_lm.sharding import constrain

Array = jax.Array


def dtype_of(m) -> jnp.dtype:
  return jnp.dtype(m.dtype)


def param(rngs: nnx.Rngs, init, shape, names) -> nnx.Param:
  """A float32 Param from `init`, with logical axis names."""
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def fan_in_init(
  fan_in_axes=(0,), scale: float = 1.0, batch_axes=(), out_axes=-1
) -> nnx.Initializer:
  """Truncated normal with std sqrt(scale / fan_in): Fedus et al. 2021, section
  2.4 (sigma = sqrt(s / n), n the fan-in; the paper's reduced init is s = 0.1,
  so the std shrinks by sqrt(10), not 10). `model.init_scale` is s. Axes in
  neither list would count into the fan-in (a receptive field): list them."""
  return nnx.initializers.variance_scaling(
    scale,
    "fan_in",
    "truncated_normal",
    in_axis=fan_in_axes,
    out_axis=out_axes,
    batch_axis=batch_axes,
  )


def is_gated(activation: str) -> bool:
  return activation in ("swiglu", "geglu")


def activate(h: Array, activation: str, h_gate: Array | None = None) -> Array:
  """Applies the FFN nonlinearity; gated ones (swiglu, geglu) use `h_gate`."""
  if activation == "gelu":
    return jax.nn.gelu(h)
  if activation == "relu":
    return jax.nn.relu(h)
  if activation == "swiglu":
    return jax.nn.silu(h_gate) * h
  if activation == "geglu":
    return jax.nn.gelu(h_gate) * h
  raise ValueError(f"unknown activation {activation!r}")


class Norm(nnx.Module):
  """RMSNorm or LayerNorm (scale only for RMS), computed in float32."""

  def __init__(self, d: int, kind: str, eps: float):
    self.kind, self.eps = kind, eps
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("embed",))
    if kind == "layer":
      self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), out_sharding=("embed",))

  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.kind == "layer":
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
    shape = (1,) * (x.ndim - 1) + (-1,)
    x = x * self.scale[...].reshape(shape)
    if self.kind == "layer":
      x = x + self.bias[...].reshape(shape)
    return x.astype(dtype)


def rope(x_BxLxHxZ: Array, positions_BxL: Array, theta: float) -> Array:
  """Rotary position embedding (half-split form, as in GPT-NeoX / Llama)."""
  d = x_BxLxHxZ.shape[-1]
  freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  ang_BxLxK = positions_BxL[..., None].astype(jnp.float32) * freq[None, None]
  sin, cos = jnp.sin(ang_BxLxK)[:, :, None], jnp.cos(ang_BxLxK)[:, :, None]
  x1, x2 = jnp.split(x_BxLxHxZ.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxZ.dtype)


class KVCache(NamedTuple):
  """One layer's decoding cache: keys and values [B, S, J, Z] (kv heads only)."""

  k: Array
  v: Array


class Attention(nnx.Module):
  """Causal multi-head attention with grouped-query heads and optional RoPE.

  With a KVCache (decoding), the block's keys and values are written at slots
  [index, index + L) and the queries attend over the cache: a query at slot
  index + i sees slot s if s <= index + i and s is valid (a real token of its
  row; padding is never visible) or s is its own slot (so a padding query
  stays finite; its output is never read).
  """

  def __init__(self, m, *, rngs: nnx.Rngs):
    D, H, J, Z = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    self.m = m
    # Heads count into the fan-in of q, k, v (std sqrt(s / (D * H))): the smaller
    # init trained faster than fan-in D here (dense tiny, 1500 steps: 0.08 nats
    # lower eval loss; experiments/switch_vs_dense/README.md, "Sizing").
    init = fan_in_init((0,), m.init_scale)
    self.wq = param(rngs, init, (D, H, Z), ("embed", "heads", "head_dim"))
    self.wk = param(rngs, init, (D, J, Z), ("embed", "kv_heads", "head_dim"))
    self.wv = param(rngs, init, (D, J, Z), ("embed", "kv_heads", "head_dim"))
    self.wo = param(
      rngs, fan_in_init((0, 1), m.init_scale), (H, Z, D), ("heads", "head_dim", "embed")
    )

  def __call__(
    self,
    x_BxLxD,
    positions_BxL,
    cache: KVCache | None = None,
    index=None,
    valid_BxS=None,
    segments_BxL=None,
  ):
    """-> out [B, L, D], and the updated KVCache when `cache` is given.

    segments_BxL (packed examples, no cache): a query sees only the keys of its
    own segment (causally), so examples packed in one row never see each other."""
    dt = x_BxLxD.dtype
    q_BxLxHxZ = jnp.einsum("bld,dhz->blhz", x_BxLxD, self.wq[...].astype(dt))
    k_BxLxJxZ = jnp.einsum("bld,djz->bljz", x_BxLxD, self.wk[...].astype(dt))
    v_BxLxJxZ = jnp.einsum("bld,djz->bljz", x_BxLxD, self.wv[...].astype(dt))
    if self.m.position == "rope":
      q_BxLxHxZ = rope(q_BxLxHxZ, positions_BxL, self.m.rope_theta)
      k_BxLxJxZ = rope(k_BxLxJxZ, positions_BxL, self.m.rope_theta)
    q_BxLxHxZ = constrain(q_BxLxHxZ, "batch", "length", "heads", "head_dim")
    wo = self.wo[...].astype(dt)
    if cache is None:
      # jax.nn.dot_product_attention handles GQA (H a multiple of J) and uses
      # the backend's fused kernel where there is one (cuDNN flash on GPU).
      if segments_BxL is None:
        out_BxLxHxZ = jax.nn.dot_product_attention(q_BxLxHxZ, k_BxLxJxZ, v_BxLxJxZ, is_causal=True)
      else:
        same_BxLxL = segments_BxL[:, :, None] == segments_BxL[:, None, :]
        mask_BxLxL = same_BxLxL & jnp.tril(jnp.ones(same_BxLxL.shape[1:], bool))[None]
        out_BxLxHxZ = jax.nn.dot_product_attention(
          q_BxLxHxZ, k_BxLxJxZ, v_BxLxJxZ, mask=mask_BxLxL[:, None]
        )
      return jnp.einsum("blhz,hzd->bld", out_BxLxHxZ, wo)
    L, S = x_BxLxD.shape[1], cache.k.shape[1]
    put = lambda buf, new: constrain(
      jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), index, axis=1),
      "batch",
      None,
      "kv_heads",
      "head_dim",
    )
    cache = KVCache(put(cache.k, k_BxLxJxZ), put(cache.v, v_BxLxJxZ))
    slot_LxS = jnp.arange(S)[None, :]
    query_L1 = (index + jnp.arange(L))[:, None]
    see_BxLxS = (valid_BxS[:, None, :] & (slot_LxS <= query_L1)[None]) | (slot_LxS == query_L1)[
      None
    ]
    out_BxLxHxZ = jax.nn.dot_product_attention(
      q_BxLxHxZ, cache.k.astype(dt), cache.v.astype(dt), mask=see_BxLxS[:, None]
    )
    return jnp.einsum("blhz,hzd->bld", out_BxLxHxZ, wo), cache


class Mlp(nnx.Module):
  """Dense FFN: D -> F -> D with GELU / ReLU / SwiGLU / GeGLU."""

  def __init__(
    self, d_model: int, d_ff: int, activation: str, *, rngs: nnx.Rngs, init_scale: float = 1.0
  ):
    self.activation = activation
    init = fan_in_init(scale=init_scale)
    self.wi = param(rngs, init, (d_model, d_ff), ("embed", "mlp"))
    if is_gated(activation):
      self.wg = param(rngs, init, (d_model, d_ff), ("embed", "mlp"))
    self.wo = param(rngs, init, (d_ff, d_model), ("mlp", "embed"))

  def __call__(self, x_BxLxD: Array) -> Array:
    # Flattened to [T, D]: XLA's CPU backend runs the [B, L, D] form 2.5-3x
    # slower (its weight gradient contracts two axes); see benchmarks/README.md.
    dt = x_BxLxD.dtype
    x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
    h_TxF = x_TxD @ self.wi[...].astype(dt)
    g_TxF = x_TxD @ self.wg[...].astype(dt) if is_gated(self.activation) else None
    h_TxF = constrain(activate(h_TxF, self.activation, g_TxF), "batch", "mlp")
    return (h_TxF @ self.wo[...].astype(dt)).reshape(x_BxLxD.shape)


class Embed(nnx.Module):
  """Token embedding [V, D]; `attend` gives logits for tied embeddings."""

  def __init__(self, vocab: int, d_model: int, *, rngs: nnx.Rngs):
    # std 1/sqrt(D): unit-scale logits when tied (nanodo's choice).
    self.embedding = param(
      rngs, nnx.initializers.normal(d_model**-0.5), (vocab, d_model), ("vocab", "embed")
    )

  def __call__(self, tokens_BxL: Array, dtype) -> Array:
    return jnp.take(self.embedding[...], tokens_BxL, axis=0).astype(dtype)

  def attend(self, x_BxLxD: Array) -> Array:
    return jnp.einsum("bld,vd->blv", x_BxLxD, self.embedding[...].astype(x_BxLxD.dtype))
