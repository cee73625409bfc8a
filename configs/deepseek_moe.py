r"""DeepSeekMoE (Dai et al. 2024): always-on shared experts plus many fine-grained routed experts.

  python -m sparse_lm.main --config=configs/deepseek_moe.py:tiny --workdir=runs/deepseek_moe
  python -m sparse_lm.inspect --config=configs/deepseek_moe.py:16b

Each MoE layer has num_shared_experts SwiGLU experts that every token uses and
num_experts routed ones of the same (small) width, of which a token uses top_k.
The router is DeepSeek-V3's auxiliary-loss-free balancing ("sigmoid_bias"):
sigmoid scores, a per-expert bias (not a parameter) that only changes which
experts are chosen, nudged by model.moe.bias_update_rate towards equal load, the
chosen scores renormalised into gates, and no load-balance loss. DeepSeekMoE
16B's own router (softmax top-k, gates as they are, balance loss 1e-3) is:

  --config.model.moe.router=topk --config.model.moe.normalize_gates=False \
      --config.model.moe.load_balance_weight=1e-3

Variants (the string after ':'):
  tiny  CPU, embedded corpus, a few minutes: d_model 128, 2 layers, layer 0 dense
        (SwiGLU 512), layer 1 with 1 shared + top-3 of 16 routed experts of 128.
  16b   DeepSeekMoE 16B's dims: d_model 2048, 28 layers, 16 heads, 2 shared + top-6
        of 64 routed experts of 1408, vocabulary 102400, separate output embedding.
        The first layer is a dense FFN of 10944, as in the paper
        (model.moe.first_dense_layers=1).
"""

from sparse_lm import config as cfglib

VARIANTS = {  # name: (d_model, layers, heads, d_ff, shared, routed, top_k, expert d_ff,
  #        vocab, batch, seq_len)
  "tiny": (128, 2, 4, 512, 1, 16, 3, 128, 2048, 16, 128),
  "16b": (2048, 28, 16, 10944, 2, 64, 6, 1408, 102_400, 1024, 4096),
}


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/deepseek_moe.py", VARIANTS, arg)
  d, n, h, f, shared, e, k, ef, v, b, l = VARIANTS[arg]
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = d, n, h, f
  m.activation, m.norm = "swiglu", "rms"
  m.tie_embeddings = False
  c.data.vocab_size, c.data.batch_size, c.data.seq_len = v, b, l

  moe = m.moe
  moe.num_shared_experts, moe.num_experts, moe.top_k, moe.d_ff = shared, e, k, ef
  moe.router = "sigmoid_bias"
  moe.normalize_gates = True
  moe.bias_update_rate = 1e-3  # V3's bias update speed
  moe.load_balance_weight = 0.0
  moe.dispatch = "dropless"
  moe.z_loss_weight = 0.0
  # Layer 0 dense, every later layer MoE (as in the paper).
  moe.every, moe.offset, moe.first_dense_layers = 1, 0, 1

  if arg != "tiny":
    cfglib.accelerator_training(c, learning_rate=4.2e-4, fsdp=True)  # the paper's 16B run
  return c
