r"""Switch Transformer (Fedus et al. 2021): top-1 routing, capacity factor, load-balance loss.

  python -m sparse_lm.main --config=configs/switch.py:tiny --workdir=runs/switch
  python -m sparse_lm.inspect --config=configs/switch.py:base --compare=configs/dense.py:base

Variants (the string after ':'):
  tiny   CPU, embedded corpus, a few minutes: dense tiny's dims (configs/dense.py:tiny)
         with 8 experts in the FFN of layer 1 of 2. 300 steps.
  base   Switch-Base dims (d_model 768, 12 layers, 12 heads, d_ff 3072, 128 experts):
         the MoE twin of configs/dense.py:base (same data, schedule and FLOPs per token).
  large  Switch-Large dims (d_model 1024, 24 layers, 16 heads, d_ff 4096, 128 experts).

The paper's models are T5 encoder-decoders; these are decoder-only LMs with the
Switch layer's settings, so "base" has about half the paper's parameters
(one stack instead of two). The FFN keeps dense.py's GELU so that Switch and
dense curves differ only in the MoE layers. Router z-loss is off (0): it came
later, with ST-MoE (Zoph et al. 2022); turn it on with
--config.model.moe.z_loss_weight=1e-3.
"""

from sparse_lm import config as cfglib

VARIANTS = {  # name: (d_model, layers, heads, d_ff, experts, batch, seq_len)
  "tiny": (128, 2, 4, 512, 8, 16, 128),
  "base": (768, 12, 12, 3072, 128, 256, 1024),
  "large": (1024, 24, 16, 4096, 128, 256, 1024),
}


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/switch.py", VARIANTS, arg)
  d, n, h, f, e, b, l = VARIANTS[arg]
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = d, n, h, f
  c.data.batch_size, c.data.seq_len = b, l

  moe = m.moe
  moe.num_experts, moe.top_k, moe.router = e, 1, "switch"
  moe.every, moe.offset = 2, 1  # MoE in every other layer: 1, 3, 5, ...
  moe.dispatch = "capacity"
  moe.capacity_factor, moe.eval_capacity_factor = 1.25, 2.0
  moe.jitter = 1e-2  # multiplicative router-input noise, training only
  m.init_scale = 0.1  # the paper's reduced init (section 2.4): s=0.1 for every weight matrix
  moe.load_balance_weight = 1e-2
  moe.z_loss_weight = 0.0

  if arg != "tiny":
    c.data.vocab_size = 32_000
    cfglib.accelerator_training(c, learning_rate=1e-3)
  return c
