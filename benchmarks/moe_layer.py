"""Forward+backward time of MoeFfn vs a dense FFN with the same active FLOPs.

The dense FFN (sparse_lm.models.layers.Mlp) has hidden k * expert hidden and
sees the same tokens as a [T, D] matrix; "ratio" is MoE time / dense time.
Two diagnostic columns bound what dispatch could gain:
  experts  the layer's own padded expert einsum (`experts.batched`) on
           a random [E, C, D] buffer with the capacity C of this point (cf x
           the average load), fwd+bwd: the expert matmuls alone, no routing,
           dispatch or combine. What XLA's batched matmul costs at this E.
  floor    the time to merely write two fresh [E, D, F] float32 arrays, the
           size of the expert-weight gradients every MoE backward produces
           (the dense FFN's are E times smaller).
All are jit-compiled in this process and run round-robin (a noisy machine
slows all alike); timings are the median of --repeats runs after warmup,
with block_until_ready.

  python benchmarks/moe_layer.py                      # the full table
  python benchmarks/moe_layer.py --experts 64 --top_k 1 --dispatch dropless
  python benchmarks/moe_layer.py --experts 16 32 --top_k 1 --dispatch capacity \\
      --capacity_layout grouped batched    # the CPU crossover (policy.py)
  # On a GPU: bf16, larger shapes, dropless by ragged_dot (its default there)
  # against the block loops
  python benchmarks/moe_layer.py --dtype bfloat16 --tokens 65536 --d_model 1024 \\
      --d_ff 4096 --grouped_kernel ragged blocks
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
from sparse_lm.models.moe import experts as experts_lib
from sparse_lm.models.moe import layer as layer_lib
from sparse_lm.models.moe import policy
from sparse_lm.models.moe import routing


def moe_model(
  E: int, k: int, dispatch: str, d_model: int, d_ff: int, cf: float, dtype: str = "float32", **impl
):
  c = cfglib.base_config()
  m = c.model
  m.d_model, m.d_ff, m.activation, m.dtype = d_model, d_ff, "gelu", dtype
  m.moe.num_experts, m.moe.top_k = E, k
  m.moe.router = "switch" if k == 1 else "topk"
  m.moe.dispatch, m.moe.capacity_factor = dispatch, cf
  for part, value in impl.items():
    m.moe.impl[part] = value
  return cfglib.model_spec(cfglib.validate(c))


def fwd_bwd(module, **call_kw):
  """(state, step): step(state, x, ct) is the value and gradients of
  sum(y * ct) + the router loss w.r.t. the module's state and x (unjitted).

  The value makes the forward compute y, as in training (y feeds the residual
  stream): with the gradient alone XLA would drop the dense FFN's second
  matmul (no gradient needs y), while the MoE needs y for its gates' gradient.
  """
  graphdef, state = nnx.split(module)

  def step(state, x, ct):
    def loss(state, x):
      out = nnx.merge(graphdef, state)(x, **call_kw)
      y, aux = out if isinstance(out, tuple) else (out, {"router_loss": 0.0})
      return jnp.sum(y * ct) + aux["router_loss"]

    return jax.value_and_grad(loss, (0, 1))(state, x)

  return state, step


def grad_fn(module, **call_kw):
  """jit(fwd_bwd's step) as f(x, ct)."""
  state, step = fwd_bwd(module, **call_kw)
  step = jax.jit(step)
  return lambda x, ct: step(state, x, ct)


def experts_grad_fn(w: experts_lib.Weights, activation: str):
  """The same for the padded expert einsum alone, w.r.t. the weights and x."""

  @jax.jit
  def step(w, x, ct):
    return jax.value_and_grad(
      lambda w, x: jnp.sum(experts_lib.batched(w, x, activation) * ct), (0, 1)
    )(w, x)

  return lambda x, ct: step(w, x, ct)


def timed(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def bench(calls: dict, repeats: int, warmup: int = 2) -> dict:
  """calls: name -> (fn, args). Median seconds per name, called round-robin."""
  for _ in range(warmup):
    for fn, args in calls.values():
      timed(fn, *args)
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      times[name].append(timed(fn, *args))
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
  ap.add_argument(
    "--capacity_layout",
    nargs="*",
    default=["auto"],
    choices=["auto"] + list(policy.PARTS["capacity_layout"]),
    help="model.moe.impl.capacity_layout; auto = policy.py's for this backend, E",
  )
  ap.add_argument(
    "--grouped_kernel",
    nargs="*",
    default=["auto"],
    choices=["auto"] + list(policy.PARTS["grouped_kernel"]),
    help="model.moe.impl.grouped_kernel (dropless); auto = policy.py's",
  )
  ap.add_argument(
    "--dtype",
    default="float32",
    choices=["float32", "bfloat16"],
    help="compute dtype of both layers (parameters stay float32)",
  )
  ap.add_argument("--repeats", type=int, default=7)
  args = ap.parse_args()

  T, D, F = args.tokens, args.d_model, args.d_ff
  key = jax.random.key(0)
  if T % 512:
    ap.error(f"--tokens={T} must be a multiple of 512 (the sequence length used)")
  dt = jnp.dtype(args.dtype)
  x = jax.random.normal(key, (T // 512, 512, D), dt)
  ct = jax.random.normal(jax.random.key(1), x.shape, dt)
  x2, ct2 = x.reshape(T, D), ct.reshape(T, D)
  print(
    f"backend={jax.default_backend()} devices={jax.device_count()} tokens={T} "
    f"d_model={D} expert_hidden={F} cf={args.capacity_factor} dtype={args.dtype} "
    f"fwd+bwd, median of {args.repeats}"
  )
  print(
    f"{'E':>4} {'k':>2} {'dispatch':>17} {'moe ms':>8} {'dense ms':>9} {'ratio':>6} "
    f"{'experts ms':>11} {'ratio':>6} {'floor ms':>9} {'ratio':>6}"
  )
  dense = {}
  points = [
    (E, k, disp, impl)
    for E, k, disp in itertools.product(args.experts, args.top_k, args.dispatch)
    for impl in (args.capacity_layout if disp == "capacity" else args.grouped_kernel)
  ]
  for E, k, disp, impl in points:
    if k not in dense:
      with nnx.use_eager_sharding(False):
        dense[k] = grad_fn(layers.Mlp(D, k * F, "gelu", rngs=nnx.Rngs(0)))
    part = "capacity_layout" if disp == "capacity" else "grouped_kernel"
    m = moe_model(
      E, k, disp, D, F, args.capacity_factor, args.dtype, **({} if impl == "auto" else {part: impl})
    )
    disp = f"{disp}/{getattr(policy.resolve(m.moe), part)}"
    with nnx.use_eager_sharding(False):
      layer = layer_lib.MoeFfn(m, rngs=nnx.Rngs(0))
    C = routing.capacity(m.moe, T, train=True)
    xe = jax.random.normal(key, (E, C, D), dt)
    shapes = [v[...].shape for v in (layer.wi, layer.wo)]
    floor = jax.jit(lambda: [jnp.full(s, 1.0, jnp.float32) for s in shapes])
    t = bench(
      {
        "moe": (grad_fn(layer, train=True), (x, ct)),
        "dense": (dense[k], (x2, ct2)),
        "experts": (experts_grad_fn(layer.expert_weights(dt), "gelu"), (xe, xe)),
        "floor": (floor, ()),
      },
      args.repeats,
    )
    r = lambda name: t[name] / t["dense"]
    print(
      f"{E:>4} {k:>2} {disp:>17} {t['moe'] * 1e3:>8.1f} {t['dense'] * 1e3:>9.1f} "
      f"{r('moe'):>6.2f} {t['experts'] * 1e3:>11.1f} {r('experts'):>6.2f} "
      f"{t['floor'] * 1e3:>9.1f} {r('floor'):>6.2f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
