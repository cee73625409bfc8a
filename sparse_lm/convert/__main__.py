"""python -m sparse_lm.convert import|export: the command line (flags are
defined here only, so importing the package defines none)."""

import ast

from absl import flags

from sparse_lm import cli
from sparse_lm.convert import FAMILIES
from sparse_lm.convert import export_checkpoint
from sparse_lm.convert import import_checkpoint
from sparse_lm.errors import UserError

flags.DEFINE_string("hf_dir", None, "The Hugging Face checkpoint folder (read or written).")
flags.DEFINE_string("workdir", None, "The run folder (written by import, read by export).")
flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest).")
flags.DEFINE_string(
  "family",
  None,
  "export: " + " | ".join(FAMILIES) + " (default: the imported one, else mixtral; "
  "switch_transformers for an encoder-decoder run, nllb_moe for one with sinusoidal "
  "positions).",
)
flags.DEFINE_enum(
  "dtype",
  None,
  ["float32", "bfloat16", "float16"],
  "The tensors' dtype on disk. import: default the checkpoint's own (config.json's "
  "torch_dtype); export: default the source's for an imported run, else float32.",
)
flags.DEFINE_integer("shard_mb", 2000, "export: the largest shard file, in MiB.")
flags.DEFINE_string(
  "mesh",
  None,
  "import: the run's config.mesh (config.mesh syntax); the parameters are written from host "
  "memory whatever it is. export: where each parameter is read before it is gathered to the "
  "host: fsdp (all devices), one (the first device) or a config.mesh tuple; default: read "
  "whole into host memory, no accelerator used.",
)

cli.define_distributed_flags()  # import / export on several processes


def main(argv):
  cli.init_distributed()
  if len(argv) != 2 or argv[1] not in ("import", "export"):
    raise UserError("usage: python -m sparse_lm.convert import|export --hf_dir=DIR --workdir=W")
  F = flags.FLAGS
  for name in ("hf_dir", "workdir"):
    if not F[name].value:
      raise UserError(f"--{name} is required")
  if argv[1] == "import":
    mesh = ast.literal_eval(F.mesh) if F.mesh else None
    out = import_checkpoint(F.hf_dir, F.workdir, mesh, F.dtype)
    print(
      f"imported {out['family']} ({out['layout']} experts, {out['params']:,} parameters, "
      f"{out['bytes'] / 2**20:.1f} MiB of {out['dtype']}) from {F.hf_dir} into {F.workdir}"
    )
  else:
    out = export_checkpoint(
      F.workdir, F.hf_dir, F.step, F.family, F.dtype, F.shard_mb, mesh=F.mesh or None
    )
    if "tensors" in out:  # process 0's (the one that wrote the files)
      print(
        f"exported {out['tensors']} tensors ({out['bytes'] / 2**20:.1f} MiB, {out['shards']} "
        f"shard(s)) as {out['family']} into {F.hf_dir}"
      )


if __name__ == "__main__":
  cli.run(main, "sparse_lm.convert", config_flags=())
