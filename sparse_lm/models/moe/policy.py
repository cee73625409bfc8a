"""Implementation choices of the MoE layer, per backend, in one place.

`model.moe.impl` says how to compute, never what: every choice gives the same
numbers (tests/moe_layer_test.py checks each against the naive reference).
Each of its three keys is "auto" (the default: picked per backend, below) or
a value, e.g. --config.model.moe.impl.positions=sort.

  capacity_layout  "batched": the padded [E, C, D] capacity buffer and one
                   einsum per matmul; "grouped": only the kept rows, sorted by
                   expert, with the grouped kernel (no work on empty slots).
  grouped_kernel   "ragged": jax.lax.ragged_dot; "blocks": grouped.py's loops.
  positions        "cumsum": a [T*K, E] int32 cumsum; "sort": a stable sort.

Off CPU the defaults are what a GPU / TPU user expects: batched capacity,
ragged_dot, sort. The CPU numbers below were measured on a 2-core XLA:CPU VM
(benchmarks/README.md has the tables); they choose nothing anywhere else.
"""

from __future__ import annotations

from typing import Any

import jax

from sparse_lm.models.spec import Impl

PARTS = {
  "capacity_layout": ("batched", "grouped"),
  "grouped_kernel": ("ragged", "blocks"),
  "positions": ("cumsum", "sort"),
}

# CPU, capacity dispatch: the kept rows with the block loops up to this many
# experts, the padded einsum above (fwd+bwd / dense FFN, 8192 tokens, grouped
# vs batched: E=16 1.46 vs 1.43, E=32 1.74 vs 1.61, E=64 2.37 vs 1.89).
#   python benchmarks/moe_layer.py --experts 16 32 64 --top_k 1 --dispatch capacity \
#       --capacity_layout grouped batched
CPU_GROUPED_CAPACITY_MAX_EXPERTS = 16
# CPU, positions in expert: the cumsum below this many experts (16k
# assignments: E=8 cumsum 0.6 ms vs sort 2.3 ms; E=64 3.5 vs 2.7; E=256 27 vs 3.0).
CPU_CUMSUM_MAX_EXPERTS = 32
# CPU, dropless: ragged_dot costs about E times the work of its rows there
# (E=8 1527 ms vs 234 ms for the block loops; E=64 15377 vs 378 ms):
#   python benchmarks/moe_layer.py --experts 8 64 --top_k 1 --dispatch dropless \
#       --grouped_kernel ragged blocks --repeats 3


# Decoding (model.moe.decode_dispatch="auto"): a decode step gathers its
# experts' weights up to this many assignments (rows x k), and takes the
# dropless grouped path above. CPU, inference.py's defaults (E=8 top-1,
# d_model 256, expert hidden 1024, 4 layers), decode tokens/s by batch:
#   gather    361 385 384 358 244 259   (b1 b2 b4 b8 b16 b32)
#   dropless  176 182 231 259 245 317
#   python benchmarks/inference.py --decode_dispatch auto gather dropless
# (dropless measured with an intermediate cond-per-expert forward, since replaced)
# (benchmarks/README.md, "Decoding"). Off CPU nothing is measured yet: the
# same limit, until a GPU run says otherwise.
GATHER_MAX_ASSIGNMENTS = {"cpu": 8}
DEFAULT_GATHER_MAX_ASSIGNMENTS = 8


def decode_dispatch(moe: Any, assignments: int, backend: str | None = None) -> str:
  """The dispatch of a forward with model.moe.dispatch in {"auto", "gather"}
  and `assignments` = tokens x k (static): "gather" or "dropless"."""
  if moe.dispatch == "gather":
    return "gather"
  backend = backend or jax.default_backend()
  limit = GATHER_MAX_ASSIGNMENTS.get(backend, DEFAULT_GATHER_MAX_ASSIGNMENTS)
  return "gather" if assignments <= limit else "dropless"


def resolve(moe: Any, backend: str | None = None) -> Impl:
  """The implementation for model.moe (a MoeSpec) on `backend` (default: JAX's):
  "auto" parts resolved, the others as set. The only place that decides."""
  cpu = (backend or jax.default_backend()) == "cpu"
  E = moe.num_experts
  auto = Impl(
    capacity_layout="grouped" if cpu and E <= CPU_GROUPED_CAPACITY_MAX_EXPERTS else "batched",
    grouped_kernel="blocks" if cpu else "ragged",
    positions="cumsum" if cpu and E <= CPU_CUMSUM_MAX_EXPERTS else "sort",
  )
  return auto._replace(**{k: v for k, v in moe.impl._asdict().items() if v != "auto"})
