"""The experts: FFNs as pure functions of an explicit weights tuple.

Both layouts compute y = act(x @ wi[e], x @ wg[e]) * mask @ wo[e] for each
row of expert e; MoeFfn (one device) and the expert-parallel path (a weight
shard inside shard_map) call the same functions.

  batched   the padded capacity buffer [E, C, D] -> [E, C, D], one einsum per
            matmul (GPU / TPU, and CPU above a few experts: policy.py)
  grouped   rows sorted by expert [N, D] with group sizes [E] (grouped.py:
            ragged_dot, or the CPU block loops)

Expert dropout (Fedus et al. 2021, section 4: dropout inside the experts) is a
mask on the hidden activations, drawn by the caller (`dropout_mask`) so that
every layout and every mesh draws the same one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparse_lm import sharding
from sparse_lm.models import layers
from sparse_lm.models.moe import grouped as grouped_lib

Array = jax.Array


class Weights(NamedTuple):
  """wi, wg [E, D, F] (wg None unless the activation is gated), wo [E, F, D];
  with model.moe.expert_bias (GPT-OSS) the biases bi, bg [E, F] and bo [E, D]
  (else None). bo is added by the caller after the hidden dim's sum
  (dispatch.Experts), so that a hidden dim split over devices adds it once."""

  wi: Array
  wg: Array | None
  wo: Array
  bi: Array | None = None
  bg: Array | None = None
  bo: Array | None = None

  def astype(self, dt) -> Weights:
    return Weights(*(None if w is None else w.astype(dt) for w in self))

  @property
  def hidden(self) -> int:
    return self.wi.shape[-1]


def dropout_mask(key: Array | None, rate: float, shape, dtype) -> Array | None:
  """Inverted-dropout keep mask (1 / (1 - rate) or 0), or None when off."""
  if key is None or rate == 0.0:
    return None
  keep = jax.random.bernoulli(key, 1.0 - rate, shape)
  return (keep / (1.0 - rate)).astype(dtype)


def batched(
  w: Weights,
  x_ExCxD: Array,
  activation: str,
  mask_ExCxF: Array | None = None,
  constrain=sharding.constrain,
) -> Array:
  """All experts on their capacity buffers: [E, C, D] -> [E, C, D]."""
  x_ExCxD = constrain(x_ExCxD, "expert", None, "act_embed")
  h_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, w.wi)
  g_ExCxF = None if w.wg is None else jnp.einsum("ecd,edf->ecf", x_ExCxD, w.wg)
  if w.bi is not None:
    h_ExCxF = h_ExCxF + w.bi[:, None]
    g_ExCxF = None if g_ExCxF is None else g_ExCxF + w.bg[:, None]
  a_ExCxF = layers.activate(h_ExCxF, activation, g_ExCxF)
  if mask_ExCxF is not None:
    a_ExCxF = a_ExCxF * mask_ExCxF
  a_ExCxF = constrain(a_ExCxF, "expert", None, "expert_mlp")
  return jnp.einsum("ecf,efd->ecd", a_ExCxF, w.wo)


def grouped(
  w: Weights,
  x_NxD: Array,
  sizes_E: Array,
  activation: str,
  mask_NxF: Array | None,
  impl: str,
) -> Array:
  """Experts on rows sorted by expert (grouped.py's kernels; impl "ragged":
  jax.lax.ragged_dot, "blocks": the CPU block loops; policy.py picks): [N, D] -> [N, D]."""
  kernel = {"ragged": grouped_lib.ffn_ragged, "blocks": grouped_lib.ffn_blocks}[impl]
  return kernel(x_NxD, sizes_E, w.wi, w.wg, w.wo, activation, mask_NxF, bi=w.bi, bg=w.bg)
