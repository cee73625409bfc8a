"""Mesh from the config, logical axis rules, and `constrain(x, *names)`.

Mesh axis names appear only in the config (`config.mesh`, `config.sharding_rules`)
and in this module; models speak logical names ("batch", "embed", "expert", ...).
config.py checks the mesh's form; `mesh_sizes` checks it against a device
count (divisibility of the batch, the experts and the tokens).
"""

from __future__ import annotations

import contextlib
import math

from flax import nnx
from flax.core import spmd as flax_spmd
import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_lm import config as cfglib
from sparse_lm.errors import ConfigError


def rules(c) -> tuple:
  """The config's logical axis rules as the tuple Flax expects."""
  return tuple(
    (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in c.sharding_rules
  )


def make_mesh(c, devices=None) -> jax.sharding.Mesh:
  """Builds the mesh of config.mesh over all devices (of every process)."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_sizes(c, len(devices))
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


def _fail(key, value, why):
  raise ConfigError(f"config.{key}={value!r} is invalid: {why}")


def mesh_sizes(c, num_devices: int) -> dict[str, int]:
  """config.mesh's axis sizes on `num_devices` (-1 resolved), checked: the
  batch, the experts and (under expert parallelism) the tokens divide over
  the axes their rules map to. A ConfigError names the key."""
  sizes = dict(c.mesh)
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if any(s == -1 for s in sizes.values()):
    if num_devices % fixed:
      _fail("mesh", c.mesh, f"fixed axes ({fixed}) must divide the device count {num_devices}")
    sizes = {a: (num_devices // fixed if s == -1 else s) for a, s in sizes.items()}
  if math.prod(sizes.values()) != num_devices:
    _fail(
      "mesh",
      c.mesh,
      f"axis sizes multiply to {math.prod(sizes.values())}, not the device count {num_devices}",
    )
  for name, _ in c.sharding_rules:
    absent = [a for a in axes_of(c.sharding_rules, name) if a not in sizes]
    if absent:
      why = f"has no axis {absent[0]!r}, which sharding_rules maps {name!r} to (give it size 1)"
      _fail("mesh", c.mesh, why)
  size_of = lambda axes: math.prod(sizes.get(a, 1) for a in axes)
  batch_axes, expert_axes = axes_of(c.sharding_rules, "batch"), axes_of(c.sharding_rules, "expert")
  moe, n_ep = c.model.moe, size_of(expert_axes)
  if moe.num_experts > 1 and moe.num_experts % n_ep:
    why = f"must be divisible by the expert mesh axis ({n_ep})"
    _fail("model.moe.num_experts", moe.num_experts, why)
  if c.data.batch_size % size_of(batch_axes):
    _fail(
      "data.batch_size",
      c.data.batch_size,
      f"must be divisible by the batch mesh axes {batch_axes} (size {size_of(batch_axes)})",
    )
  if moe.num_experts <= 1 or n_ep == 1:
    return sizes
  # Expert parallelism (sparse_lm/models/moe/parallel.py).
  tok_axes = batch_axes + tuple(a for a in expert_axes if a not in batch_axes)
  n = c.train.get("microbatches", 1) if "train" in c else 1
  # What one forward routes: an encoder-decoder's encoder and decoder rows separately.
  lengths = {"data.seq_len": c.data.seq_len}
  if c.model.get("arch") == "encoder_decoder":
    from sparse_lm.data import seq2seq  # pylint: disable=g-import-not-at-top

    lengths["the decoder length"] = seq2seq.lengths(c.data)[1]
  for what, length in lengths.items():
    tokens = c.data.batch_size // n * length
    if n > 1 and tokens % size_of(tok_axes):
      why = (
        f"makes micro-batches of {tokens} tokens ({what}={length}), not divisible by the "
        f"token mesh axes {tok_axes} (size {size_of(tok_axes)}) for expert parallelism"
      )
      _fail("train.microbatches", n, why)
    if tokens % size_of(tok_axes):
      _fail(
        "data.batch_size",
        c.data.batch_size,
        f"times {what}={length} ({tokens} tokens) must be divisible by "
        f"the token mesh axes {tok_axes} (size {size_of(tok_axes)}) for expert parallelism",
      )
  G = moe.num_groups
  if cfglib.model_spec(c).moe.router_facts.group_placement and n_ep % G and G % n_ep:
    _fail(
      "model.moe.num_groups",
      G,
      f"must divide or be a multiple of the expert mesh axes' size {n_ep}, so that "
      "the expert split follows group boundaries",
    )
  return sizes
