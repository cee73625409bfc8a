r"""Parameters, FLOPs and memory of any config, without allocating the model.

  python -m sparse_lm.inspect --config=configs/mixtral.py:8x7b
  python -m sparse_lm.inspect --config=configs/switch.py:base --compare=configs/dense.py:base
  python -m sparse_lm.inspect --config=configs/glam.py:64b_64e --devices=1024

Counts come from `nnx.eval_shape` of the real model, so they follow the code
and nothing is allocated: a 1T-parameter config takes seconds on a laptop.

- Routed expert weights are the Params whose first logical axis is "expert"
  (shared experts are not routed: always active). A token uses
  `experts_per_token` of the E routed experts, so active = total - routed
  + routed * experts_per_token / E.
- FLOPs per token: forward = 2 x (active matmul parameters, with the D x V
  logits matmul whether or not embeddings are tied, and no embedding lookups)
  + 4 x layers x seq_len x attention width (QK^T and AV over the full context,
  as in Chinchilla's and PaLM's counts); training = 3 x forward. Expert slots
  left empty by a capacity factor > 1 are not counted (model FLOPs).
- Memory: parameters are float32 whatever model.dtype is; the optimizer state
  is optax's own, shaped by `jax.eval_shape` (AdamW: 2 x params; Adafactor:
  factored). Per device: each array divided over the mesh axes its logical
  names map to under config.sharding_rules, for `--devices` devices.
  Activations are not included.
- Import (sparse_lm/convert/, a Hugging Face checkpoint of this shape in
  bfloat16): the host's peak besides the memory-mapped files' page cache
  (import_host_bytes).
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp

from sparse_lm import config as cfglib
from sparse_lm import finetune
from sparse_lm import optimizer as optlib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.errors import ConfigError
from sparse_lm.models.moe import routing
from sparse_lm.params import is_routed
from sparse_lm.params import param_list

LOOKUP_TABLES = ("embedding", "pos_embed")  # gathered, not multiplied


def _define_flags():
  """Only when run as a program: the trainer imports this module and owns --config."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  config_flags.DEFINE_config_file(
    "compare", None, "A second config, shown side by side.", lock_config=True
  )
  flags.DEFINE_integer(
    "devices",
    0,
    "Device count for the per-device rows; config.mesh's -1 axis takes "
    "what is left. 0 = the fewest the mesh allows (-1 resolved to 1).",
  )


def experts_per_token(m) -> float:
  """How many routed experts a token uses, on average."""
  router = routing.ROUTERS[m.moe.router]
  if router.by_expert:  # each expert takes cf * T * k / E tokens
    return m.moe.capacity_factor * router.assignments_per_token(m.moe)
  return router.assignments_per_token(m.moe)


def optimizer_bytes(t, params) -> dict[str, int]:
  """Bytes of optimizer state per parameter path, from the init of the
  optimizer the trainer builds (optimizer.make_optimizer); parameters that
  train.frozen freezes have none."""
  opt = optlib.make_optimizer(t)
  frozen = finetune.frozen_predicate(t.frozen) if t.frozen else lambda path, names: False
  shapes = {
    path: jax.ShapeDtypeStruct(shape, jnp.float32)
    for path, shape, names in params
    if not frozen(path, names)
  }
  state = jax.eval_shape(opt.init, shapes)
  per_param = dict.fromkeys((path for path, _, _ in params), 0)
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = [k.key for k in key_path if isinstance(k, jax.tree_util.DictKey)]
    if keys and keys[0] in per_param:
      per_param[keys[0]] += math.prod(leaf.shape) * leaf.dtype.itemsize
  return per_param


def summarize(c, vocab_size: int | None = None, model=None) -> dict:
  """Total / active params, FLOPs per token and memory (bytes) of config `c`.

  Keys: total_params, active_params, routed_expert_params, embedding_params,
  train_flops_per_token, inference_flops_per_token, param_bytes, optimizer_bytes.
  `model`: an abstract (or real) Transformer of `c`, to skip building one.
  """
  m = cfglib.model_spec(c)
  V = vocab_size or statelib.vocab_size_of(c)
  model = model if model is not None else statelib.abstract_model(c, V)
  params = param_list(model)
  total = routed = lookup = unembed = vectors = 0
  for path, shape, names in params:
    n = math.prod(shape)
    total += n
    routed += n if is_routed(path, names) else 0
    lookup += n if path.split("/")[-1] in LOOKUP_TABLES else 0
    unembed += n if path.split("/")[-1] == "unembed" else 0
    vectors += n if len(shape) < 2 else 0  # norm scales and biases: no matmul
  k_frac = experts_per_token(m) / m.moe.num_experts if m.is_moe else 1.0
  active = total - routed + routed * k_frac
  matmul = active - lookup - unembed - vectors + V * m.d_model
  attn_width = m.num_heads * m.head_dim
  fwd = 2 * matmul + 4 * m.num_layers * c.data.seq_len * attn_width
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  param_bytes = sum(math.prod(p.shape) * p.dtype.itemsize for p in leaves)  # model.param_dtype
  return {
    "total_params": int(total),
    "active_params": int(round(active)),
    "routed_expert_params": int(routed),
    "embedding_params": int(lookup + unembed),
    "train_flops_per_token": float(3 * fwd),
    "inference_flops_per_token": float(fwd),
    "param_bytes": int(param_bytes),
    "optimizer_bytes": int(sum(optimizer_bytes(c.train, params).values())),
  }


def _split(names: tuple, shape: tuple, rules, sizes: dict) -> int:
  """Elements per device of an array with logical `names` on a mesh of `sizes`."""
  used, n = set(), 1
  for dim, name in zip(shape, names):
    axes = sharding.axes_of(rules, name) or ((name,) if name in sizes else ())
    axes = [a for a in axes if a not in used]  # a mesh axis shards one dim at most
    used.update(axes)
    n *= -(-dim // math.prod(sizes[a] for a in axes))
  return n * math.prod(shape[len(names) :])


def per_device(c, model, num_devices: int) -> dict:
  """Mesh sizes, and parameter / optimizer bytes per device, on `num_devices`."""
  sizes = sharding.mesh_sizes(c, num_devices)
  rules = c.sharding_rules
  params = param_list(model)
  opt = optimizer_bytes(c.train, params)
  param_b = opt_b = 0.0
  for path, shape, names in params:
    frac = _split(names, shape, rules, sizes) / math.prod(shape)
    param_b += 4 * math.prod(shape) * frac
    opt_b += opt[path] * frac  # approximate for factored (Adafactor) slots
  return {"mesh": sizes, "param_bytes": param_b, "optimizer_bytes": opt_b}


def import_host_bytes(c, model, num_devices: int, source_bytes: int = 2) -> float:
  """Peak host memory of importing a checkpoint of this config's shape
  (sparse_lm/convert/) onto `num_devices`, besides the page cache of the
  memory-mapped files: the parameter being placed, one device shard at a time,
  as read from the file (`source_bytes` per value: 2 for bfloat16; a routed
  expert array reads only that shard's experts, any other reads the whole
  tensor) plus the shard in float32. On accelerators that is all; on CPU the
  devices are host memory too (params / device x devices)."""
  sizes = sharding.mesh_sizes(c, num_devices)
  peak = 0.0
  for path, shape, names in param_list(model):
    shard = _split(names, shape, c.sharding_rules, sizes)
    read = shard if is_routed(path, names) else math.prod(shape)
    peak = max(peak, source_bytes * read + 4 * shard)
  return peak


# ------------------------------------------------------------------- the table


def _num(n: float) -> str:
  for unit, d in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= d:
      return f"{n / d:.2f}{unit}"
  return f"{n:.0f}"


def _bytes(b: float) -> str:
  for unit, d in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
    if b >= d:
      return f"{b / d:,.2f} {unit}"
  return f"{b / 2**10:,.2f} KiB"


def column(c, num_devices: int = 0) -> dict[str, str]:
  """One config's rows of the table, as strings."""
  m = cfglib.model_spec(c)
  num_devices = num_devices or math.prod(v for _, v in c.mesh if v != -1)
  sharding.mesh_sizes(c, num_devices)  # a bad count fails before any tracing
  model = statelib.abstract_model(c)
  s = summarize(c, model=model)
  d = per_device(c, model, num_devices)
  n_moe = len(m.moe_layers)
  if m.is_moe:
    routing = f"{m.moe.router}: {experts_per_token(m):g} of {m.moe.num_experts}"
    if m.moe.num_shared_experts:
      routing += f" + {m.moe.num_shared_experts} shared"
  else:
    routing = "dense"
  mesh = " ".join(f"{a}={n}" for a, n in d["mesh"].items() if n > 1) or "1 device"
  grads = d["param_bytes"]  # float32, sharded like the parameters
  return {
    "layers (MoE)": f"{m.num_layers} ({n_moe})",
    "experts per token": routing,
    "total params": _num(s["total_params"]),
    "active params": _num(s["active_params"]),
    "train FLOPs / token": _num(s["train_flops_per_token"]),
    "inference FLOPs / token": _num(s["inference_flops_per_token"]),
    "params (float32)": _bytes(s["param_bytes"]),
    "optimizer state": f"{_bytes(s['optimizer_bytes'])} ({c.train.optimizer})",
    "mesh": mesh,
    "params / device": _bytes(d["param_bytes"]),
    "params+grads+opt / device": _bytes(d["param_bytes"] + grads + d["optimizer_bytes"]),
    "import: host peak (bf16 files)": _bytes(import_host_bytes(c, model, num_devices)),
  }


def table(columns: dict[str, dict[str, str]]) -> str:
  """Rows of the first column's keys, one column per config name."""
  keys = list(next(iter(columns.values())))
  w = max(map(len, keys)) + 2
  widths = [max(len(name), *(len(col[k]) for k in keys)) + 3 for name, col in columns.items()]
  lines = ["".ljust(w) + "".join(n.rjust(cw) for n, cw in zip(columns, widths))]
  for k in keys:
    lines.append(
      k.ljust(w) + "".join(col[k].rjust(cw) for col, cw in zip(columns.values(), widths))
    )
  return "\n".join(lines)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  columns, notes = {}, []
  for name in ("config", "compare"):
    flag = flags.FLAGS[name]
    if flag.value is None:
      continue
    title = config_flags.get_config_filename(flag)
    overrides = config_flags.get_override_values(flag)
    if overrides:
      mark = "*" * (1 + len(columns))  # so the same file twice still gets two columns
      title += mark
      notes.append(f"{mark} " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    try:
      columns[title] = column(cfglib.validate(flag.value), flags.FLAGS.devices)
    except ConfigError as e:
      raise ConfigError(f"{title}: {e}") from None
  if not columns:
    raise app.UsageError("--config is required, e.g. --config=configs/mixtral.py:8x7b")
  print(table(columns))
  for note in notes:
    print(note)


if __name__ == "__main__":
  from sparse_lm import cli  # pylint: disable=g-import-not-at-top

  _define_flags()
  cli.run(main, "sparse_lm.inspect", config_flags=("config", "compare"))
