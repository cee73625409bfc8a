r"""Mixtral (Jiang et al. 2024): softmax over the top-2 of 8 router logits in every layer, dropless.

  python -m sparse_lm.main --config=configs/mixtral.py:tiny --workdir=runs/mixtral
  python -m sparse_lm.inspect --config=configs/mixtral.py:8x7b --compare=configs/dense.py:base

Every layer's FFN is an MoE of SwiGLU experts; attention is grouped-query
(8 kv heads) with RoPE at theta 1e6; input and output embeddings are separate;
dispatch is dropless (no capacity, no dropped tokens).

Variants (the string after ':'):
  tiny  CPU, embedded corpus, a few minutes: d_model 128, 2 layers, 4 heads
        (2 kv heads), top-2 of 8 SwiGLU experts of 448 (3.5 x d_model, as 8x7B).
  1b    A ~1B-active Mixtral: d_model 2048, 16 layers, 16 heads (8 kv) of
        128, top-2 of 8 experts of 4096, vocabulary 32000, sequences of 2048,
        batch 128 (262K tokens): 3.55B total / 1.14B active parameters (1.01B
        without the embeddings). One 80 GB GPU takes it with train.remat=full,
        model.scan_layers=True, train.microbatches=32 and
        model.param_dtype=bfloat16 (README, "From one CPU to a cluster").
  8x7b  Mixtral 8x7B: d_model 4096, 32 layers, 32 heads (8 kv) of 128, experts
        of 14336, vocabulary 32000: 46.7B total / 12.9B active parameters.
"""

from sparse_lm import config as cfglib

VARIANTS = {  # name: (d_model, layers, heads, kv_heads, d_ff, vocab, batch, seq_len)
  "tiny": (128, 2, 4, 2, 448, 2048, 16, 128),
  "1b": (2048, 16, 16, 8, 4096, 32_000, 128, 2048),
  "8x7b": (4096, 32, 32, 8, 14336, 32_000, 512, 4096),
}


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/mixtral.py", VARIANTS, arg)
  d, n, h, kv, f, v, b, l = VARIANTS[arg]
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.d_ff = d, n, h, kv, f
  m.activation, m.norm, m.norm_eps = "swiglu", "rms", 1e-5
  m.position, m.rope_theta = "rope", 1e6
  m.tie_embeddings = False
  c.data.vocab_size, c.data.batch_size, c.data.seq_len = v, b, l

  moe = m.moe
  moe.num_experts, moe.top_k, moe.router = 8, 2, "mixtral"
  moe.every, moe.offset = 1, 0
  moe.dispatch = "dropless"
  moe.load_balance_weight = 2e-2  # Hugging Face's router_aux_loss_coef for Mixtral
  moe.z_loss_weight = 0.0

  if arg != "tiny":
    cfglib.accelerator_training(c, learning_rate=3e-4, fsdp=True)
  return c
