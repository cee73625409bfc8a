r"""DeepSeek-V3 (DeepSeek-AI 2024, arXiv 2412.19437): multi-head latent
attention, 256 routed experts (top-8, node-limited) + 1 shared, first 3 layers dense.

  python -m sparse_lm.main --config=configs/deepseek_v3.py:tiny --workdir=runs/deepseek_v3
  python -m sparse_lm.inspect --config=configs/deepseek_v3.py:671b
  python -m sparse_lm.inspect --config=configs/deepseek_v3.py:1b

What sets it apart (section 2.1; transformers' modeling_deepseek_v3.py):
multi-head latent attention (model.attention="mla": queries through a 1536
bottleneck, keys and values from a 512 latent, one 64-wide RoPE key shared
by the 128 heads; the cache holds 576 values per token and layer),
sigmoid routing with the aux-loss-free bias, restricted to 4 of 8 expert
groups (router "group_limited"), gates renormalised then times 2.5
(model.moe.routed_scaling_factor), yarn RoPE 40x from 4096 with DeepSeek's
mscale on the softmax scale, interleaved RoPE pairs as the released weights.
Multi-token prediction (section 2.2): model.mtp_depth=1 MTP module (its own
MoE block, as the release's layer 61) trained with weight
model.mtp_loss_weight=0.3 (the paper's first 10T tokens; 0.1 after);
inspect counts it apart (mtp_params): the 671B / 37B are the main model's,
as the paper's leave out the MTP module.

Variants (the string after ':'):
  tiny   CPU, embedded corpus: d_model 64, 4 layers (the first dense), 4
         heads, q / kv ranks 32, top-4 of 8 experts in 2 of 4 groups + 1 shared.
  1b     ~1B active: Moonlight-16B-A3B (Moonshot AI 2025, arXiv 2502.16982;
         DeepseekV3ForCausalLM, its config.json: d_model 2048, 27 layers, 16
         heads, no query compression, kv rank 512, 64 routed experts of 1408
         top-6 in one group + 2 shared, the first layer dense, routed scale
         2.446, theta 50,000 unscaled, vocab 163,840) at half its width:
         d_model 1024, 8 heads (head widths and kv rank kept, as DeepSeek's
         releases keep them across sizes), d_ff 5632, experts of 704.
         Moonlight's routing (sigmoid with the bias, one group: router
         "sigmoid_bias") and positions; the training recipe (MTP, balance)
         as the others. inspect: 4.18B total, 0.92B active (0.75B without the
         input embedding; MTP apart, 0.15B); Moonlight itself at full width
         is 15.96B / 2.91B there (its card: 16B / 3B).
  671b   DeepSeek-V3 / R1: 61 layers, d_model 7168: 671B total / 37B active.
"""

import ml_collections as mlc

from sparse_lm import config as cfglib

# name: (d_model, layers, dense layers, heads, (q_lora, kv_lora, nope, rope, v),
#        d_ff, expert d_ff, experts, top_k, groups, top_k_groups, vocab)
VARIANTS = {
  "tiny": (64, 4, 1, 4, (32, 32, 16, 8, 16), 128, 32, 8, 4, 4, 2, 2048),
  "1b": (1024, 27, 1, 8, (0, 512, 128, 64, 128), 5632, 704, 64, 6, 1, 1, 163_840),
  "671b": (7168, 61, 3, 128, (1536, 512, 128, 64, 128), 18432, 2048, 256, 8, 8, 4, 129_280),
}


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/deepseek_v3.py", VARIANTS, arg)
  d, n, dense, h, mla, ff, eff, e, k, g, kg, v = VARIANTS[arg]
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = d, n, h, ff
  m.attention = "mla"
  a = m.mla
  a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim = mla
  m.activation, m.norm, m.norm_eps = "swiglu", "rms", 1e-6
  m.position, m.rope_theta, m.rope_layout = "rope", 10_000.0, "interleaved"
  m.rope_scaling = (
    None
    if arg == "1b"
    else mlc.ConfigDict(
      dict(
        rope_type="yarn",
        factor=40.0,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        original_max_position_embeddings=4096,
      )
    )
  )
  m.tie_embeddings = False
  m.mtp_depth, m.mtp_loss_weight = 1, 0.3  # section 2.2 / 4.2: D = 1, lambda 0.3 then 0.1
  c.data.vocab_size = v
  c.data.batch_size, c.data.seq_len = (16, 128) if arg == "tiny" else (512, 4096)

  moe = m.moe
  moe.num_experts, moe.top_k, moe.d_ff = e, k, eff
  moe.router, moe.num_groups, moe.top_k_groups = "group_limited", g, kg
  moe.routed_scaling_factor = 2.5
  moe.num_shared_experts = 1
  if arg == "1b":  # Moonlight's: one expert group, 2 shared experts, theta 50,000
    moe.router, moe.num_groups, moe.top_k_groups = "sigmoid_bias", 0, 1
    moe.routed_scaling_factor, moe.num_shared_experts = 2.446, 2
    m.rope_theta, m.norm_eps = 50_000.0, 1e-5
  moe.every, moe.offset, moe.first_dense_layers = 1, 0, dense
  moe.dispatch = "dropless"
  moe.load_balance_weight = 1e-4  # the paper's sequence-wise alpha (section 4.2)
  moe.balance_scope = "sequence"
  moe.bias_update_rate = 1e-3  # gamma (section 4.2)

  if arg != "tiny":
    cfglib.accelerator_training(c, learning_rate=2.2e-4, fsdp=True)
  return c
