"""Mesh from the config, logical axis rules, and `constrain(x, *names)`.

Mesh axis names appear only in the config (`config.mesh`, `config.sharding_rules`)
and in this module; models speak logical names ("batch", "embed", "expert", ...).
"""

from __future__ import annotations

import contextlib

from flax import nnx
from flax.core import spmd as flax_spmd
import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_lm import config as cfglib


def rules(c) -> tuple:
  """The config's logical axis rules as the tuple Flax expects."""
  return tuple(
    (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in c.sharding_rules
  )


def make_mesh(c, devices=None) -> jax.sharding.Mesh:
  """Builds the mesh of config.mesh over all devices (of every process)."""
  devices = jax.devices() if devices is None else devices
  sizes = cfglib.validate_mesh_for_devices(c, len(devices))
  names = tuple(sizes)
  return jax.make_mesh(
    tuple(sizes.values()), names, devices=devices, axis_types=(AxisType.Auto,) * len(names)
  )


@contextlib.contextmanager
def use(mesh, c):
  """Sets the mesh and logical rules: modules built inside are born sharded."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules(c)):
    yield


def axes_of(rules, name: str) -> tuple[str, ...]:
  """The mesh axes logical `name` maps to under `rules` ((name, axes) pairs,
  first match; () when unmapped or mapped to None). The one lookup."""
  for logical, axes in rules:
    if logical == name:
      axes = axes if isinstance(axes, (tuple, list)) else (axes,)
      return tuple(a for a in axes if a)
  return ()


def logical_spec(*names) -> P:
  """Resolves logical axis names with the active rules into a PartitionSpec."""
  return P(*flax_spmd.from_sharding_rules(names, flax_spmd.get_logical_axis_rules()))


def constrain(x, *names):
  """with_logical_constraint for NNX activations; a no-op with no mesh set.
  Names the active rules lack stay unsharded."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = flax_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  known = {name for name, _ in rules}
  return jax.lax.with_sharding_constraint(
    x, logical_spec(*(n if n in known else None for n in names))
  )


def named(mesh, *names) -> NamedSharding:
  """NamedSharding on `mesh` for logical names (under the active rules)."""
  return NamedSharding(mesh, logical_spec(*names))
