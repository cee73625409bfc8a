r"""Compile time of the train step: against depth (scanned or not), and the
README's table of XLA's bytes per device by config, mesh and remat policy.

  python benchmarks/compile_time.py            # mixtral.py:tiny at 4 and 32 layers, 1 device
  python benchmarks/compile_time.py --config=configs/mixtral.py:1b --layers 4 16 \
      --set train.remat=full
  python benchmarks/compile_time.py --table    # README, "From one CPU to a cluster"

The real train step (inspect.train_program: state.train_step jitted with the
trainer's shardings) for abstract arguments, on simulated CPU devices;
nothing is allocated. One run per point, in one process, JAX's persistent
compilation cache off.

Depth (the default): per point, trace + lower (Python: the model traced into
StableHLO) and XLA's compile, in seconds, after an untimed warm-up compile of
the first point (JAX's one-time costs). Unscanned, every layer is its own
copy in the program, so both grow with depth; scanned (model.scan_layers,
one body for all layers) they should not. Prints a markdown table and the
ratio of the deepest to the shallowest point.

--table: each of TABLE's cells (config, devices, --mesh, overrides; scanned)
under each of its --remat policies, through inspect.compile_rows (the train
step only): XLA's argument, temporary and total bytes per device and the
seconds the compile took (lowering included), a markdown row per cell as it
finishes, all cells of one policy before the next policy's.
"""

from __future__ import annotations

import argparse
import ast
import time

import jax

from sparse_lm import config as cfglib
from sparse_lm import inspect as inspectlib
from sparse_lm import sharding

# (config, devices, --mesh, overrides, remat policies): the README's cells,
# scanned (model.scan_layers: XLA:CPU drops the barriers that keep an unscanned
# block's recomputation apart from its forward, so there remat would show no
# saving; models/transformer.py). All four policies for the one-GPU model,
# none and full for the 64-device ones (each of those compiles for minutes).
ALL = ("none", "full", "dots", "moe")
TABLE = [
  ("configs/mixtral.py:1b", 1, "", {}, ALL),
  ("configs/mixtral.py:1b", 1, "", {"train.microbatches": 16}, ALL),
  ("configs/mixtral.py:1b", 8, "fsdp=8", {}, ALL),
  ("configs/mixtral.py:8x7b", 64, "fsdp=64", {}, ("none", "full")),
  ("configs/mixtral.py:8x7b", 64, "fsdp=8,expert=8", {}, ("none", "full")),
  ("configs/dbrx.py:132b", 64, "fsdp=64", {}, ("none", "full")),
  ("configs/dbrx.py:132b", 64, "fsdp=4,expert=16", {}, ("none", "full")),
]


def _set(c, key: str, value):
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value


def _parse(kv: str) -> tuple[str, object]:
  key, _, value = kv.partition("=")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value  # a bare string


def point(spec: str, layers: int, scan: bool | None, devices: int, sets: list[str]) -> dict:
  """Trace+lower and compile seconds of the train step of `spec` at `layers`."""
  c = cfglib.load_config(spec)
  c.model.num_layers = layers
  if scan is not None:
    c.model.scan_layers = scan
  for kv in sets:
    _set(c, *_parse(kv))
  c = cfglib.validate(c)
  mesh = inspectlib.cpu_mesh(c, devices)
  step, args = inspectlib.train_program(c, mesh)
  with sharding.use(mesh, c):
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  return {"lower": t1 - t0, "compile": t2 - t1, "temp": mem.temp_size_in_bytes}


def depth(a):
  has_scan = "scan_layers" in cfglib.base_config().model
  scans = {"both": [False, True], "on": [True], "off": [False]}[a.scan] if has_scan else [None]
  points = [(s, n) for s in scans for n in a.layers]
  point(a.config, points[0][1], points[0][0], a.devices, a.set)  # warm-up, not timed
  print(
    f"{a.config} {' '.join(a.set)} on {a.devices} CPU device(s), jax {jax.__version__}, "
    f"train step, one run each"
  )
  print("| layers | scan_layers | trace + lower s | XLA compile s | total s | temporaries |")
  print("|--:|---|--:|--:|--:|--:|")
  rows = {}
  for scan, n in points:
    r = rows[scan, n] = point(a.config, n, scan, a.devices, a.set)
    print(
      f"| {n} | {'n/a (no key)' if scan is None else scan} | {r['lower']:.1f} | "
      f"{r['compile']:.1f} | {r['lower'] + r['compile']:.1f} | "
      f"{inspectlib._bytes(r['temp'])} |",
      flush=True,
    )
  lo, hi = min(a.layers), max(a.layers)
  for scan in scans:
    t = lambda n, scan=scan: rows[scan, n]["lower"] + rows[scan, n]["compile"]
    print(f"scan_layers={scan}: {hi} layers / {lo} layers = {t(hi) / t(lo):.2f}x (total s)")


def table(a):
  print(f"jax {jax.__version__}, train step, scanned, XLA:CPU, bytes per device, one compile each")
  cols = "config | devices, mesh | remat | microbatches | arguments | temporaries | total"
  print(f"| {cols} | compile s |")
  print("|---|---|---|--:|--:|--:|--:|--:|")
  for remat in a.remat:
    for spec, n, mesh, sets, remats in TABLE:
      if remat not in remats:
        continue
      c = inspectlib.with_mesh(cfglib.load_config(spec), mesh)
      sets = {"model.scan_layers": True, **sets, "train.remat": remat, **dict(map(_parse, a.set))}
      missing = [k for k in sets if k.split(".")[-1] not in c[k.split(".")[0]]]
      if missing:
        print(f"| {spec} | {n}, {mesh} | {remat} | | n/a: no key {missing} | | | |", flush=True)
        continue
      for k, v in sets.items():
        _set(c, k, v)
      c = cfglib.validate(c)
      t0 = time.perf_counter()
      s = inspectlib.compile_rows(c, n, decode_step=False)["train"]
      secs = time.perf_counter() - t0
      b = inspectlib._bytes
      sizes = " ".join(f"{k}={v}" for k, v in sharding.mesh_sizes(c, n).items() if v > 1)
      print(
        f"| {spec} | {n}, {sizes or '1 device'} | {remat} | {c.train.get('microbatches', 1)} | "
        f"{b(s['arguments'])} | {b(s['temporaries'])} | {b(s['total'])} | {secs:.0f} |",
        flush=True,
      )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--table", action="store_true", help="the README's bytes table instead")
  ap.add_argument("--config", default="configs/mixtral.py:tiny")
  ap.add_argument("--layers", type=int, nargs="*", default=[4, 32])
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument(
    "--scan",
    default="both",
    choices=["both", "on", "off"],
    help="model.scan_layers values to time (both: off and on, where the config has the key)",
  )
  ap.add_argument("--remat", nargs="*", default=["none", "full", "dots", "moe"], help="--table")
  ap.add_argument("--only", nargs="*", default=[], help="--table: cells whose config has this")
  ap.add_argument("--set", nargs="*", default=[], help="config overrides, key=value")
  a = ap.parse_args()
  if a.only:
    TABLE[:] = [cell for cell in TABLE if any(o in cell[0] for o in a.only)]
  # Before JAX's first operation.
  inspectlib.simulate_devices(max(cell[1] for cell in TABLE) if a.table else a.devices)
  jax.config.update("jax_enable_compilation_cache", False)
  if a.table:
    table(a)
  else:
    depth(a)


if __name__ == "__main__":
  main()
