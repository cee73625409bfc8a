"""Expert parallelism: experts sharded over the mesh's "expert" axes, tokens
exchanged with `jax.lax.all_to_all` inside `jax.shard_map`.

This module is a placement for dispatch.py's one program: `placement(E)` is
dispatch.Local() when the mesh axes that the logical name "expert" maps to
have size 1 (or there is no mesh), else an `ExpertParallel`, which runs the
same per-shard bodies inside one shard_map. Results do not depend on the mesh:

  * Routing stays global and outside shard_map, exactly as on one device
    (router logits, routing.route / expert_choice, the GShard priority
    positions over all K*T assignments of the global batch, the kept mask,
    the aux terms); GSPMD partitions these small tensors. So the decisions and
    the drops are the single-device ones: capacity C is per expert over the
    whole global batch.
  * Inside one shard_map over all mesh axes, each device holds T_loc tokens
    (the token axis split over the "batch" mesh axes, plus any "expert" axis
    that "batch" lacks) and U = E / P experts' weights (their logical
    names already say "expert" on dim 0; "embed" (FSDP) is gathered at the
    shard_map boundary; "expert_mlp" (tensor) stays split, with a psum after
    the second matmul).

Capacity (token choice and expert choice): the source packs its kept
assignments into a send buffer [P, U, W, D], W = min(C, T_loc), row =
(expert, local rank among this device's kept assignments of the expert), plus
each row's global slot (its global priority position p < C, or the expert-
choice slot c). all_to_all over the expert axes; the destination computes the
rows it received in one of the two capacity layouts (policy.py):
  "batched" (GPU / TPU, CPU above policy.CPU_GROUPED_CAPACITY_MAX_EXPERTS
      experts, and expert choice): a compact
      [U, C, D] buffer, rows placed at their global slots (unique within
      an expert-axis group), experts.batched on the weight shard; each
      device computes U x C rows. With a "data" (or "fsdp")
      axis > 1 the C slots of an expert are spread over the data rows: each
      data row fills only its own tokens' slots and still computes all C rows,
      so the expert FLOPs are n_data x those of one device holding the same
      experts (the price of global capacity with static shapes).
  "grouped" (CPU up to that many experts): the received rows regrouped by local
      expert, experts.grouped (grouped.py's block loops) with the slots for
      the dropout mask: the work follows the rows actually received, so no
      empty-slot work and no n_data x factor.
The outputs go back by the same indices and all_to_all; the source combines
with the gates. No one-hot [T, E, C] tensors: index gathers only (dispatch.py's
way). Costs: the send buffer is E * W * D per device (W = min(C, T_loc), since
a device's kept rows of one expert may be anything from 0 to that), so each
all_to_all moves E * W * D per device, not the ~cf * T_loc * K * D of a
local-capacity scheme.

Dropless: per destination shard a send block of A = T_loc * K rows
(worst case: every assignment goes to one shard) sorted by expert, plus the
per-local-expert counts [P, U] and each row's local expert id.
all_to_all; the destination regroups the P * A received rows by local
expert (expert-major, then source, then the source's order), runs
experts.grouped on its weight shard with group sizes = the received
counts, returns the rows. grouped.ffn_blocks (the CPU path) loops over each
expert's actual rows in blocks, so its cost follows the actual group sizes
(plus < U small blocks of padding), not the static P * A rows;
jax.lax.ragged_dot (GPU / TPU path) is given the same group sizes. The send /
receive buffers are P x the rows a device actually sends (static shapes):
a ragged all-to-all (jax.lax.ragged_all_to_all) would cut the bytes moved on
GPU / TPU; memory stays P * A rows.

Expert dropout is exact too: the single-device mask is drawn globally (the
same call, [E, C, F] for capacity, sharded over the expert axes; [T*K, F] rows
in the single-device dropless row order for dropless, replicated, which costs
T*K*F per device while expert_dropout > 0) and each expert row takes its own.

Hierarchical MoE: E is split over the expert axes in contiguous blocks, so
when the split follows group boundaries (sharding.mesh_sizes checks that P
divides num_groups or num_groups divides P) the primary gate picks the
device(s) holding a group and the secondary gate picks experts on them.
"""

from __future__ import annotations

import math

from flax import nnx
from flax.core import spmd as flax_spmd
import jax
from jax.sharding import PartitionSpec as P

from sparse_lm import sharding
from sparse_lm.errors import ConfigError
from sparse_lm.models.moe import dispatch as dispatch_lib
from sparse_lm.models.moe import experts as experts_lib


def _size(axes) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes)


def _live_axes(name: str) -> tuple[str, ...]:
  """Mesh axes of size > 1 that the active rules map a logical name to."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = sharding.axes_of(flax_spmd.get_logical_axis_rules(), name)
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def placement(num_experts: int, hidden: int) -> dispatch_lib.Local | ExpertParallel:
  """Where dispatch.py's program runs: dispatch.Local(), or ExpertParallel."""
  if _size(_live_axes("expert")) > 1:
    return ExpertParallel(num_experts, hidden)
  return dispatch_lib.Local()


class ExpertParallel:
  """Runs dispatch.py's per-shard bodies in one shard_map over all mesh axes
  (see the module doc): tokens split over the token axes, experts over the
  expert axes, the expert hidden dim over the tensor axes where it can be."""

  def __init__(self, num_experts: int, hidden: int):
    self.mesh = jax.sharding.get_abstract_mesh()
    self.ex = _live_axes("expert")
    self.n = _size(self.ex)
    batch = _live_axes("batch")
    self.tok = batch + tuple(a for a in self.ex if a not in batch)
    self.n_tokens = _size(self.tok)
    mlp = _live_axes("expert_mlp")
    if set(mlp) & set(self.tok + self.ex) or hidden % _size(mlp):
      mlp = ()  # gathered at the shard_map boundary instead
    self.mlp = mlp
    if num_experts % self.n:
      raise ConfigError(
        f"config.model.moe.num_experts={num_experts} is invalid: must be divisible by the "
        f"expert mesh axes {self.ex} (size {self.n})"
      )

  def shard(self) -> dispatch_lib.Shard:
    ex, mlp, tok = self.ex, self.mlp, self.tok
    one = lambda axes: axes if len(axes) > 1 else axes[0]
    return dispatch_lib.Shard(
      n=self.n,
      a2a=lambda x: jax.lax.all_to_all(x, one(ex), 0, 0, tiled=True),
      hidden_sum=(lambda y: jax.lax.psum(y, mlp)) if mlp else (lambda y: y),
      first_token=lambda t_loc: jax.lax.axis_index(one(tok)) * t_loc,
    )

  def run(self, body, x, arrays, w, mask, *, replicated=False, row_mask=False, check_vma=True):
    """body(shard, x, *arrays, w, mask) inside shard_map -> rows split like x's.

    x's rows and `arrays` are split over the token axes (`arrays` whole on
    every device when `replicated`), the weights w over the expert axes, the
    dropout mask as the [E, C, F] slot mask (or, row_mask, replicated [T*K, F]
    rows); the hidden dim F over the tensor axes where it can be.
    check_vma=False around grouped.py's kernels: their loops start from
    invariant zero carries, which the varying-axes check rejects; without it,
    shard_map's transpose still psums the cotangents of inputs replicated over
    an axis (the weights over "data") and divides those of replicated outputs."""
    T = x.shape[0]
    if T % self.n_tokens:
      raise ConfigError(
        f"config.data.batch_size is invalid: the MoE layer's {T} tokens (batch x length) "
        f"must be divisible by the token mesh axes {self.tok} (size {self.n_tokens}) for "
        "expert parallelism"
      )
    ex, mlp, rows = self.ex, self.mlp or None, P(self.tok, None)
    w_specs = experts_lib.Weights(
      P(ex, None, mlp), None if w.wg is None else P(ex, None, mlp), P(ex, mlp, None)
    )
    if w.bi is not None:  # model.moe.expert_bias
      bg = None if w.bg is None else P(ex, mlp)
      w_specs = w_specs._replace(bi=P(ex, mlp), bg=bg, bo=P(ex, None))
    mask_spec = P(None, mlp) if row_mask else P(ex, None, mlp)
    array_specs = (P() if replicated else P(self.tok),) * len(arrays)

    def wrapped(*a):
      with nnx.logical_axis_rules(()):  # no GSPMD constraints inside shard_map
        return body(self.shard(), *a)

    return jax.shard_map(
      wrapped,
      mesh=self.mesh,
      in_specs=(rows, *array_specs, w_specs, mask_spec),
      out_specs=rows,
      check_vma=check_vma,
    )(x, *arrays, w, mask)
