"""Expert parallelism for MoeFfn: experts sharded over the mesh's "expert" axes,
tokens exchanged with `jax.lax.all_to_all` inside `jax.shard_map`.

MoeFfn.__call__ asks `dispatcher(...)` for its dispatch functions: the
single-device ones of dispatch.py when the mesh axes that the logical name
"expert" maps to have size 1 (or there is no mesh), else an `ExpertParallel`
with the same three functions. Results do not depend on the mesh:

  * Routing stays global and outside shard_map, exactly as on one device
    (router logits, routing.route / expert_choice, the GShard priority
    positions over all K*T assignments of the global batch, the kept mask,
    the aux terms); GSPMD partitions these small tensors. So the decisions and
    the drops are the single-device ones: capacity C is per expert over the
    whole global batch.
  * Inside one shard_map over all mesh axes, each device holds T_loc tokens
    (the token axis split over the "batch" mesh axes, plus any "expert" axis
    that "batch" lacks) and E_loc = E / n_ep experts' weights (their logical
    names already say "expert" on dim 0; "embed" (FSDP) is gathered at the
    shard_map boundary; "expert_mlp" (tensor) stays split, with a psum after
    the second matmul).

Capacity (token choice and expert choice): the source packs its kept
assignments into a send buffer [n_ep, E_loc, S, D], S = min(C, T_loc), row =
(expert, local rank among this device's kept assignments of the expert), plus
each row's global slot (its global priority position p < C, or the expert-
choice slot c). all_to_all over the expert axes; the destination computes the
rows it received in one of MoeFfn's two capacity layouts (its capacity_impl):
  "batched" (GPU / TPU, CPU above 16 experts, and expert choice): a compact
      [E_loc, C, D] buffer, rows placed at their global slots (unique within
      an expert-axis group), the layer's `_batched_experts` on the weight
      shard; each device computes E_loc x C rows. With a "data" (or "fsdp")
      axis > 1 the C slots of an expert are spread over the data rows: each
      data row fills only its own tokens' slots and still computes all C rows,
      so the expert FLOPs are n_data x those of one device holding the same
      experts (the price of global capacity with static shapes).
  "grouped" (CPU up to 16 experts): the received rows regrouped by local
      expert, the layer's `_grouped_experts` (grouped.py's block loops) with
      the slots for the dropout mask: the work follows the rows actually
      received, so no empty-slot work and no n_data x factor.
The outputs go back by the same indices and all_to_all; the source combines
with the gates. No one-hot [T, E, C] tensors: index gathers only (dispatch.py's
way). Costs: the send buffer is E * S * D per device (S = min(C, T_loc), since
a device's kept rows of one expert may be anything from 0 to that), so each
all_to_all moves E * S * D per device, not the ~cf * T_loc * K * D of a
local-capacity scheme.

Dropless: per destination shard a send block of S_dst = T_loc * K rows
(worst case: every assignment goes to one shard) sorted by expert, plus the
per-local-expert counts [n_ep, E_loc] and each row's local expert id.
all_to_all; the destination regroups the n_ep * S_dst received rows by local
expert (expert-major, then source, then the source's order), runs the layer's
`_grouped_experts` on its weight shard with group sizes = the received
counts, returns the rows. grouped.ffn_blocks (the CPU path) loops over each
expert's actual rows in blocks, so its cost follows the actual group sizes
(plus < E_loc small blocks of padding), not the static n_ep * S_dst rows;
jax.lax.ragged_dot (GPU / TPU path) is given the same group sizes. The send /
receive buffers are n_ep x the rows a device actually sends (static shapes):
a ragged all-to-all (jax.lax.ragged_all_to_all) would cut the bytes moved on
GPU / TPU; memory stays n_ep * S_dst rows.

Expert dropout is exact too: the single-device mask is drawn globally (the
same call, [E, C, F] for capacity, sharded over the expert axes; [T*K, F] rows
in the single-device dropless row order for dropless, replicated, which costs
T*K*F per device while expert_dropout > 0) and each expert row takes its own.

Hierarchical MoE: E is split over the expert axes in contiguous blocks, so
when the split follows group boundaries (config.validate_mesh_for_devices
checks that n_ep divides num_groups or num_groups divides n_ep) the primary
gate picks the device(s) holding a group and the secondary gate picks experts
on them; the logical name "expert_group" must map to nothing or to the
expert axes (the groups are placed by the expert axes).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from flax import nnx
from flax.core import spmd as flax_spmd
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparse_lm import config as cfglib
from sparse_lm import sharding
from sparse_lm.models import layers
from sparse_lm.models.moe import dispatch as dispatch_lib
from sparse_lm.models.moe import routing as routing_lib

Array = jax.Array


# ------------------------------------------------------------------ mesh axes


def mesh_axes(logical_name: str) -> tuple[str, ...]:
  """Mesh axes of size > 1 the active rules map a logical name to (() if none / no mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = flax_spmd.get_logical_axis_rules()
  if mesh.empty or logical_name not in {name for name, _ in rules}:
    return ()
  spec = sharding.logical_spec(logical_name)[0]
  axes = () if spec is None else (tuple(spec) if isinstance(spec, (tuple, list)) else (spec,))
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def _size(axes) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes)


def expert_parallel_size() -> int:
  """Size of the mesh axes "expert" maps to (1: experts are not split)."""
  return _size(mesh_axes("expert"))


def dispatcher(layer, key: Array | None, grouped_impl: str | None):
  """What MoeFfn dispatches with: dispatch.py, or ExpertParallel when n_ep > 1."""
  if expert_parallel_size() > 1:
    return ExpertParallel(layer, key, grouped_impl)
  return dispatch_lib


# ------------------------------------------------------------------ helpers


def _rows_inverse(row_A: Array, num_rows: int, src_A: Array, fill: int) -> Array:
  """src_of_row [R]: src_A[a] at row_A[a]; `fill` where no a lands (rows past R drop)."""
  return jnp.full((num_rows,), fill, jnp.int32).at[row_A].set(src_A.astype(jnp.int32),
                                                             mode="drop")


def _take_rows(x_NxD: Array, idx: Array) -> Array:
  """x[idx] along rows; idx >= N gives zeros."""
  return jnp.take(x_NxD, idx, axis=0, mode="fill", fill_value=0)


def _a2a(x, axes):
  """Tiled all_to_all over the expert axes, dim 0 (destination shard -> source shard)."""
  return jax.lax.all_to_all(x, axes if len(axes) > 1 else axes[0], 0, 0, tiled=True)


class _LocalExperts:
  """The layer's own expert functions on this device's weight shard (inside shard_map).

  Stands in for `self` in MoeFfn._batched_experts / _grouped_experts, which
  read only `_weights`, `_dropout_mask`, `activation` and `m`; the dropout
  mask is the slice of the globally drawn one for the rows here.
  """

  def __init__(self, layer, w: dict, mask: Array | None):
    self.m, self.activation = layer.m, layer.activation
    self._w, self._mask = w, mask
    cls = type(layer)
    self.batched = functools.partial(cls._batched_experts, self)
    self.grouped = functools.partial(cls._grouped_experts, self)

  def _weights(self, dt):
    wg = self._w.get("wg")
    return (self._w["wi"].astype(dt), None if wg is None else wg.astype(dt),
            self._w["wo"].astype(dt))

  def _dropout_mask(self, shape, dt, key):
    del key
    if self._mask is None:
      return None
    assert self._mask.shape == tuple(shape), (self._mask.shape, shape)
    return self._mask.astype(dt)


# ------------------------------------------------------------------ dispatcher


class ExpertParallel:
  """dispatch.py's three dispatch functions, expert-parallel (see the module doc).

  The expert_fn / grouped_fn arguments (closures over the global weights) are
  not used: the layer's expert functions run on the local weight shards.
  """

  def __init__(self, layer, key: Array | None, grouped_impl: str | None):
    self.layer, self.key, self.grouped_impl = layer, key, grouped_impl
    m = layer.m
    self.E, self.F = m.moe.num_experts, layer.wi[...].shape[-1]
    mesh = jax.sharding.get_abstract_mesh()
    self.mesh = mesh
    self.ex = mesh_axes("expert")
    self.n_ep = _size(self.ex)
    batch = mesh_axes("batch")
    self.tok = batch + tuple(a for a in self.ex if a not in batch)
    self.n_tok = _size(self.tok)
    mlp = mesh_axes("expert_mlp")
    if set(mlp) & set(self.tok + self.ex) or self.F % _size(mlp):
      mlp = ()  # gathered at the shard_map boundary instead
    self.mlp = mlp
    if self.E % self.n_ep:
      raise cfglib.ConfigError(
          f"config.model.moe.num_experts={self.E} is invalid: must be divisible by the expert "
          f"mesh axes {self.ex} (size {self.n_ep})")

  # ---------------------------------------------------------------- plumbing

  def _check_tokens(self, T):
    if T % self.n_tok:
      raise cfglib.ConfigError(
          f"config.data.batch_size is invalid: the MoE layer's {T} tokens (batch x length) "
          f"must be divisible by the token mesh axes {self.tok} (size {self.n_tok}) for "
          "expert parallelism")

  def _weights(self):
    layer = self.layer
    ex, mlp = self.ex, (self.mlp or None)
    w = {"wi": layer.wi[...], "wo": layer.wo[...]}
    spec = {"wi": P(ex, None, mlp), "wo": P(ex, mlp, None)}
    if layers.is_gated(layer.activation):
      w["wg"], spec["wg"] = layer.wg[...], P(ex, None, mlp)
    return w, spec

  def _finish(self, y):
    """psum over the tensor axes that split the expert hidden dim."""
    return jax.lax.psum(y, self.mlp) if self.mlp else y

  def _shard_map(self, body, args, in_specs, out_specs, check_vma=True):
    """shard_map over all mesh axes. check_vma=False around grouped.py's kernels: their
    loops start from invariant zero carries, which the varying-axes check rejects;
    without it, shard_map's transpose still psums the cotangents of inputs replicated
    over an axis (the weights over "data") and divides those of replicated outputs."""

    def wrapped(*a):
      with nnx.logical_axis_rules(()):  # no GSPMD constraints inside shard_map
        return body(*a)
    return jax.shard_map(wrapped, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=check_vma)(*args)

  # ---------------------------------------------------------------- capacity core

  def _exchange_capacity(self, experts, x_TxD, token_A, expert_A, slot_A, rank_A, send_A,
                         C, S, grouped=False):
    """Inside shard_map: this device's assignments -> their expert outputs y_A [A, D].

    token_A: local token; expert_A: global expert; slot_A: global slot in the
    expert's C slots; rank_A: local rank among the sent rows of that expert
    (< S); send_A: whether the assignment is served. grouped: compute only the
    received rows, regrouped by local expert, with the layer's grouped experts
    (the CPU choice of MoeFfn's capacity_impl); else the padded [E_loc, C, D]
    buffer with _batched_experts.
    """
    E, n_ep = self.E, self.n_ep
    El = E // n_ep
    T_loc, D = x_TxD.shape
    row_A = jnp.where(send_A, expert_A * S + rank_A, E * S).astype(jnp.int32)
    x_send = _take_rows(x_TxD, _rows_inverse(row_A, E * S, token_A, T_loc))
    slot_send = _rows_inverse(row_A, E * S, slot_A, C)  # C = empty row
    x_recv = _a2a(x_send.reshape(n_ep, El * S, D), self.ex)
    slot_recv = _a2a(slot_send.reshape(n_ep, El * S), self.ex)  # [n_src, El*S]
    R = n_ep * El * S
    local_R = jnp.broadcast_to(jnp.arange(El, dtype=jnp.int32)[None, :, None],
                               (n_ep, El, S)).reshape(-1)
    slot_R = slot_recv.reshape(-1)
    iota_R = jnp.arange(R, dtype=jnp.int32)
    if grouped:
      # The rows of (source s, local expert l) are a prefix of their S rows (local
      # ranks 0, 1, ...): group them expert-major, then by source.
      cnt_SxL = jnp.sum((slot_R < C).reshape(n_ep, El, S), -1, dtype=jnp.int32)
      sizes_L = jnp.sum(cnt_SxL, 0)
      base_SxL = (jnp.cumsum(sizes_L) - sizes_L)[None, :] + jnp.cumsum(cnt_SxL, 0) - cnt_SxL
      dst_R = jnp.where(slot_R < C, (base_SxL[:, :, None] + jnp.arange(S)[None, None, :]).reshape(-1), R)
      slot_of_row = _rows_inverse(dst_R, R, local_R * C + slot_R, El * C)
      x_rows = _take_rows(x_recv.reshape(R, D), _rows_inverse(dst_R, R, iota_R, R))
      y_rows = self._finish(experts.grouped(x_rows, sizes_L, None, self.grouped_impl,
                                            slot_of_row=slot_of_row, capacity=C))
      y_recv = _take_rows(y_rows, dst_R)
    else:
      dst_R = jnp.where(slot_R < C, local_R * C + slot_R, El * C)
      row_of_slot = _rows_inverse(dst_R, El * C, iota_R, R)
      x_ExCxD = _take_rows(x_recv.reshape(R, D), row_of_slot).reshape(El, C, D)
      y_ExCxD = self._finish(experts.batched(x_ExCxD, None))
      y_recv = _take_rows(y_ExCxD.reshape(El * C, D), dst_R)
    y_back = _a2a(y_recv.reshape(n_ep, El * S, D), self.ex).reshape(E * S, D)
    return _take_rows(y_back, row_A)

  # ---------------------------------------------------------------- token choice, capacity

  def capacity_dispatch(self, x_TxD: Array, r: routing_lib.Routing, expert_fn=None, *,
                        num_experts: int, capacity: int, position_method: str | None = None,
                        grouped_fn=None):
    """grouped_fn given (MoeFfn's CPU choice for few experts): the destination
    computes only the rows it receives, with the layer's grouped experts; else
    the padded buffer."""
    del expert_fn
    grouped = grouped_fn is not None
    assert num_experts == self.E
    T, K = r.expert_TxK.shape
    E, C = self.E, capacity
    self._check_tokens(T)
    # Global priority positions: the single-device rule itself.
    _, pos_A, _, kept_A = dispatch_lib.capacity_slots(r, E, C, position_method)
    pos_TxK = jnp.where(kept_A, pos_A, C).reshape(K, T).T
    kept_TxK = kept_A.reshape(K, T).T
    T_loc = T // self.n_tok
    # Each token picks an expert at most once, so a device sends <= T_loc rows
    # to an expert, and <= C as they hold distinct global slots.
    S = min(C, T_loc)
    w, w_spec = self._weights()
    extra, extra_spec = self._slot_dropout(C, x_TxD.dtype)

    def body(x, expert, pos, kept, w, extra):
      Tl = x.shape[0]
      e_A, kept_A = expert.reshape(-1), kept.reshape(-1)
      rank_A, _ = dispatch_lib.positions_in_expert(e_A, kept_A, E, position_method)
      token_A = jnp.repeat(jnp.arange(Tl, dtype=jnp.int32), K)
      experts = _LocalExperts(self.layer, w, extra.get("mask"))
      y_A = self._exchange_capacity(experts, x, token_A, e_A, pos.reshape(-1), rank_A,
                                    kept_A, C, S, grouped)
      return y_A.reshape(Tl, K, -1)

    tok = P(self.tok)
    y_TxKxD = self._shard_map(body, (x_TxD, r.expert_TxK, pos_TxK, kept_TxK, w, extra),
                              (P(self.tok, None), tok, tok, tok, w_spec, extra_spec),
                              P(self.tok, None, None), check_vma=not grouped)
    gate_TxK = jnp.where(kept_TxK, r.gate_TxK, 0.0)
    y_TxD = jnp.einsum("tk,tkd->td", gate_TxK, y_TxKxD.astype(jnp.float32))
    return y_TxD, {"dropped_fraction": dispatch_lib.dropped_fraction(r.valid_TxK, kept_TxK),
                   "kept_TxK": kept_TxK}

  def _slot_dropout(self, C: int, dtype):
    """The single-device expert-dropout mask over [E, C, F] slots, split by expert."""
    mask = self.layer._dropout_mask((self.E, C, self.F), dtype, self.key)
    if mask is None:
      return {}, {}
    return {"mask": mask}, {"mask": P(self.ex, None, self.mlp or None)}

  # ---------------------------------------------------------------- expert choice

  def expert_choice_dispatch(self, x_TxD: Array, r: routing_lib.ExpertChoiceRouting,
                             expert_fn=None, *, mask_T: Array):
    del expert_fn
    T = x_TxD.shape[0]
    E, C = r.token_ExC.shape
    assert E == self.E
    self._check_tokens(T)
    T_loc = T // self.n_tok
    S = min(C, T_loc)
    w, w_spec = self._weights()
    extra, extra_spec = self._slot_dropout(C, x_TxD.dtype)
    tok_axes = self.tok

    def body(x, token_ExC, valid_ExC, gate_ExC, w, extra):
      Tl, D = x.shape
      first = jax.lax.axis_index(tok_axes if len(tok_axes) > 1 else tok_axes[0]) * Tl
      local_ExC = token_ExC - first
      mine_ExC = valid_ExC & (local_ExC >= 0) & (local_ExC < Tl)
      rank_ExC = jnp.cumsum(mine_ExC.astype(jnp.int32), axis=1) - 1
      expert_A = jnp.repeat(jnp.arange(E, dtype=jnp.int32), C)
      slot_A = jnp.tile(jnp.arange(C, dtype=jnp.int32), E)
      mine_A = mine_ExC.reshape(-1)
      token_A = jnp.where(mine_A, local_ExC.reshape(-1), Tl)
      experts = _LocalExperts(self.layer, w, extra.get("mask"))
      y_A = self._exchange_capacity(experts, x, token_A, expert_A, slot_A,
                                    rank_ExC.reshape(-1), mine_A, C, S)
      contrib = gate_ExC.reshape(-1, 1) * y_A.astype(jnp.float32)
      return jnp.zeros((Tl, D), jnp.float32).at[token_A].add(contrib, mode="drop")

    y_TxD = self._shard_map(body, (x_TxD, r.token_ExC, r.valid_ExC, r.gate_ExC, w, extra),
                            (P(self.tok, None), P(), P(), P(), w_spec, extra_spec),
                            P(self.tok, None))
    token_EC = jnp.where(r.valid_ExC, r.token_ExC, T).reshape(-1)
    chosen_T = jnp.zeros((T,), jnp.float32).at[token_EC].set(1.0, mode="drop")
    real = jnp.sum(mask_T)
    dropped = jnp.sum(mask_T * (1.0 - chosen_T)) / jnp.maximum(real, 1.0)
    return y_TxD, {"dropped_fraction": dropped.astype(jnp.float32), "chosen_T": chosen_T > 0}

  # ---------------------------------------------------------------- dropless

  def dropless_dispatch(self, x_TxD: Array, r: routing_lib.Routing, grouped_fn=None, *,
                        num_experts: int, position_method: str | None = None):
    del grouped_fn
    assert num_experts == self.E
    T, K = r.expert_TxK.shape
    E, n_ep = self.E, self.n_ep
    El = E // n_ep
    self._check_tokens(T)
    T_loc = T // self.n_tok
    A = T_loc * K  # send block per destination shard (worst case)
    R = n_ep * A  # rows received
    w, w_spec = self._weights()
    mask = self.layer._dropout_mask((T * K, self.F), x_TxD.dtype, self.key)
    extra, extra_spec = {}, {}
    if mask is not None:
      # Each assignment's row in the single-device sorted order picks its mask row.
      g_A, counts_E = dispatch_lib.positions_in_expert(
          r.expert_TxK.reshape(-1), r.valid_TxK.reshape(-1), E, position_method)
      starts_E = jnp.cumsum(counts_E) - counts_E
      g_TxK = (starts_E[r.expert_TxK.reshape(-1)] + g_A).reshape(T, K)
      extra = {"mask": mask, "grow": g_TxK}
      extra_spec = {"mask": P(None, self.mlp or None), "grow": P(self.tok)}

    def body(x, expert, valid, w, extra):
      Tl, D = x.shape
      e_A, v_A = expert.reshape(-1), valid.reshape(-1)
      pos_A, counts_E = dispatch_lib.positions_in_expert(e_A, v_A, E, position_method)
      starts_E = jnp.cumsum(counts_E) - counts_E
      block_E = starts_E[(jnp.arange(E) // El) * El]  # start of each shard's block
      row_A = jnp.where(v_A, (e_A // El) * A + starts_E[e_A] - block_E[e_A] + pos_A,
                        n_ep * A).astype(jnp.int32)
      token_A = jnp.repeat(jnp.arange(Tl, dtype=jnp.int32), K)
      x_send = _take_rows(x, _rows_inverse(row_A, n_ep * A, token_A, Tl))
      id_send = _rows_inverse(row_A, n_ep * A, e_A % El, El)  # El = empty row
      x_recv = _a2a(x_send.reshape(n_ep, A, D), self.ex).reshape(R, D)
      id_recv = _a2a(id_send.reshape(n_ep, A), self.ex)  # [n_src, A]
      counts_SxL = _a2a(counts_E.reshape(n_ep, El), self.ex)  # [n_src, El]
      sizes_L = jnp.sum(counts_SxL, 0)
      group_start_L = jnp.cumsum(sizes_L) - sizes_L
      offset_SxL = (group_start_L[None, :] + jnp.cumsum(counts_SxL, 0) - counts_SxL  # sources before
                    - (jnp.cumsum(counts_SxL, 1) - counts_SxL))  # start of l in the source block
      ok = id_recv < El
      l_SxA = jnp.minimum(id_recv, El - 1)
      dst_SxA = jnp.take_along_axis(offset_SxL, l_SxA, axis=1) + jnp.arange(A)[None, :]
      dst_R = jnp.where(ok, dst_SxA, R).reshape(-1).astype(jnp.int32)
      x_dst = _take_rows(x_recv, _rows_inverse(dst_R, R, jnp.arange(R, dtype=jnp.int32), R))
      mask_dst = None
      if "mask" in extra:
        g_send = _rows_inverse(row_A, n_ep * A, extra["grow"].reshape(-1), 0)
        g_recv = _a2a(g_send.reshape(n_ep, A), self.ex).reshape(-1)
        mask_dst = jnp.take(extra["mask"], _rows_inverse(dst_R, R, g_recv, 0), axis=0)
      experts = _LocalExperts(self.layer, w, mask_dst)
      y_dst = self._finish(experts.grouped(x_dst, sizes_L.astype(jnp.int32), None,
                                           self.grouped_impl))
      y_recv = _take_rows(y_dst, dst_R).reshape(n_ep, A, D)
      y_back = _a2a(y_recv, self.ex).reshape(n_ep * A, D)
      return _take_rows(y_back, row_A).reshape(Tl, K, D)

    tok = P(self.tok)
    y_TxKxD = self._shard_map(body, (x_TxD, r.expert_TxK, r.valid_TxK, w, extra),
                              (P(self.tok, None), tok, tok, w_spec, extra_spec),
                              P(self.tok, None, None), check_vma=False)
    y_TxD = jnp.einsum("tk,tkd->td", r.gate_TxK, y_TxKxD.astype(jnp.float32))
    return y_TxD, {"dropped_fraction": jnp.zeros((), jnp.float32), "kept_TxK": r.valid_TxK}

  def __getattr__(self, name: str) -> Any:  # capacity(), num_choices(), ...
    return getattr(dispatch_lib, name)
