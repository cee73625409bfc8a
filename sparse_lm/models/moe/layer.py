"""MoeFfn: the MoE FFN layer (router -> dispatch -> experts -> combine).

Uses config.model: d_model, d_ff, activation, dtype and the model.moe block
(see sparse_lm/config.py). Router math in float32; expert matmuls in
model.dtype; parameters float32 with logical axis names.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections as mlc

from sparse_lm.models import layers
from sparse_lm.models.moe import dispatch as dispatch_lib
from sparse_lm.models.moe import grouped
from sparse_lm.models.moe import parallel
from sparse_lm.models.moe import routing as routing_lib
from flax.core import spmd as flax_spmd
from sparse_lm import sharding

Array = jax.Array


class RouterBias(nnx.Variable):
  """DeepSeek-V3 per-expert routing bias: not a Param (no gradient, no optimizer);
  MoeFfn updates it from the observed load in every training forward."""


def constrain(x, *names):
  """sharding.constrain, with logical names the active rules lack left unsharded."""
  known = {name for name, _ in flax_spmd.get_logical_axis_rules()}
  return sharding.constrain(x, *(n if n in known else None for n in names))


def init_scale(m) -> float:
  """The MoE layer's init scale s: model.moe.init_scale, or model.init_scale if 0."""
  return m.moe.init_scale or m.init_scale


def expert_d_ff(m) -> int:
  return m.moe.d_ff or m.d_ff


def expert_activation(m) -> str:
  return m.moe.activation or m.activation


# On CPU, capacity dispatch runs grouped.py's block loops on the kept rows only
# up to this many experts, and the padded [E, C, D] einsum above it. Measured
# crossover (benchmarks/README.md, 8192 tokens, fwd+bwd / dense FFN, grouped vs
# batched): E=16 about even (k=1 1.46 vs 1.43, k=2 1.46 vs 1.51); E=32 k=1
# 1.74 vs 1.61; E=64 k=1 2.37 vs 1.89; E=256 k=1 4.82 vs 3.49.
GROUPED_CAPACITY_MAX_EXPERTS = 16


def default_capacity_impl(num_experts: int) -> str:
  """CPU with few experts: "grouped" (no work on empty slots, cache-resident
  blocks). Otherwise "batched": the padded [E, C, D] einsum, which XLA runs
  faster than E per-expert loops once each expert has few rows, and which
  GPU / TPU always use."""
  if jax.default_backend() == "cpu" and num_experts <= GROUPED_CAPACITY_MAX_EXPERTS:
    return "grouped"
  return "batched"


# Named PRNG streams of one MoE forward (folded into the layer's rng).
_JITTER, _NOISE, _DROPOUT, _EOM = range(4)


class MoeFfn(nnx.Module):
  """Sparse MoE FFN. __call__(x [B, L, D]) -> (y [B, L, D], aux dict).

  The residual is added by the Transformer block, so a dropped token (or a
  padding token, which is never routed) gets a zero MoE output.
  """

  def __init__(self, m, *, rngs: nnx.Rngs):
    # Frozen (hashable) copy: the module's graphdef can then be a jit static.
    m = m if isinstance(m, mlc.FrozenConfigDict) else mlc.FrozenConfigDict(m)
    moe = m.moe
    self.m = m
    E, D, F = moe.num_experts, m.d_model, expert_d_ff(m)
    self.activation = expert_activation(m)
    s = init_scale(m)
    router_init = layers.fan_in_init(scale=s)
    self.router = layers.param(rngs, router_init, (D, E), ("embed", None))
    if moe.noisy_gating:  # Shazeer 2017 initialises both gating matrices to zero
      self.router_noise = layers.param(rngs, nnx.initializers.zeros, (D, E), ("embed", None))
    if moe.router == "hierarchical":
      G = moe.num_groups
      self.group_router = layers.param(rngs, router_init, (D, G), ("embed", None))
      if moe.noisy_gating:
        self.group_router_noise = layers.param(rngs, nnx.initializers.zeros, (D, G),
                                               ("embed", None))
    if moe.router == "sigmoid_bias":
      self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32))
    init = layers.fan_in_init((1,), s, batch_axes=(0,))  # [E, fan_in, fan_out]
    self.wi = layers.param(rngs, init, (E, D, F), ("expert", "embed", "expert_mlp"))
    if layers.is_gated(self.activation):
      self.wg = layers.param(rngs, init, (E, D, F), ("expert", "embed", "expert_mlp"))
    self.wo = layers.param(rngs, init, (E, F, D), ("expert", "expert_mlp", "embed"))
    if moe.num_shared_experts:
      # S shared experts of hidden F == one dense FFN of hidden S * F.
      SF = moe.num_shared_experts * F
      dense_init = layers.fan_in_init(scale=s)
      self.shared_wi = layers.param(rngs, dense_init, (D, SF), ("embed", "mlp"))
      if layers.is_gated(self.activation):
        self.shared_wg = layers.param(rngs, dense_init, (D, SF), ("embed", "mlp"))
      self.shared_wo = layers.param(rngs, dense_init, (SF, D), ("mlp", "embed"))

  # ---------------------------------------------------------------- experts

  def _weights(self, dt):
    wg = self.wg[...].astype(dt) if layers.is_gated(self.activation) else None
    return self.wi[...].astype(dt), wg, self.wo[...].astype(dt)

  def _dropout_mask(self, shape, dt, key):
    p = self.m.moe.expert_dropout
    if key is None or p == 0.0:
      return None
    keep = jax.random.bernoulli(key, 1.0 - p, shape)
    return (keep / (1.0 - p)).astype(dt)

  def _batched_experts(self, x_ExCxD, key):
    """All experts on their capacity buffers: [E, C, D] -> [E, C, D]."""
    dt = x_ExCxD.dtype
    wi, wg, wo = self._weights(dt)
    x_ExCxD = constrain(x_ExCxD, "expert", None, "act_embed")
    h_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, wi)
    g_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, wg) if wg is not None else None
    a_ExCxF = layers.activate(h_ExCxF, self.activation, g_ExCxF)
    mask = self._dropout_mask(a_ExCxF.shape, dt, key)
    if mask is not None:
      a_ExCxF = a_ExCxF * mask
    a_ExCxF = constrain(a_ExCxF, "expert", None, "expert_mlp")
    return jnp.einsum("ecf,efd->ecd", a_ExCxF, wo)

  def _grouped_experts(self, x_NxD, group_sizes_E, key, impl=None, *, slot_of_row=None,
                       capacity=None):
    """Experts on rows sorted by expert. For capacity dispatch, slot_of_row [N]
    (e * C + position, E * C for an empty row) makes expert dropout draw the
    same [E, C, F] mask as _batched_experts, whatever the implementation."""
    dt = x_NxD.dtype
    wi, wg, wo = self._weights(dt)
    F = wi.shape[-1]
    if slot_of_row is None:
      mask = self._dropout_mask((x_NxD.shape[0], F), dt, key)
    else:
      mask = self._dropout_mask((wi.shape[0], capacity, F), dt, key)
      if mask is not None:
        mask = jnp.take(mask.reshape(-1, F), slot_of_row, axis=0, mode="fill", fill_value=0)
    return grouped.grouped_ffn(x_NxD, group_sizes_E, wi, wg, wo, self.activation, mask, impl)

  def _shared(self, x_TxD):
    dt = x_TxD.dtype
    h = x_TxD @ self.shared_wi[...].astype(dt)
    g = x_TxD @ self.shared_wg[...].astype(dt) if layers.is_gated(self.activation) else None
    return layers.activate(h, self.activation, g) @ self.shared_wo[...].astype(dt)

  # ---------------------------------------------------------------- forward

  def __call__(self, x_BxLxD: Array, *, mask_BxL: Array | None = None, train: bool = False,
               rng: Array | None = None, grouped_impl: str | None = None,
               capacity_impl: str | None = None, position_method: str | None = None
               ) -> tuple[Array, dict[str, Array]]:
    """y [B, L, D] in model.dtype and the aux dict (router_loss + terms + diagnostics).

    rng is used only when train=True (jitter, noisy gating, second-expert
    policy, expert dropout, expert output masking). These override choices
    made by backend / expert count (for tests and benchmarks):
      grouped_impl     "ragged" | "blocks": the grouped kernel (grouped.py);
      capacity_impl    "batched" (padded [E, C, D] einsum) | "grouped" (kept
                       rows only, with the grouped kernel);
      position_method  "cumsum" | "sort" (dispatch.positions_in_expert).
    """
    m, moe = self.m, self.m.moe
    B, L, D = x_BxLxD.shape
    T, E = B * L, moe.num_experts
    dt = layers.dtype_of(m)
    x_TxD = x_BxLxD.reshape(T, D).astype(dt)
    mask_T = (jnp.ones((T,), jnp.float32) if mask_BxL is None
              else mask_BxL.reshape(T).astype(jnp.float32))
    key = self._check_rng(train, rng)
    stream = lambda i: None if key is None else jax.random.fold_in(key, i)
    # dispatch.py, or its expert-parallel twin when the mesh's "expert" axis is > 1.
    dispatch = parallel.dispatcher(self, stream(_DROPOUT), grouped_impl)

    # Router (float32).
    xr_TxD = x_TxD.astype(jnp.float32)
    if train and moe.jitter > 0:
      xr_TxD = routing_lib.jitter(xr_TxD, moe.jitter, stream(_JITTER))
    dot = lambda w: jnp.dot(xr_TxD, w[...], precision=jax.lax.Precision.HIGHEST)
    logits_TxE = dot(self.router)

    if moe.router == "expert_choice":
      C = dispatch_lib.capacity(moe, T, train)
      r = routing_lib.expert_choice(logits_TxE, C, mask_T)
      y_TxD, info = dispatch.expert_choice_dispatch(
          x_TxD, r, lambda x: self._batched_experts(x, stream(_DROPOUT)), mask_T=mask_T)
    else:
      noisy = moe.noisy_gating and train
      hier = moe.router == "hierarchical"
      r = routing_lib.route(
          logits_TxE, moe, mask_T=mask_T, train=train, rng=stream(_NOISE),
          noise_TxE=dot(self.router_noise) if noisy else None,
          group_logits_TxG=dot(self.group_router) if hier else None,
          group_noise_TxG=dot(self.group_router_noise) if noisy and hier else None,
          bias_E=self.router_bias[...] if moe.router == "sigmoid_bias" else None)
      if moe.dispatch == "capacity":
        C = dispatch_lib.capacity(moe, T, train)
        kw = {}
        if (capacity_impl or default_capacity_impl(E)) == "grouped":
          kw["grouped_fn"] = lambda x, n, slot: self._grouped_experts(
              x, n, stream(_DROPOUT), grouped_impl, slot_of_row=slot, capacity=C)
        y_TxD, info = dispatch.capacity_dispatch(
            x_TxD, r, lambda x: self._batched_experts(x, stream(_DROPOUT)), num_experts=E,
            capacity=C, position_method=position_method, **kw)
      else:
        y_TxD, info = dispatch.dropless_dispatch(
            x_TxD, r, lambda x, n: self._grouped_experts(x, n, stream(_DROPOUT), grouped_impl),
            num_experts=E, position_method=position_method)
      if moe.router == "sigmoid_bias" and train:
        counts_E = routing_lib.expert_counts(r.expert_TxK, r.valid_TxK, E)
        self.router_bias[...] = routing_lib.update_bias(
            self.router_bias[...], counts_E, moe.bias_update_rate)

    if train and moe.eom_rate > 0:
      # NLLB-200 Expert Output Masking: drop the whole routed output of a
      # fraction of tokens. Kept tokens are not rescaled by 1 / (1 - rate), so
      # evaluation needs no correction (the residual carries the masked ones).
      keep_T = jax.random.bernoulli(stream(_EOM), 1.0 - moe.eom_rate, (T,))
      y_TxD = y_TxD * keep_T[:, None]
    y_TxD = y_TxD.astype(dt)
    if moe.num_shared_experts:
      y_TxD = y_TxD + self._shared(x_TxD)
    aux = dict(r.aux)
    aux["dropped_fraction"] = info["dropped_fraction"]
    aux["router_loss"] = (moe.load_balance_weight * aux["load_balance_loss"]
                          + moe.z_loss_weight * aux["z_loss"]
                          + moe.importance_weight * (aux["importance_loss"] + aux["load_loss"]))
    aux = {k: v.astype(jnp.float32) for k, v in aux.items()}
    return y_TxD.reshape(B, L, D), aux

  def _check_rng(self, train, rng):
    moe = self.m.moe
    needs = [name for name, on in (
        ("jitter", moe.jitter > 0), ("noisy_gating", moe.noisy_gating),
        ("second_expert_policy", moe.router == "topk" and moe.top_k > 1
         and moe.second_expert_policy != "all"),
        ("expert_dropout", moe.expert_dropout > 0), ("eom_rate", moe.eom_rate > 0)) if on]
    if not train:
      return None
    if rng is None and needs:
      raise ValueError(f"MoeFfn(train=True) needs an rng for model.moe.{needs[0]}")
    return rng
