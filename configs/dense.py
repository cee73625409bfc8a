r"""Dense Transformer LM: the baseline every MoE curve is measured against.

  python -m sparse_lm.main --config=configs/dense.py:tiny --workdir=runs/dense

Variants (the string after ':'): tiny (CPU, embedded corpus, minutes),
small, base (accelerators). Any key can be overridden: --config.model.d_model=256.
"""

from sparse_lm import config as cfglib

VARIANTS = {  # name: (d_model, layers, heads, d_ff, batch, seq_len)
  "tiny": (128, 2, 4, 512, 16, 128),
  "small": (512, 8, 8, 2048, 128, 512),
  "base": (768, 12, 12, 3072, 256, 1024),
}


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/dense.py", VARIANTS, arg)
  d, n, h, f, b, l = VARIANTS[arg]
  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.d_ff = d, n, h, f
  c.data.batch_size, c.data.seq_len = b, l
  if arg != "tiny":
    c.data.vocab_size = 32_000
    cfglib.accelerator_training(c, learning_rate=1e-3)
  return c
