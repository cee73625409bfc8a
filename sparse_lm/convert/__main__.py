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
  "export: " + " | ".join(FAMILIES) + " (default: the imported one, else mixtral).",
)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "export: the tensors' dtype.")
flags.DEFINE_integer("shard_mb", 2000, "export: the largest shard file, in MiB.")
flags.DEFINE_string("mesh", None, "import: place the parameters on this mesh (config.mesh syntax).")


def main(argv):
  if len(argv) != 2 or argv[1] not in ("import", "export"):
    raise UserError("usage: python -m sparse_lm.convert import|export --hf_dir=DIR --workdir=W")
  F = flags.FLAGS
  for name in ("hf_dir", "workdir"):
    if not F[name].value:
      raise UserError(f"--{name} is required")
  if argv[1] == "import":
    mesh = ast.literal_eval(F.mesh) if F.mesh else None
    out = import_checkpoint(F.hf_dir, F.workdir, mesh)
    print(
      f"imported {out['family']} ({out['layout']} experts, {out['params']:,} parameters) "
      f"from {F.hf_dir} into {F.workdir}"
    )
  else:
    out = export_checkpoint(F.workdir, F.hf_dir, F.step, F.family, F.dtype, F.shard_mb)
    print(
      f"exported {out['tensors']} tensors ({out['bytes'] / 2**20:.1f} MiB, {out['shards']} "
      f"shard(s)) as {out['family']} into {F.hf_dir}"
    )


if __name__ == "__main__":
  cli.run(main, "sparse_lm.convert", config_flags=())
