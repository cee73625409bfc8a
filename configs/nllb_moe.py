r"""NLLB-200 MoE (NLLB Team 2022): top-2 of 128 experts in every 4th layer, Expert Output Masking.

  python -m sparse_lm.main --config=configs/nllb_moe.py:tiny --workdir=runs/nllb_moe
  python -m sparse_lm.inspect --config=configs/nllb_moe.py:54b

NLLB-200 is an encoder-decoder translation model; these are decoder-only LMs
with its MoE layer. The MoE layers are 3, 7, 11, ... (every=4, offset=3, as
fairseq's moe_freq=4). Routing as in the released 54.5B checkpoint's config:
top-2 with gates renormalised, second_expert_policy "all"
(--config.model.moe.second_expert_policy=sampling for fairseq's sampled second
expert), and Expert Output Masking at rate 0.2 (a token's routed output is
dropped with probability 0.2 in training). Load-balance weight 1e-2 (fairseq's
gate-loss weight); no router jitter or z-loss.

Variants (the string after ':'):
  tiny  CPU, embedded corpus, a few minutes: dense tiny's dims in 4 layers,
        layer 3's FFN top-2 of 8 experts.
  54b   NLLB-200 MoE 54.5B's layer dims (d_model 2048, 16 heads, ReLU FFN 8192,
        128 experts, 256K vocabulary, tied embeddings) with its 24 encoder and
        24 decoder layers stacked as one 48-layer decoder: 12 MoE layers and the
        same parameter count less the decoder's cross-attention (54.0B vs 54.5B).
"""

from sparse_lm import config as cfglib

VARIANTS = {  # name: (d_model, layers, heads, d_ff, experts, vocab, batch, seq_len)
  "tiny": (128, 4, 4, 512, 8, 2048, 16, 128),
  "54b": (2048, 48, 16, 8192, 128, 256_206, 512, 1024),
}


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/nllb_moe.py", VARIANTS, arg)
  d, n, h, f, e, v, b, l = VARIANTS[arg]
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = d, n, h, f
  m.activation, m.norm = "relu", "layer"
  m.tie_embeddings = True
  c.data.vocab_size, c.data.batch_size, c.data.seq_len = v, b, l

  moe = m.moe
  moe.num_experts, moe.top_k, moe.router = e, 2, "topk"
  moe.normalize_gates = True
  moe.second_expert_policy = "all"
  moe.every, moe.offset = 4, 3
  moe.eom_rate = 0.2
  moe.dispatch = "capacity"
  moe.capacity_factor, moe.eval_capacity_factor = 1.25, 2.0
  moe.load_balance_weight = 1e-2
  moe.load_balance_choices = "first"  # fairseq's top-2 gate: ce counts first choices
  moe.z_loss_weight = 0.0

  if arg != "tiny":
    m.dropout = 0.1
    cfglib.accelerator_training(c, learning_rate=1e-3, fsdp=True)
  return c
