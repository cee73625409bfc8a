"""Mesh from the config, logical axis rules, and `constrain(x, *names)`.

Mesh axis names appear only in the config (`config.mesh`, `config.sharding_rules`)
and in this module; models speak logical names ("batch", "embed", "expert", ...).
"""

from __future__ import annotations

import contextlib

from flax import nnx
from flax.core import spmd as flax_spmd
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sparse_lm import config as cfglib


def rules(c) -> tuple:
  """The config's logical axis rules as the tuple Flax expects."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in c.sharding_rules)


def make_mesh(c, devices=None) -> jax.sharding.Mesh:
  """Builds the mesh of config.mesh over all devices (of every process)."""
  devices = jax.devices() if devices is None else devices
  sizes = cfglib.validate_mesh_for_devices(c, len(devices))
  names = tuple(sizes)
  return jax.make_mesh(tuple(sizes.values()), names, devices=devices,
                       axis_types=(AxisType.Auto,) * len(names))


@contextlib.contextmanager
def use(mesh, c):
  """Sets the mesh and logical rules: modules built inside are born sharded."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules(c)):
    yield


def logical_spec(*names) -> P:
  """Resolves logical axis names with the active rules into a PartitionSpec."""
  return P(*flax_spmd.from_sharding_rules(names, flax_spmd.get_logical_axis_rules()))


def constrain(x, *names):
  """with_logical_constraint for NNX activations; a no-op with no mesh set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not flax_spmd.get_logical_axis_rules():
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(*names))


def named(mesh, *names) -> NamedSharding:
  """NamedSharding on `mesh` for logical names (under the active rules)."""
  return NamedSharding(mesh, logical_spec(*names))


def mesh_axis_size(logical_name: str) -> int:
  """Product of mesh axis sizes a logical name maps to (1 with no mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  spec = logical_spec(logical_name)[0]
  if spec is None:
    return 1
  axes = spec if isinstance(spec, tuple) else (spec,)
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return n
