r"""Host memory of importing and exporting a real-sized checkpoint (issue 28).

  python benchmarks/convert_memory.py                 # ~2 GB Mixtral-shaped, bfloat16
  python benchmarks/convert_memory.py --layers 2      # a quick one (~0.6 GB)

Makes a Mixtral-shaped Hugging Face folder of random bfloat16 tensors (the
per-expert hub layout, several safetensors shards and their index, written
with safetensors.numpy: no torch), then in child processes, each measured
by its peak resident set (getrusage of the children):
  baseline  python -c "import sparse_lm.convert" (the interpreter, JAX, Orbax)
  import    python -m sparse_lm.convert import (parameters only, bfloat16)
  export    python -m sparse_lm.convert export (bfloat16, --shard_mb)
and checks that the export holds the source's tensors bit for bit. Prints a
markdown table: measured peaks above the baseline beside what `inspect`
predicts for the same config (inspect.import_host_bytes / export_host_bytes),
the largest tensor, and the checkpoint's size on disk against the
parameters' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

ENV = dict(os.environ)  # before sparse_lm's imports (TensorFlow sets variables)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "mixtral")


def hf_config(args) -> dict:
  """Mixtral-8x7B's config.json (tests/fixtures/released) at a smaller width and depth."""
  return {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": args.d_model,
    "intermediate_size": args.d_ff,
    "num_hidden_layers": args.layers,
    "num_attention_heads": args.d_model // 128,
    "num_key_value_heads": max(args.d_model // 512, 1),
    "head_dim": 128,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": args.vocab,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
  }


def tensors(h: dict):
  """(name, shape) of the per-expert hub layout (torch Linear: [out, in])."""
  D, F, V, hd = h["hidden_size"], h["intermediate_size"], h["vocab_size"], h["head_dim"]
  q, kv = h["num_attention_heads"] * hd, h["num_key_value_heads"] * hd
  yield "model.embed_tokens.weight", (V, D)
  for i in range(h["num_hidden_layers"]):
    p = f"model.layers.{i}"
    yield f"{p}.input_layernorm.weight", (D,)
    yield f"{p}.post_attention_layernorm.weight", (D,)
    for n, shape in (("q", (q, D)), ("k", (kv, D)), ("v", (kv, D)), ("o", (D, q))):
      yield f"{p}.self_attn.{n}_proj.weight", shape
    yield f"{p}.block_sparse_moe.gate.weight", (h["num_local_experts"], D)
    for j in range(h["num_local_experts"]):
      for n, shape in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F))):
        yield f"{p}.block_sparse_moe.experts.{j}.{n}.weight", shape
  yield "model.norm.weight", (D,)
  yield "lm_head.weight", (V, D)


def make_checkpoint(out: str, h: dict, shard_mb: int) -> int:
  """Writes config.json, the shards, the index and the fixture's tokenizer;
  returns the tensors' bytes."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  os.makedirs(out)
  rng = np.random.default_rng(0)
  shards, cur, size, total = [], {}, 0, 0
  for name, shape in tensors(h):
    a = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    if cur and size + a.nbytes > shard_mb * 2**20:
      shards.append(cur)
      cur, size = {}, 0
    cur[name], size, total = a, size + a.nbytes, total + a.nbytes
  shards.append(cur)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, fname))
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(h, f, indent=1)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(FIXTURE, name), os.path.join(out, name))
  return total


# Runs a module (or code) as __main__ and, at exit, writes its own peak RSS:
# VmHWM, this process image's high-water mark (getrusage's ru_maxrss would
# carry the forking parent's size over the exec).
_WRAP = """
import atexit, runpy, sys
out = sys.argv.pop(1)
hwm = lambda: open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
atexit.register(lambda: open(out, "w").write(hwm()))
if sys.argv[1] == "-c":
  exec(sys.argv[2])
else:
  sys.argv = sys.argv[1:]
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def peak_of(argv: list[str], work: str) -> tuple[float, float]:
  """(peak RSS in bytes, seconds) of `python argv...` in a child process
  (`-m module args` or `-c code`); exits on its failure."""
  out = os.path.join(work, "peak.txt")
  if os.path.exists(out):
    os.remove(out)
  env = {**ENV, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  t0 = time.time()
  argv = argv[1:] if argv[0] == "-m" else argv
  p = subprocess.run(
    [sys.executable, "-c", _WRAP, out, *argv], env=env, capture_output=True, text=True
  )
  if p.returncode or not os.path.exists(out):
    sys.exit(f"{' '.join(argv[:3])} failed:\n{p.stderr[-3000:]}")
  with open(out) as f:
    return int(f.read()) * 1024.0, time.time() - t0  # VmHWM: kB


def same_tensors(a_dir: str, b_dir: str) -> int:
  """The number of tensors, after checking both folders hold the same names
  with the same bytes (read one tensor at a time)."""
  from sparse_lm.convert.safetensors_io import Tensors  # pylint: disable=g-import-not-at-top

  a, b = Tensors(a_dir), Tensors(b_dir)
  if a.names() != b.names():
    sys.exit(f"the export's tensors are not the source's: {set(a.names()) ^ set(b.names())}")
  for n in a.names():
    x, y = a.get(n), b.get(n)
    if (
      x.dtype != y.dtype
      or x.shape != y.shape
      or not np.array_equal(x.view(np.uint16), y.view(np.uint16))
    ):
      sys.exit(f"tensor {n} differs after the round trip")
  return len(a.names())


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--d_model", type=int, default=1024)
  ap.add_argument("--d_ff", type=int, default=3584)
  ap.add_argument("--layers", type=int, default=10)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--shard_mb", type=int, default=500, help="source and export shard size")
  ap.add_argument("--keep", default=None, help="work in this folder and keep it")
  args = ap.parse_args()

  from sparse_lm import inspect as inspectlib  # pylint: disable=g-import-not-at-top
  from sparse_lm import state as statelib  # pylint: disable=g-import-not-at-top
  from sparse_lm.convert import importer  # pylint: disable=g-import-not-at-top

  work = args.keep or tempfile.mkdtemp(prefix="convert_memory_")
  src, wd, out = (os.path.join(work, n) for n in ("hf", "run", "export"))
  h = hf_config(args)
  t0 = time.time()
  total = make_checkpoint(src, h, args.shard_mb)
  largest = max(int(np.prod(s)) for _, s in tensors(h)) * 2
  print(f"source: {total / 2**30:.2f} GiB of bfloat16 in {src} ({time.time() - t0:.0f} s)")

  _, c = importer.hf_to_config(src)
  model = statelib.abstract_model(c, c.data.vocab_size)
  predicted_import = inspectlib.import_host_bytes(c, model, source_bytes=2, written_bytes=2)
  predicted_export = inspectlib.export_host_bytes(c, model, stored_bytes=2, out_bytes=2)

  base, _ = peak_of(
    ["-c", "import sparse_lm.convert, jax; jax.numpy.zeros(1).block_until_ready()"], work
  )
  imp, imp_s = peak_of(
    ["-m", "sparse_lm.convert", "import", f"--hf_dir={src}", f"--workdir={wd}"], work
  )
  export = ["export", f"--workdir={wd}", f"--hf_dir={out}", f"--shard_mb={args.shard_mb}"]
  exp, exp_s = peak_of(["-m", "sparse_lm.convert", *export], work)
  n = same_tensors(src, out)
  state_dir = os.path.join(wd, "checkpoints", "0", "state")
  on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(state_dir) for f in fs)
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  print(
    f"\n{total / 2**30:.2f} GiB Mixtral-shaped bfloat16 checkpoint (d_model {args.d_model}, "
    f"d_ff {args.d_ff}, {args.layers} layers, 8 experts, vocab {args.vocab}); largest tensor "
    f"{gib(largest)}; round trip bit-exact over {n} tensors; shards of {args.shard_mb} MiB.\n"
  )
  print("| step | peak RSS | above the baseline | / largest tensor | inspect predicts | seconds |")
  print("|---|--:|--:|--:|--:|--:|")
  print(f"| interpreter baseline | {gib(base)} | | | | |")
  rows = (("import", imp, predicted_import, imp_s), ("export", exp, predicted_export, exp_s))
  for name, peak, predicted, secs in rows:
    above = peak - base
    print(
      f"| {name} | {gib(peak)} | {gib(above)} | {above / largest:.2f}x | {gib(predicted)} "
      f"| {secs:.0f} |"
    )
  print(
    f"\nparameters-only checkpoint: {gib(on_disk)} on disk for {gib(total)} of parameters "
    f"({on_disk / total:.3f}x)"
  )
  over = [name for name, peak, predicted, _ in rows if peak - base > predicted]
  if over:  # inspect's figure is an upper bound: a peak above it is a failure here
    sys.exit(f"measured above inspect's bound: {', '.join(over)}")
  if not args.keep:
    shutil.rmtree(work)


if __name__ == "__main__":
  main()
