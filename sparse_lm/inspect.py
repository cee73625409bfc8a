r"""Parameters, FLOPs and memory of any config, without allocating the model.

  python -m sparse_lm.inspect --config=configs/mixtral.py:8x7b
  python -m sparse_lm.inspect --config=configs/switch.py:base --compare=configs/dense.py:base

Counts come from `nnx.eval_shape` of the real model, so they follow the code.
Active parameters count a routed expert's weights times (experts used per token
/ E). FLOPs per token (Kaplan et al. 2020): forward = 2 * active matmul params
+ 2 * layers * seq_len * attention width; training = 3 x forward.
"""

from __future__ import annotations

import math

from absl import app
from absl import flags
from flax import nnx
import jax
from ml_collections import config_flags

from sparse_lm import config as cfglib

# Flags are defined only when run as a program: the trainer imports this module.
_CONFIG = _COMPARE = _DEVICES = None


def _define_flags():
  global _CONFIG, _COMPARE, _DEVICES
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  _COMPARE = config_flags.DEFINE_config_file("compare", None, "A second config, side by side.",
                                             lock_config=True)
  _DEVICES = flags.DEFINE_integer("devices", 0, "Devices for the per-device memory column "
                                  "(0 = the product of the config's fixed mesh sizes).")


BYTES_F32 = 4


def experts_per_token(m) -> float:
  """How many routed experts a token uses, on average."""
  moe = m.moe
  if moe.router == "hierarchical":
    return moe.top_k_groups * moe.top_k
  if moe.router == "expert_choice":
    return moe.capacity_factor * moe.top_k  # each expert takes cf*T*k/E tokens
  return moe.top_k


def abstract_model(c, vocab_size: int):
  from sparse_lm.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  with nnx.use_eager_sharding(False):  # shapes only: no mesh needed
    return nnx.eval_shape(lambda: Transformer(c.model, vocab_size, rngs=nnx.Rngs(0)))


def vocab_size_of(c) -> int:
  return 259 if c.data.tokenizer == "byte" else c.data.vocab_size


def summarize(c, vocab_size: int | None = None, model=None) -> dict:
  """Total / active params, FLOPs per token and memory of config `c`."""
  m = c.model
  V = vocab_size or vocab_size_of(c)
  model = model if model is not None else abstract_model(c, V)
  total = routed = embed = 0
  routed_by_layer = []
  for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    n = math.prod(p.get_value().shape)
    total += n
    names = getattr(p, "out_sharding", None) or ()
    if names and names[0] == "expert":
      routed += n
    if path[-1] in ("embedding", "pos_embed"):
      embed += n
  k_frac = experts_per_token(m) / m.moe.num_experts if cfglib.is_moe(m) else 1.0
  active = total - routed + routed * k_frac
  # Logits are a D x V matmul whether or not the table is tied.
  compute_params = active - embed + V * m.d_model
  attn_width = m.num_heads * cfglib.head_dim(m)
  fwd = 2 * compute_params + 2 * m.num_layers * c.data.seq_len * attn_width
  opt_slots = 2 if c.train.optimizer == "adamw" else 1  # adafactor's factored slots are ~0
  del routed_by_layer
  return {
      "total_params": int(total),
      "active_params": int(round(active)),
      "routed_expert_params": int(routed),
      "embedding_params": int(embed),
      "train_flops_per_token": float(3 * fwd),
      "inference_flops_per_token": float(fwd),
      "param_bytes": total * BYTES_F32,
      "optimizer_bytes": total * BYTES_F32 * opt_slots,
  }


def per_device_bytes(c, model, num_devices: int) -> float:
  """Parameter + optimizer bytes per device under the config's mesh and rules."""
  from sparse_lm import sharding  # pylint: disable=g-import-not-at-top
  sizes = dict(c.mesh)
  fixed = math.prod(s for s in sizes.values() if s != -1)
  sizes = {a: (num_devices // fixed if s == -1 else s) for a, s in sizes.items()}
  rules = dict(sharding.rules(c))
  opt_slots = 2 if c.train.optimizer == "adamw" else 1
  total = 0.0
  for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    n = math.prod(p.get_value().shape)
    split = 1
    for name in getattr(p, "out_sharding", None) or ():
      axes = rules.get(name)
      axes = axes if isinstance(axes, tuple) else (axes,)
      split *= math.prod(sizes.get(a, 1) for a in axes if a)
    total += n * BYTES_F32 * (1 + opt_slots) / split
  return total


def _fmt(n: float) -> str:
  for unit, d in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= d:
      return f"{n / d:.2f}{unit}"
  return f"{n:.0f}"


def _gib(b: float) -> str:
  return f"{b / 2**30:,.2f} GiB"


def table(configs: dict) -> str:
  rows = {}
  for name, c in configs.items():
    model = abstract_model(c, vocab_size_of(c))
    s = summarize(c, model=model)
    sizes = dict(c.mesh)
    n_dev = _DEVICES.value or math.prod(v for v in sizes.values() if v != -1)
    rows[name] = {
        "total params": _fmt(s["total_params"]),
        "active params": _fmt(s["active_params"]),
        "experts x top-k": (f"{c.model.moe.num_experts} x {experts_per_token(c.model):g}"
                            if cfglib.is_moe(c.model) else "dense"),
        "train FLOPs/token": _fmt(s["train_flops_per_token"]),
        "inference FLOPs/token": _fmt(s["inference_flops_per_token"]),
        "params (f32)": _gib(s["param_bytes"]),
        "optimizer state": _gib(s["optimizer_bytes"]),
        f"params+opt per device ({n_dev} dev)": _gib(per_device_bytes(c, model, n_dev)),
    }
  keys = list(next(iter(rows.values())))
  w = max(map(len, keys)) + 2
  cw = max(max(len(n) for n in rows) + 2, 14)
  out = ["".ljust(w) + "".join(n.rjust(cw) for n in rows)]
  for k in keys:
    out.append(k.ljust(w) + "".join(r[k].rjust(cw) for r in rows.values()))
  return "\n".join(out)


def main(argv):
  del argv
  configs = {flags.FLAGS["config"].value_str if hasattr(flags.FLAGS["config"], "value_str")
             else "config": cfglib.validate(_CONFIG.value)}
  configs = {"config": configs.popitem()[1]}
  if _COMPARE.value is not None:
    configs["compare"] = cfglib.validate(_COMPARE.value)
  with jax.default_device(jax.devices("cpu")[0]):
    print(table(configs))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
