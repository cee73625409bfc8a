"""Forward+backward time of MoeFfn vs a dense FFN with the same active FLOPs.

The dense FFN (sparse_lm.models.layers.Mlp) has hidden k * expert hidden and
sees the same tokens. "ratio" divides by the dense FFN on a [T, D] matrix,
the fastest form (MoeFfn flattens [B, L, D] to [T, D] itself); the last column
divides by the same Mlp called on [B, L, D] as the Transformer calls it, which
XLA on CPU runs several times slower (its weight gradient contracts two axes).
"floor" is the time to merely write two fresh [E, D, F] float32 arrays, the
size of the expert-weight gradients every MoE backward must produce (the
dense one writes E times less); on a VM where fresh pages fault slowly this
bounds the ratio from below at large E. Both are jit-compiled in this process; timings are the median of
--repeats runs after warmup (block_until_ready), MoE and dense interleaved so
a noisy machine slows both alike.

  python benchmarks/moe_layer.py                      # the full table
  python benchmarks/moe_layer.py --experts 64 --top_k 1 --dispatch dropless
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp

from sparse_lm import config as cfglib
from sparse_lm.models import layers
from sparse_lm.models.moe.layer import MoeFfn


def moe_model(E: int, k: int, dispatch: str, d_model: int, d_ff: int, cf: float):
  c = cfglib.base_config()
  m = c.model
  m.d_model, m.d_ff, m.activation = d_model, d_ff, "gelu"
  m.moe.num_experts, m.moe.top_k = E, k
  m.moe.router = "switch" if k == 1 else "topk"
  m.moe.dispatch, m.moe.capacity_factor = dispatch, cf
  return cfglib.validate(c).model


def grad_fn(module, **call_kw):
  """jit(grad of sum(y * ct) + router loss) w.r.t. params and x."""
  graphdef, state = nnx.split(module)

  @jax.jit
  def step(state, x, ct):
    def loss(state, x):
      out = nnx.merge(graphdef, state)(x, **call_kw)
      y, aux = out if isinstance(out, tuple) else (out, {"router_loss": 0.0})
      return jnp.sum(y * ct) + aux["router_loss"]
    return jax.grad(loss, (0, 1))(state, x)

  return lambda x, ct: step(state, x, ct)


def timed(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def bench(fns: dict, x, ct, repeats: int, warmup: int = 2) -> dict:
  """Median seconds per fn; fns called round-robin so machine noise hits all alike."""
  args = {name: (x, ct) if name != "dense" else (x.reshape(-1, x.shape[-1]),
                                                  ct.reshape(-1, ct.shape[-1]))
          for name in fns}
  for _ in range(warmup):
    for name, fn in fns.items():
      timed(fn, *args[name])
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timed(fn, *args[name]))
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=8192)
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--d_ff", type=int, default=1024, help="expert hidden")
  ap.add_argument("--experts", type=int, nargs="*", default=[8, 64, 256])
  ap.add_argument("--top_k", type=int, nargs="*", default=[1, 2])
  ap.add_argument("--dispatch", nargs="*", default=["capacity", "dropless"])
  ap.add_argument("--capacity_factor", type=float, default=1.25)
  ap.add_argument("--repeats", type=int, default=7)
  args = ap.parse_args()

  T, D = args.tokens, args.d_model
  x = jax.random.normal(jax.random.key(0), (T // 512, 512, D), jnp.float32)
  ct = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
  print(f"backend={jax.default_backend()} devices={jax.device_count()} tokens={T} "
        f"d_model={D} expert_hidden={args.d_ff} cf={args.capacity_factor} "
        f"fwd+bwd, median of {args.repeats}")
  print(f"{'E':>4} {'k':>2} {'dispatch':>9} {'moe ms':>8} {'dense ms':>9} {'ratio':>6} "
        f"{'dense[B,L,D] ms':>16} {'ratio':>6} {'floor ms':>9}")
  dense = {}
  for E, k, disp in itertools.product(args.experts, args.top_k, args.dispatch):
    if k not in dense:
      with nnx.use_eager_sharding(False):
        mlp = layers.Mlp(D, k * args.d_ff, "gelu", rngs=nnx.Rngs(0))
      dense[k] = grad_fn(mlp)
    m = moe_model(E, k, disp, D, args.d_ff, args.capacity_factor)
    with nnx.use_eager_sharding(False):
      layer = MoeFfn(m, rngs=nnx.Rngs(0))
    shapes = [v[...].shape for v in (layer.wi, layer.wo)]
    floor = jax.jit(lambda x, ct: [jnp.full(s, 1.0, jnp.float32) for s in shapes])
    t = bench({"moe": grad_fn(layer, train=True), "dense": dense[k], "dense3d": dense[k],
               "floor": floor}, x, ct, args.repeats)
    print(f"{E:>4} {k:>2} {disp:>9} {t['moe'] * 1e3:>8.1f} {t['dense'] * 1e3:>9.1f} "
          f"{t['moe'] / t['dense']:>6.2f} {t['dense3d'] * 1e3:>16.1f} "
          f"{t['moe'] / t['dense3d']:>6.2f} {t['floor'] * 1e3:>9.1f}", flush=True)


if __name__ == "__main__":
  main()
