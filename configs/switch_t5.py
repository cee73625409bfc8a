r"""Switch Transformer as published (Fedus et al. 2021): T5 encoder-decoders, MoE in both stacks.

  python -m sparse_lm.main --config=configs/switch_t5.py:tiny --workdir=runs/switch_t5
  python -m sparse_lm.inspect --config=configs/switch_t5.py:switch_base_128 \
      --compare=configs/switch_t5.py:t5_base

model.arch="encoder_decoder" (sparse_lm/models/encoder_decoder.py): relative
position buckets, RMSNorm without bias, pre-norm, no biases, tied embeddings
with T5's d_model ** -0.5 logit scaling; trained on T5's span corruption
(noise density 0.15, mean span length 3; data.seq_len is the encoder's
length, the decoder's is T5's random_spans_helper's). The MoE layers are
every other layer of each stack (1, 3, 5, ...: every=2, offset=1, as
transformers' SwitchTransformers' sparse_step=2), top-1 "switch" routing,
capacity factor 1.25 (2.0 in evaluation), router in float32 with jitter
1e-2, init scale 0.1, load-balance weight 1e-2 (section 2.2-2.4).

Variants (the string after ':'), sizes from Table 9 and the totals the paper
gives (inspect's counts beside them in the README, "Encoder-decoder"):
  tiny             CPU, embedded stdlib corpus, a few minutes: d_model 64, 2 + 2
                   layers, 8 experts in layer 1 of each stack, GeGLU.
  t5_base          T5-Base: d_model 768, 12 + 12 layers, 12 heads of 64, FFN 3072
                   (ReLU), vocabulary 32,128: 223M.
  switch_base_8    Switch-Base with 8 experts (google/switch-base-8's shape).
  switch_base_128  Switch-Base, 128 experts: 7.4B.
  t5_large         T5-Large: d_model 1024, 24 + 24 layers, 16 heads, FFN 4096 (ReLU): 739M.
  switch_large     Switch-Large: d_model 1024, 24 + 24 layers, 16 heads, FFN
                   4096 (ReLU), 128 experts: 26.3B.
  t5_xxl           T5-XXL (T5.1.1's): d_model 4096, 24 + 24 layers, 64 heads of 64,
                   GeGLU FFN 10240: 11B.
  switch_xxl       Switch-XXL: d_model 4096, 24 + 24 layers, 64 heads of 64,
                   GeGLU FFN 10240, MoE every other layer: 395B (with 128
                   experts; see below).
  switch_c         Switch-C: d_model 2080, 15 + 15 layers, 32 heads of 64, FFN
                   6144 (ReLU), 2048 experts in every layer: 1571B.

The FFNs: the totals the paper gives for T5-Base (223M), Switch-Base (7.4B)
and Switch-Large (26.3B) are those of T5 1.0's ReLU FFNs of 3072 and 4096
(Table 9 writes the GeGLU widths 2048 and 2816 of T5.1.1; GeGLU 2048 has the
same count as ReLU 3072 at Base, but GeGLU 2816 would make Switch-Large 27.1B);
Switch-XXL's 395B is GeGLU 10240 with 128 experts (the released
google/switch-xxl-128; with 64 experts, as some transcriptions of Table 9
read, the same model has 201B). Tied embeddings: T5-Base is 248M untied.
"""

from sparse_lm import config as cfglib

# name: (d_model, layers, heads, head_dim, d_ff, activation, experts, every, batch, seq_len)
VARIANTS = {
  "tiny": (64, 2, 4, 16, 128, "geglu", 8, 2, 16, 64),
  "t5_base": (768, 12, 12, 64, 3072, "relu", 0, 2, 256, 512),
  "switch_base_8": (768, 12, 12, 64, 3072, "relu", 8, 2, 256, 512),
  "switch_base_128": (768, 12, 12, 64, 3072, "relu", 128, 2, 256, 512),
  "t5_large": (1024, 24, 16, 64, 4096, "relu", 0, 2, 256, 512),
  "switch_large": (1024, 24, 16, 64, 4096, "relu", 128, 2, 256, 512),
  "t5_xxl": (4096, 24, 64, 64, 10240, "geglu", 0, 2, 256, 512),
  "switch_xxl": (4096, 24, 64, 64, 10240, "geglu", 128, 2, 256, 512),
  "switch_c": (2080, 15, 32, 64, 6144, "relu", 2048, 1, 256, 512),
}
T5_VOCAB = 32_128  # T5's SentencePiece vocabulary with its 100 sentinels, padded


def get_config(arg: str = "tiny"):
  c = cfglib.base_config()
  arg = cfglib.check_variant("configs/switch_t5.py", VARIANTS, arg)
  d, n, h, z, f, act, e, every, b, length = VARIANTS[arg]
  m = c.model
  m.arch, m.position = "encoder_decoder", "relative"
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.d_ff = d, n, h, z, f
  m.activation, m.norm, m.tie_embeddings = act, "rms", True
  m.init_scale = 0.1 if e else 1.0  # the paper's reduced init (section 2.4) for the Switch models
  c.data.objective = "span_corruption"
  c.data.batch_size, c.data.seq_len = b, length

  moe = m.moe
  moe.num_experts, moe.top_k, moe.router = e, 1, "switch"
  moe.every, moe.offset = every, 1 % every  # every other layer: 1, 3, 5, ...; Switch-C: all
  moe.dispatch = "capacity"
  moe.capacity_factor, moe.eval_capacity_factor = 1.25, 2.0
  moe.jitter = 1e-2
  moe.load_balance_weight = 1e-2
  moe.z_loss_weight = 0.0  # came later, with ST-MoE

  if arg == "tiny":
    c.data.vocab_size = 512
    c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 300, 100, 100
  else:
    c.data.vocab_size = T5_VOCAB
    cfglib.accelerator_training(c, learning_rate=1e-2, warmup_steps=10_000, fsdp=True)
    c.train.optimizer, c.train.schedule = "adafactor", "rsqrt"  # T5's
    c.train.weight_decay = 0.0
  return c
