"""Parameter paths in one spelling, and what the rest of the code asks of them.

A parameter's path is its names joined by "/": "blocks/1/ffn/wi",
"embed/embedding" (nnx's state path of the Transformer, without the
Variable's "value"). Name rules (train.init_rules, train.frozen), inspect's
counts, the optimizer's frozen filter, checkpoints read by name and the
Hugging Face conversion tables all use this spelling, built here.

A train state is `nnx.state((model, optimizer))`: its part 0 is the model's
variables, part 1 the optimizer's. `model_leaves`, `params_of` and
`logical_names` read part 0; `replace` writes leaves back by path.

Two layouts, one spelling (model.scan_layers). Unscanned, layer i's
parameters are "blocks/{i}/...". Scanned, the layers of the scanned
super-blocks are stored stacked, as MaxText does: "scan/{j}/..." is one array
[repeats, ...] per parameter of super-block position j, whose row r is layer
start + r * period + j (models/transformer.py, scan_plan); first_dense_layers
and a remainder stay "blocks/{i}/...". The optimizer's state mirrors the
parameters, so it is stacked too, one update per kind of array. The mapping
between the two is here and nowhere else: `layout_of` reads a state's layout
from its names and shapes (so a checkpoint on disk says its own), `per_layer`
turns stacked leaves into the per-layer names "blocks/{i}/..." (any leaf: an
array, a ShapeDtypeStruct, a sharding, an nnx Variable, a (shape, ...)
tuple), and `stacked` builds the stacked leaves back. Everything that names
parameters speaks per-layer names through them: checkpoints across layouts,
train.init_from and its rules, train.frozen, inspect's counts and
sparse_lm/convert/.
"""

from __future__ import annotations

import itertools
from typing import Any
from typing import Callable
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

EXPERT_AXIS = "expert"  # the logical axis of routed experts' stacked weights
SCAN = "scan"  # Transformer.scan: the stacked super-block positions (model.scan_layers)
# The stacked arrays' leading (layer) axis has no logical name: never sharded.
LAYER_AXIS = None


def path_str(path) -> str:
  """ "blocks/1/ffn/wi" from an nnx state path or a jax key path (DictKey,
  SequenceKey and GetAttrKey entries, or plain keys); attribute keys (a
  Variable's "value") are dropped."""
  keys = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey):
      continue
    keys.append(str(getattr(k, "key", getattr(k, "idx", k))))
  return "/".join(keys)


def names_of(variable) -> tuple:
  """The logical axis names a Variable was created with (nnx's out_sharding)."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  return tuple(meta.get("out_sharding") or ())


def is_routed(path: str, names: tuple) -> bool:
  """Whether a parameter holds routed experts' weights (its first logical axis
  is the expert axis): each token uses k of them. Shared experts (MoeFfn's
  shared_* parameters) are always active and never routed."""
  return bool(names) and names[0] == EXPERT_AXIS and "shared" not in path.rsplit("/", 1)[-1]


def param_list(model) -> list[tuple[str, tuple, tuple]]:
  """(path, shape, logical names) of every nnx.Param of a model (real or
  abstract), by per-layer names and shapes whatever its layout."""
  flat = {
    path_str(path): (tuple(p.get_value().shape), names_of(p))
    for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  layout = layout_of({p: shape for p, (shape, _) in flat.items()})
  flat = per_layer(flat, layout, lambda v, r: (v[0][1:], v[1][1:]))
  return [(p, shape, names) for p, (shape, names) in flat.items()]


def model_leaves(state) -> dict[str, tuple]:
  """{path: (jax key path, leaf)} of the model variables (part 0) of a train
  state, as jax.tree_util flattens it (leaves are arrays or ShapeDtypeStructs)."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    head = getattr(kp[0], "key", None) if kp else None
    if head == 0:
      out[path_str(kp[1:])] = (kp, leaf)
  return out


_FROM_STATE: Any = object()  # params_of's default: the state's own layout


def params_of(state, layout: Layout | None = _FROM_STATE) -> dict[str, Any]:
  """{per-layer path: nnx.Param} of the model part of a train state (of
  arrays or ShapeDtypeStructs; of shardings, give the state's `layout`): a
  stacked Param's rows are per-layer Params (`row`; for real arrays, copies)."""
  flat = nnx.to_flat_state(state)
  out = {path_str(p[1:]): v for p, v in flat if p[0] == 0 and isinstance(v, nnx.Param)}
  return per_layer(out, state_layout(state) if layout is _FROM_STATE else layout)


def logical_names(state) -> dict[str, tuple]:
  """{path: logical axis names} of the model variables of a train state."""
  return {path_str(p[1:]): names_of(v) for p, v in nnx.to_flat_state(state) if p[0] == 0}


def replace(state, values: dict[str, Any]):
  """`state` with the model leaves named in `values` ({path: array}) replaced.
  Per-layer names of stacked layers ("blocks/{i}/...") replace their rows of
  the stacked leaf (placed as it is; the rows not named keep their values)."""
  leaves = model_leaves(state)
  layout = layout_of({p: x.shape for p, (_, x) in leaves.items()})
  by_kp, rows = {}, {}
  for path, v in values.items():
    hit = None if path in leaves else stacked_name(path, layout)
    if path not in leaves and (hit is None or hit[0] not in leaves):
      raise KeyError(f"no model variable {path!r} in the state")
    if hit is None:
      by_kp[leaves[path][0]] = v
    else:
      rows.setdefault(hit[0], {})[hit[1]] = v
  for path, given in rows.items():
    kp, old = leaves[path]
    fill = lambda old, given: jnp.stack([given.get(r, old[r]) for r in range(len(old))])
    if isinstance(old, jax.core.Tracer):
      by_kp[kp] = fill(old, given)
    else:
      by_kp[kp] = jax.jit(fill, out_shardings=old.sharding)(old, given)
  return jax.tree_util.tree_map_with_path(lambda kp, x: by_kp.get(kp, x), state)


# ------------------------------------------------------- stacked <-> per layer


class Layout(NamedTuple):
  """model.scan_layers' storage: row r of "scan/{j}/..." is layer
  start + r * period + j (models/transformer.scan_plan's numbers)."""

  start: int
  period: int
  repeats: int

  def layer(self, j: int, r: int) -> int:
    return self.start + r * self.period + j

  def row(self, layer: int) -> tuple[int, int] | None:
    """(position j, row r) of a scanned layer, None for a layer kept per layer."""
    k = layer - self.start
    return (k % self.period, k // self.period) if 0 <= k < self.period * self.repeats else None


def _at(keys: list[str], name: str) -> int | None:
  """The index of `name` followed by an integer key in a path's keys."""
  return next((n for n in range(len(keys) - 1) if keys[n] == name and keys[n + 1].isdigit()), None)


def _keys(path) -> list[str]:
  return (path if isinstance(path, str) else path_str(path)).split("/")


def is_stacked(path) -> bool:
  """Whether a path (a string, or an nnx / jax key path) names a stacked
  leaf ("scan/{j}/...", its first axis the layers), in the model's state or
  the optimizer's."""
  return _at(_keys(path), SCAN) is not None


def layout_of(shapes: dict[str, tuple]) -> Layout | None:
  """The layout of a state (or a checkpoint) from its {path: shape}: None
  when every layer is stored per layer. The stacked layers are the ones
  missing from "blocks/{i}": from the first of them (first_dense_layers come
  before), `period` positions of `repeats` rows."""
  positions, layers, repeats = set(), set(), 0
  for path, shape in shapes.items():
    keys = path.split("/")
    n = _at(keys, SCAN)
    if n is not None:
      positions.add(int(keys[n + 1]))
      repeats = repeats or tuple(shape)[0]  # the first (a parameter's, in a train state)
    n = _at(keys, "blocks")
    if n is not None:
      layers.add(int(keys[n + 1]))
  if not positions:
    return None
  start = next(i for i in itertools.count() if i not in layers)
  return Layout(start, max(positions) + 1, repeats)


def layer_path(path: str, layout: Layout, r: int) -> str:
  """The per-layer name of row r of stacked `path` ("scan/1/ffn/wi", r ->
  "blocks/{layout.layer(1, r)}/ffn/wi"; a prefix, "1/opt_state/...", kept)."""
  keys = path.split("/")
  n = _at(keys, SCAN)
  return "/".join([*keys[:n], "blocks", str(layout.layer(int(keys[n + 1]), r)), *keys[n + 2 :]])


def stacked_name(path: str, layout: Layout | None) -> tuple[str, int] | None:
  """(stacked path, row) that holds per-layer `path` under `layout`, or None."""
  keys = path.split("/")
  n = _at(keys, "blocks")
  hit = None if layout is None or n is None else layout.row(int(keys[n + 1]))
  if hit is None:
    return None
  j, r = hit
  return "/".join([*keys[:n], SCAN, str(j), *keys[n + 2 :]]), r


def _sort_key(path: str):
  """nnx's order of state keys: integers by value, names alphabetically."""
  return tuple((0, int(k), "") if k.isdigit() else (1, 0, k) for k in path.split("/"))


def row(leaf, r: int):
  """Row r of a stacked leaf: an array's row; a ShapeDtypeStruct or a
  NamedSharding without the layer axis; an nnx Variable's (its logical names
  too); a tuple's first element's (a shape or logical names) with the rest kept."""
  if isinstance(leaf, nnx.Variable):
    names = leaf.get_metadata().get("out_sharding")
    meta = {"out_sharding": tuple(names)[1:]} if names else {}
    return leaf.replace(row(leaf.get_value(), r), **meta, layers=None)
  if isinstance(leaf, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec(*leaf.spec[1:]))
  if isinstance(leaf, jax.sharding.Sharding):
    return leaf  # one device: the same for a row
  if isinstance(leaf, jax.ShapeDtypeStruct):
    shd = leaf.sharding
    shd = row(shd, r) if isinstance(shd, jax.sharding.NamedSharding) else shd
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=shd)
  if isinstance(leaf, tuple):
    return (tuple(leaf[0])[1:], *leaf[1:])
  return leaf[r]


def per_layer(flat: dict[str, Any], layout: Layout | None, row_of: Callable = row) -> dict:
  """{path: leaf} with every stacked leaf split into its layers' per-layer
  names ("scan/0/attn/wq" row r -> "blocks/{layout.layer(0, r)}/attn/wq"),
  ordered as the unscanned state's. Leaves are cut by `row_of(leaf, r)`."""
  if layout is None:
    return dict(flat)
  out = {}
  for path, leaf in flat.items():
    if is_stacked(path):
      for r in range(layout.repeats):
        out[layer_path(path, layout, r)] = row_of(leaf, r)
    else:
      out[path] = leaf
  return {p: out[p] for p in sorted(out, key=_sort_key)}


def stacked(flat: dict[str, Any], like: dict[str, Any], stack: Callable) -> dict:
  """{path: leaf} in the layout of `like` ({path: leaf}, stacked or not) from
  per-layer leaves `flat`: each stacked path of `like` is `stack(rows, its
  leaf in like)` of its layers' leaves, in row order."""
  layout = layout_of({p: _shape(x) for p, x in like.items()})
  out = {}
  for path, leaf in like.items():
    if is_stacked(path):
      out[path] = stack([flat[layer_path(path, layout, r)] for r in range(layout.repeats)], leaf)
    else:
      out[path] = flat[path]
  return out


def _shape(leaf) -> tuple:
  if isinstance(leaf, nnx.Variable):
    leaf = leaf.get_value()
  return tuple(leaf[0]) if isinstance(leaf, tuple) else tuple(leaf.shape)


def state_layout(state) -> Layout | None:
  """The layout of a train state's model part (or of a model's state)."""
  flat = model_leaves(state) or {
    path_str(kp): (kp, x) for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]
  }
  return layout_of({p: x.shape for p, (_, x) in flat.items()})


def layer_rows(path: str, variable) -> list[tuple[str, tuple]]:
  """(per-layer path, logical names) of each layer a model Variable holds:
  itself, or the layers of a stacked one (its "layers" metadata, set where
  the Transformer stacks them), for rules evaluated one Variable at a time
  (train.frozen's filter)."""
  layers = variable.get_metadata().get("layers") if hasattr(variable, "get_metadata") else None
  if not layers or not is_stacked(path):
    return [(path, names_of(variable))]
  keys, names = path.split("/"), names_of(variable)[1:]
  n = _at(keys, SCAN)
  return [("/".join([*keys[:n], "blocks", str(i), *keys[n + 2 :]]), names) for i in layers]
