r"""A released checkpoint against transformers: import, compare, export (issue 28).

  pip install -e ".[hf_fixtures]"        # torch and transformers: this script only
  python benchmarks/verify_hf.py --hf_dir=~/hf/OLMoE-1B-7B-0924 [--workdir=runs/olmoe] \
      [--prompts=prompts.txt] [--dtype=float32] [--keep]

The step a user takes before trusting an import of a real model (peers do the
same: MaxText's KL check against the Hugging Face model). It

  1. imports --hf_dir into --workdir (python -m sparse_lm.convert import);
  2. runs both models over the same prompts (the README's by default, or a
     text file of one prompt per line): our model from the workdir (float32
     parameters, state.load_model on --mesh, fsdp by default) and
     transformers' AutoModelForCausalLM (torch, float32 on the CPU), with the
     checkpoint's own tokenizer;
  3. prints, per prompt and overall, the mean KL(transformers || ours) of the
     next-token distributions, the top-1 agreement and the largest logit
     difference;
  4. exports the workdir back (python -m sparse_lm.convert export) and checks
     every tensor equals the source's, bit for bit, in the source's dtype.

Exit status 1 if the mean KL exceeds --max_kl or a tensor differs. Needs
memory for both models at once in float32 (OLMoE-1B-7B: about 56 GB); run it
on a machine that has it. No released checkpoint is on this machine (no hub
access), so it has run on the tiny fixture only (torch and transformers
installed beside the venv, 2026-12-07): `--hf_dir=tests/fixtures/hf/olmoe
--mesh=one` gave mean KL 5e-9, top-1 agreement 1.0, max |dlogit| 3.5e-6,
and an export equal to the source in all 69 tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
  "def fib(n):",
  "The capital of France is",
  "import numpy as np\nx = np.arange(10)\nprint(",
  "Mixture-of-Experts models route each token to",
]


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def convert(*args: str):
  p = subprocess.run([sys.executable, "-m", "sparse_lm.convert", *args], cwd=ROOT)
  if p.returncode:
    sys.exit(f"sparse_lm.convert {args[0]} failed (exit {p.returncode})")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--hf_dir", required=True)
  ap.add_argument("--workdir", default=None, help="default: a temporary folder")
  ap.add_argument("--prompts", default=None, help="a text file, one prompt per line")
  ap.add_argument("--mesh", default="fsdp", help="where our model goes (generate's --mesh)")
  ap.add_argument("--max_kl", type=float, default=1e-3)
  ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
  args = ap.parse_args()
  # The reference is the plain PyTorch model: no kernels from the hub.
  os.environ.setdefault("USE_HUB_KERNELS", "0")
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  hf_dir = os.path.abspath(os.path.expanduser(args.hf_dir))
  tmp = tempfile.mkdtemp(prefix="verify_hf_")
  workdir = os.path.abspath(args.workdir or os.path.join(tmp, "run"))
  if not os.path.exists(os.path.join(workdir, "config.json")):
    convert("import", f"--hf_dir={hf_dir}", f"--workdir={workdir}", "--dtype=float32")
  prompts = PROMPTS
  if args.prompts:
    with open(args.prompts) as f:
      prompts = [line.rstrip("\n") for line in f if line.strip()]

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from sparse_lm import checkpoint as ckptlib  # pylint: disable=g-import-not-at-top
  from sparse_lm import sharding  # pylint: disable=g-import-not-at-top
  from sparse_lm import state as statelib  # pylint: disable=g-import-not-at-top

  c, mesh = statelib.mesh_for_use(ckptlib.read_config(workdir), args.mesh)
  model, c, tok = statelib.load_model(workdir, mesh=mesh, config=c)
  ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)

  kls, agree, worst = [], [], 0.0
  for prompt in prompts:
    ids = hf_tok(prompt, return_tensors="np")["input_ids"][0]
    if list(tok.encode(prompt)) != list(ids):
      print(f"note: the tokenizers split {prompt!r} differently; comparing on transformers' ids")
    with torch.no_grad():
      want = ref(torch.tensor(ids[None])).logits[0].float().numpy()
    with sharding.use(mesh, c) if mesh is not None else contextlib.nullcontext():
      got = np.asarray(model(jnp.asarray(ids[None])).logits[0], np.float32)
    p, q = log_softmax(want), log_softmax(got)
    kl = (np.exp(p) * (p - q)).sum(-1)
    kls.append(kl.mean())
    agree.append((want.argmax(-1) == got.argmax(-1)).mean())
    worst = max(worst, float(np.abs(want - got).max()))
    diff = np.abs(want - got).max()
    print(f"{prompt[:40]!r:44} KL {kl.mean():.2e}  top-1 {agree[-1]:.3f}  max |dlogit| {diff:.2e}")
  mean_kl = float(np.mean(kls))
  print(f"\nmean KL {mean_kl:.2e}, top-1 agreement {np.mean(agree):.4f}, max |dlogit| {worst:.2e}")

  out = os.path.join(tmp, "export")
  convert("export", f"--workdir={workdir}", f"--hf_dir={out}")
  from sparse_lm.convert.safetensors_io import Tensors  # pylint: disable=g-import-not-at-top

  a, b = Tensors(hf_dir), Tensors(out)
  differ = [n for n in b.names() if n not in a or not np.array_equal(a.get(n), b.get(n))]
  missing = [n for n in a.names() if n not in b and not n.endswith("rotary_emb.inv_freq")]
  print(f"export: {len(b.names())} tensors, {len(differ)} differ, {len(missing)} missing")
  if not args.keep:
    import shutil  # pylint: disable=g-import-not-at-top

    shutil.rmtree(tmp, ignore_errors=True)
  if mean_kl > args.max_kl or differ or missing:
    sys.exit(1)


if __name__ == "__main__":
  main()
