"""The config schema, its defaults, and validation: the one place for config errors.

Every family file in configs/ starts from `base_config()` and changes what it
needs, so every config has every key below and `--config.a.b=...` overrides
work the same for all of them. `validate(c)` runs before anything is compiled
or written and raises `ConfigError` with a one-line message naming the key
(a key that the config's other choices never read is refused too, not
ignored). `model_spec(c)` turns the model block into the frozen spec models/
are built from, with the "0 = inherit" defaults resolved. Imports go one way:
config -> models (routing's table, the spec); models never import config;
sharding.py checks the mesh against the devices.

Dimension letters used in tensor names across the code base (one meaning each):
  B batch, L length, S cached length (decoding), T tokens (B*L flattened),
  D d_model, F ffn hidden, V vocab, H heads, J kv heads, Z head dim,
  E experts, U experts on one shard, K choices per token (top-k), C capacity,
  G expert groups, P shards along the expert axes, A assignments (T*K),
  W rows a shard sends each expert, R buffer rows, N rows sorted by expert.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import ml_collections as mlc

from sparse_lm.errors import ConfigError
from sparse_lm.models import spec as spec_lib
from sparse_lm.models.moe import policy
from sparse_lm.models.moe import routing

__all__ = ["base_config", "model_spec", "validate"]


DISPATCHES = ("capacity", "dropless")
DECODE_DISPATCHES = ("auto", "gather", "dropless", "capacity")
SECOND_EXPERT_POLICIES = ("all", "random", "sampling")
LOAD_BALANCE_CHOICES = ("all", "first")
BALANCE_SCOPES = ("global", "micro", "sequence")
ACTIVATIONS = ("gelu", "relu", "swiglu", "geglu", "swiglu_clamped")
NORMS = ("rms", "layer")
# relative: T5's buckets; sinusoidal: fairseq's (NLLB-200's, with the padding
# offset); both encoder_decoder only.
POSITIONS = ("rope", "learned", "relative", "sinusoidal")
ARCHS = ("decoder", "encoder_decoder")
ENCDEC_POSITIONS = ("relative", "sinusoidal")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "constant")
TOKENIZERS = ("sentencepiece", "byte", "huggingface")
ROPE_LAYOUTS = ("half", "interleaved")
QK_NORMS = ("none", "head", "full")
ROUTER_DTYPES = ("float32", "compute")
REMATS = ("none", "full", "dots", "moe")  # models/transformer.py, REMAT_POLICIES


def base_config() -> mlc.ConfigDict:
  """All keys with defaults: a tiny dense LM on the embedded stdlib corpus."""
  c = mlc.ConfigDict()

  c.data = mlc.ConfigDict()
  # "stdlib" (embedded corpus of this Python's standard library source),
  # "files:<glob>" (your own text files), or any TFDS text dataset name
  # ("lm1b", "c4/en", ...), optionally with a config: "name/config".
  # "sft:<file.jsonl>": instruction data, (prompt, response) per line
  # (sparse_lm/data/sft.py; its tokenizer comes from data.tokenizer_dataset).
  # "chat:<file.jsonl>": conversations ({"messages": [...]} per line) in the
  # tokenizer's chat template, loss on assistant turns (sparse_lm/data/chat.py).
  c.data.dataset = "stdlib"
  c.data.text_key = "text"  # feature holding the text, for TFDS datasets
  c.data.data_dir = ""  # TFDS data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  # Files (relative paths or fnmatch globs) left out of the training split and
  # of the tokenizer's text: "stdlib" and "files:" datasets.
  c.data.exclude = ()
  # "sentencepiece", "byte", or "huggingface": data.tokenizer_file, a Hugging
  # Face tokenizer.json (an imported checkpoint's: sparse_lm/convert/), with
  # data.vocab_size the model's vocabulary.
  c.data.tokenizer = "sentencepiece"
  c.data.tokenizer_file = ""
  # The dataset whose train split the SentencePiece tokenizer is trained on;
  # "" = data.dataset. An sft: dataset needs one: its base run's ("stdlib").
  c.data.tokenizer_dataset = ""
  # sft: datasets. The text of an example: the template with its prompt, then
  # its response and end-of-text; the loss counts the response tokens only.
  c.data.sft_template = "{prompt}{response}"
  c.data.sft_overlong = "truncate"  # an example over seq_len + 1 tokens: "truncate" | "refuse"
  c.data.vocab_size = 2048  # sentencepiece vocab (the byte tokenizer fixes its own)
  c.data.batch_size = 16  # global, over all processes
  c.data.seq_len = 128
  c.data.shuffle_buffer = 1024
  # The documents are split into this many fixed streams, each packed and
  # shuffled on its own; stream s fills rows [s, s + 1) * batch_size / num_streams
  # of every batch, and each process reads only its streams. So the batches do
  # not depend on the process count (any count dividing num_streams).
  c.data.num_streams = 8
  # Encoder-decoder data (sparse_lm/data/seq2seq.py; issue 30): "lm" (the
  # decoder-only stream above), "span_corruption" (T5's, over any text
  # dataset: data.seq_len is the encoder length, the decoder's is T5's
  # random_spans_helper's) or "seq2seq" (data.dataset "seq2seq:<file.jsonl>"
  # or "seq2seq:translation", Django's catalogues: data/translation.py).
  c.data.objective = "lm"
  c.data.noise_density = 0.15
  c.data.mean_noise_span_length = 3.0
  c.data.targets_len = 0  # seq2seq decoder length; 0 = data.seq_len
  c.data.languages = ()  # seq2seq:translation's languages; () = all of Django's

  c.model = mlc.ConfigDict()
  # "decoder" (decoder-only LM) or "encoder_decoder" (T5.1.1 with MoE in both
  # stacks, the Switch Transformer's and NLLB-200's shape;
  # models/encoder_decoder.py): model.num_layers layers in each stack,
  # model.position "relative" (T5's bucketed biases and unscaled attention) or
  # "sinusoidal" (fairseq's table, NLLB-200's; attention scaled by
  # 1 / sqrt(head_dim)), data.objective "span_corruption" or "seq2seq".
  c.model.arch = "decoder"
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 0  # 0 = num_heads (plain multi-head); fewer = GQA
  c.model.head_dim = 0  # 0 = d_model // num_heads
  c.model.d_ff = 512
  c.model.activation = "gelu"
  c.model.norm = "rms"
  c.model.norm_eps = 1e-6
  c.model.position = "rope"
  c.model.rope_theta = 10_000.0
  c.model.tie_embeddings = True
  c.model.dtype = "float32"  # compute dtype (the Params' own is model.param_dtype)
  # The Params' dtype, "float32" or "bfloat16" (drawn in float32, then rounded).
  # The optimizer's state is in it too unless train.moments_dtype="float32";
  # the router computes in float32 whatever the dtypes.
  c.model.param_dtype = "float32"
  # Weight-matrix init: truncated normal, std sqrt(init_scale / fan_in) (Fedus
  # et al. 2021 section 2.4, s; the Switch paper's s = 0.1). Embeddings keep
  # std 1/sqrt(d_model).
  c.model.init_scale = 1.0
  c.model.dropout = 0.0
  c.model.max_len = c.data.get_ref("seq_len")  # learned positions table size
  # Conventions of released checkpoints (sparse_lm/convert/ sets them on import).
  # RoPE pairs: "half" rotates (i, i + Z/2) (GPT-NeoX, Llama, every Hugging Face
  # family here); "interleaved" rotates (2i, 2i + 1) (RoFormer, GPT-J, Meta's and
  # DeepSeek's original checkpoints).
  c.model.rope_layout = "half"
  # RMSNorm (eps model.norm_eps) on queries and keys before RoPE: "head" over each
  # head's Z features (Qwen3-MoE), "full" over all heads' H*Z / J*Z (OLMoE).
  c.model.qk_norm = "none"
  c.model.qkv_bias = False  # biases on the q, k and v projections (Qwen2-MoE)
  c.model.clip_qkv = 0.0  # > 0: q, k, v clamped to [-clip, clip] (DBRX, OLMoE)
  c.model.norm_bias = True  # model.norm="layer" only; False: no bias (DBRX)
  # Encoder-decoder only (NLLB-200 / fairseq; models/encoder_decoder.py):
  # scale_embedding multiplies the token embedding by sqrt(d_model) on input
  # and leaves the tied output layer unscaled (False: T5's, the tied logits
  # times d_model ** -0.5); mlp_bias puts biases on the dense FFN's two
  # projections (model.moe.expert_bias: on the experts').
  c.model.scale_embedding = False
  c.model.mlp_bias = False
  # RoPE scaling as transformers' modeling_rope_utils defines it (None = off):
  # a ConfigDict with rope_type "yarn" (factor, original_max_position_embeddings,
  # beta_fast, beta_slow, truncate, attention_factor, mscale, mscale_all_dim),
  # "linear" (factor), "llama3" (factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings) or "dynamic" (factor,
  # max_position_embeddings: static, so data.seq_len must not pass it).
  c.model.rope_scaling = None
  # GPT-OSS's attention: a learned per-head logit in the softmax denominator
  # (sinks), a bias on the output projection, and a sliding window of
  # model.sliding_window tokens on the layers model.layer_types names
  # "sliding_attention" (the others "full_attention"; () = all full).
  c.model.attn_sinks = False
  c.model.attn_out_bias = False
  c.model.sliding_window = 0
  c.model.layer_types = ()
  # activation "swiglu_clamped" (GPT-OSS): gate <= limit, |up| <= limit,
  # (up + 1) * gate * sigmoid(alpha * gate).
  c.model.swiglu_alpha = 1.702
  c.model.swiglu_limit = 7.0
  # Attention: "mha" (multi-head, grouped-query with model.num_kv_heads) or
  # "mla" (multi-head latent attention, DeepSeek-V2 section 2.1 / V3 section
  # 2.1.1: queries through a q_lora_rank bottleneck (0 = none), keys and
  # values from one kv_lora_rank latent, each with an RMSNorm, plus one RoPE
  # key of qk_rope_head_dim shared by the heads; the KV cache holds only the
  # latent and that key). model.head_dim and num_kv_heads are unread by "mla".
  c.model.attention = "mha"
  c.model.mla = mlc.ConfigDict()
  c.model.mla.q_lora_rank = 1536
  c.model.mla.kv_lora_rank = 512
  c.model.mla.qk_nope_head_dim = 128
  c.model.mla.qk_rope_head_dim = 64
  c.model.mla.v_head_dim = 128
  # Multi-token prediction (DeepSeek-V3 section 2.2): mtp_depth D sequential
  # MTP modules after the main model (each: RMSNorms of the previous depth's
  # hidden state and of the next token's embedding, a 2d -> d projection, one
  # Transformer block of the last layer's kind, its own final norm; the
  # embedding and output head shared). Training adds mtp_loss_weight / D x
  # their cross-entropies (lambda; the paper's 0.3 for its first 10T tokens,
  # then 0.1). Evaluation and decoding use the main model (generate
  # --speculative drafts with the modules). 0 = none.
  c.model.mtp_depth = 0
  c.model.mtp_loss_weight = 0.3
  # The layers as one jax.lax.scan over a super-block of model.moe.every layers
  # (1 when dense; first_dense_layers run before it): one traced body whose
  # parameters (and optimizer state) are stored stacked, so the step compiles
  # in about the same time at any depth, and train.remat saves memory on CPU
  # too. Parameters are named per layer wherever they are named (a run saved
  # with it restores without it and back; models/transformer.py, params.py).
  c.model.scan_layers = False

  c.model.moe = mlc.ConfigDict()
  c.model.moe.num_experts = 0  # 0 or 1 = dense model
  c.model.moe.top_k = 1
  # Which layers get an MoE FFN: layer i is MoE when i % every == offset.
  # every=1: all layers; 2: every 2nd (Switch, GLaM); 4: every 4th (NLLB, ST-MoE).
  c.model.moe.every = 2
  c.model.moe.offset = 1
  c.model.moe.first_dense_layers = 0  # layers below this index stay dense (DeepSeekMoE: 1)
  c.model.moe.d_ff = 0  # expert hidden size; 0 = model.d_ff
  c.model.moe.activation = ""  # "" = model.activation
  c.model.moe.router = "switch"
  c.model.moe.dispatch = "capacity"
  # Dispatch when decoding (sparse_lm/decode.py): "auto" (default: "gather" when
  # a step has few assignments, tokens x k <= policy.py's per-backend limit,
  # else "dropless"), "gather" (each assignment's expert weights gathered by
  # id: reads k experts per token, not E), "dropless" (the grouped kernel over
  # tokens sorted by expert); all three never drop, so cached decoding equals
  # the full forward. "capacity": the training rule at eval_capacity_factor,
  # which drops depending on the batch.
  c.model.moe.decode_dispatch = "auto"
  # How to compute (never what): "auto" = per backend (sparse_lm/models/moe/policy.py).
  c.model.moe.impl = mlc.ConfigDict()
  c.model.moe.impl.capacity_layout = "auto"  # "batched" (padded [E, C, D]) | "grouped"
  c.model.moe.impl.grouped_kernel = "auto"  # "ragged" (ragged_dot) | "blocks" (CPU loops)
  c.model.moe.impl.positions = "auto"  # "cumsum" | "sort"
  # Capacity per expert over the whole batch: C = max(min_capacity,
  # ceil(cf * tokens * k / E)), at most tokens; for expert_choice, each expert's
  # number of tokens.
  c.model.moe.capacity_factor = 1.25  # training
  c.model.moe.eval_capacity_factor = 2.0
  c.model.moe.min_capacity = 4
  c.model.moe.second_expert_policy = "all"
  # Renormalise the chosen gates to sum 1 (GShard / GLaM). Only "topk",
  # "sigmoid_bias" and "group_limited" read it (validate refuses False for the
  # others): switch's gate is the raw probability (Fedus et al. eq. 2), mixtral
  # and hierarchical are already a softmax over the chosen.
  c.model.moe.normalize_gates = True
  c.model.moe.jitter = 0.0  # Switch multiplicative jitter eps (training only)
  c.model.moe.noisy_gating = False  # Shazeer 2017 noisy top-k (training only)
  # s for the MoE layer's router, experts and shared experts; 0 = model.init_scale.
  c.model.moe.init_scale = 0.0
  c.model.moe.num_shared_experts = 0  # DeepSeekMoE shared experts
  # Their hidden width in all (one dense FFN); 0 = num_shared_experts x
  # moe.d_ff. Qwen2-MoE's shared_expert_intermediate_size need not be a
  # multiple of the routed experts' width.
  c.model.moe.shared_d_ff = 0
  # The shared experts' output times sigmoid(x @ w), w [D, 1] (Qwen2-MoE).
  c.model.moe.shared_expert_gate = False
  # The router's logits: "float32" (input and weights in float32, this code
  # base's choice) or "compute" (in model.dtype, as Hugging Face's routers).
  # The softmax and top-k are float32 either way.
  c.model.moe.router_dtype = "float32"
  # Expert groups (contiguous blocks of E / num_groups experts). hierarchical:
  # a group gate picks top_k_groups groups, top_k experts in each (Shazeer 2017
  # app. B); group_limited: top_k experts among the top_k_groups groups
  # (DeepSeek-V3's node-limited routing, M = top_k_groups).
  c.model.moe.num_groups = 0
  c.model.moe.top_k_groups = 1
  c.model.moe.bias_update_rate = 1e-3  # aux-loss-free balancing (sigmoid_bias, group_limited)
  # The routed experts' gates times this (DeepSeek-V3's routed_scaling_factor,
  # 2.5; after normalize_gates). Read by sigmoid_bias and group_limited only.
  c.model.moe.routed_scaling_factor = 1.0
  c.model.moe.expert_dropout = 0.0
  c.model.moe.eom_rate = 0.0  # NLLB Expert Output Masking
  c.model.moe.load_balance_weight = 1e-2
  # What f_e of the load-balance loss counts (routing.py): "all" = all k choices
  # of each token (Megatron-Core; Mixtral, DBRX, DeepSeek), "first" = each
  # token's first choice (GShard Algorithm 1, GLaM, NLLB). Same for top-1.
  c.model.moe.load_balance_choices = "all"
  # Over which tokens f_e and P_e of the balance terms (load balance, importance,
  # load) are counted: "global" (the whole step's batch, all micro-batches and
  # data shards: the Switch / GShard definition for a batch, Megatron's
  # global-batch balancing; train.microbatches changes nothing), "micro" (each
  # micro-batch's own, averaged: what most peers do), "sequence" (per row,
  # averaged: DeepSeek-V3's complementary sequence-wise loss).
  c.model.moe.balance_scope = "global"
  c.model.moe.z_loss_weight = 1e-3
  # Shazeer 2017 importance (CV^2 of summed gates) + load losses, for every
  # router (load: the smooth noisy-top-k estimator when noisy gating is on in
  # training, else CV^2 of counts). The hierarchical configs use 0.1.
  c.model.moe.importance_weight = 0.0
  # GPT-OSS: a trained bias on the router logits, and biases on the experts
  # (expert_bias: up, gate and out; NLLB-200's ReLU experts: up and out).
  c.model.moe.router_logit_bias = False
  c.model.moe.expert_bias = False

  c.train = mlc.ConfigDict()
  c.train.seed = 0
  c.train.num_steps = 300
  c.train.optimizer = "adamw"
  c.train.learning_rate = 3e-3
  c.train.schedule = "cosine"
  c.train.warmup_steps = 20
  c.train.end_lr_fraction = 0.1  # cosine only
  c.train.cooldown_steps = 0  # > 0: the last N steps decay linearly to 0 (train.lr_schedule)
  c.train.schedule_offset = 0  # > 0: continue a run's schedule from that step (upcycling)
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9  # adamw only
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0  # global norm; 0 = off
  # The optimizer state's dtype: "param" (model.param_dtype, as optax keeps
  # it) or "float32" (with model.param_dtype=bfloat16: 10 bytes a parameter
  # instead of 6, the second moment not rounded to 8 bits of mantissa).
  c.train.moments_dtype = "param"
  # What each block's backward pass keeps (the rest is recomputed): "none" (all),
  # "full" (only the block's input), "dots" (matmul outputs without batch dims),
  # "moe" (attention and dense-FFN matmul outputs and the routing decisions;
  # the expert FFNs are recomputed). Same loss and gradients, less memory.
  c.train.remat = "none"
  # The global batch in N micro-batches whose gradients add up inside one
  # compiled step (data.batch_size / N rows each; state.micro_grads).
  c.train.microbatches = 1
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_batches = 8
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 3  # only finite states are ever saved (train.py)
  # False: checkpoints hold the parameters only (a release; a third of
  # AdamW's bytes); resuming from one starts the optimizer state fresh.
  c.train.save_optimizer = True
  # 0: a step with a non-finite loss or gradient norm stops the run (its state
  # is not saved). N > 0: such a step's update is skipped and counted
  # (metrics: skipped_steps); more than N in a row stops the run.
  c.train.skip_nonfinite_steps = 0
  # "A:B": a jax.profiler trace of steps A..B (1-based, inclusive) into
  # workdir/profile/ (open it with TensorBoard's profile plugin or Perfetto).
  c.train.profile_steps = ""
  # Fine-tuning (README, "Fine-tuning"): start from another run's parameters.
  # init_from: its workdir, optionally ":step" (default its latest); read only
  # when this workdir has no checkpoint of its own. init_rules: ordered
  # (regex over this model's parameter paths, source path or None) pairs, the
  # first full match decides (None: fresh init; the source path may use the
  # regex's groups, "\1"); unmatched parameters take the source's of the same
  # name, else a fresh init. A dense MLP into an MoE layer's experts is sparse
  # upcycling (every expert a copy), E experts into m x E a tiling.
  c.train.init_from = ""
  c.train.init_rules = ()
  # Upcycling: "expected" scales each copied expert's output projection by
  # 1 / (the chosen gates' sum at uniform routing) for routers whose gates do
  # not sum to 1 (switch: E; unnormalised top-k: E / k); "none" leaves them.
  # Exact at step 0 only with a zero router (init_router="zero"): with a fresh
  # one Switch's chosen gate is above 1/E, so the output starts too large.
  c.train.init_gate_scale = "none"
  # The new routers' gating matrices of a run started by init_from: "fresh"
  # (the model's init) or "zero" (every logit equal at step 0: with
  # init_gate_scale="expected" a top-1 upcycled MoE starts exactly at the
  # dense model; the gradient moves it from the first step).
  c.train.init_router = "fresh"
  # The data position of a run started by init_from: "fresh" (its stream from
  # the start: SFT, another dataset) or "continue" (the source checkpoint's
  # next batch: continued pretraining and upcycling on unseen data; the
  # data settings and train.seed must be the source's).
  c.train.init_data = "fresh"
  # Drop-Upcycling: this fraction of each copied expert's hidden units keeps
  # the fresh init instead (a different subset per expert).
  c.train.init_reinit_fraction = 0.0
  # Parameters not trained (no optimizer state): a regex over parameter paths,
  # or ":router", ":experts" (routed expert weights), ":non_experts".
  c.train.frozen = ""

  # Mesh axes, -1 fills the rest. Axis names appear only here, in the rules
  # below and in sparse_lm/sharding.py. Tuples, so that the command line can
  # override them: --config.mesh="(('data', 2), ('fsdp', 1), ('expert', 4), ('tensor', 1))".
  c.mesh = (("data", -1), ("fsdp", 1), ("expert", 1), ("tensor", 1))
  # Logical -> mesh axis rules (MaxText style). FSDP: map "embed" to "fsdp".
  c.sharding_rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),  # parameters' d_model axis: FSDP shards it
    ("act_embed", None),  # activations' d_model axis
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
  )
  return c


def load_module(path: str):
  """Imports a config or sweep file by path (relative to cwd, else to the repo root)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(path) and os.path.exists(os.path.join(root, path)):
    path = os.path.join(root, path)
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_config(spec: str) -> mlc.ConfigDict:
  """'configs/switch.py:tiny' -> that file's get_config('tiny') (sweep files use it)."""
  path, _, arg = spec.partition(":")
  mod = load_module(path)
  return mod.get_config(arg) if arg else mod.get_config()


def check_variant(path: str, variants: dict, arg: str | None, default: str = "tiny") -> str:
  """The variant a family file's get_config(arg) asked for, or a one-line error."""
  arg = arg or default
  if arg not in variants:
    raise ConfigError(f"{path} variant {arg!r} is unknown: one of {list(variants)}")
  return arg


def accelerator_training(
  c,
  *,
  learning_rate: float,
  fsdp: bool = False,
  warmup_steps: int = 2_000,
  num_steps: int = 100_000,
):
  """Settings the accelerator-scale variants share: bf16 compute, a long
  schedule, sparser logging; `fsdp` shards parameters over all devices."""
  c.model.dtype = "bfloat16"
  c.train.learning_rate, c.train.warmup_steps = learning_rate, warmup_steps
  c.train.num_steps = num_steps
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 100, 1_000, 1_000
  if fsdp:
    c.mesh = (("data", 1), ("fsdp", -1), ("expert", 1), ("tensor", 1))


# ---------------------------------------------------------------- validation


def _fail(key, value, allowed):
  raise ConfigError(f"config.{key}={value!r} is invalid: {allowed}")


def _choice(c, key, choices):
  v = _get(c, key)
  if v not in choices:
    _fail(key, v, f"must be one of {', '.join(map(repr, choices))}")


def _positive(c, key, allow_zero=False):
  v = _get(c, key)
  if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
    _fail(key, v, "must be a number >= 0" if allow_zero else "must be a number > 0")


def _unread(c, key, unread: bool, why: str):
  """A key changed from its default where the config's other choices never
  read it: a one-line error instead of a silent no-op."""
  if unread and _get(c, key) != _get(base_config(), key):
    _fail(key, _get(c, key), f"has no effect: {why}; leave it at its default")


def _get(c, key):
  v = c
  for part in key.split("."):
    v = v[part]
  return v


def model_spec(c) -> spec_lib.ModelSpec:
  """The frozen, resolved model spec of config `c` (or of its `model` block),
  validated first: the one place where the "0 = inherit" defaults are
  resolved. models/ are built from this, never from the config."""
  m = c.model if "model" in c else c
  moe = m.moe
  fields = lambda cls, block, **resolved: cls(
    **{f.name: block[f.name] for f in dataclasses.fields(cls) if f.name not in resolved},
    **resolved,
  )
  return fields(
    spec_lib.ModelSpec,
    m,
    num_kv_heads=m.num_kv_heads or m.num_heads,
    head_dim=m.head_dim or m.d_model // m.num_heads,
    remat=c.train.remat if "train" in c else "none",
    rope_scaling=tuple(sorted(dict(m.rope_scaling).items())) if m.rope_scaling else (),
    layer_types=tuple(m.layer_types),
    mla=spec_lib.MlaSpec(**m.mla) if "mla" in m else spec_lib.MlaSpec(),
    mtp_depth=m.get("mtp_depth", 0),  # configs saved before the key: none
    mtp_loss_weight=m.get("mtp_loss_weight", 0.3),
    scale_embedding=m.get("scale_embedding", False),  # configs saved before the keys
    mlp_bias=m.get("mlp_bias", False),
    moe=fields(
      spec_lib.MoeSpec,
      moe,
      impl=spec_lib.Impl(**moe.impl),
      d_ff=moe.d_ff or m.d_ff,
      shared_d_ff=moe.shared_d_ff or moe.num_shared_experts * (moe.d_ff or m.d_ff),
      activation=moe.activation or m.activation,
      init_scale=moe.init_scale or m.init_scale,
    ),
  )


def validate(c: mlc.ConfigDict) -> mlc.ConfigDict:
  """Checks every key; raises ConfigError naming the first bad one. Returns c."""
  d, m, moe, t = c.data, c.model, c.model.moe, c.train
  for key in (
    "data.batch_size",
    "data.seq_len",
    "model.d_model",
    "model.num_layers",
    "model.init_scale",
    "model.num_heads",
    "model.d_ff",
    "train.num_steps",
    "train.learning_rate",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_batches",
  ):
    _positive(c, key)
  for key in (
    "model.num_kv_heads",
    "model.head_dim",
    "model.moe.num_experts",
    "model.moe.d_ff",
    "train.warmup_steps",
    "train.weight_decay",
    "train.grad_clip",
    "model.moe.jitter",
    "model.moe.load_balance_weight",
    "model.moe.z_loss_weight",
    "model.moe.importance_weight",
    "model.moe.num_shared_experts",
    "model.moe.shared_d_ff",
    "model.moe.num_groups",
    "model.dropout",
    "model.moe.first_dense_layers",
    "model.moe.bias_update_rate",
    "model.moe.init_scale",
    "model.moe.expert_dropout",
    "model.moe.eom_rate",
    "data.shuffle_buffer",
  ):
    _positive(c, key, allow_zero=True)
  if not isinstance(d.num_streams, int) or isinstance(d.num_streams, bool) or d.num_streams < 1:
    _fail("data.num_streams", d.num_streams, "must be an integer >= 1")
  if isinstance(d.batch_size, int) and d.batch_size % d.num_streams:
    _fail("data.num_streams", d.num_streams, f"must divide data.batch_size={d.batch_size}")
  _choice(c, "data.tokenizer", TOKENIZERS)
  # Byte fallback needs 256 byte pieces + specials + the corpus's characters.
  if d.tokenizer == "sentencepiece" and not 384 <= d.vocab_size <= 1_000_000:
    _fail("data.vocab_size", d.vocab_size, "must be in [384, 1000000] for sentencepiece")
  if d.tokenizer == "huggingface" and not d.tokenizer_file:
    _fail(
      "data.tokenizer_file", d.tokenizer_file, "data.tokenizer='huggingface' needs a tokenizer.json"
    )
  _unread(
    c,
    "data.tokenizer_file",
    d.tokenizer != "huggingface",
    "only data.tokenizer='huggingface' reads it",
  )
  ds = d.dataset
  if not isinstance(ds, str) or not ds:
    _fail("data.dataset", ds, "must be 'stdlib', 'files:<glob>' or a TFDS dataset name")
  _validate_objective(c)
  _validate_arch(c)
  if ds.startswith("files:") and len(ds) == len("files:"):
    _fail("data.dataset", ds, "'files:' needs a glob, e.g. 'files:~/text/*.txt'")
  if ds.startswith("chat:"):
    _validate_chat(c)
  elif ds.startswith("sft:"):
    _validate_sft(c)
  elif not (ds == "stdlib" or ds.startswith(("files:", "seq2seq:"))):
    _check_tfds_name(ds)
  if not isinstance(d.exclude, (tuple, list)) or not all(isinstance(e, str) for e in d.exclude):
    _fail("data.exclude", d.exclude, "must be a tuple of relative paths or globs")
  _choice(c, "model.activation", ACTIVATIONS)
  _choice(c, "model.norm", NORMS)
  _choice(c, "model.position", POSITIONS)
  _choice(c, "model.dtype", DTYPES)
  _choice(c, "model.param_dtype", DTYPES)
  _choice(c, "model.scan_layers", (False, True))
  if m.scan_layers and c.train.optimizer == "adafactor":
    _fail(
      "model.scan_layers",
      m.scan_layers,
      "with train.optimizer='adafactor': its per-array statistics (the update's RMS "
      "clipping, the parameter scale) would span the layers stored stacked in one "
      "array, so the update would depend on the key; use adamw or leave it False",
    )
  if m.d_model % m.num_heads and not m.head_dim:
    _fail(
      "model.num_heads",
      m.num_heads,
      f"must divide model.d_model={m.d_model} (or set model.head_dim)",
    )
  spec = model_spec(c)
  if spec.num_kv_heads > m.num_heads or m.num_heads % spec.num_kv_heads:
    _fail(
      "model.num_kv_heads",
      m.num_kv_heads,
      f"must divide model.num_heads={m.num_heads} (0 = num_heads)",
    )
  if m.position == "rope" and spec.head_dim % 2:
    _fail("model.head_dim", spec.head_dim, "must be even for rope positions")
  if m.position == "learned" and m.max_len < d.seq_len:
    _fail("model.max_len", m.max_len, f"must be >= data.seq_len={d.seq_len} for learned positions")
  if not 0 <= m.dropout < 1:
    _fail("model.dropout", m.dropout, "must be in [0, 1)")
  _choice(c, "model.rope_layout", ROPE_LAYOUTS)
  _unread(c, "model.rope_layout", m.position != "rope", "model.position is not 'rope'")
  _choice(c, "model.qk_norm", QK_NORMS)
  _choice(c, "model.qkv_bias", (False, True))
  _positive(c, "model.clip_qkv", allow_zero=True)
  _choice(c, "model.norm_bias", (True, False))
  _unread(c, "model.norm_bias", m.norm != "layer", "only model.norm='layer' has a bias")

  _validate_gpt_oss(c)
  _validate_mla(c)
  _validate_mtp(c)

  _choice(c, "model.moe.shared_expert_gate", (False, True))
  _unread(c, "model.moe.shared_expert_gate", not moe.num_shared_experts, "no shared experts")
  _unread(c, "model.moe.shared_d_ff", not moe.num_shared_experts, "no shared experts")
  _choice(c, "model.moe.router", tuple(routing.ROUTERS))
  _choice(c, "model.moe.dispatch", DISPATCHES)
  _choice(c, "model.moe.decode_dispatch", DECODE_DISPATCHES)
  _choice(c, "model.moe.second_expert_policy", SECOND_EXPERT_POLICIES)
  _choice(c, "model.moe.load_balance_choices", LOAD_BALANCE_CHOICES)
  _choice(c, "model.moe.balance_scope", BALANCE_SCOPES)
  for part, values in policy.PARTS.items():
    _choice(c, f"model.moe.impl.{part}", ("auto",) + values)
  if moe.activation:
    _choice(c, "model.moe.activation", ACTIVATIONS)
  if spec.is_moe:
    E = moe.num_experts
    if not isinstance(moe.top_k, int) or not 1 <= moe.top_k <= E:
      _fail("model.moe.top_k", moe.top_k, f"must be in [1, num_experts={E}]")
    bad = routing.ROUTERS[moe.router].check(moe)
    if bad:
      _fail(bad[0], _get(c, bad[0]), bad[1])
    _unread(
      c,
      "model.moe.normalize_gates",
      not routing.ROUTERS[moe.router].normalizes,
      f"router {moe.router!r} does not read it (only "
      + ", ".join(repr(n) for n, r in routing.ROUTERS.items() if r.normalizes)
      + " renormalise their gates)",
    )
    _positive(c, "model.moe.routed_scaling_factor")
    _unread(
      c,
      "model.moe.routed_scaling_factor",
      moe.router not in ("sigmoid_bias", "group_limited"),
      "only routers 'sigmoid_bias' and 'group_limited' scale their gates",
    )
    for key in ("model.moe.num_groups", "model.moe.top_k_groups"):
      _unread(
        c,
        key,
        moe.router not in ("hierarchical", "group_limited"),
        "only routers 'hierarchical' and 'group_limited' group the experts",
      )
    if not isinstance(moe.every, int) or moe.every < 1:
      _fail("model.moe.every", moe.every, "must be an integer >= 1")
    if not spec.moe_layers:
      _fail(
        "model.moe.every",
        moe.every,
        f"with offset {moe.offset} selects no layer of model.num_layers={m.num_layers}",
      )
    for key in ("model.moe.capacity_factor", "model.moe.eval_capacity_factor"):
      _positive(c, key)
    _positive(c, "model.moe.min_capacity", allow_zero=True)
    if moe.second_expert_policy != "all" and not routing.ROUTERS[moe.router].randomness(moe):
      _fail(
        "model.moe.second_expert_policy",
        moe.second_expert_policy,
        "'random' and 'sampling' need router 'topk' with top_k >= 2; use 'all'",
      )
    if not 0 <= moe.jitter < 1:
      _fail("model.moe.jitter", moe.jitter, "must be in [0, 1)")
    if not 0 <= moe.eom_rate < 1:
      _fail("model.moe.eom_rate", moe.eom_rate, "must be in [0, 1)")
    if not 0 <= moe.expert_dropout < 1:
      _fail("model.moe.expert_dropout", moe.expert_dropout, "must be in [0, 1)")
    _choice(c, "model.moe.router_dtype", ROUTER_DTYPES)

  _validate_finetuning(c)
  _choice(c, "train.optimizer", OPTIMIZERS)
  _choice(c, "train.schedule", SCHEDULES)
  _choice(c, "train.remat", REMATS)
  _choice(c, "train.moments_dtype", ("param", "float32"))
  _choice(c, "train.save_optimizer", (True, False))
  _unread(c, "train.b1", t.optimizer != "adamw", f"train.optimizer={t.optimizer!r} has no b1")
  _unread(c, "train.b2", t.optimizer != "adamw", f"train.optimizer={t.optimizer!r} has no b2")
  _unread(
    c,
    "train.end_lr_fraction",
    t.schedule != "cosine",
    f"only the cosine schedule decays to it (train.schedule={t.schedule!r})",
  )
  if not 0 <= t.end_lr_fraction <= 1:
    _fail("train.end_lr_fraction", t.end_lr_fraction, "must be in [0, 1]")
  if not isinstance(t.schedule_offset, int) or t.schedule_offset < 0:
    _fail("train.schedule_offset", t.schedule_offset, "must be an integer >= 0")
  if not 0 <= t.cooldown_steps <= t.num_steps:
    allowed = f"must be in [0, train.num_steps={t.num_steps}]"
    _fail("train.cooldown_steps", t.cooldown_steps, allowed)
  if (
    not isinstance(t.skip_nonfinite_steps, int)
    or isinstance(t.skip_nonfinite_steps, bool)
    or t.skip_nonfinite_steps < 0
  ):
    _fail("train.skip_nonfinite_steps", t.skip_nonfinite_steps, "must be an integer >= 0")
  if not isinstance(t.seed, int):
    _fail("train.seed", t.seed, "must be an integer")
  profile_window(t)
  n = t.microbatches
  if not isinstance(n, int) or isinstance(n, bool) or n < 1 or d.batch_size % n:
    _fail(
      "train.microbatches", n, f"must be an integer >= 1 dividing data.batch_size={d.batch_size}"
    )
  _validate_mesh(c)
  return c


ROPE_SCALINGS = {  # rope_type: (required keys, optional keys)
  "linear": (("factor",), ()),
  "dynamic": (("factor", "max_position_embeddings"), ()),
  "llama3": (
    ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    (),
  ),
  "yarn": (
    ("original_max_position_embeddings",),
    (
      "factor",
      "max_position_embeddings",
      "beta_fast",
      "beta_slow",
      "truncate",
      "attention_factor",
      "mscale",
      "mscale_all_dim",
    ),
  ),
}
LAYER_TYPES = ("full_attention", "sliding_attention")


def _validate_gpt_oss(c):
  """model.rope_scaling, the attention sinks and windows, swiglu_clamped."""
  m, d = c.model, c.data
  rs = m.rope_scaling
  if rs is not None:
    if not hasattr(rs, "get") or m.position != "rope":
      _fail("model.rope_scaling", rs, "must be None or a ConfigDict, with model.position='rope'")
    kind = rs.get("rope_type")
    if kind not in ROPE_SCALINGS:
      _fail("model.rope_scaling.rope_type", kind, f"must be one of {', '.join(ROPE_SCALINGS)}")
    need, may = ROPE_SCALINGS[kind]
    for k in rs:
      if k not in ("rope_type", *need, *may):
        _fail(f"model.rope_scaling.{k}", rs[k], f"is not a key of rope_type {kind!r}")
    for k in need:
      if rs.get(k) is None:
        _fail(f"model.rope_scaling.{k}", None, f"is required by rope_type {kind!r}")
    if kind == "yarn" and rs.get("factor") is None and rs.get("max_position_embeddings") is None:
      _fail("model.rope_scaling.factor", None, "yarn needs factor (or max_position_embeddings)")
    if kind == "dynamic" and d.seq_len > rs.max_position_embeddings:
      _fail(
        "model.rope_scaling.rope_type",
        kind,
        f"'dynamic' changes its frequencies with the length past max_position_embeddings="
        f"{rs.max_position_embeddings} (data.seq_len={d.seq_len}); only the static case is "
        "supported",
      )
  _choice(c, "model.attn_sinks", (False, True))
  _choice(c, "model.attn_out_bias", (False, True))
  _choice(c, "model.moe.router_logit_bias", (False, True))
  _choice(c, "model.moe.expert_bias", (False, True))
  w = m.sliding_window
  if not isinstance(w, int) or isinstance(w, bool) or w < 0:
    _fail("model.sliding_window", w, "must be an integer >= 0 (0 = no window)")
  types = tuple(m.layer_types)
  if types and (len(types) != m.num_layers or any(t not in LAYER_TYPES for t in types)):
    _fail(
      "model.layer_types",
      types,
      f"must be () or {m.num_layers} (model.num_layers) of {', '.join(map(repr, LAYER_TYPES))}",
    )
  if w and "sliding_attention" not in types:
    _fail("model.sliding_window", w, "no layer of model.layer_types is 'sliding_attention'")
  if "sliding_attention" in types and not w:
    _fail("model.layer_types", types, "'sliding_attention' needs model.sliding_window > 0")
  if w and m.scan_layers:
    _fail("model.scan_layers", True, "the layers differ in their attention window")
  if m.moe.expert_bias and routing.ROUTERS[m.moe.router].by_expert:
    _fail("model.moe.expert_bias", True, f"router {m.moe.router!r} is not supported with it")
  clamped = "swiglu_clamped" in (m.activation, m.moe.activation)
  for key in ("model.swiglu_alpha", "model.swiglu_limit"):
    _positive(c, key)
    _unread(c, key, not clamped, "no FFN's activation is 'swiglu_clamped'")


def _validate_mla(c):
  """model.attention and model.mla (layers.MLAttention)."""
  m = c.model
  _choice(c, "model.attention", ("mha", "mla"))
  if m.attention != "mla":
    return
  for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    _positive(c, f"model.mla.{k}")
  _positive(c, "model.mla.q_lora_rank", allow_zero=True)
  if m.mla.qk_rope_head_dim % 2:
    _fail("model.mla.qk_rope_head_dim", m.mla.qk_rope_head_dim, "must be even (RoPE pairs)")
  if m.position != "rope":
    _fail("model.position", m.position, "model.attention='mla' needs 'rope' (its decoupled key)")
  for key, off in (
    ("model.attn_sinks", False),
    ("model.attn_out_bias", False),
    ("model.sliding_window", 0),
    ("model.qkv_bias", False),
    ("model.qk_norm", "none"),
    ("model.clip_qkv", 0.0),
  ):
    if _get(c, key) != off:
      _fail(key, _get(c, key), f"is not supported with model.attention='mla' (use {off!r})")


def _validate_mtp(c):
  """model.mtp_depth and model.mtp_loss_weight (transformer.MtpModule)."""
  m = c.model
  if "mtp_depth" not in m:
    return
  d = m.mtp_depth
  if not isinstance(d, int) or isinstance(d, bool) or d < 0:
    _fail("model.mtp_depth", d, "must be an integer >= 0 (0 = no multi-token prediction)")
  w = m.mtp_loss_weight
  if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w < float("inf"):
    _fail("model.mtp_loss_weight", w, "must be a number >= 0")
  if d and c.train.microbatches > 1:
    _fail(
      "model.mtp_depth",
      d,
      f"with train.microbatches={c.train.microbatches} is not supported (the MTP loss is "
      "computed over whole batches only)",
    )


def profile_window(t) -> tuple[int, int] | None:
  """train.profile_steps "A:B" as (A, B), None when off; a bad value is a ConfigError."""
  spec = t.get("profile_steps", "")
  if not spec:
    return None
  a, sep, b = str(spec).partition(":")
  if not (sep and a.isdigit() and b.isdigit() and 1 <= int(a) <= int(b)):
    _fail("train.profile_steps", spec, "must be 'A:B' with 1 <= A <= B (steps, inclusive)")
  return int(a), int(b)


def _validate_objective(c):
  """data.objective and its keys (sparse_lm/data/seq2seq.py)."""
  d = c.data
  _choice(c, "data.objective", ("lm", "span_corruption", "seq2seq"))
  pairs = d.dataset.startswith("seq2seq:")
  if pairs != (d.objective == "seq2seq"):
    _fail(
      "data.objective",
      d.objective,
      "'seq2seq' goes with a data.dataset 'seq2seq:<file.jsonl>' or 'seq2seq:translation', "
      f"and only with one (data.dataset={d.dataset!r})",
    )
  if d.objective == "span_corruption" and d.dataset.startswith(("sft:", "chat:")):
    _fail("data.objective", d.objective, "needs a text dataset ('stdlib', 'files:', TFDS)")
  if not 0 < d.noise_density < 1:
    _fail("data.noise_density", d.noise_density, "must be in (0, 1)")
  _positive(c, "data.mean_noise_span_length")
  if not isinstance(d.targets_len, int) or d.targets_len < 0:
    _fail("data.targets_len", d.targets_len, "must be an integer >= 0 (0 = data.seq_len)")
  for key in ("data.noise_density", "data.mean_noise_span_length"):
    _unread(c, key, d.objective != "span_corruption", "span_corruption only")
  _unread(c, "data.targets_len", d.objective != "seq2seq", "seq2seq only")
  if not isinstance(d.languages, (tuple, list)) or not all(isinstance(g, str) for g in d.languages):
    _fail("data.languages", d.languages, "must be a tuple of locale names, e.g. ('de', 'ja')")
  if d.languages and d.dataset != "seq2seq:translation":  # (a saved run's () reads back as [])
    _fail("data.languages", d.languages, "has no effect: seq2seq:translation only")


def _validate_arch(c):
  """model.arch against data.objective, model.position and what the
  encoder-decoder does not support yet (models/encoder_decoder.py)."""
  m, d = c.model, c.data
  arch = m.get("arch", "decoder")  # configs saved before the key: decoder-only
  if arch not in ARCHS:
    _fail("model.arch", arch, f"must be one of {', '.join(map(repr, ARCHS))}")
  encdec = arch == "encoder_decoder"
  if encdec and d.objective == "lm":
    _fail("model.arch", arch, "needs data.objective 'span_corruption' or 'seq2seq' (not 'lm')")
  if not encdec and d.objective != "lm":
    _fail("data.objective", d.objective, "needs model.arch='encoder_decoder'")
  if encdec != (m.position in ENCDEC_POSITIONS):
    _fail(
      "model.position",
      m.position,
      "'relative' (T5's position buckets) and 'sinusoidal' (fairseq's) go with "
      f"model.arch='encoder_decoder', and only with it (model.arch={arch!r})",
    )
  for key in ("model.scale_embedding", "model.mlp_bias"):
    if key.rpartition(".")[2] in m:
      _choice(c, key, (False, True))
      _unread(c, key, not encdec, "only model.arch='encoder_decoder' reads it")
  if not encdec:
    return
  for key, off in (
    ("model.attention", "mha"),
    ("model.scan_layers", False),
    ("model.mtp_depth", 0),
    ("model.attn_sinks", False),
    ("model.sliding_window", 0),
    ("model.qk_norm", "none"),
    ("model.clip_qkv", 0.0),
  ):
    block, _, name = key.rpartition(".")
    if name in _get(c, block) and _get(c, key) != off:
      _fail(key, _get(c, key), f"is not supported with model.arch='encoder_decoder' (use {off!r})")


def _validate_sft(c):
  d = c.data
  if len(d.dataset) == len("sft:"):
    _fail("data.dataset", d.dataset, "'sft:' needs a JSONL file, e.g. 'sft:data/train.jsonl'")
  if d.tokenizer == "sentencepiece" and (
    not d.tokenizer_dataset or d.tokenizer_dataset.startswith("sft:")
  ):
    _fail(
      "data.tokenizer_dataset",
      d.tokenizer_dataset,
      "an sft: dataset needs the dataset its tokenizer was trained on (the base run's, e.g. "
      "'stdlib')",
    )
  if "{prompt}" not in d.sft_template or not d.sft_template.endswith("{response}"):
    _fail("data.sft_template", d.sft_template, "must contain {prompt} and end with {response}")
  _choice(c, "data.sft_overlong", ("truncate", "refuse"))


def _validate_chat(c):
  d = c.data
  if len(d.dataset) == len("chat:"):
    _fail("data.dataset", d.dataset, "'chat:' needs a JSONL file, e.g. 'chat:data/train.jsonl'")
  if d.tokenizer != "huggingface":
    _fail(
      "data.dataset",
      d.dataset,
      "a chat: dataset needs data.tokenizer='huggingface' (the chat template is the tokenizer's)",
    )
  _choice(c, "data.sft_overlong", ("truncate", "refuse"))


FROZEN_PRESETS = (":router", ":experts", ":non_experts")  # what each freezes: finetune.py
GATE_SCALES = ("none", "expected")


def _validate_finetuning(c):
  t = c.train
  if not isinstance(t.init_from, str):
    _fail("train.init_from", t.init_from, "must be a workdir, optionally with ':step'")
  rules = t.init_rules
  ok = isinstance(rules, (tuple, list)) and all(
    isinstance(r, (tuple, list))
    and len(r) == 2
    and isinstance(r[0], str)
    and (r[1] is None or isinstance(r[1], str))
    for r in rules
  )
  if not ok:
    _fail("train.init_rules", rules, "must be ((regex, source path or None), ...)")
  for rx, _ in rules:
    try:
      re.compile(rx)
    except re.error as e:
      _fail("train.init_rules", rx, f"is not a regex ({e})")
  upcycling = t.init_gate_scale != "none" or t.init_reinit_fraction or t.init_router != "fresh"
  if (rules or upcycling) and not t.init_from:
    _fail(
      "train.init_from",
      t.init_from,
      "is empty, but init_rules / init_gate_scale / init_reinit_fraction / init_router are set",
    )
  _choice(c, "train.init_gate_scale", GATE_SCALES)
  _choice(c, "train.init_router", ("fresh", "zero"))
  _choice(c, "train.init_data", ("fresh", "continue"))
  if t.init_data == "continue" and not t.init_from:
    _fail("train.init_data", t.init_data, "needs train.init_from (the run whose data it continues)")
  moe = c.model.moe
  if t.init_gate_scale == "expected" and routing.ROUTERS[moe.router].gate_mass is None:
    _fail(
      "train.init_gate_scale",
      t.init_gate_scale,
      f"router {moe.router!r} has no fixed gate sum per token to scale by; use 'none'",
    )
  if not 0 <= t.init_reinit_fraction < 1:
    _fail("train.init_reinit_fraction", t.init_reinit_fraction, "must be in [0, 1)")
  if not isinstance(t.frozen, str):
    _fail("train.frozen", t.frozen, "must be a regex or one of " + ", ".join(FROZEN_PRESETS))
  if t.frozen.startswith(":") and t.frozen not in FROZEN_PRESETS:
    _fail("train.frozen", t.frozen, "a preset is one of " + ", ".join(FROZEN_PRESETS))
  if not t.frozen.startswith(":"):
    try:
      re.compile(t.frozen)
    except re.error as e:
      _fail("train.frozen", t.frozen, f"is not a regex ({e})")


def _check_tfds_name(name: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  base = name.split("/")[0].split(":")[0]
  if base not in tfds.list_builders(with_community_datasets=False):
    _fail(
      "data.dataset",
      name,
      "unknown dataset: use 'stdlib', 'files:<glob>', or a TFDS name such as 'lm1b' or 'c4/en'",
    )


def _validate_mesh(c):
  axes = c.mesh
  try:
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
  except (TypeError, ValueError):
    _fail("mesh", axes, "must be a list of (axis_name, size) pairs")
  if len(set(names)) != len(names):
    _fail("mesh", axes, "axis names must be unique")
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    _fail("mesh", axes, "sizes must be >= 1, with at most one -1 (fills the rest)")
  for logical, mesh_axes in c.sharding_rules:
    mesh_axes = mesh_axes if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
    for a in mesh_axes:
      if a is not None and a not in names:
        _fail("sharding_rules", (logical, a), f"names a mesh axis not in config.mesh {names}")
