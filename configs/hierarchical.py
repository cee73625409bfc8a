r"""Hierarchical MoE (Shazeer et al. 2017): a noisy top-k gate over groups, then one in the group.

  python -m sparse_lm.main --config=configs/hierarchical.py:tiny --workdir=runs/hierarchical
  python -m sparse_lm.inspect --config=configs/hierarchical.py:4096h

A token goes to top_k_groups (k1) of num_groups (a) groups by the primary gate,
and within each chosen group to top_k (k2) of its E / a experts by that group's
secondary gate; its gate is the product of the two. Both levels use noisy top-k
gating in training and the paper's importance and load losses (weight 0.1 each,
model.moe.importance_weight); the Switch-style load-balance loss is off.

Variants (the string after ':'):
  tiny   CPU, embedded corpus, a few minutes: dense tiny's dims, 16 experts as
         4 groups of 4, k1=2, k2=1 (2 experts a token).
  4096h  The paper's largest hierarchical layer on its 1B-word LM (MoE-4096-h):
         4096 experts as 64 groups of 64, k1=k2=2, each expert a ReLU FFN
         512 -> 1024 -> 512. The paper put one such layer between two LSTM
         layers; here it is the FFN of layer 4 of an 8-layer, d_model 512
         decoder-only Transformer (every=8, offset=4): 4.3B expert parameters.
"""

from sparse_lm import config as cfglib

VARIANTS = {  # name: (d_model, layers, heads, d_ff, experts, groups, k1, k2, expert d_ff,
  #        batch, seq_len)
  "tiny": (128, 2, 4, 512, 16, 4, 2, 1, 512, 16, 128),
  "4096h": (512, 8, 8, 2048, 4096, 64, 2, 2, 1024, 256, 256),
}


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/hierarchical.py", VARIANTS, arg)
  d, n, h, f, e, groups, k1, k2, ef, b, l = VARIANTS[arg]
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = d, n, h, f
  c.data.batch_size, c.data.seq_len = b, l

  moe = m.moe
  moe.router = "hierarchical"
  moe.num_experts, moe.num_groups = e, groups
  moe.top_k_groups, moe.top_k = k1, k2
  moe.d_ff, moe.activation = ef, "relu"
  moe.noisy_gating = True
  moe.normalize_gates = True  # softmax over the kept top-k logits, as in the paper
  moe.importance_weight = 0.1
  moe.load_balance_weight = 0.0
  moe.z_loss_weight = 0.0
  moe.every, moe.offset = (2, 1) if arg == "tiny" else (n, n // 2)
  moe.dispatch = "capacity"
  moe.capacity_factor, moe.eval_capacity_factor = 1.25, 2.0

  if arg != "tiny":
    c.data.vocab_size = 32_000
    cfglib.accelerator_training(c, learning_rate=1e-3, fsdp=True)
  return c
