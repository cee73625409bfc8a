r"""GPT-OSS (OpenAI 2025, gpt-oss-20b / gpt-oss-120b): top-4 of 32 / 128 experts in every layer.

  python -m sparse_lm.main --config=configs/gpt_oss.py:tiny --workdir=runs/gpt_oss
  python -m sparse_lm.inspect --config=configs/gpt_oss.py:20b
  python -m sparse_lm.convert import --hf_dir=~/hf/gpt-oss-20b --workdir=runs/gpt_oss_20b

What sets it apart (model card, section 2; transformers' modeling_gpt_oss.py):
attention alternates a 128-token sliding window with full attention layer by
layer (model.layer_types), each head has a learned sink logit in its softmax
denominator (model.attn_sinks), q / k / v / o, the router and the experts have
biases, the experts' SwiGLU is clamped (model.swiglu_limit 7, alpha 1.702,
(up + 1) * gate * sigmoid(alpha * gate)), RoPE is yarn-scaled 32x from a 4096
context (model.rope_scaling), router: softmax over the top-4 biased logits.
Grouped-query attention: 64 query heads of 64, 8 kv heads; vocabulary
201,088 (o200k_harmony); embeddings untied.

Variants (the string after ':'):
  tiny   CPU, embedded corpus, a few minutes: d_model 64, 4 layers (sliding
         window 16 / full), 4 heads (2 kv) of 16, top-2 of 4 experts of 64.
  20b    gpt-oss-20b: 24 layers, 32 experts of 2880: 20.91B total / 3.61B
         active parameters (the model card's count leaves out the input
         embedding: inspect's "active params less the input embedding").
  120b   gpt-oss-120b: 36 layers, 128 experts: 116.83B total / 5.13B active.
"""

import ml_collections as mlc

from sparse_lm import config as cfglib

VARIANTS = {  # name: (d_model, layers, heads, kv_heads, head_dim, experts, top_k, window, vocab)
  "tiny": (64, 4, 4, 2, 16, 4, 2, 16, 2048),
  "20b": (2880, 24, 64, 8, 64, 32, 4, 128, 201_088),
  "120b": (2880, 36, 64, 8, 64, 128, 4, 128, 201_088),
}


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/gpt_oss.py", VARIANTS, arg)
  d, n, h, kv, z, e, k, w, v = VARIANTS[arg]
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = d, n, h, kv, z
  m.d_ff = d  # intermediate_size = hidden_size (2880) in both released models
  m.activation, m.swiglu_alpha, m.swiglu_limit = "swiglu_clamped", 1.702, 7.0
  m.norm, m.norm_eps = "rms", 1e-5
  m.position, m.rope_theta = "rope", 150_000.0
  m.rope_scaling = mlc.ConfigDict(
    dict(
      rope_type="yarn",
      factor=32.0,
      beta_fast=32.0,
      beta_slow=1.0,
      truncate=False,
      original_max_position_embeddings=4096,
    )
  )
  m.qkv_bias = m.attn_out_bias = m.attn_sinks = True
  m.sliding_window = w
  m.layer_types = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))
  m.tie_embeddings = False
  c.data.vocab_size = v
  c.data.batch_size, c.data.seq_len = (16, 128) if arg == "tiny" else (256, 4096)

  moe = m.moe
  moe.num_experts, moe.top_k, moe.router = e, k, "mixtral"
  moe.every, moe.offset = 1, 0
  moe.router_logit_bias = moe.expert_bias = True
  moe.dispatch = "dropless"
  moe.load_balance_weight = 1e-3 * k / n  # router_aux_loss_coef 0.001 (families/shared.py)
  moe.z_loss_weight = 0.0

  if arg != "tiny":
    cfglib.accelerator_training(c, learning_rate=3e-4, fsdp=True)
  return c
