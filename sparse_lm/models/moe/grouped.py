"""Grouped expert FFN over rows sorted by expert (dropless, and capacity on CPU).

Rows x_NxD are sorted by expert: expert e owns rows [start_e, start_e + n_e),
start = exclusive cumsum of group_sizes_E; rows past sum(n) are ignored.
  ffn_ragged  jax.lax.ragged_dot, for backends with a grouped matmul (GPU, TPU).
  ffn_blocks  for CPU, where ragged_dot costs about E times the work: per
              expert, a loop over fixed-size row blocks of its group (big
              blocks first, small ones for the remainder), so the wasted rows
              are under E x the small block; the forward visits only the
              experts that have rows (their weights alone are sliced).
              Custom VJP with the same loops; the backward recomputes each block's hidden
              activations instead of storing [N, F] (cheaper on CPU, where a
              large fresh buffer costs page faults and cache misses).
Both compute y = act(x @ wi[e] (+ bi[e]), x @ wg[e] (+ bg[e])) * hidden_mask @ wo[e]
per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_lm.models.layers import activate
from sparse_lm.models.layers import is_gated

Array = jax.Array

# Row-block sizes of ffn_blocks (the CPU kernel only), largest first (benchmarks/README.md).
BLOCK_SIZES = (128, 32)


def row_experts(group_sizes_E, n: int) -> Array:
  """The expert of each of n rows sorted by expert (rows past the groups: the last)."""
  E = group_sizes_E.shape[0]
  return jnp.repeat(jnp.arange(E, dtype=jnp.int32), group_sizes_E, total_repeat_length=n)


def ffn_ragged(x_NxD, group_sizes_E, wi, wg, wo, activation, hidden_mask_NxF=None, **b) -> Array:
  """Grouped FFN with jax.lax.ragged_dot (fast on GPU / TPU); b: the hidden
  biases bi, bg [E, F] (model.moe.expert_bias, else None), each row its expert's."""
  h_NxF = jax.lax.ragged_dot(x_NxD, wi, group_sizes_E)
  g_NxF = jax.lax.ragged_dot(x_NxD, wg, group_sizes_E) if is_gated(activation) else None
  if b.get("bi") is not None:
    e_N = row_experts(group_sizes_E, x_NxD.shape[0])
    h_NxF, g_NxF = h_NxF + b["bi"][e_N], None if g_NxF is None else g_NxF + b["bg"][e_N]
  a_NxF = activate(h_NxF, activation, g_NxF)
  if hidden_mask_NxF is not None:
    a_NxF = a_NxF * hidden_mask_NxF
  return jax.lax.ragged_dot(a_NxF, wo, group_sizes_E)


def ffn_blocks(x_NxD, group_sizes_E, wi, wg, wo, activation, mask_NxF=None, block_sizes=None, **b):
  """Grouped FFN as per-expert loops over row blocks (the CPU path); b: the
  hidden biases bi, bg [E, F] (model.moe.expert_bias, else None)."""
  gated, bs = is_gated(activation), tuple(block_sizes or BLOCK_SIZES)
  w = (wi, wg if gated else None, wo, b.get("bi"), b.get("bg") if gated else None)
  return _ffn_blocks(x_NxD, group_sizes_E, w, mask_NxF, activation, bs)


def _for_each_block(group_sizes_E, block_sizes, body, carry, expert_in, expert_out):
  """Per expert, loops over its row blocks (big blocks first, then small ones
  for the remainder):
    carry, local = body(expert_in[e], first_row, block_size, group_end, carry, local)
  `local` starts from expert_out for every expert; returns (carry, the final
  locals stacked [E, ...]).

  Without locals (the forward) only the experts that have rows are visited:
  an empty one's weights are never sliced and no block runs for it, which is
  what a decode step with a few tokens needs (llama.cpp's mul_mat_id and
  megablox skip them too). With locals (the backward's per-expert weight
  gradients) a scan over all E experts stacks them: writing each into a
  zeroed [E, ...] carry instead cost +25 % at E=256 in training
  (benchmarks/README.md, "Decoding")."""
  starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E

  def blocks(start, n, weights, carry):
    local = expert_out
    done = jnp.zeros((), group_sizes_E.dtype)
    for j, bs in enumerate(block_sizes):
      last = j == len(block_sizes) - 1
      nb = (n - done + bs - 1) // bs if last else (n - done) // bs
      first = start + done

      def step(b, c, bs=bs, first=first):
        return body(weights, first + b * bs, bs, start + n, *c)

      carry, local = jax.lax.fori_loop(0, nb, step, (carry, local))
      done = done + nb * bs
    return carry, local

  if jax.tree.leaves(expert_out):
    return jax.lax.scan(lambda c, xs: blocks(*xs, c), carry, (starts_E, group_sizes_E, expert_in))
  E = group_sizes_E.shape[0]
  used_E = jnp.nonzero(group_sizes_E > 0, size=E, fill_value=0)[0]

  def used(i, carry):
    e = used_E[i]
    weights = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, e, 0, False), expert_in)
    return blocks(starts_E[e], group_sizes_E[e], weights, carry)[0]

  return jax.lax.fori_loop(0, jnp.sum(group_sizes_E > 0), used, carry), expert_out


def _act(h, g, m, activation):
  a = activate(h, activation, g)
  return a if m is None else a * m


def _slice(a, row, size):
  return None if a is None else jax.lax.dynamic_slice_in_dim(a, row, size)


def _pad(a, n):
  return None if a is None else jnp.pad(a, ((0, n), (0, 0)))


def _hidden(xb, w1, w3, b1, b3):
  """A block's pre-activation hidden rows (and gate rows), biases added."""
  hb = xb @ w1 if b1 is None else xb @ w1 + b1[None]
  gb = None if w3 is None else (xb @ w3 if b3 is None else xb @ w3 + b3[None])
  return hb, gb


def _fwd_loops(x_NxD, group_sizes_E, w, mask_NxF, activation, block_sizes):
  N, D = x_NxD.shape[0], w[2].shape[-1]
  pad = max(block_sizes)
  xp, mp = _pad(x_NxD, pad), _pad(mask_NxF, pad)

  def body(w, row, bs, end, y, local):
    w1, w3, w2, b1, b3 = w
    xb = _slice(xp, row, bs)
    hb, gb = _hidden(xb, w1, w3, b1, b3)
    yb = _act(hb, gb, _slice(mp, row, bs), activation) @ w2
    # A block may run past the group's end into the next expert's rows; those
    # are overwritten when the next expert (processed later) writes them.
    return jax.lax.dynamic_update_slice_in_dim(y, yb, row, 0), local

  y, _ = _for_each_block(
    group_sizes_E, block_sizes, body, jnp.zeros((N + pad, D), x_NxD.dtype), w, ()
  )
  return y[:N]


# The hidden activations are recomputed block by block in the backward pass
# instead of stored: on CPU a [N, F] buffer costs more (memory traffic, page
# faults) than the extra x @ wi of a cache-resident block.
_ffn_blocks = jax.custom_vjp(_fwd_loops, nondiff_argnums=(4, 5))


def _ffn_blocks_fwd(*args):
  """y, and as residuals the differentiable arguments (x, sizes, weights, mask)."""
  return _fwd_loops(*args), args[:4]


def _ffn_blocks_bwd(activation, block_sizes, res, dy_NxD):
  x_NxD, group_sizes_E, w, mask_NxF = res
  N = x_NxD.shape[0]
  pad = max(block_sizes)
  xp, mp, dyp = _pad(x_NxD, pad), _pad(mask_NxF, pad), _pad(dy_NxD, pad)
  f32 = jnp.float32

  def body(w, row, bs, end, dx, local):
    w1, w3, w2, b1, b3 = w
    g1, g3, g2, gb1, gb3 = local
    in_group = (row + jnp.arange(bs)) < end
    xb, mb = _slice(xp, row, bs), _slice(mp, row, bs)
    dyb = jnp.where(in_group[:, None], _slice(dyp, row, bs), 0)
    hb, gb = _hidden(xb, w1, w3, b1, b3)
    ab, act_vjp = jax.vjp(lambda hh, gg: _act(hh, gg, mb, activation), hb, gb)
    g2 = g2 + jnp.dot(ab.T, dyb, preferred_element_type=f32)
    dh, dg = act_vjp(dyb @ w2.T)  # zero on rows past the group (dyb is)
    g1 = g1 + jnp.dot(xb.T, dh, preferred_element_type=f32)
    dxb = dh @ w1.T
    gb1 = gb1 if b1 is None else gb1 + jnp.sum(dh, 0, dtype=f32)
    gb3 = gb3 if b3 is None else gb3 + jnp.sum(dg, 0, dtype=f32)
    if w3 is not None:
      g3 = g3 + jnp.dot(xb.T, dg, preferred_element_type=f32)
      dxb = dxb + dg @ w3.T
    dx = jax.lax.dynamic_update_slice_in_dim(dx, dxb.astype(dx.dtype), row, 0)
    return dx, (g1, g3, g2, gb1, gb3)

  zeros1 = lambda w: None if w is None else jnp.zeros(w.shape[1:], f32)
  dx, grads = _for_each_block(
    group_sizes_E, block_sizes, body, jnp.zeros_like(xp), w, tuple(zeros1(a) for a in w)
  )
  cast = lambda d, a: None if a is None else d.astype(a.dtype)
  return (dx[:N], None, tuple(cast(d, a) for d, a in zip(grads, w)), None)


_ffn_blocks.defvjp(_ffn_blocks_fwd, _ffn_blocks_bwd)
