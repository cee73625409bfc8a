r"""The prepared GPU check (issue 27), run by gpu_check.sh: one markdown table.

  benchmarks/gpu_check.sh --out gpu_check.md   # one H100 / H200: at most 8 minutes
  benchmarks/gpu_check.sh --cpu                # smoke mode: the same code paths, tiny shapes

Four checks, each a group of rows of one table (written to --out row by row,
so a run cut short keeps what it measured; a check that fails is a row
saying why, and the others still run):
  moe layer    MoeFfn forward + backward in bfloat16 against its dense twin
               (benchmarks/moe_layer.py: the same model, timing and dense FFN
               of hidden k x expert hidden), E 8 and 64, d_model 2048,
               capacity and dropless dispatch at the backend's defaults.
  grouped      whether the dropless path compiles to a grouped matmul: the
               optimised HLO of that layer (compiled.as_text()) searched by
               name, `ragged-dot` kept or a custom call named ragged / grouped
               (XLA:CPU rewrites ragged-dot into dense dots: "no" there).
  decode       decode tokens/s at batch 1 and 64 of a ~1B-total MoE against
               its dense twins (benchmarks/inference.py's three models,
               decode.generate's own rate).
  mfu          a train step of configs/mixtral.py:1b (3.55B total / 1.14B
               active) with train.remat=full, on one device: the fewest
               micro-batches whose compiled bytes fit the device's memory
               (inspect.compiled_stats against memory_stats' bytes_limit),
               model FLOPs (inspect.summarize's, without the recomputation)
               per second over the device's bf16 dense peak.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import statistics
import sys
import time
import traceback

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # moe_layer, inference

import inference  # noqa: E402
import moe_layer  # noqa: E402

from sparse_lm import config as cfglib  # noqa: E402
from sparse_lm import decode  # noqa: E402
from sparse_lm import inspect as inspectlib  # noqa: E402
from sparse_lm import sharding  # noqa: E402
from sparse_lm import state as statelib  # noqa: E402
from sparse_lm.models import layers  # noqa: E402
from sparse_lm.models.moe import layer as layer_lib  # noqa: E402
from sparse_lm.models.moe import policy  # noqa: E402
from sparse_lm.models.transformer import Transformer  # noqa: E402

SHAPES = {
  "gpu": {
    "moe": dict(tokens=32768, seq=512, d_model=2048, d_ff=2048, experts=(8, 64), top_k=2, reps=5),
    "decode": dict(
      d_model=2048,
      layers=12,
      heads=16,
      d_ff=2048,
      experts=8,
      vocab=32000,
      prompt_len=512,
      decode_steps=64,
      batches=(1, 64),
      reps=3,
    ),
    # README, "From one CPU to a cluster": 54 GiB per device on XLA:CPU (float32
    # parameters and AdamW moments alone are 40 GiB, 87 GiB with their gradients).
    "train": dict(
      config="configs/mixtral.py:1b",
      rows_per_micro=4,
      steps=3,
      sets={"model.param_dtype": "bfloat16"},
    ),
  },
  "cpu": {
    "moe": dict(tokens=512, seq=128, d_model=64, d_ff=128, experts=(8,), top_k=2, reps=1),
    "decode": dict(
      d_model=64,
      layers=1,
      heads=4,
      d_ff=128,
      experts=8,
      vocab=512,
      prompt_len=8,
      decode_steps=3,
      batches=(1,),  # the GPU's 64 goes through the same loop
      reps=1,
    ),
    "train": dict(
      config="configs/mixtral.py:tiny",
      rows_per_micro=4,
      steps=2,
      sets={
        "model.param_dtype": "bfloat16",
        "model.num_layers": 1,
        "data.batch_size": 8,
        "data.seq_len": 64,
      },
    ),
  },
}

# The MoE layer's implementation: JAX's defaults off CPU (policy.resolve: batched
# capacity, ragged_dot, sort); the smoke mode sets them so that it runs the
# GPU's code paths on the CPU.
IMPL = {}

# bf16 dense peak FLOP/s by device kind (vendor data sheets, without sparsity).
PEAKS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


class Table:
  """One markdown table, written to `path` row by row (and echoed)."""

  HEAD = "| check | case | measured | twin / reference | ratio | notes |"

  def __init__(self, path: str, caption: str):
    self.path = path
    self._write("w", f"{caption}\n\n{self.HEAD}\n|---|---|--:|---|--:|---|\n")

  def _write(self, mode: str, text: str):
    with open(self.path, mode) as f:
      f.write(text)
    print(text, end="", flush=True)

  def row(self, *cells):
    self._write("a", "| " + " | ".join(str(c) for c in cells) + " |\n")


def _compiled_fwd_bwd(module, x, ct, **call_kw):
  """moe_layer.fwd_bwd's step (value and gradients of sum(y * ct) + the
  router loss) compiled once: (callable f(x, ct), the optimised HLO text)."""
  state, step = moe_layer.fwd_bwd(module, **call_kw)
  compiled = jax.jit(step).lower(state, x, ct).compile()
  return (lambda x, ct: compiled(state, x, ct)), compiled.as_text()


def grouped_matmul(hlo: str) -> tuple[str, str]:
  """(verdict, counts) from an optimised HLO text, by instruction name."""
  ops = collections.Counter(re.findall(r" ([a-z][a-z0-9-]*)\(", hlo))  # " opcode("
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
  grouped = [t for t in targets if re.search("ragged|grouped", t, re.I)]
  if ops["ragged-dot"]:
    verdict = "yes: ragged-dot kept"
  elif grouped:
    verdict = f"yes: custom call {grouped[0]}"
  else:
    verdict = "no: no ragged-dot or grouped custom call left"
  calls = ", ".join(f"{t} x{n}" for t, n in targets.most_common(4)) or "none"
  counts = (
    f"ragged-dot {ops['ragged-dot']}, dot {ops['dot']}, while {ops['while']}, custom calls: {calls}"
  )
  return verdict, counts


def check_moe_layer(t: Table, s: dict):
  T, L, D, F, k = s["tokens"], s["seq"], s["d_model"], s["d_ff"], s["top_k"]
  dt = jnp.bfloat16
  x = jax.random.normal(jax.random.key(0), (T // L, L, D), dt)
  ct = jax.random.normal(jax.random.key(1), x.shape, dt)
  with nnx.use_eager_sharding(False):
    dense = moe_layer.grad_fn(layers.Mlp(D, k * F, "gelu", rngs=nnx.Rngs(0)))
  for E in s["experts"]:
    for dispatch in ("capacity", "dropless"):
      m = moe_layer.moe_model(E, k, dispatch, D, F, 1.25, "bfloat16", **IMPL)
      impl = policy.resolve(m.moe)
      how = impl.capacity_layout if dispatch == "capacity" else impl.grouped_kernel
      with nnx.use_eager_sharding(False):
        layer = layer_lib.MoeFfn(m, rngs=nnx.Rngs(0))
      fn, hlo = _compiled_fwd_bwd(layer, x, ct, train=True)
      calls = {"moe": (fn, (x, ct)), "dense": (dense, (x.reshape(T, D), ct.reshape(T, D)))}
      ms = moe_layer.bench(calls, s["reps"], warmup=1)
      case = f"E={E} k={k} {dispatch}/{how}, T={T} D={D} F={F} bf16"
      t.row(
        "MoE layer fwd+bwd",
        case,
        f"{ms['moe'] * 1e3:.2f} ms",
        f"dense FFN (hidden {k * F}) {ms['dense'] * 1e3:.2f} ms",
        f"{ms['moe'] / ms['dense']:.2f}x",
        "",
      )
      if dispatch == "dropless":
        verdict, counts = grouped_matmul(hlo)
        t.row("dropless -> grouped matmul?", f"E={E} {how}, optimised HLO", verdict, "", "", counts)


def check_decode(t: Table, s: dict):
  a = argparse.Namespace(**{k: v for k, v in s.items() if k not in ("batches", "reps")})
  a.dtype = "bfloat16"
  key = jax.random.key(1)
  kinds = ("moe", "dense-active", "dense-total")
  runs, sizes = {}, {}
  for kind in kinds:
    c = inference.model_config(a, kind)
    c.model.moe.impl.update(IMPL)
    m = decode.inference_spec(cfglib.model_spec(c))
    with nnx.use_eager_sharding(False):
      model = decode.for_inference(Transformer(m, a.vocab, rngs=nnx.Rngs(0)))
    st = inspectlib.summarize(c, a.vocab, model=model)
    sizes[kind] = (
      f"{inspectlib._num(st['total_params'])} total / {inspectlib._num(st['active_params'])} active"
    )
    for B in s["batches"]:
      prompts = jax.random.randint(key, (B, a.prompt_len), 3, a.vocab).tolist()
      runs[kind, B] = lambda model=model, prompts=prompts: decode.generate(
        model, prompts, max_new_tokens=a.decode_steps
      )
      runs[kind, B]()  # compiles
  rate = {k: [] for k in runs}
  for _ in range(s["reps"]):  # round-robin
    for k, fn in runs.items():
      rate[k].append(fn().tokens_per_s())
  rate = {k: statistics.median(v) for k, v in rate.items()}
  for B in s["batches"]:
    moe = rate["moe", B]
    act, tot = rate["dense-active", B], rate["dense-total", B]
    t.row(
      f"decode tokens/s, batch {B}",
      f"MoE top-1 of {a.experts} ({sizes['moe']}), {a.layers} layers, d_model {a.d_model}, "
      f"{a.prompt_len}-token prompts, {a.decode_steps} steps, bf16",
      f"{moe:,.0f}",
      f"dense-active {act:,.0f}; dense-total {tot:,.0f}",
      f"{moe / act:.2f}x; {moe / tot:.2f}x",
      f"dense-active {sizes['dense-active']}, dense-total {sizes['dense-total']}",
    )


def _train_config(s: dict, batch: int, microbatches: int):
  c = cfglib.load_config(s["config"])
  for key, value in s["sets"].items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.data.batch_size = batch
  c.model.moe.impl.update(IMPL)
  if "remat" in c.train:
    c.train.remat = "full"
  if "microbatches" in c.train:
    c.train.microbatches = microbatches
  if "scan_layers" in c.model:
    c.model.scan_layers = True  # one compiled body: a shorter compile
  return cfglib.validate(c)


def check_mfu(t: Table, s: dict, device, peak: float | None):
  """The config's batch in micro-batches of rows_per_micro rows, halved
  while the compiled step does not fit (then the batch, where there are no
  micro-batches), at most 3 compiles; the last choice is run."""
  B = s["sets"].get("data.batch_size") or cfglib.load_config(s["config"]).data.batch_size
  n = max(1, B // s["rows_per_micro"])
  limit = (device.memory_stats() or {}).get("bytes_limit")
  for attempt in range(3):  # at most 3 compiles (each a minute or so on a GPU)
    c = _train_config(s, B, n)
    mesh = sharding.make_mesh(c, [device])
    step, args = inspectlib.train_program(c, mesh)
    with sharding.use(mesh, c):
      stats = inspectlib.compiled_stats(step, args)
    if not limit or stats["total"] <= limit or attempt == 2:
      break  # (the last try runs anyway, and fails with the device's out-of-memory error)
    if "microbatches" in c.train and n < B:
      n *= 2  # half the rows per micro-batch
    else:
      B, n = max(1, B // 2), max(1, n // 2)
  V = statelib.vocab_size_of(c)
  state_shd = jax.tree.map(lambda a: a.sharding, args[0])
  batch_shd = args[1]["inputs"].sharding
  with sharding.use(mesh, c):
    state = jax.jit(lambda: nnx.state(statelib.create(c, V)), out_shardings=state_shd)()
    L = c.data.seq_len
    toks = np.random.default_rng(0).integers(3, V, (B, L + 1), dtype=np.int32)
    batch = {
      "inputs": jax.device_put(toks[:, :-1], batch_shd),
      "targets": jax.device_put(toks[:, 1:], batch_shd),
      "weights": jax.device_put(np.ones((B, L), np.float32), batch_shd),
    }
    run = stats["compiled"]
    state, meas = run(state, batch, jnp.int32(0))  # warm-up
    jax.block_until_ready(meas["loss"])
    times = []
    for i in range(s["steps"]):
      t0 = time.perf_counter()
      state, meas = run(state, batch, jnp.int32(i + 1))
      jax.block_until_ready(meas["loss"])
      times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  flops = inspectlib.summarize(c, V)["train_flops_per_token"] * B * L
  knobs = [f"remat={c.train.get('remat', 'n/a (no key)')}"]
  knobs.append(f"microbatches={c.train.get('microbatches', 'n/a (no key)')}")
  knobs.append(f"scan_layers={c.model.get('scan_layers', 'n/a (no key)')}")
  knobs.append(f"param_dtype={c.model.get('param_dtype', 'float32')}")
  mfu = f"{flops / sec / peak:.1%}" if peak else "n/a (no peak for this device)"
  t.row(
    "train step MFU",
    f"{s['config']} {', '.join(knobs)}, batch {B} x {L}, 1 device",
    mfu,
    f"peak {peak / 1e12:.0f} TFLOP/s bf16" if peak else "",
    "",
    f"step {sec:.3f} s (median of {s['steps']}), model FLOPs {flops:.3g}/step, "
    f"compiled {inspectlib._bytes(stats['total'])}/device of "
    f"{inspectlib._bytes(limit) if limit else 'no limit'}, compile {stats['seconds']:.0f} s, "
    f"loss {float(meas['loss']):.3f}",
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cpu", action="store_true", help="smoke mode: tiny shapes on the CPU")
  ap.add_argument("--out", default="gpu_check.md")
  ap.add_argument("--peak_tflops", type=float, default=0.0, help="override the device's peak")
  ap.add_argument(
    "--only", nargs="*", default=["moe", "mfu", "decode"], choices=["moe", "decode", "mfu"]
  )
  a = ap.parse_args()
  mode = "cpu" if a.cpu else "gpu"
  if a.cpu:
    jax.config.update("jax_platforms", "cpu")
    IMPL.update(
      policy.resolve(moe_layer.moe_model(8, 1, "dropless", 8, 8, 1.0).moe, "gpu")._asdict()
    )
  device = jax.devices()[0]
  if not a.cpu and device.platform == "cpu":
    sys.exit("gpu_check: no accelerator (jax.devices() is CPU); --cpu runs the smoke mode")
  kind = getattr(device, "device_kind", device.platform)
  peak = a.peak_tflops * 1e12 or next((v for k, v in PEAKS.items() if k in kind), None)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  t = Table(
    a.out,
    f"gpu_check ({mode} mode): {kind}, {jax.device_count()} device(s), jax {jax.__version__}, "
    f"{stamp}",
  )
  shapes = SHAPES[mode]
  checks = {
    "moe": lambda: check_moe_layer(t, shapes["moe"]),
    "decode": lambda: check_decode(t, shapes["decode"]),
    "mfu": lambda: check_mfu(t, shapes["train"], device, peak if not a.cpu else None),
  }
  failed = 0
  for name in a.only:
    t0 = time.perf_counter()
    try:
      checks[name]()
    except Exception as e:  # pylint: disable=broad-except  # a row says why; the others run
      failed += 1
      traceback.print_exc()
      t.row(name, "FAILED", "", "", "", " ".join(f"{type(e).__name__}: {e}".split())[:300])
    print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
