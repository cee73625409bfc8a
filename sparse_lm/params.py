"""Parameter paths in one spelling, and what the rest of the code asks of them.

A parameter's path is its names joined by "/": "blocks/1/ffn/wi",
"embed/embedding" (nnx's state path of the Transformer, without the
Variable's "value"). Name rules (train.init_rules, train.frozen), inspect's
counts, the optimizer's frozen filter, checkpoints read by name and the
Hugging Face conversion tables all use this spelling, built here.

A train state is `nnx.state((model, optimizer))`: its part 0 is the model's
variables, part 1 the optimizer's. `model_leaves`, `params_of` and
`logical_names` read part 0; `replace` writes leaves back by path.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax

EXPERT_AXIS = "expert"  # the logical axis of routed experts' stacked weights


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
  """(path, shape, logical names) of every nnx.Param of a model (real or abstract)."""
  return [
    (path_str(path), tuple(p.get_value().shape), names_of(p))
    for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))
  ]


def model_leaves(state) -> dict[str, tuple]:
  """{path: (jax key path, leaf)} of the model variables (part 0) of a train
  state, as jax.tree_util flattens it (leaves are arrays or ShapeDtypeStructs)."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    head = getattr(kp[0], "key", None) if kp else None
    if head == 0:
      out[path_str(kp[1:])] = (kp, leaf)
  return out


def params_of(state) -> dict[str, Any]:
  """{path: nnx.Param} of the model part of a train state."""
  flat = nnx.to_flat_state(state)
  return {path_str(p[1:]): v for p, v in flat if p[0] == 0 and isinstance(v, nnx.Param)}


def logical_names(state) -> dict[str, tuple]:
  """{path: logical axis names} of the model variables of a train state."""
  return {path_str(p[1:]): names_of(v) for p, v in nnx.to_flat_state(state) if p[0] == 0}


def replace(state, values: dict[str, Any]):
  """`state` with the model leaves named in `values` ({path: array}) replaced."""
  by_kp = {kp: values[p] for p, (kp, _) in model_leaves(state).items() if p in values}
  missing = set(values) - {p for p in model_leaves(state)}
  if missing:
    raise KeyError(f"no model variable {sorted(missing)[0]!r} in the state")
  return jax.tree_util.tree_map_with_path(lambda kp, x: by_kp.get(kp, x), state)
