"""Building blocks: norms, embeddings, RoPE (and its scalings), causal GQA
attention (with GPT-OSS's sinks and sliding windows), multi-head latent
attention (DeepSeek-V2/V3's MLA: MLAttention), dense FFN.

Modules take the resolved model spec (models/spec.py). Parameters carry
logical axis names (resolved by the config's rules in sparse_lm/sharding.py).
Shapes are in tensor names; letters in sparse_lm/config.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from flax import nnx
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from sparse_lm.sharding import constrain

Array = jax.Array


def dtype_of(m) -> jnp.dtype:
  return jnp.dtype(m.dtype)


def param(rngs: nnx.Rngs, init, shape, names) -> nnx.Param:
  """A float32 Param from `init`, with logical axis names (the Transformer
  rounds its Params to model.param_dtype once they are all drawn)."""
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
  return activation.split(":")[0] in ("swiglu", "geglu", "swiglu_clamped")


def spelled(activation: str, m) -> str:
  """The activation as the FFN kernels take it: "swiglu_clamped" carries the
  model's model.swiglu_alpha and model.swiglu_limit ("swiglu_clamped:1.702:7.0")."""
  if activation == "swiglu_clamped":
    return f"swiglu_clamped:{float(m.swiglu_alpha)!r}:{float(m.swiglu_limit)!r}"
  return activation


def activate(h: Array, activation: str, h_gate: Array | None = None) -> Array:
  """Applies the FFN nonlinearity; gated ones (swiglu, geglu, swiglu_clamped)
  use `h_gate`. swiglu_clamped (GPT-OSS; `spelled`): the gate clamped above
  and the up projection on both sides at the limit, then (up + 1) * gate *
  sigmoid(alpha * gate)."""
  if activation.startswith("swiglu_clamped"):
    _, alpha, limit = activation.split(":")
    g = jnp.minimum(h_gate, float(limit))
    up = jnp.clip(h, -float(limit), float(limit))
    return (up + 1) * (g * jax.nn.sigmoid(g * float(alpha)))
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
  """RMSNorm or LayerNorm (with a bias unless bias=False), computed in float32."""

  def __init__(self, d: int, kind: str, eps: float, bias: bool = True, names=("embed",)):
    self.kind, self.eps = kind, eps
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=names)
    if kind == "layer" and bias:
      self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), out_sharding=names)

  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.kind == "layer":
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
    shape = (1,) * (x.ndim - 1) + (-1,)
    x = x * self.scale[...].reshape(shape)
    if hasattr(self, "bias"):
      x = x + self.bias[...].reshape(shape)
    return x.astype(dtype)


def _yarn(inv_freq: np.ndarray, d: int, theta: float, s: dict) -> tuple[np.ndarray, float]:
  """YaRN (Peng et al. 2023): frequencies interpolated by `factor` below the
  correction range, kept above it, a linear ramp between (section 3.2, "NTK-by-parts",
  in dimensions found by eq. 17 from beta_fast / beta_slow rotations over
  original_max_position_embeddings); the attention factor 0.1 ln(factor) + 1
  (eq. 21-22; mscale / mscale_all_dim as DeepSeek's: their ratio)."""
  factor = s.get("factor") or s["max_position_embeddings"] / s["original_max_position_embeddings"]
  mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
  att = s.get("attention_factor")
  if att is None:
    if s.get("mscale") and s.get("mscale_all_dim"):
      att = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    else:
      att = mscale(factor)
  beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
  n = s["original_max_position_embeddings"]
  dim_of = lambda rot: d * math.log(n / (rot * 2 * math.pi)) / (2 * math.log(theta))
  low, high = dim_of(beta_fast), dim_of(beta_slow)
  if s.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate = 1 - ramp
  f = np.float32
  pos_freqs = f(theta) ** (np.arange(0, d, 2).astype(f) / f(d))
  interp = f(1.0) / (f(factor) * pos_freqs)
  return interp * (1 - extrapolate) + inv_freq * extrapolate, float(att)


def _llama3(inv_freq: np.ndarray, s: dict) -> np.ndarray:
  """Llama 3.1's: wavelengths above original / low_freq_factor slowed by
  `factor`, below original / high_freq_factor kept, a smooth blend between."""
  factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  n = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > n / lo, inv_freq / factor, inv_freq)
  smooth = (n / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < n / hi) & ~(wavelen > n / lo)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_frequencies(d: int, theta: float, scaling: tuple = ()) -> tuple[np.ndarray, float]:
  """(inverse frequencies [d / 2] float32, attention factor) of RoPE over d
  features with base theta, under model.rope_scaling (`scaling`: its items;
  () unscaled), as transformers' modeling_rope_utils computes them: "linear"
  (frequencies / factor), "dynamic" (NTK at max_position_embeddings: the
  unscaled frequencies, which config.py checks stay static), "yarn", "llama3".
  The attention factor multiplies cos and sin (so q . k by its square)."""
  s = dict(scaling)
  kind = s.get("rope_type", "default")
  f = np.float32
  inv_freq = f(1.0) / (f(theta) ** (np.arange(0, d, 2).astype(f) / f(d)))
  if kind in ("default", "dynamic"):
    return inv_freq, 1.0
  if kind == "linear":
    return (inv_freq / f(s["factor"])).astype(f), 1.0
  if kind == "llama3":
    return _llama3(inv_freq, s), 1.0
  if kind == "yarn":
    freq, att = _yarn(inv_freq, d, theta, s)
    return freq.astype(f), att
  raise ValueError(f"model.rope_scaling.rope_type={kind!r} is not supported")


def rope(
  x_BxLxHxZ: Array, positions_BxL: Array, theta: float, layout: str = "half", scaling: tuple = ()
) -> Array:
  """Rotary position embedding (Su et al. 2021, eq. 34): feature pair j of a
  head turns by position * theta^(-2j / Z). model.rope_layout says which
  features pair up: "half" (j, j + Z/2) (GPT-NeoX, Llama, Hugging Face's
  rotate_half), "interleaved" (2j, 2j + 1) (the paper's and RoFormer's).
  `scaling` (model.rope_scaling's items) changes the frequencies and scales
  the result (rope_frequencies)."""
  d = x_BxLxHxZ.shape[-1]
  att = 1.0
  if scaling:
    freq_np, att = rope_frequencies(d, theta, scaling)
    freq = jnp.asarray(freq_np)
  else:
    freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  ang_BxLxK = positions_BxL[..., None].astype(jnp.float32) * freq[None, None]
  sin, cos = jnp.sin(ang_BxLxK)[:, :, None], jnp.cos(ang_BxLxK)[:, :, None]
  if att != 1.0:
    sin, cos = sin * att, cos * att
  x = x_BxLxHxZ.astype(jnp.float32)
  if layout == "interleaved":
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  else:
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxZ.dtype)


class KVCache(NamedTuple):
  """One layer's decoding cache: keys and values [B, S, J, Z] (kv heads only).
  A sliding-window layer's holds min(S, window) slots, a ring: slot s of the
  sequence lives at s % window (Attention)."""

  k: Array
  v: Array


class AttentionOut(NamedTuple):
  """What Attention returns: out [B, L, D], and the updated KVCache (None
  when not decoding)."""

  out: Array
  cache: KVCache | None


def attend(q_BxLxHxZ, k_BxSxJxZ, v_BxSxJxZ, mask_BxLxS, sinks_H=None, scale=None) -> Array:
  """softmax(q . k / sqrt(Z)) v over the keys `mask` shows, grouped-query (head
  h reads kv head h // (H / J)), in float32. sinks_H (GPT-OSS's attention
  sinks; Xiao et al. 2023, section 3.3, learned): one logit per head added to
  the softmax's denominator only, so a query may put weight on no key.
  `scale` replaces 1 / sqrt(Z) (MLA's); v's head width may differ from q's."""
  B, L, H, Z = q_BxLxHxZ.shape
  J = k_BxSxJxZ.shape[2]
  q_BxLxJxGxZ = q_BxLxHxZ.reshape(B, L, J, H // J, Z)
  logits = jnp.einsum(
    "bljgz,bsjz->bjgls", q_BxLxJxGxZ, k_BxSxJxZ, preferred_element_type=jnp.float32
  ) * (Z**-0.5 if scale is None else scale)
  logits = jnp.where(mask_BxLxS[:, None, None], logits, jnp.finfo(jnp.float32).min)
  if sinks_H is None:
    probs = jax.nn.softmax(logits, -1)
  else:
    sink = jnp.broadcast_to(
      sinks_H.astype(jnp.float32).reshape(1, J, H // J, 1, 1), logits.shape[:-1] + (1,)
    )
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], -1), -1)[..., :-1]
  out = jnp.einsum("bjgls,bsjz->bljgz", probs.astype(v_BxSxJxZ.dtype), v_BxSxJxZ)
  return out.reshape(B, L, H, v_BxSxJxZ.shape[-1])


def cache_write(buf, new, index, *names) -> Array:
  """`buf` [B, S, ...] with `new` [B, L, ...] written at slot `index`, sharded
  as ("batch", None, *names)."""
  new = new.astype(buf.dtype)
  return constrain(
    jax.lax.dynamic_update_slice_in_dim(buf, new, index, axis=1), "batch", None, *names
  )


def decode_mask(valid_BxS, index, L: int) -> Array:
  """[B, L, S]: query index + i sees the valid slots up to its own, and always
  its own (a padding query must attend to something)."""
  slot_LxS = jnp.arange(valid_BxS.shape[1])[None, :]
  query_L1 = (index + jnp.arange(L))[:, None]
  return (valid_BxS[:, None, :] & (slot_LxS <= query_L1)[None]) | (slot_LxS == query_L1)[None]


class Attention(nnx.Module):
  """Causal multi-head attention with grouped-query heads and optional RoPE.

  With a KVCache (decoding), the block's keys and values are written at slots
  [index, index + L) and the queries attend over the cache: a query at slot
  index + i sees slot s if s <= index + i and s is valid (a real token of its
  row; padding is never visible) or s is its own slot (so a padding query
  stays finite; its output is never read).

  GPT-OSS's parts (each off by default): model.attn_sinks (`attend`), a bias
  on the output projection (model.attn_out_bias), and a sliding window on the
  layers model.layer_types names "sliding_attention" (model.sliding_window =
  W: a query sees itself and the W - 1 slots before it, as transformers'
  sliding_window_overlay). Decoding, such a layer's cache is a ring of W
  slots, so its bytes stay bounded however long the text grows.
  """

  def __init__(self, m, layer: int = 0, *, rngs: nnx.Rngs):
    D, H, J, Z = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    self.m = m
    self.window = m.window(layer)
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
    if m.qkv_bias:
      zeros = nnx.initializers.zeros
      self.bq = param(rngs, zeros, (H, Z), ("heads", "head_dim"))
      self.bk = param(rngs, zeros, (J, Z), ("kv_heads", "head_dim"))
      self.bv = param(rngs, zeros, (J, Z), ("kv_heads", "head_dim"))
    if m.attn_out_bias:
      self.bo = param(rngs, nnx.initializers.zeros, (D,), ("embed",))
    if m.attn_sinks:
      self.sinks = param(rngs, nnx.initializers.zeros, (H,), ("heads",))
    if m.qk_norm == "head":
      self.q_norm = Norm(Z, "rms", m.norm_eps, names=("head_dim",))
      self.k_norm = Norm(Z, "rms", m.norm_eps, names=("head_dim",))
    elif m.qk_norm == "full":
      self.q_norm = Norm(H * Z, "rms", m.norm_eps, names=(None,))
      self.k_norm = Norm(J * Z, "rms", m.norm_eps, names=(None,))

  def _qkv(self, x_BxLxD, positions_BxL):
    """q [B, L, H, Z], k and v [B, L, J, Z]: projections, then the model's
    biases, qk_norm, clip_qkv and RoPE, in that order (as Qwen2/3-MoE, OLMoE
    and DBRX apply them)."""
    m, dt = self.m, x_BxLxD.dtype
    q = jnp.einsum("bld,dhz->blhz", x_BxLxD, self.wq[...].astype(dt))
    k = jnp.einsum("bld,djz->bljz", x_BxLxD, self.wk[...].astype(dt))
    v = jnp.einsum("bld,djz->bljz", x_BxLxD, self.wv[...].astype(dt))
    if m.qkv_bias:
      bias = lambda b: b[...].astype(dt)[None, None]
      q, k, v = q + bias(self.bq), k + bias(self.bk), v + bias(self.bv)
    if m.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    elif m.qk_norm == "full":
      q = self.q_norm(q.reshape(q.shape[:2] + (-1,))).reshape(q.shape)
      k = self.k_norm(k.reshape(k.shape[:2] + (-1,))).reshape(k.shape)
    if m.clip_qkv:
      q, k, v = (jnp.clip(a, -m.clip_qkv, m.clip_qkv) for a in (q, k, v))
    if m.position == "rope":
      q = rope(q, positions_BxL, m.rope_theta, m.rope_layout, m.rope_scaling)
      k = rope(k, positions_BxL, m.rope_theta, m.rope_layout, m.rope_scaling)
    return q, k, v

  def __call__(
    self,
    x_BxLxD,
    positions_BxL,
    cache: KVCache | None = None,
    index=None,
    valid_BxS=None,
    segments_BxL=None,
  ) -> AttentionOut:
    """-> AttentionOut(out [B, L, D], the updated KVCache or None without `cache`).

    segments_BxL (packed examples, no cache): a query sees only the keys of its
    own segment (causally), so examples packed in one row never see each other."""
    dt = x_BxLxD.dtype
    # The names are what train.remat="moe" keeps (transformer.REMAT_POLICIES).
    qkv = self._qkv(x_BxLxD, positions_BxL)
    q_BxLxHxZ, k_BxLxJxZ, v_BxLxJxZ = (checkpoint_name(a, "attn_qkv") for a in qkv)
    q_BxLxHxZ = constrain(q_BxLxHxZ, "batch", "length", "heads", "head_dim")
    wo = self.wo[...].astype(dt)
    if self.window or self.m.attn_sinks or self.m.attn_out_bias:
      qkv = (q_BxLxHxZ, k_BxLxJxZ, v_BxLxJxZ)
      return self._attend(*qkv, wo, cache, index, valid_BxS, segments_BxL)
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
      out_BxLxHxZ = checkpoint_name(out_BxLxHxZ, "attn_context")
      out_BxLxD = jnp.einsum("blhz,hzd->bld", out_BxLxHxZ, wo)
      return AttentionOut(checkpoint_name(out_BxLxD, "attn_out"), None)
    names = ("kv_heads", "head_dim")
    cache = KVCache(
      *(cache_write(c, n, index, *names) for c, n in zip(cache, (k_BxLxJxZ, v_BxLxJxZ)))
    )
    see_BxLxS = decode_mask(valid_BxS, index, x_BxLxD.shape[1])
    out_BxLxHxZ = jax.nn.dot_product_attention(
      q_BxLxHxZ, cache.k.astype(dt), cache.v.astype(dt), mask=see_BxLxS[:, None]
    )
    return AttentionOut(jnp.einsum("blhz,hzd->bld", out_BxLxHxZ, wo), cache)

  def _attend(self, q, k, v, wo, cache, index, valid_BxS, segments_BxL) -> AttentionOut:
    """Attention through `attend` (sinks, windows), with or without a cache."""
    L, dt, W = q.shape[1], q.dtype, self.window
    sinks = self.sinks[...] if self.m.attn_sinks else None
    new_L = jnp.arange(L) if cache is None else index + jnp.arange(L)
    if cache is None:
      slots, keys, values, see_BxLxS = new_L, k, v, None
      if segments_BxL is not None:
        see_BxLxS = segments_BxL[:, :, None] == segments_BxL[:, None, :]
    elif not W:  # a full cache: write, then read it all
      names = ("kv_heads", "head_dim")
      cache = KVCache(
        cache_write(cache.k, k, index, *names), cache_write(cache.v, v, index, *names)
      )
      slots, keys, values = jnp.arange(cache.k.shape[1]), cache.k.astype(dt), cache.v.astype(dt)
      see_BxLxS = valid_BxS[:, None, :]
    else:
      # A ring of R slots: before this block, position p holds the latest slot
      # s < index with s % R == p (none while s < 0). The block reads the ring
      # and its own keys, then writes its last min(L, R) keys into the ring.
      R = cache.k.shape[1]
      held_R = index - 1 - jnp.mod(index - 1 - jnp.arange(R), R)
      slots = jnp.concatenate([held_R, new_L])
      keys = jnp.concatenate([cache.k.astype(dt), k], 1)
      values = jnp.concatenate([cache.v.astype(dt), v], 1)
      valid = jnp.take(valid_BxS, jnp.maximum(slots, 0), axis=1) & (slots >= 0)[None]
      see_BxLxS = valid[:, None, :]
      n = min(L, R)
      ring_n = jnp.mod(index + L - n + jnp.arange(n), R)
      put = lambda buf, new: constrain(
        buf.at[:, ring_n].set(new[:, L - n :].astype(buf.dtype)),
        "batch",
        None,
        "kv_heads",
        "head_dim",
      )
      cache = KVCache(put(cache.k, k), put(cache.v, v))
    rel_LxS = new_L[:, None] - slots[None, :]
    causal_LxS = rel_LxS >= 0
    if W:
      causal_LxS = causal_LxS & (rel_LxS < W)
    mask_BxLxS = causal_LxS[None] if see_BxLxS is None else see_BxLxS & causal_LxS[None]
    if cache is not None:
      mask_BxLxS = mask_BxLxS | (rel_LxS == 0)[None]  # a padding query sees itself
    out_BxLxHxZ = checkpoint_name(attend(q, keys, values, mask_BxLxS, sinks), "attn_context")
    out_BxLxD = jnp.einsum("blhz,hzd->bld", out_BxLxHxZ, wo)
    if self.m.attn_out_bias:
      out_BxLxD = out_BxLxD + self.bo[...].astype(dt)[None, None]
    return AttentionOut(checkpoint_name(out_BxLxD, "attn_out"), cache)


def mla_scale(m) -> float:
  """MLA's softmax scale: 1 / sqrt(qk_nope + qk_rope), times yarn's
  mscale(factor, mscale_all_dim)^2 when model.rope_scaling has mscale_all_dim
  (DeepSeek-V3's released code; transformers' yarn_apply_mscale)."""
  a, s = m.mla, dict(m.rope_scaling)
  scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
  factor, all_dim = s.get("factor") or 0.0, s.get("mscale_all_dim") or 0.0
  if s.get("rope_type", "default") != "default" and all_dim and factor > 1:
    ms = 0.1 * all_dim * math.log(factor) + 1.0
    scale = scale * ms * ms
  return scale


class MLAttention(nnx.Module):
  """Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, section 2.1;
  DeepSeek-V3 section 2.1.1), model.attention="mla" with model.mla's widths:
  C = kv_lora_rank, Q = q_lora_rank, N = qk_nope_head_dim, R =
  qk_rope_head_dim, Zv = v_head_dim.

  Queries: q = RMSNorm(x W_DQ) W_UQ (eq. 12-13; x W_Q when Q = 0), split per
  head into N features without position and R with RoPE (eq. 14). Keys and
  values: one latent c = RMSNorm(x W_DKV) [C] per token (eq. 9) expanded per
  head to k_nope [N] and v [Zv] by W_UKV (eq. 10-11), plus one RoPE key
  k_rope = RoPE(x W_KR) [R] shared by every head (eq. 15-16); a head's key is
  [k_nope, k_rope]. softmax scale: `mla_scale`. The two RMSNorms use eps 1e-6
  (transformers' DeepseekV3RMSNorm default, not model.norm_eps).

  Decoding, the cache holds only c and k_rope: KVCache(k=[B, S, C],
  v=[B, S, R]) ((C + R) values per token and layer against 2 J Z for
  `Attention`). The cached step uses the paper's absorbed form (section 2.1.2,
  "we can absorb W_UK into W_UQ, and W_UV into W_O"): q_nope W_UK^T scores the
  latents directly, and the attention-weighted latent goes through W_UV once,
  so no per-head key or value is ever expanded from the cache.
  """

  def __init__(self, m, layer: int = 0, *, rngs: nnx.Rngs):
    del layer  # every MLA layer is the same (no windows)
    a, D, H = m.mla, m.d_model, m.num_heads
    C, N, R, Zv, Q = (
      a.kv_lora_rank,
      a.qk_nope_head_dim,
      a.qk_rope_head_dim,
      a.v_head_dim,
      a.q_lora_rank,
    )
    self.m = m
    init = fan_in_init((0,), m.init_scale)
    if Q:
      self.wq_a = param(rngs, init, (D, Q), ("embed", None))
      self.q_norm = Norm(Q, "rms", 1e-6, names=(None,))
      self.wq_b = param(rngs, init, (Q, H, N + R), (None, "heads", "head_dim"))
    else:
      self.wq = param(rngs, init, (D, H, N + R), ("embed", "heads", "head_dim"))
    self.wkv_a = param(rngs, init, (D, C + R), ("embed", None))
    self.kv_norm = Norm(C, "rms", 1e-6, names=(None,))
    self.wkv_b = param(rngs, init, (C, H, N + Zv), (None, "heads", "head_dim"))
    self.wo = param(
      rngs, fan_in_init((0, 1), m.init_scale), (H, Zv, D), ("heads", "head_dim", "embed")
    )

  def _project(self, x_BxLxD, positions_BxL):
    """(q_nope [B, L, H, N], q_rope [B, L, H, R], latent c [B, L, C], k_rope [B, L, R])."""
    m, a, dt = self.m, self.m.mla, x_BxLxD.dtype
    N, C = a.qk_nope_head_dim, a.kv_lora_rank
    if a.q_lora_rank:
      cq = self.q_norm(jnp.einsum("bld,dq->blq", x_BxLxD, self.wq_a[...].astype(dt)))
      q = jnp.einsum("blq,qhz->blhz", cq, self.wq_b[...].astype(dt))
    else:
      q = jnp.einsum("bld,dhz->blhz", x_BxLxD, self.wq[...].astype(dt))
    ckv = jnp.einsum("bld,dc->blc", x_BxLxD, self.wkv_a[...].astype(dt))
    c_BxLxC = self.kv_norm(ckv[..., :C])
    rot = lambda t: rope(t, positions_BxL, m.rope_theta, m.rope_layout, m.rope_scaling)
    return q[..., :N], rot(q[..., N:]), c_BxLxC, rot(ckv[:, :, None, C:])[:, :, 0]

  def __call__(
    self,
    x_BxLxD,
    positions_BxL,
    cache: KVCache | None = None,
    index=None,
    valid_BxS=None,
    segments_BxL=None,
  ) -> AttentionOut:
    """As Attention.__call__; the cache is KVCache(latent [B, S, C], k_rope [B, S, R])."""
    a, dt = self.m.mla, x_BxLxD.dtype
    N, H, L = a.qk_nope_head_dim, self.m.num_heads, x_BxLxD.shape[1]
    q_nope, q_rope, c_BxLxC, kr_BxLxR = self._project(x_BxLxD, positions_BxL)
    wkv_b, wo = self.wkv_b[...].astype(dt), self.wo[...].astype(dt)
    scale = mla_scale(self.m)
    if cache is None:
      kv_BxLxHxZ = jnp.einsum("blc,chz->blhz", c_BxLxC, wkv_b)
      kr_BxLxHxR = jnp.broadcast_to(
        kr_BxLxR[:, :, None], kr_BxLxR.shape[:2] + (H,) + kr_BxLxR.shape[-1:]
      )
      k = jnp.concatenate([kv_BxLxHxZ[..., :N], kr_BxLxHxR], -1)
      q = jnp.concatenate([q_nope, q_rope], -1)
      q, k, v = (checkpoint_name(t, "attn_qkv") for t in (q, k, kv_BxLxHxZ[..., N:]))
      mask_BxLxS = jnp.tril(jnp.ones((L, L), bool))[None]
      if segments_BxL is not None:
        mask_BxLxS = mask_BxLxS & (segments_BxL[:, :, None] == segments_BxL[:, None, :])
      out_BxLxHxZ = checkpoint_name(attend(q, k, v, mask_BxLxS, scale=scale), "attn_context")
      out_BxLxD = jnp.einsum("blhz,hzd->bld", out_BxLxHxZ, wo)
      return AttentionOut(checkpoint_name(out_BxLxD, "attn_out"), None)
    cache = KVCache(
      cache_write(cache.k, c_BxLxC, index, None), cache_write(cache.v, kr_BxLxR, index, None)
    )
    see_BxLxS = decode_mask(valid_BxS, index, L)
    f32 = jnp.float32
    q_lat = jnp.einsum("blhn,chn->blhc", q_nope, wkv_b[..., :N], preferred_element_type=f32)
    logits = jnp.einsum("blhc,bsc->bhls", q_lat, cache.k.astype(f32))
    logits += jnp.einsum("blhr,bsr->bhls", q_rope, cache.v.astype(dt), preferred_element_type=f32)
    logits = jnp.where(see_BxLxS[:, None], logits * scale, jnp.finfo(f32).min)
    probs = jax.nn.softmax(logits, -1)
    ctx_BxLxHxC = jnp.einsum("bhls,bsc->blhc", probs, cache.k.astype(f32))
    out_BxLxHxZ = jnp.einsum("blhc,chz->blhz", ctx_BxLxHxC.astype(dt), wkv_b[..., N:])
    return AttentionOut(jnp.einsum("blhz,hzd->bld", out_BxLxHxZ, wo), cache)


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
    h_TxF = checkpoint_name(x_TxD @ self.wi[...].astype(dt), "mlp_hidden")
    g_TxF = None
    if is_gated(self.activation):
      g_TxF = checkpoint_name(x_TxD @ self.wg[...].astype(dt), "mlp_hidden")
    h_TxF = constrain(activate(h_TxF, self.activation, g_TxF), "batch", "mlp")
    y_TxD = checkpoint_name(h_TxF @ self.wo[...].astype(dt), "mlp_out")
    return y_TxD.reshape(x_BxLxD.shape)


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
