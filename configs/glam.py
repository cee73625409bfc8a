r"""GLaM (Du et al. 2022): top-2 of 64 experts in every other layer, gates renormalised.

  python -m sparse_lm.main --config=configs/glam.py:tiny --workdir=runs/glam
  python -m sparse_lm.inspect --config=configs/glam.py:64b_64e

Variants (the string after ':'):
  tiny     CPU, embedded corpus, a few minutes: dense tiny's dims, top-2 of 8 experts.
  base     d_model 768, 12 layers, 64 experts: the MoE twin of configs/dense.py:base.
  64b_64e  GLaM (64B/64E), the paper's Table 4 row: 64 layers, d_model 8192,
           128 heads of 128 (attention width 16384 = 2 x d_model), d_ff 32768,
           64 experts, 256K SentencePiece vocabulary, tied input/output embedding.

GLaM's FFN types: the dense FFN is gated GELU (GeGLU, two input projections);
the experts are plain GELU FFNs (Pax's GLaM layers set the gated activation on
the dense FFN only). With that, the counts are 1.16T total / 96.6B active; the
paper rounds the total to 1.2T. No expert FFN type matches both published
numbers within 2%: total - active is 32 MoE layers x 62 unchosen experts, 1.065T
with GELU experts (a 1.2T total would need 135B active) and 1.598T with GeGLU
experts (a 1.69T total). GLaM's relative position bias is RoPE here.

Second-expert policy: "all" (every token goes to both of its experts, as in
GLaM's Pax configs). GShard's "random" sends the second expert with probability
proportional to its gate: --config.model.moe.second_expert_policy=random.
"""

from sparse_lm import config as cfglib

VARIANTS = {  # name: (d_model, layers, heads, head_dim, d_ff, experts, vocab, batch, seq_len)
  "tiny": (128, 2, 4, 0, 512, 8, 2048, 16, 128),
  "base": (768, 12, 12, 0, 3072, 64, 32_000, 256, 1024),
  "64b_64e": (8192, 64, 128, 128, 32768, 64, 256_000, 1024, 1024),
}


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/glam.py", VARIANTS, arg)
  d, n, h, hd, f, e, v, b, l = VARIANTS[arg]
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.d_ff = d, n, h, hd, f
  m.activation = "geglu"  # dense FFN
  m.tie_embeddings = True
  c.data.vocab_size, c.data.batch_size, c.data.seq_len = v, b, l

  moe = m.moe
  moe.num_experts, moe.top_k, moe.router = e, 2, "topk"
  moe.activation = "gelu"  # experts: plain GELU FFNs of d_ff
  moe.normalize_gates = True  # the two gates sum to 1
  moe.second_expert_policy = "all"
  moe.every, moe.offset = 2, 1
  moe.dispatch = "capacity"
  moe.capacity_factor, moe.eval_capacity_factor = 1.25, 2.0
  moe.load_balance_weight = 1e-2
  moe.load_balance_choices = "first"  # GShard Algorithm 1: f_e counts first choices
  moe.z_loss_weight = 0.0  # GLaM's z-loss is on the output logits, not the router

  if arg == "base":
    cfglib.accelerator_training(c, learning_rate=1e-3)
  if arg == "64b_64e":
    # The paper: Adafactor, inverse-square-root decay after 10K warmup steps, peak 0.01.
    cfglib.accelerator_training(c, learning_rate=1e-2, warmup_steps=10_000, fsdp=True)
    c.train.optimizer, c.train.schedule = "adafactor", "rsqrt"
  return c
