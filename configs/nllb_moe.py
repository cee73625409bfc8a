r"""NLLB-200's MoE (NLLB Team 2022): an encoder-decoder, top-2 of 128 experts in every 4th layer.

  python -m sparse_lm.main --config=configs/nllb_moe.py:tiny --workdir=runs/nllb_moe
  python -m sparse_lm.inspect --config=configs/nllb_moe.py:54b

model.arch="encoder_decoder" (sparse_lm/models/encoder_decoder.py) with
fairseq's transformer as NLLB-200 used it (transformers' modeling_nllb_moe.py
reads the released checkpoint the same way): fairseq's sinusoidal positions
(model.position="sinusoidal", the padding offset 2), the token embedding times
sqrt(d_model) and tied to the output layer without rescaling
(model.scale_embedding), biases on q, k, v, the attention output, the dense
FFN and the experts, pre-norm LayerNorm with bias (eps 1e-5), ReLU FFNs,
attention scaled by 1 / sqrt(head_dim), a final LayerNorm per stack. The MoE
layers are 3, 7, 11, ... of each stack (every=4, offset=3: fairseq's
moe_freq=4, transformers' sparse_step 4). Routing as the released 54.5B
checkpoint's config: top-2 with the gates renormalised, second_expert_policy
"all" (--config.model.moe.second_expert_policy=sampling for fairseq's sampled
second expert), and Expert Output Masking at rate 0.2 (a token's routed output
is dropped with probability 0.2 in training, scaled by 0.8 in evaluation: the
paper's section 6.2.2, fairseq's moe_tok_dropout). Load-balance weight 1e-2
(fairseq's gate-loss weight, counting first choices); no router jitter or
z-loss. Trained on translation pairs in NLLB's layout ([src_lang] source </s>
-> </s> [tgt_lang] target; data.objective="seq2seq").

Variants (the string after ':'):
  tiny     CPU, a few minutes: Django's en<->de / en<->fr pairs
           (seq2seq:translation), d_model 64, 4 + 4 layers, layer 3 of each
           stack top-2 of 8 experts, vocabulary 512.
  54b      NLLB-200 MoE 54.5B (facebook/nllb-moe-54b): d_model 2048, 24 + 24
           layers, 16 heads, ReLU FFN 8192, 128 experts in 6 + 6 layers,
           vocabulary 256,206 (the released tokenizer's), tied embeddings:
           inspect 54,500,569,088 parameters (the paper's 54.5B).
  lm_tiny  The decoder-only stand-in this file held before the encoder-decoder
           existed: NLLB's MoE layer (top-2 of 8 in layer 3, EOM 0.2) in a
           4-layer decoder-only LM on the stdlib corpus (tests/decode_test.py
           and tests/inspect_test.py run it with the other decoder-only families).
"""

from sparse_lm import config as cfglib

VARIANTS = {  # name: (d_model, layers, heads, d_ff, experts, vocab, batch, seq_len)
  "tiny": (64, 4, 4, 256, 8, 512, 16, 64),
  "54b": (2048, 24, 16, 8192, 128, 256_206, 512, 1024),
  "lm_tiny": (128, 4, 4, 512, 8, 2048, 16, 128),
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
  if arg != "lm_tiny":
    m.arch, m.position = "encoder_decoder", "sinusoidal"
    m.scale_embedding = True
    m.qkv_bias = m.attn_out_bias = m.mlp_bias = m.moe.expert_bias = True
    m.norm_eps = 1e-5  # torch.nn.LayerNorm's (fairseq's LayerNorm)
    c.data.objective, c.data.dataset = "seq2seq", "seq2seq:translation"
  if arg == "tiny":
    c.data.languages = ("de", "fr")

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

  if arg == "54b":
    m.dropout = 0.3  # the paper's MoE models (section 6.2.2)
    cfglib.accelerator_training(c, learning_rate=2e-3, fsdp=True)
  return c
