r"""Inference trade-off: an MoE model against its two dense twins, measured in one run.

  python benchmarks/inference.py                   # CPU: d_model 256, 4 layers, 8 experts
  # On a GPU: bf16, a ~1B-total MoE (12 layers, d_model 2048, 8 experts of 2048)
  python benchmarks/inference.py --dtype bfloat16 --d_model 2048 --layers 12 --heads 16 \
      --d_ff 2048 --vocab 32000 --prefill_batch 8 --decode_batches 1 64 --png ''

Three models with the same d_model, depth, attention and vocabulary:
  moe           Switch (top-1) FFNs of hidden d_ff with E experts in every layer
  dense-active  one FFN of hidden d_ff: the MoE's active parameters and FLOPs
  dense-total   one FFN of hidden E x d_ff: the MoE's total parameters
Random weights (speed does not depend on them), inference form (the MoE
decodes dropless, decode.py). Measured, in this process, round-robin, median
of --repeats after a warmup, block_until_ready:
  prefill tok/s  a batch of --prompt_len-token prompts through decode.forward
  decode tok/s   decode.generate's tokens/s (greedy, --decode_steps new tokens
                 after --prompt_len-token prompts, the steps after the first:
                 sampling and the stop check on the device), at each
                 --decode_batches
and the distinct experts a decode step of B tokens touches per layer,
E (1 - (1 - k/E)^B): what the MoE's advantage shrinks with. Writes the table
(stdout) and, unless --png '', a PNG of decode tokens/s against the batch.
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


def distinct_experts(E: int, k: int, B: int) -> float:
  """Expected distinct experts per layer for B tokens with uniform top-k routing."""
  return E * (1 - (1 - k / E) ** B)


def plot(rate, a, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for k, r in rate.items():
    ax.plot(a.decode_batches, [r[f"decode b{B}"] for B in a.decode_batches], marker="o", label=k)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("decode batch (rows)")
  ax.set_ylabel("decode tokens/s")
  ax2 = ax.twinx()
  ax2.plot(
    a.decode_batches,
    [distinct_experts(a.experts, 1, B) for B in a.decode_batches],
    "k:",
    label="distinct experts per layer (right)",
  )
  ax2.set_ylabel("distinct experts touched per layer")
  ax2.set_ylim(0, a.experts + 0.5)
  lines = ax.get_legend_handles_labels()
  lines2 = ax2.get_legend_handles_labels()
  ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower right")
  ax.grid(alpha=0.3)
  ax.set_title(f"Decoding: MoE (top-1 of {a.experts}) vs its dense twins, {jax.default_backend()}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


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
  ap.add_argument("--decode_batches", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
  ap.add_argument("--decode_steps", type=int, default=32)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument(
    "--decode_dispatch",
    nargs="*",
    default=["auto"],
    help="model.moe.decode_dispatch; several: one MoE row each (the gather threshold)",
  )
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--png", default="benchmarks/decode_vs_batch.png", help="'' = no plot")
  a = ap.parse_args()
  moes = {("moe" if len(a.decode_dispatch) == 1 else f"moe {d}"): d for d in a.decode_dispatch}
  kinds = (*moes, "dense-active", "dense-total")
  rows = {}
  for kind in kinds:
    c = model_config(a, "moe" if kind in moes else kind)
    c.model.moe.decode_dispatch = moes.get(kind, "auto")
    m = decode.inference_spec(cfglib.model_spec(c))
    with nnx.use_eager_sharding(False):
      model = decode.for_inference(Transformer(m, a.vocab, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    stats = inspectlib.summarize(c, a.vocab, model=model)
    key = jax.random.key(1)
    S = decode.cache_length(a.prompt_len, a.decode_steps)  # as generate sizes it

    def prefill(B, graphdef=graphdef, state=state, m=m):
      toks = jax.random.randint(key, (B, a.prompt_len), 3, a.vocab)
      ones = jnp.ones((B, a.prompt_len), jnp.float32)
      pos = jnp.broadcast_to(jnp.arange(a.prompt_len, dtype=jnp.int32), (B, a.prompt_len))
      return lambda: decode.forward(graphdef, state, toks, ones, pos, decode.init_cache(m, B, S))[0]

    def decoder(B, model=model):
      prompts = jax.random.randint(key, (B, a.prompt_len), 3, a.vocab).tolist()
      # The steps after the first, timed by generate itself (compiles excluded).
      return lambda: decode.generate(model, prompts, max_new_tokens=a.decode_steps)

    rows[kind] = {
      "calls": {"prefill": prefill(a.prefill_batch)},
      "decode": {B: decoder(B) for B in a.decode_batches},
      "total_params": stats["total_params"],
      "active_params": stats["active_params"],
      "flops": stats["inference_flops_per_token"],
      "param_bytes": decode.param_bytes(model),
      "cache_bytes": {B: decode.cache_bytes(m, B, S) for B in a.decode_batches},
    }
  for r in rows.values():  # warmup (compiles)
    timed(r["calls"]["prefill"])
    for fn in r["decode"].values():
      fn()
  times = {k: {"prefill": []} | {B: [] for B in a.decode_batches} for k in kinds}
  for _ in range(a.repeats):  # round-robin: a busy machine slows all three alike
    for k in kinds:
      times[k]["prefill"].append(timed(rows[k]["calls"]["prefill"]))
      for B, fn in rows[k]["decode"].items():
        times[k][B].append(fn().tokens_per_s())
  rate = {}
  for k in kinds:
    rate[k] = {"prefill": a.prefill_batch * a.prompt_len / statistics.median(times[k]["prefill"])}
    rate[k] |= {f"decode b{B}": statistics.median(times[k][B]) for B in a.decode_batches}
  names = list(rate[kinds[0]])
  print(
    f"backend={jax.default_backend()} dtype={a.dtype} d_model={a.d_model} layers={a.layers} "
    f"heads={a.heads} d_ff={a.d_ff} experts={a.experts} vocab={a.vocab} "
    f"prompt_len={a.prompt_len} decode_steps={a.decode_steps} "
    f"decode_dispatch={a.decode_dispatch} median of {a.repeats}"
  )
  cols = ["total params", "active params", "GFLOPs/token", "param MB", "KV MB b1"]
  cols += [f"{n} tok/s" for n in names]
  print("| model | " + " | ".join(cols) + " |")
  print("|---|" + "---|" * len(cols))
  B0 = a.decode_batches[0]
  for k in kinds:
    r = rows[k]
    vals = [
      f"{r['total_params'] / 1e6:.2f}M",
      f"{r['active_params'] / 1e6:.2f}M",
      f"{r['flops'] / 1e9:.3f}",
      f"{r['param_bytes'] / 2**20:.1f}",
      f"{r['cache_bytes'][B0] / 2**20:.2f}",
    ]
    print(f"| {k} | " + " | ".join(vals + [f"{rate[k][n]:,.0f}" for n in names]) + " |")
  for moe, twin in ((moe, twin) for moe in moes for twin in ("dense-active", "dense-total")):
    m, t = rows[moe], rows[twin]
    vals = [
      m["total_params"] / t["total_params"],
      m["active_params"] / t["active_params"],
      m["flops"] / t["flops"],
      m["param_bytes"] / t["param_bytes"],
      m["cache_bytes"][B0] / t["cache_bytes"][B0],
    ]
    vals += [rate[moe][n] / rate[twin][n] for n in names]
    print(f"| {moe} / {twin} | " + " | ".join(f"{v:.2f}x" for v in vals) + " |")
  experts = " ".join(f"b{B} {distinct_experts(a.experts, 1, B):.2f}" for B in a.decode_batches)
  print(f"distinct experts per layer (top-1 of {a.experts}, uniform routing): {experts}")
  if a.png:
    plot(rate, a, a.png)
    print(f"wrote {a.png}")


if __name__ == "__main__":
  main()
