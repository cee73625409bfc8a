r"""Inference trade-off: an MoE model against its two dense twins, measured in one run.

  python benchmarks/inference.py                   # CPU: d_model 256, 4 layers, 8 experts
  # On a GPU: bf16, a ~1B-total MoE (12 layers, d_model 2048, 8 experts of 2048)
  python benchmarks/inference.py --dtype bfloat16 --d_model 2048 --layers 12 --heads 16 \
      --d_ff 2048 --vocab 32000 --prefill_batch 8 --decode_batches 1 32 128

Three models with the same d_model, depth, attention and vocabulary:
  moe           Switch (top-1) FFNs of hidden d_ff with E experts in every layer
  dense-active  one FFN of hidden d_ff: the MoE's active parameters and FLOPs
  dense-total   one FFN of hidden E x d_ff: the MoE's total parameters
Random weights (speed does not depend on them), inference form (the MoE
decodes dropless, decode.py). Measured, in this process, round-robin, median
of --repeats after a warmup, block_until_ready:
  prefill tok/s  a batch of --prompt_len-token prompts through decode.forward
  decode tok/s   batch rows x --decode_steps one-token steps on a cache filled
                 with a --prompt_len prompt, at each --decode_batches
and from the code: parameter bytes, KV-cache bytes (decode.cache_bytes),
XLA's compiled memory analysis of the batch-1 decode step (arguments +
temporaries), and inference FLOPs per token (inspect.summarize, attention over
the prompt_len + decode_steps context).
"""

from __future__ import annotations

import argparse
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp

from sparse_lm import config as cfglib
from sparse_lm import decode
from sparse_lm import inspect as inspectlib
from sparse_lm.models.transformer import Transformer


def model_config(a, kind: str):
  c = cfglib.load_config("configs/switch.py:tiny")
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.dtype = a.d_model, a.layers, a.heads, a.dtype
  m.d_ff = a.d_ff * (a.experts if kind == "dense-total" else 1)
  m.moe.num_experts = a.experts if kind == "moe" else 1
  m.moe.every, m.moe.offset = 1, 0
  c.data.vocab_size = a.vocab
  c.data.seq_len = a.prompt_len + a.decode_steps  # the context inspect's attention FLOPs use
  m.max_len = c.data.seq_len
  return cfglib.validate(c)


def timed(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--d_ff", type=int, default=1024, help="expert hidden (= active dense hidden)")
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=2048)
  ap.add_argument("--prompt_len", type=int, default=512)
  ap.add_argument("--prefill_batch", type=int, default=4)
  ap.add_argument("--decode_batches", type=int, nargs="*", default=[1, 32])
  ap.add_argument("--decode_steps", type=int, default=32)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args()
  kinds = ("moe", "dense-active", "dense-total")
  rows = {}
  for kind in kinds:
    c = model_config(a, kind)
    m = decode.inference_spec(cfglib.model_spec(c))
    with nnx.use_eager_sharding(False):
      model = Transformer(m, a.vocab, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    stats = inspectlib.summarize(c, a.vocab, model=model)
    key = jax.random.key(1)
    S = a.prompt_len + a.decode_steps

    def prefill(B, graphdef=graphdef, state=state, m=m):
      toks = jax.random.randint(key, (B, a.prompt_len), 3, a.vocab)
      ones = jnp.ones((B, a.prompt_len), jnp.float32)
      pos = jnp.broadcast_to(jnp.arange(a.prompt_len, dtype=jnp.int32), (B, a.prompt_len))
      return lambda: decode.forward(graphdef, state, toks, ones, pos, decode.init_cache(m, B, S))[0]

    def decoder(B, graphdef=graphdef, state=state, m=m):
      toks = jax.random.randint(key, (B, a.prompt_len), 3, a.vocab)
      ones = jnp.ones((B, a.prompt_len), jnp.float32)
      pos = jnp.broadcast_to(jnp.arange(a.prompt_len, dtype=jnp.int32), (B, a.prompt_len))
      _, filled, _ = decode.forward(graphdef, state, toks, ones, pos, decode.init_cache(m, B, S))
      filled = jax.block_until_ready(filled)
      one = jnp.ones((B, 1), jnp.float32)

      def run():
        cache = jax.tree.map(jnp.copy, filled)  # decode.forward donates the cache
        nxt = toks[:, -1:]
        for i in range(a.decode_steps):
          logits, cache, _ = decode.forward(
            graphdef, state, nxt, one, jnp.full((B, 1), a.prompt_len + i, jnp.int32), cache
          )
          nxt = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
        return nxt

      return run

    step_lowered = jax.jit(
      lambda st, t, msk, p, cache: nnx.merge(graphdef, st)(
        t, mask_BxL=msk, positions_BxL=p, cache=cache
      )[0]
    ).lower(
      state,
      jnp.ones((1, 1), jnp.int32),
      jnp.ones((1, 1)),
      jnp.ones((1, 1), jnp.int32),
      decode.init_cache(m, 1, S),
    )
    mem = step_lowered.compile().memory_analysis()
    rows[kind] = {
      "calls": {
        "prefill": prefill(a.prefill_batch),
        **{f"decode b{B}": decoder(B) for B in a.decode_batches},
      },
      "total_params": stats["total_params"],
      "active_params": stats["active_params"],
      "flops": stats["inference_flops_per_token"],
      "param_bytes": decode.param_bytes(model),
      "cache_bytes": {B: decode.cache_bytes(m, B, S) for B in a.decode_batches},
      "step_bytes": mem.argument_size_in_bytes + mem.temp_size_in_bytes,
    }
  names = list(rows["moe"]["calls"])
  for r in rows.values():  # warmup (compiles)
    for fn in r["calls"].values():
      timed(fn)
  times = {k: {n: [] for n in names} for k in kinds}
  for _ in range(a.repeats):
    for k in kinds:
      for n in names:
        times[k][n].append(timed(rows[k]["calls"][n]))
  med = {k: {n: statistics.median(v) for n, v in t.items()} for k, t in times.items()}
  rate = {}
  for k in kinds:
    rate[k] = {"prefill": a.prefill_batch * a.prompt_len / med[k]["prefill"]}
    for B in a.decode_batches:
      rate[k][f"decode b{B}"] = B * a.decode_steps / med[k][f"decode b{B}"]
  print(
    f"backend={jax.default_backend()} dtype={a.dtype} d_model={a.d_model} layers={a.layers} "
    f"heads={a.heads} d_ff={a.d_ff} experts={a.experts} vocab={a.vocab} "
    f"prompt_len={a.prompt_len} decode_steps={a.decode_steps} median of {a.repeats}"
  )
  cols = [
    "total params",
    "active params",
    "GFLOPs/token",
    "param MB",
    "KV MB b1",
    "decode step MB",
  ] + [f"{n} tok/s" for n in names]
  print("| model | " + " | ".join(cols) + " |")
  print("|---|" + "---|" * len(cols))
  for k in kinds:
    r = rows[k]
    B0 = a.decode_batches[0]
    vals = [
      f"{r['total_params'] / 1e6:.2f}M",
      f"{r['active_params'] / 1e6:.2f}M",
      f"{r['flops'] / 1e9:.3f}",
      f"{r['param_bytes'] / 2**20:.1f}",
      f"{r['cache_bytes'][B0] / 2**20:.2f}",
      f"{r['step_bytes'] / 2**20:.1f}",
    ]
    vals += [f"{rate[k][n]:,.0f}" for n in names]
    print(f"| {k} | " + " | ".join(vals) + " |")
  for twin in ("dense-active", "dense-total"):
    vals = [
      rows["moe"]["total_params"] / rows[twin]["total_params"],
      rows["moe"]["active_params"] / rows[twin]["active_params"],
      rows["moe"]["flops"] / rows[twin]["flops"],
      rows["moe"]["param_bytes"] / rows[twin]["param_bytes"],
      rows["moe"]["cache_bytes"][a.decode_batches[0]]
      / rows[twin]["cache_bytes"][a.decode_batches[0]],
      rows["moe"]["step_bytes"] / rows[twin]["step_bytes"],
    ]
    vals += [rate["moe"][n] / rate[twin][n] for n in names]
    print(f"| moe / {twin} | " + " | ".join(f"{v:.2f}x" for v in vals) + " |")


if __name__ == "__main__":
  main()
