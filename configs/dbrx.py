r"""DBRX (Databricks 2024): fine-grained MoE, 4 of 16 GLU experts in every layer, no token dropping.

  python -m sparse_lm.main --config=configs/dbrx.py:tiny --workdir=runs/dbrx
  python -m sparse_lm.inspect --config=configs/dbrx.py:132b --compare=configs/mixtral.py:8x7b

Routing is Mixtral's (router "mixtral": the top-4 gates renormalised to sum 1);
experts are SwiGLU; attention is grouped-query (8 kv heads) with RoPE at theta
5e5; LayerNorm; separate input and output embeddings; dropless dispatch.

Variants (the string after ':'):
  tiny  CPU, embedded corpus, a few minutes: d_model 128, 2 layers, 4 heads (2 kv),
        top-4 of 16 experts of 128 (active FFN width 512, as dense tiny).
  132b  DBRX: d_model 6144, 40 layers, 48 heads (8 kv) of 128, experts of 10752,
        vocabulary 100352: 132B total / 36B active parameters.
"""

from sparse_lm import config as cfglib

VARIANTS = {  # name: (d_model, layers, heads, kv_heads, expert d_ff, vocab, batch, seq_len)
  "tiny": (128, 2, 4, 2, 128, 2048, 16, 128),
  "132b": (6144, 40, 48, 8, 10752, 100_352, 512, 4096),
}


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/dbrx.py", VARIANTS, arg)
  d, n, h, kv, f, v, b, l = VARIANTS[arg]
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.d_ff = d, n, h, kv, f
  m.activation, m.norm, m.norm_eps = "swiglu", "layer", 1e-5
  m.position, m.rope_theta = "rope", 5e5
  m.tie_embeddings = False
  c.data.vocab_size, c.data.batch_size, c.data.seq_len = v, b, l

  moe = m.moe
  moe.num_experts, moe.top_k, moe.router = 16, 4, "mixtral"
  moe.every, moe.offset = 1, 0
  moe.dispatch = "dropless"
  moe.load_balance_weight = 5e-2  # DBRX's moe_loss_weight
  moe.z_loss_weight = 0.0

  if arg != "tiny":
    cfglib.accelerator_training(c, learning_rate=3e-4, fsdp=True)
  return c
