"""Dispatch and combine: move tokens to their experts and the results back.

The cost grows with tokens x k x d_model, not with E: no [T, E, C] one-hot
tensors. Each (token, choice) assignment gets a row in an expert buffer from
its position among the assignments of the same expert (a stable sort, or a
cumsum over [T*K, E] int32 for few experts); tokens move by index gathers.

  capacity_dispatch      GShard / Switch: a buffer [E, C, D]; all first choices
                         are served before any second choice, in token order;
                         assignments past C are dropped (the token keeps only
                         the residual) and counted.
  dropless_dispatch      Mixtral / DBRX / MegaBlocks: assignments sorted by
                         expert into [T*K, D] rows, a grouped matmul (grouped.py)
                         runs every assignment; nothing is dropped.
  expert_choice_dispatch Zhou et al.: the router already chose [E, C] slots.

Padding tokens (mask 0) have invalid assignments: they take no capacity, are
not computed, and get a zero MoE output.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparse_lm.models.moe import routing as routing_lib

Array = jax.Array

# Below this many experts the [T*K, E] int32 cumsum is cheaper than a sort
# (measured on CPU, 16k assignments: E=8 cumsum 0.6 ms vs sort 2.3 ms; E=64
# 3.5 vs 2.7; E=256 27 vs 3.0).
CUMSUM_MAX_EXPERTS = 32


def num_choices(moe: Any) -> int:
  """Assignments per token: top_k, times top_k_groups for hierarchical."""
  return moe.top_k * (moe.top_k_groups if moe.router == "hierarchical" else 1)


def capacity(moe: Any, num_tokens: int, train: bool) -> int:
  """Per-expert capacity over the whole batch: max(min_capacity, ceil(cf*T*k/E)), <= T."""
  cf = moe.capacity_factor if train else moe.eval_capacity_factor
  c = max(moe.min_capacity, math.ceil(cf * num_tokens * num_choices(moe) / moe.num_experts))
  return max(1, min(c, num_tokens))


def positions_in_expert(expert_A: Array, valid_A: Array, num_experts: int,
                        method: str | None = None) -> tuple[Array, Array]:
  """Rank of each valid assignment among the valid ones of its expert, in array order.

  Returns (position [A] int32, garbage where not valid; counts [E] int32).
  method: "cumsum" ([A, E] int32 work), "sort" (a stable sort, A log A), or
  None to pick by the number of experts.
  """
  E = num_experts
  A = expert_A.shape[0]
  if method is None:
    method = "cumsum" if E <= CUMSUM_MAX_EXPERTS else "sort"
  expert_A = expert_A.astype(jnp.int32)
  if method == "cumsum":
    onehot_AxE = ((expert_A[:, None] == jnp.arange(E, dtype=jnp.int32)[None, :]) & valid_A[:, None])
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


def _rows_inverse(row_A: Array, num_rows: int, token_A: Array, num_tokens: int) -> Array:
  """token_of_row [R]: the token each row holds, num_tokens (a zero row) if empty."""
  return jnp.full((num_rows,), num_tokens, jnp.int32).at[row_A].set(token_A, mode="drop")


def _take_rows(x_NxD: Array, idx: Array) -> Array:
  """x[idx] along rows; idx == N (or beyond) gives zeros."""
  return jnp.take(x_NxD, idx, axis=0, mode="fill", fill_value=0)


def _combine(y_RxD: Array, row_TxK: Array, gate_TxK: Array) -> Array:
  """sum_k gate[t, k] * y[row[t, k]], float32 [T, D]."""
  y_TxKxD = _take_rows(y_RxD, row_TxK).astype(jnp.float32)
  return jnp.einsum("tk,tkd->td", gate_TxK, y_TxKxD)


def capacity_slots(r: routing_lib.Routing, num_experts: int, capacity: int,
                   position_method: str | None = None):
  """The GShard priority rule, in one place (the expert-parallel path uses it too).

  Assignments in priority order A = K*T (all first choices in token order, then
  all second choices, ...). Returns (expert_A, pos_A, counts_E, kept_A): each
  assignment's expert, its slot among that expert's valid assignments, the
  per-expert counts before capacity, and whether it fits (pos < capacity).
  """
  expert_A = r.expert_TxK.T.reshape(-1)
  valid_A = r.valid_TxK.T.reshape(-1)
  pos_A, counts_E = positions_in_expert(expert_A, valid_A, num_experts, position_method)
  return expert_A, pos_A, counts_E, valid_A & (pos_A < capacity)


def dropped_fraction(valid_TxK: Array, kept_TxK: Array) -> Array:
  """Fraction of valid assignments that capacity dropped."""
  n_valid = jnp.sum(valid_TxK)
  return ((n_valid - jnp.sum(kept_TxK)) / jnp.maximum(n_valid, 1)).astype(jnp.float32)


def capacity_dispatch(x_TxD: Array, r: routing_lib.Routing,
                      expert_fn: Callable[[Array], Array] | None = None, *, num_experts: int,
                      capacity: int, position_method: str | None = None,
                      grouped_fn: Callable[[Array, Array, Array], Array] | None = None
                      ) -> tuple[Array, dict[str, Array]]:
  """GShard capacity dispatch, computing with one of:
    expert_fn  [E, C, D] -> [E, C, D]: experts on the padded capacity buffer
               (static shapes: the TPU / GPU and expert-parallel layout);
    grouped_fn (rows [T*K, D], group sizes [E], slot of each row [T*K]) -> rows:
               experts on the kept assignments only, sorted by expert (the
               CPU path: no work on empty capacity slots); used if given.
  Returns (y [T, D] float32, {"dropped_fraction", "kept_TxK"}).
  """
  T, K = r.expert_TxK.shape
  E, C = num_experts, capacity
  expert_A, pos_A, counts_E, kept_A = capacity_slots(r, E, C, position_method)
  token_A = jnp.tile(jnp.arange(T, dtype=jnp.int32), K)
  if grouped_fn is not None:
    sizes_E = jnp.minimum(counts_E, C).astype(jnp.int32)
    starts_E = jnp.cumsum(sizes_E) - sizes_E
    N = T * K
    row_A = jnp.where(kept_A, starts_E[expert_A] + pos_A, N).astype(jnp.int32)
    slot_A = jnp.where(kept_A, expert_A * C + pos_A, E * C).astype(jnp.int32)
    y_RxD = grouped_fn(_take_rows(x_TxD, _rows_inverse(row_A, N, token_A, T)), sizes_E,
                       _rows_inverse(row_A, N, slot_A, E * C))
  else:
    row_A = jnp.where(kept_A, expert_A * C + pos_A, E * C).astype(jnp.int32)
    x_ExCxD = _take_rows(x_TxD, _rows_inverse(row_A, E * C, token_A, T)).reshape(E, C, -1)
    y_RxD = expert_fn(x_ExCxD).reshape(E * C, -1)
  row_TxK = row_A.reshape(K, T).T
  kept_TxK = kept_A.reshape(K, T).T
  y_TxD = _combine(y_RxD, row_TxK, jnp.where(kept_TxK, r.gate_TxK, 0.0))
  return y_TxD, {"dropped_fraction": dropped_fraction(r.valid_TxK, kept_TxK),
                 "kept_TxK": kept_TxK}


def dropless_dispatch(x_TxD: Array, r: routing_lib.Routing,
                      grouped_fn: Callable[[Array, Array], Array], *, num_experts: int,
                      position_method: str | None = None) -> tuple[Array, dict[str, Array]]:
  """Sorts assignments by expert; grouped_fn maps (rows [T*K, D], group sizes [E]) -> rows.

  Rows past sum(group sizes) are zero inputs (padding / policy-dropped
  assignments) and their outputs are never read.
  """
  T, K = r.expert_TxK.shape
  E, N = num_experts, T * K
  expert_A = r.expert_TxK.reshape(-1)
  valid_A = r.valid_TxK.reshape(-1)
  pos_A, counts_E = positions_in_expert(expert_A, valid_A, E, position_method)
  starts_E = jnp.cumsum(counts_E) - counts_E
  row_A = jnp.where(valid_A, starts_E[expert_A] + pos_A, N).astype(jnp.int32)
  token_A = jnp.repeat(jnp.arange(T, dtype=jnp.int32), K)
  x_NxD = _take_rows(x_TxD, _rows_inverse(row_A, N, token_A, T))
  y_NxD = grouped_fn(x_NxD, counts_E.astype(jnp.int32))
  y_TxD = _combine(y_NxD, row_A.reshape(T, K), r.gate_TxK)
  return y_TxD, {"dropped_fraction": jnp.zeros((), jnp.float32), "kept_TxK": r.valid_TxK}


def expert_choice_dispatch(x_TxD: Array, r: routing_lib.ExpertChoiceRouting,
                           expert_fn: Callable[[Array], Array], *, mask_T: Array
                           ) -> tuple[Array, dict[str, Array]]:
  """Gathers each expert's chosen tokens [E, C, D], runs experts, scatter-adds back.

  dropped_fraction: the fraction of real tokens no expert chose.
  """
  T = x_TxD.shape[0]
  E, C = r.token_ExC.shape
  token_EC = jnp.where(r.valid_ExC, r.token_ExC, T).reshape(-1)
  y_ExCxD = expert_fn(_take_rows(x_TxD, token_EC).reshape(E, C, -1))
  contrib_ECxD = r.gate_ExC.reshape(-1, 1) * y_ExCxD.reshape(E * C, -1).astype(jnp.float32)
  y_TxD = jnp.zeros((T, x_TxD.shape[-1]), jnp.float32).at[token_EC].add(contrib_ECxD, mode="drop")
  chosen_T = jnp.zeros((T,), jnp.float32).at[token_EC].set(1.0, mode="drop")
  real = jnp.sum(mask_T)
  dropped = jnp.sum(mask_T * (1.0 - chosen_T)) / jnp.maximum(real, 1.0)
  return y_TxD, {"dropped_fraction": dropped.astype(jnp.float32), "chosen_T": chosen_T > 0}
