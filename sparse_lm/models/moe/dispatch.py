"""Dispatch and combine: one program, on one device and across an expert mesh.

Tokens move by index gathers, so the cost grows with tokens x k x d_model,
not with E: no [T, E, C] one-hot tensors. Each dispatch is written once as
  global decisions -> per-shard body (pack, exchange, experts, exchange back)
  -> combine with the gates,
and run by a placement: `Local()` calls the body on the whole batch with
`SHARD1` (n = 1: the exchange is the identity and the body takes the direct
route), parallel.ExpertParallel runs the same body inside jax.shard_map with
the all-to-all over the mesh's expert axes (parallel.py has the layouts and
their costs). So the expert-parallel path is this path with shard-local steps.

  capacity_dispatch      GShard / Switch: expert e serves at most C assignments
                         of the whole batch, all first choices before any
                         second choice, in token order (capacity_slots); the
                         rest are dropped (the token keeps only the residual)
                         and counted. Computed on the padded [E, C, D] buffer
                         ("batched") or on the kept rows only ("grouped").
  dropless_dispatch      Mixtral / DBRX / MegaBlocks: assignments sorted by
                         expert, a grouped matmul runs every one.
  expert_choice_dispatch Zhou et al.: the router already chose [E, C] slots.
  gather_dispatch        decoding with few assignments: each assignment's
                         expert weights gathered by id (gpt-fast's
                         w1[expert_indices]), so a step reads T x K experts'
                         weights, not E; one device only.

Padding tokens (mask 0) have invalid assignments: they take no capacity, are
not computed, and get a zero MoE output. Assignment arrays are [A] over a
shard's T x K (token-major) assignments; rows are positions in a buffer.
"""

from __future__ import annotations

from typing import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparse_lm.models import layers as layers_lib
from sparse_lm.models.moe import experts as experts_lib
from sparse_lm.models.moe import grouped as grouped_lib
from sparse_lm.models.moe import routing as routing_lib

Array = jax.Array


# ------------------------------------------------------------------ placement


class Shard(NamedTuple):
  """What a per-shard body knows about the shards along the expert axes."""

  n: int  # shards along the expert axes
  a2a: Callable[[Array], Array]  # all_to_all over them, dim 0 = destination
  hidden_sum: Callable[[Array], Array]  # psum over axes that split the expert hidden dim
  first_token: Callable[[int], Array | int]  # global index of this shard's first token


SHARD1 = Shard(1, lambda x: x, lambda y: y, lambda t_loc: 0)


class Local:
  """One device (or a mesh whose expert axes have size 1): the body as is.

  `run(body, x, arrays, w, mask, **placement)` = body(shard, x, *arrays, w,
  mask) -> rows like x's; parallel.ExpertParallel.run takes the same call and
  reads `placement` (how `arrays` and `mask` are split)."""

  n = n_tokens = 1

  def run(self, body, x, arrays, w, mask, **_):
    return body(SHARD1, x, *arrays, w, mask)


LOCAL = Local()


# ------------------------------------------------------------------ positions


def positions_in_expert(
  expert_A: Array, valid_A: Array, num_experts: int, method: str = "sort"
) -> tuple[Array, Array]:
  """Rank of each valid assignment among the valid ones of its expert, in array order.

  Returns (position [A] int32, garbage where not valid; counts [E] int32).
  method: "cumsum" ([A, E] int32 work) or "sort" (a stable sort, A log A);
  policy.py picks one per backend.
  """
  E = num_experts
  A = expert_A.shape[0]
  expert_A = expert_A.astype(jnp.int32)
  if method == "cumsum":
    onehot_AxE = (expert_A[:, None] == jnp.arange(E, dtype=jnp.int32)[None, :]) & valid_A[:, None]
    csum_AxE = jnp.cumsum(onehot_AxE.astype(jnp.int32), axis=0)
    pos_A = jnp.take_along_axis(csum_AxE, expert_A[:, None], axis=1)[:, 0] - 1
    return pos_A, csum_AxE[-1]
  if method != "sort":
    raise ValueError(f"unknown position method {method!r}")
  key_A = jnp.where(valid_A, expert_A, E)  # invalid ones sort last
  order_A = jnp.argsort(key_A, stable=True).astype(jnp.int32)
  counts_E1 = jnp.zeros((E + 1,), jnp.int32).at[key_A].add(1)
  starts_E1 = jnp.cumsum(counts_E1) - counts_E1
  pos_sorted_A = jnp.arange(A, dtype=jnp.int32) - starts_E1[key_A[order_A]]
  pos_A = jnp.zeros((A,), jnp.int32).at[order_A].set(pos_sorted_A, unique_indices=True)
  return pos_A, counts_E1[:E]


def capacity_slots(
  r: routing_lib.Routing, num_experts: int, capacity: int, method: str
) -> tuple[Array, Array]:
  """The GShard priority rule, over the whole batch (global, outside any shard).

  Assignments in priority order K*T (all first choices in token order, then
  all second choices, ...). Returns (pos_TxK, kept_TxK): each assignment's
  slot among its expert's valid assignments, and whether it fits (< C).
  """
  T, K = r.expert_TxK.shape
  expert_A = r.expert_TxK.T.reshape(-1)
  valid_A = r.valid_TxK.T.reshape(-1)
  pos_A, _ = positions_in_expert(expert_A, valid_A, num_experts, method)
  kept_A = valid_A & (pos_A < capacity)
  return pos_A.reshape(K, T).T, kept_A.reshape(K, T).T


def dropped_fraction(valid_TxK: Array, kept_TxK: Array) -> Array:
  """Fraction of valid assignments that capacity dropped."""
  n_valid = jnp.sum(valid_TxK)
  return ((n_valid - jnp.sum(kept_TxK)) / jnp.maximum(n_valid, 1)).astype(jnp.float32)


# ------------------------------------------------------------------ row helpers


def rows_inverse(row_A: Array, num_rows: int, src_A: Array, fill: int) -> Array:
  """src_of_row [R]: src_A[a] at row row_A[a]; `fill` where none lands (rows >= R drop)."""
  return jnp.full((num_rows,), fill, jnp.int32).at[row_A].set(src_A.astype(jnp.int32), mode="drop")


def take_rows(x_NxD: Array, idx: Array) -> Array:
  """x[idx] along rows; idx >= N gives zeros."""
  return jnp.take(x_NxD, idx, axis=0, mode="fill", fill_value=0)


def _combine(y_TxKxD: Array, gate_TxK: Array) -> Array:
  """sum_k gate[t, k] * y[t, k], float32 [T, D]."""
  return jnp.einsum("tk,tkd->td", gate_TxK, y_TxKxD.astype(jnp.float32))


class Experts(NamedTuple):
  """How the experts compute on a shard: weights (this shard's), activation,
  capacity layout and grouped kernel (policy.Impl), dropout mask (this
  shard's part of the globally drawn one, or None)."""

  w: experts_lib.Weights
  activation: str
  layout: str
  kernel: str
  mask: Array | None

  def batched(self, sh: Shard, x_ExCxD, mask=None):
    y = sh.hidden_sum(experts_lib.batched(self.w, x_ExCxD, self.activation, mask))
    return y if self.w.bo is None else y + self.w.bo[:, None].astype(y.dtype)

  def grouped(self, sh: Shard, x_NxD, sizes_E, mask=None):
    y = sh.hidden_sum(
      experts_lib.grouped(self.w, x_NxD, sizes_E, self.activation, mask, self.kernel)
    )
    bo = None if self.w.bo is None else self.w.bo[grouped_lib.row_experts(sizes_E, y.shape[0])]
    return y if bo is None else y + bo.astype(y.dtype)


def _slot_mask(ex: Experts, slot_of_row: Array) -> Array | None:
  """The rows' part of an [E, C, F] slot mask (slot E*C or beyond: a zero row)."""
  if ex.mask is None:
    return None
  return take_rows(ex.mask.reshape(-1, ex.mask.shape[-1]), slot_of_row)


# ------------------------------------------------------------------ capacity core


def _exchange_capacity(
  sh: Shard, ex: Experts, x_TxD, token_A, expert_A, slot_A, rank_A, send_A, C: int, W: int
) -> Array:
  """Per shard: its assignments -> their expert outputs y_A [A, D].

  token_A: local token; expert_A: global expert; slot_A: its slot among the
  expert's C (global); rank_A: its rank among this shard's sent rows of that
  expert (< W); send_A: whether it is served. With n == 1, slot == rank and
  W == C, so the send buffer is the capacity buffer itself.
  """
  n = sh.n
  E = ex.w.wi.shape[0] * n  # w is this shard's
  U = E // n
  T_loc, D = x_TxD.shape
  if n == 1 and ex.layout == "grouped":
    # Kept rows only, sorted by expert: row = start of the expert + slot.
    sizes_E = jnp.zeros((E,), jnp.int32).at[expert_A].add(send_A.astype(jnp.int32))
    starts_E = jnp.cumsum(sizes_E) - sizes_E
    N = expert_A.shape[0]
    row_A = jnp.where(send_A, starts_E[expert_A] + slot_A, N).astype(jnp.int32)
    slot_of_row = rows_inverse(row_A, N, expert_A * C + slot_A, E * C)
    x_rows = take_rows(x_TxD, rows_inverse(row_A, N, token_A, T_loc))
    return take_rows(ex.grouped(sh, x_rows, sizes_E, _slot_mask(ex, slot_of_row)), row_A)
  row_A = jnp.where(send_A, expert_A * W + rank_A, E * W).astype(jnp.int32)
  x_send = take_rows(x_TxD, rows_inverse(row_A, E * W, token_A, T_loc))
  if n == 1:  # batched: the send buffer is the [E, C, D] capacity buffer
    y_ExCxD = ex.batched(sh, x_send.reshape(E, C, D), ex.mask)
    return take_rows(y_ExCxD.reshape(E * C, D), row_A)
  slot_send = rows_inverse(row_A, E * W, slot_A, C)  # C = an empty row
  x_recv = sh.a2a(x_send.reshape(n, U * W, D))
  slot_R = sh.a2a(slot_send.reshape(n, U * W)).reshape(-1)  # [n_src * U * W]
  R = n * U * W
  local_R = jnp.broadcast_to(jnp.arange(U, dtype=jnp.int32)[None, :, None], (n, U, W)).reshape(-1)
  iota_R = jnp.arange(R, dtype=jnp.int32)
  if ex.layout == "grouped":
    # The rows of (source s, local expert l) are a prefix of their W rows:
    # group them expert-major, then by source.
    cnt_PxU = jnp.sum((slot_R < C).reshape(n, U, W), -1, dtype=jnp.int32)
    sizes_U = jnp.sum(cnt_PxU, 0)
    base_PxU = (jnp.cumsum(sizes_U) - sizes_U)[None, :] + jnp.cumsum(cnt_PxU, 0) - cnt_PxU
    dst_R = jnp.where(
      slot_R < C, (base_PxU[:, :, None] + jnp.arange(W)[None, None, :]).reshape(-1), R
    )
    slot_of_row = rows_inverse(dst_R, R, local_R * C + slot_R, U * C)
    x_rows = take_rows(x_recv.reshape(R, D), rows_inverse(dst_R, R, iota_R, R))
    y_recv = take_rows(ex.grouped(sh, x_rows, sizes_U, _slot_mask(ex, slot_of_row)), dst_R)
  else:
    dst_R = jnp.where(slot_R < C, local_R * C + slot_R, U * C)
    x_ExCxD = take_rows(x_recv.reshape(R, D), rows_inverse(dst_R, U * C, iota_R, R))
    y_ExCxD = ex.batched(sh, x_ExCxD.reshape(U, C, D), ex.mask)
    y_recv = take_rows(y_ExCxD.reshape(U * C, D), dst_R)
  y_back = sh.a2a(y_recv.reshape(n, U * W, D)).reshape(E * W, D)
  return take_rows(y_back, row_A)


# ------------------------------------------------------------------ the dispatches


def capacity_dispatch(
  x_TxD: Array, r: routing_lib.Routing, ex: Experts, *, capacity: int, positions: str, place=LOCAL
) -> tuple[Array, dict[str, Array]]:
  """GShard capacity dispatch. Returns (y [T, D] float32, {"dropped_fraction"}).

  ex.mask, if any, is the global [E, C, F] dropout mask by capacity slot.
  """
  T, K = r.expert_TxK.shape
  E, C = ex.w.wi.shape[0], capacity
  pos_TxK, kept_TxK = capacity_slots(r, E, C, positions)
  T_loc = T // place.n_tokens
  # A token picks an expert at most once: a shard sends <= T_loc rows to an
  # expert, and <= C as they hold distinct slots.
  W = min(C, T_loc)

  def body(sh, x, expert, pos, kept, w, mask):
    Tl = x.shape[0]
    e_A, kept_A, pos_A = expert.reshape(-1), kept.reshape(-1), pos.reshape(-1)
    rank_A = pos_A if sh.n == 1 else positions_in_expert(e_A, kept_A, E, positions)[0]
    token_A = jnp.repeat(jnp.arange(Tl, dtype=jnp.int32), K)
    y_A = _exchange_capacity(
      sh, ex._replace(w=w, mask=mask), x, token_A, e_A, pos_A, rank_A, kept_A, C, W
    )
    return y_A.reshape(Tl, K, -1)

  arrays = (r.expert_TxK, pos_TxK, kept_TxK)
  y_TxKxD = place.run(body, x_TxD, arrays, ex.w, ex.mask, check_vma=ex.layout != "grouped")
  y_TxD = _combine(y_TxKxD, jnp.where(kept_TxK, r.gate_TxK, 0.0))
  return y_TxD, {"dropped_fraction": dropped_fraction(r.valid_TxK, kept_TxK)}


def expert_choice_dispatch(
  x_TxD: Array, r: routing_lib.ExpertChoiceRouting, ex: Experts, *, mask_T: Array, place=LOCAL
) -> tuple[Array, dict[str, Array]]:
  """Gathers each expert's chosen tokens [E, C, D], runs experts, scatter-adds back.

  dropped_fraction: the fraction of real tokens no expert chose.
  """
  T = x_TxD.shape[0]
  E, C = r.token_ExC.shape
  T_loc = T // place.n_tokens
  W = min(C, T_loc)
  ex = ex._replace(layout="batched")

  def body(sh, x, token_ExC, valid_ExC, gate_ExC, w, mask):
    Tl, D = x.shape
    local_ExC = token_ExC - sh.first_token(Tl)
    mine_ExC = valid_ExC & (local_ExC >= 0) & (local_ExC < Tl)
    # Rank among this shard's slots of the expert; with one shard it is the
    # slot, as padding (never valid) takes an expert's last slots.
    rank_A = (jnp.cumsum(mine_ExC.astype(jnp.int32), axis=1) - 1).reshape(-1)
    expert_A = jnp.repeat(jnp.arange(E, dtype=jnp.int32), C)
    slot_A = jnp.tile(jnp.arange(C, dtype=jnp.int32), E)
    mine_A = mine_ExC.reshape(-1)
    token_A = jnp.where(mine_A, local_ExC.reshape(-1), Tl)
    ex_sh = ex._replace(w=w, mask=mask)
    y_A = _exchange_capacity(sh, ex_sh, x, token_A, expert_A, slot_A, rank_A, mine_A, C, W)
    contrib = gate_ExC.reshape(-1, 1) * y_A.astype(jnp.float32)
    return jnp.zeros((Tl, D), jnp.float32).at[token_A].add(contrib, mode="drop")

  arrays = (r.token_ExC, r.valid_ExC, r.gate_ExC)
  y_TxD = place.run(body, x_TxD, arrays, ex.w, ex.mask, replicated=True)
  token_EC = jnp.where(r.valid_ExC, r.token_ExC, T).reshape(-1)
  chosen_T = jnp.zeros((T,), jnp.float32).at[token_EC].set(1.0, mode="drop")
  real = jnp.sum(mask_T)
  dropped = jnp.sum(mask_T * (1.0 - chosen_T)) / jnp.maximum(real, 1.0)
  return y_TxD, {"dropped_fraction": dropped.astype(jnp.float32)}


def dropless_dispatch(
  x_TxD: Array, r: routing_lib.Routing, ex: Experts, *, positions: str, place=LOCAL
) -> tuple[Array, dict[str, Array]]:
  """Sorts assignments by expert; the grouped kernel runs every one.

  ex.mask, if any, is the [T*K, F] dropout mask of the one-device sorted rows
  (row r = the r-th assignment in expert order); every mesh uses the same.
  """
  T, K = r.expert_TxK.shape
  E = ex.w.wi.shape[0]
  n = place.n
  U = E // n
  T_loc = T // place.n_tokens
  A = T_loc * K  # a shard's assignments: its send block to each shard (worst case)
  grow_TxK = None
  if ex.mask is not None and n > 1:
    # Each assignment's row in the one-device sorted order picks its mask row.
    g_A, counts_E = positions_in_expert(
      r.expert_TxK.reshape(-1), r.valid_TxK.reshape(-1), E, positions
    )
    starts_E = jnp.cumsum(counts_E) - counts_E
    grow_TxK = (starts_E[r.expert_TxK.reshape(-1)] + g_A).reshape(T, K)

  def body(sh, x, expert, valid, grow, w, mask):
    Tl, D = x.shape
    e_A, v_A = expert.reshape(-1), valid.reshape(-1)
    pos_A, counts_E = positions_in_expert(e_A, v_A, E, positions)
    starts_E = jnp.cumsum(counts_E) - counts_E
    token_A = jnp.repeat(jnp.arange(Tl, dtype=jnp.int32), K)
    ex_sh = ex._replace(w=w, mask=mask)
    if sh.n == 1:  # rows sorted by expert are the grouped kernel's input as they are
      row_A = jnp.where(v_A, starts_E[e_A] + pos_A, A).astype(jnp.int32)
      x_rows = take_rows(x, rows_inverse(row_A, A, token_A, Tl))
      y_rows = ex_sh.grouped(sh, x_rows, counts_E.astype(jnp.int32), mask)
      return take_rows(y_rows, row_A).reshape(Tl, K, D)
    # Send buffer [P, A, D] (R = P * A rows): block p holds this shard's
    # assignments to the U experts of shard p (experts p*U .. p*U + U - 1),
    # sorted by expert, each expert's in token order, from row 0 of the block
    # (block_E: where the destination's first expert starts in this shard's
    # expert-sorted order); the rest of the block is empty. A block of A rows
    # fits the worst case, every assignment to one shard.
    block_E = starts_E[(jnp.arange(E) // U) * U]
    row_A = (e_A // U) * A + starts_E[e_A] - block_E[e_A] + pos_A
    row_A = jnp.where(v_A, row_A, n * A).astype(jnp.int32)
    R = n * A  # rows received
    x_send = take_rows(x, rows_inverse(row_A, R, token_A, Tl))
    id_send = rows_inverse(row_A, R, e_A % U, U)  # U = an empty row
    x_recv = sh.a2a(x_send.reshape(n, A, D)).reshape(R, D)
    id_recv = sh.a2a(id_send.reshape(n, A))  # [P, A]: block s came from shard s
    counts_PxU = sh.a2a(counts_E.reshape(n, U))  # [s, u]: rows shard s sent for local expert u
    sizes_U = jnp.sum(counts_PxU, 0)
    # The grouped kernel's buffer [R, D]: expert-major (local expert u's rows
    # at [start_u, start_u + sizes_U[u]), start = exclusive cumsum of sizes_U),
    # within an expert by source shard s = 0 .. P-1, within a source in the
    # source's token order; rows past sum(sizes_U) are empty. Received row a
    # of block s, the j-th of expert u in that block, goes to start_u + (rows
    # of u from shards before s) + j; as a = (u's first row in block s) + j,
    # dst = offset[s, u] + a with offset = start_u + (exclusive cumsum of
    # counts over sources) - (exclusive cumsum of counts over experts in s).
    # The outputs go back along the same rows: dst_R, the all_to_all, row_A.
    offset_PxU = (
      (jnp.cumsum(sizes_U) - sizes_U)[None, :]
      + jnp.cumsum(counts_PxU, 0)
      - counts_PxU
      - (jnp.cumsum(counts_PxU, 1) - counts_PxU)
    )
    dst_PxA = jnp.take_along_axis(offset_PxU, jnp.minimum(id_recv, U - 1), axis=1)
    dst_R = jnp.where(id_recv < U, dst_PxA + jnp.arange(A)[None, :], R)
    dst_R = dst_R.reshape(-1).astype(jnp.int32)
    x_dst = take_rows(x_recv, rows_inverse(dst_R, R, jnp.arange(R, dtype=jnp.int32), R))
    mask_dst = None
    if mask is not None:
      g_send = rows_inverse(row_A, R, grow.reshape(-1), 0)
      g_recv = sh.a2a(g_send.reshape(n, A)).reshape(-1)
      mask_dst = jnp.take(mask, rows_inverse(dst_R, R, g_recv, 0), axis=0)
    y_dst = ex_sh.grouped(sh, x_dst, sizes_U.astype(jnp.int32), mask_dst)
    y_back = sh.a2a(take_rows(y_dst, dst_R).reshape(n, A, D)).reshape(R, D)
    return take_rows(y_back, row_A).reshape(Tl, K, D)

  arrays = (r.expert_TxK, r.valid_TxK, grow_TxK)
  y_TxKxD = place.run(body, x_TxD, arrays, ex.w, ex.mask, row_mask=True, check_vma=False)
  y_TxD = _combine(y_TxKxD, r.gate_TxK)
  return y_TxD, {"dropped_fraction": jnp.zeros((), jnp.float32)}


def gather_dispatch(x_TxD: Array, r: routing_lib.Routing, w: experts_lib.Weights, activation: str):
  """Each assignment's expert weights gathered by id, cast to the compute dtype
  after the gather (T x K experts' bytes, not E), applied to its token.

  For steps with few assignments (decoding: policy.decode_dispatch); its cost
  grows with T x K x (the bytes of one expert), so above a few assignments the
  grouped path wins. w: the layer's weights as stored (float32, all E)."""
  T, K = r.expert_TxK.shape
  dt = x_TxD.dtype
  e_A = r.expert_TxK.reshape(-1)
  take = lambda a: None if a is None else jnp.take(a, e_A, axis=0).astype(dt)
  x_AxD = jnp.repeat(x_TxD, K, axis=0)
  h_AxF = jnp.einsum("ad,adf->af", x_AxD, take(w.wi))
  g_AxF = None if w.wg is None else jnp.einsum("ad,adf->af", x_AxD, take(w.wg))
  if w.bi is not None:
    h_AxF = h_AxF + take(w.bi)
    g_AxF = None if g_AxF is None else g_AxF + take(w.bg)
  y_AxD = jnp.einsum("af,afd->ad", layers_lib.activate(h_AxF, activation, g_AxF), take(w.wo))
  if w.bo is not None:
    y_AxD = y_AxD + take(w.bo)
  y_TxD = _combine(y_AxD.reshape(T, K, -1), jnp.where(r.valid_TxK, r.gate_TxK, 0.0))
  return y_TxD, {"dropped_fraction": jnp.zeros((), jnp.float32)}
