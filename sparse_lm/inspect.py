r"""Parameters, FLOPs and memory of any config, without allocating the model.

  python -m sparse_lm.inspect --config=configs/mixtral.py:8x7b
  python -m sparse_lm.inspect --config=configs/switch.py:base --compare=configs/dense.py:base
  python -m sparse_lm.inspect --config=configs/glam.py:64b_64e --devices=1024

Counts come from `nnx.eval_shape` of the real model, so they follow the code
and nothing is allocated: a 1T-parameter config takes seconds on a laptop.

- Routed expert weights are the Params whose first logical axis is "expert"
  (shared experts are not routed: always active). A token uses
  `experts_per_token` of the E routed experts, so active = total - routed
  + routed * experts_per_token / E.
- FLOPs per token: forward = 2 x (active matmul parameters, with the D x V
  logits matmul whether or not embeddings are tied, and no embedding lookups)
  + 4 x layers x seq_len x attention width (QK^T and AV over the full context,
  as in Chinchilla's and PaLM's counts); training = 3 x forward. Expert slots
  left empty by a capacity factor > 1 are not counted (model FLOPs).
- Memory: parameters are float32 whatever model.dtype is; the optimizer state
  is optax's own, shaped by `jax.eval_shape` (AdamW: 2 x params; Adafactor:
  factored). Per device: each array divided over the mesh axes its logical
  names map to under config.sharding_rules, for `--devices` devices.
  Activations are not included.
- Import and export (sparse_lm/convert/, a Hugging Face checkpoint of this
  shape in bfloat16): the host's peak above the interpreter's, one parameter
  at a time (import_host_bytes, export_host_bytes; measured against a real
  run by benchmarks/convert_memory.py).

--compile: does a step fit, before launch (README, "From one CPU to a cluster")

  python -m sparse_lm.inspect --config=configs/mixtral.py:8x7b --compile --devices=64
  python -m sparse_lm.inspect --config=configs/mixtral.py:1b --compile \
      --config.train.remat=full --config.train.microbatches=16
  python -m sparse_lm.inspect --config=configs/dbrx.py:132b --compile --devices=64 \
      --mesh=fsdp=4,expert=16

lowers and compiles the real train step (state.train_step, jitted with the
shardings train.py gives it, the state donated) and the decode step
(decode.forward, one token per row over a cache of data.seq_len slots) for
the config's mesh on --devices simulated CPU devices, from ShapeDtypeStructs
with shardings (nothing is allocated, not even the init), and adds XLA's rows
(compiled.memory_analysis(), per device): arguments, outputs, the donated
arguments reused as outputs, temporaries, generated code and their total
(arguments + outputs - donated + temporaries + code), XLA's FLOPs per device
(cost_analysis()) beside the analytic count above, and the compile time.
--mesh replaces config.mesh's sizes ("fsdp=8,expert=8"; axes not named: 1).

- Simulated devices: the program asks JAX for --devices CPU devices itself
  (jax.config "jax_num_cpu_devices", and the CPU platform only) at the start
  of main, before JAX's first operation; JAX reads it when its backends start,
  so no XLA_FLAGS and no second process are needed. Called from a process
  whose backends have started, the functions below use the CPU devices it
  has, and say so when they are too few (a test process sets
  XLA_FLAGS=--xla_force_host_platform_device_count before importing jax).
- These are XLA:CPU's numbers. A GPU's compile of the same program differs
  in fusion, scheduling and how it keeps bf16 intermediates, so they are an
  estimate of a GPU's, not its number (no GPU has checked by how much yet);
  train.py's check (check_fits: the same analysis by the device's own
  compiler) has the last word. Attention is jax.nn.dot_product_attention's
  XLA form on both: its [B, H, L, L] scores are in the temporaries.
- XLA counts a loop's body once: under model.scan_layers, and in the CPU
  dropless kernel (block loops), its FLOPs fall below the analytic count.
- Time: Mixtral 8x7B on 64 devices compiles in about 4.5 minutes on a 2-core
  VM (README), most of it XLA's; the decode step adds seconds.
"""

from __future__ import annotations

import functools
import math
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm import config as cfglib
from sparse_lm import decode
from sparse_lm import finetune
from sparse_lm import optimizer as optlib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.errors import ConfigError
from sparse_lm.errors import RunError
from sparse_lm.models.moe import routing
from sparse_lm.models.transformer import Transformer
from sparse_lm.params import is_routed
from sparse_lm.params import param_list

LOOKUP_TABLES = ("embedding", "pos_embed", "rel_bias")  # gathered, not multiplied


def _define_flags():
  """Only when run as a program: the trainer imports this module and owns --config."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  config_flags.DEFINE_config_file(
    "compare", None, "A second config, shown side by side.", lock_config=True
  )
  flags.DEFINE_integer(
    "devices",
    0,
    "Device count for the per-device rows; config.mesh's -1 axis takes "
    "what is left. 0 = the fewest the mesh allows (-1 resolved to 1).",
  )
  flags.DEFINE_bool(
    "compile",
    False,
    "Also compile the train step and the decode step for the mesh on --devices simulated "
    "CPU devices and print XLA's bytes per device, its FLOPs and the compile times.",
  )
  flags.DEFINE_string(
    "mesh",
    "",
    "Replaces config.mesh's sizes: 'axis=size,...' (e.g. 'fsdp=-1' or 'data=8,expert=8'); "
    "axes not named get 1.",
  )


def experts_per_token(m) -> float:
  """How many routed experts a token uses, on average."""
  router = routing.ROUTERS[m.moe.router]
  if router.by_expert:  # each expert takes cf * T * k / E tokens
    return m.moe.capacity_factor * router.assignments_per_token(m.moe)
  return router.assignments_per_token(m.moe)


def optimizer_bytes(t, params, param_dtype: str = "float32") -> dict[str, int]:
  """Bytes of optimizer state per parameter path, from the init of the
  optimizer the trainer builds (optimizer.make_optimizer) on parameters of
  `param_dtype` (model.param_dtype); parameters that train.frozen freezes
  have none."""
  opt = optlib.make_optimizer(t)
  frozen = finetune.frozen_predicate(t.frozen) if t.frozen else lambda path, names: False
  shapes = {
    path: jax.ShapeDtypeStruct(shape, jnp.dtype(param_dtype))
    for path, shape, names in params
    if not frozen(path, names)
  }
  state = jax.eval_shape(opt.init, shapes)
  per_param = dict.fromkeys((path for path, _, _ in params), 0)
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = [k.key for k in key_path if isinstance(k, jax.tree_util.DictKey)]
    if keys and keys[0] in per_param:
      per_param[keys[0]] += math.prod(leaf.shape) * leaf.dtype.itemsize
  return per_param


def summarize(c, vocab_size: int | None = None, model=None) -> dict:
  """Total / active params, FLOPs per token and memory (bytes) of config `c`.

  Keys: total_params, active_params, routed_expert_params, embedding_params,
  train_flops_per_token, inference_flops_per_token, param_bytes, optimizer_bytes,
  mtp_params, mtp_active_params. The multi-token prediction modules
  (model.mtp_depth) are left out of total / active, as DeepSeek-V3's 671B /
  37B leave out its 14B MTP module, and counted in mtp_params (their embedding
  and head are the main model's); their FLOPs are in the training FLOPs only
  (decoding drops them); param_bytes and optimizer_bytes hold them.
  `model`: an abstract (or real) Transformer of `c`, to skip building one.
  """
  m = cfglib.model_spec(c)
  V = vocab_size or statelib.vocab_size_of(c)
  model = model if model is not None else statelib.abstract_model(c, V)
  params = param_list(model)
  k_frac = experts_per_token(m) / m.moe.num_experts if m.is_moe else 1.0
  total = routed = lookup = unembed = vectors = 0
  mtp_total = mtp_routed = mtp_vectors = 0
  for path, shape, names in params:
    n = math.prod(shape)
    if path.startswith("mtp/"):  # the MTP modules (model.mtp_depth): counted apart
      mtp_total += n
      mtp_routed += n if is_routed(path, names) else 0
      mtp_vectors += n if len(shape) < 2 else 0
      continue
    total += n
    routed += n if is_routed(path, names) else 0
    lookup += n if path.split("/")[-1] in LOOKUP_TABLES else 0
    unembed += n if path.split("/")[-1] == "unembed" else 0
    vectors += n if len(shape) < 2 else 0  # norm scales and biases: no matmul
  active = total - routed + routed * k_frac
  mtp_active = mtp_total - mtp_routed + mtp_routed * k_frac
  matmul = active - lookup - unembed - vectors + V * m.d_model
  attn_width = m.num_heads * m.head_dim  # per query and key: H Z for q . k, H Z for p v
  if m.attention == "mla":
    attn_width = (
      m.num_heads * (m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim + m.mla.v_head_dim) / 2
    )
  fwd = 2 * matmul + 4 * m.num_layers * c.data.seq_len * attn_width
  if c.model.get("arch") == "encoder_decoder":  # per encoder token (encoder_decoder_flops)
    fwd = encoder_decoder_flops(c, params, k_frac, V) / c.data.seq_len
  # Each MTP module: its matmuls, its block's attention and the shared head's
  # D x V logits; trained, never run at inference (DeepSeek-V3 section 2.2).
  mtp_fwd = m.mtp_depth * (4 * c.data.seq_len * attn_width + 2 * V * m.d_model)
  mtp_fwd += 2 * (mtp_active - mtp_vectors)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  param_bytes = sum(math.prod(p.shape) * p.dtype.itemsize for p in leaves)  # model.param_dtype
  return {
    "total_params": int(total),
    "active_params": int(round(active)),
    "routed_expert_params": int(routed),
    "embedding_params": int(lookup + unembed),
    "input_embedding_params": int(lookup),
    "mtp_params": int(mtp_total),
    "mtp_active_params": int(round(mtp_active)),
    "train_flops_per_token": float(3 * (fwd + mtp_fwd)),
    "inference_flops_per_token": float(fwd),
    "param_bytes": int(param_bytes),
    "optimizer_bytes": int(sum(optimizer_bytes(c.train, params, c.model.param_dtype).values())),
  }


def encoder_decoder_flops(c, params, k_frac: float, vocab_size: int) -> float:
  """Forward FLOPs of one encoder-decoder example (model.arch="encoder_decoder"):
  data.seq_len encoder tokens and the objective's decoder length Ld
  (seq2seq.lengths). 2 x active matmul parameters x the tokens they apply to
  (the encoder's and the cross-attention's key and value projections: the
  encoder tokens; the rest of the decoder and the D x V logits: the decoder
  tokens) + 4 x layers x attention width x (Le^2 + Ld^2 + Ld Le) (encoder,
  decoder and cross-attention scores and mixing, full context as for the
  decoder-only count). summarize divides it by data.seq_len: FLOPs per token
  of the batch the trainer counts (batch_size x seq_len)."""
  from sparse_lm.data import seq2seq  # pylint: disable=g-import-not-at-top

  m = cfglib.model_spec(c)
  Le, Ld = seq2seq.lengths(c.data)
  enc = dec = 0.0
  for path, shape, names in params:
    if len(shape) < 2 or path.split("/")[-1] in LOOKUP_TABLES:
      continue
    n = math.prod(shape) * (k_frac if is_routed(path, names) else 1.0)
    keys = path.split("/")
    on_encoder = keys[0] == "encoder" or ("cross_attn" in keys and keys[-1] in ("wk", "wv"))
    enc, dec = (enc + n, dec) if on_encoder else (enc, dec + n)
  dec += vocab_size * m.d_model  # the logits, tied or not
  width = m.num_heads * m.head_dim
  return 2 * (enc * Le + dec * Ld) + 4 * m.num_layers * width * (Le * Le + Ld * Ld + Ld * Le)


def _split(names: tuple, shape: tuple, rules, sizes: dict) -> int:
  """Elements per device of an array with logical `names` on a mesh of `sizes`."""
  used, n = set(), 1
  for dim, name in zip(shape, names):
    axes = sharding.axes_of(rules, name) or ((name,) if name in sizes else ())
    axes = [a for a in axes if a not in used]  # a mesh axis shards one dim at most
    used.update(axes)
    n *= -(-dim // math.prod(sizes[a] for a in axes))
  return n * math.prod(shape[len(names) :])


def per_device(c, model, num_devices: int) -> dict:
  """Mesh sizes, and parameter / optimizer bytes per device, on `num_devices`."""
  sizes = sharding.mesh_sizes(c, num_devices)
  rules = c.sharding_rules
  params = param_list(model)
  opt = optimizer_bytes(c.train, params, c.model.param_dtype)
  itemsize = jnp.dtype(c.model.param_dtype).itemsize
  param_b = opt_b = 0.0
  for path, shape, names in params:
    frac = _split(names, shape, rules, sizes) / math.prod(shape)
    param_b += itemsize * math.prod(shape) * frac
    opt_b += opt[path] * frac  # approximate for factored (Adafactor) slots
  return {"mesh": sizes, "param_bytes": param_b, "optimizer_bytes": opt_b}


# What import and export hold beside their one parameter, whatever the model:
# a block of rows being read or cast (safetensors_io.CHUNK_BYTES, 16 MiB)
# and TensorStore's own buffers and metadata (measured 14-35 MiB above the
# interpreter between parameters by benchmarks/convert_memory.py).
CONVERT_OVERHEAD = 64 * 2**20


def import_host_bytes(c, model, source_bytes: int = 2, written_bytes: int = 2) -> float:
  """Peak host memory of importing a Hugging Face checkpoint of this config's
  shape (sparse_lm/convert/importer.py) above the interpreter's: its largest
  parameter once, in `written_bytes` a value (--dtype, by default the
  source's), plus CONVERT_OVERHEAD. The import reads the files a block of
  rows (or an expert) at a time into that one array, and Orbax writes it
  uncompressed from a jax.Array that aliases it (no copy). `source_bytes`
  does not enter any more (the block is in the overhead). An upper bound,
  checked by benchmarks/convert_memory.py (measured: 1.8x its largest
  bfloat16 tensor of 62.5 MiB, 0.11 GiB; this gives 0.12 GiB)."""
  del source_bytes
  n = max(math.prod(shape) for _, shape, _ in param_list(model))
  return n * written_bytes + CONVERT_OVERHEAD


def export_host_bytes(c, model, stored_bytes: int = 4, out_bytes: int = 2) -> float:
  """Peak host memory of exporting a run of this config's shape
  (sparse_lm/convert/exporter.py) above the interpreter's: its largest
  parameter twice in `stored_bytes` a value (model.param_dtype, or the
  import's dtype for an imported run; TensorStore decodes each array from a
  buffer of its own, so a read holds it twice), plus CONVERT_OVERHEAD (the
  shards stream to disk, cast to `out_bytes` a block of rows at a time). An
  upper bound, checked by benchmarks/convert_memory.py."""
  del out_bytes
  n = max(math.prod(shape) for _, shape, _ in param_list(model))
  return 2 * n * stored_bytes + CONVERT_OVERHEAD


# ------------------------------------------------------ compiled: XLA's bytes


def simulate_devices(n: int) -> int:
  """Asks JAX for `n` CPU devices (jax_num_cpu_devices, the CPU platform
  only), which it reads when its backends start: at the first JAX operation,
  not at `import jax`. Returns the CPU devices this process has (n, unless a
  JAX operation ran before)."""
  try:
    jax.config.update("jax_num_cpu_devices", n)
    jax.config.update("jax_platforms", "cpu")
  except RuntimeError:  # the backends have started: what they have is what there is
    pass
  return len(jax.devices("cpu"))


def cpu_mesh(c, num_devices: int) -> jax.sharding.Mesh:
  """config.mesh over the first `num_devices` CPU devices of this process."""
  sharding.mesh_sizes(c, num_devices)  # a ConfigError naming the key comes first
  have = len(jax.devices("cpu"))
  if have < num_devices:
    raise ConfigError(
      f"--devices={num_devices}: this process has {have} CPU devices; run "
      "python -m sparse_lm.inspect (it asks JAX for them before its first operation), or "
      f"set XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before jax starts"
    )
  return sharding.make_mesh(c, jax.devices("cpu")[:num_devices])


def abstract_batch(c, batch_shd, like: dict | None = None) -> dict:
  """A global training batch [B, L] as ShapeDtypeStructs with `batch_shd`:
  the keys, dtypes and lengths of `like` (a batch of the run's input: an
  encoder-decoder's decoder features are shorter than data.seq_len), else the
  pretraining input's (inputs, targets int32; weights float32; an
  encoder-decoder's: seq2seq's T5X features, [B, Le] and [B, Ld])."""
  if like is None and c.model.get("arch") == "encoder_decoder":
    from sparse_lm.data import seq2seq  # pylint: disable=g-import-not-at-top

    Le, Ld = seq2seq.lengths(c.data)
    like = {k: np.zeros((1, Le), np.int32) for k in seq2seq.ENCODER_FEATURES}
    like |= {k: np.zeros((1, Ld), np.int32) for k in seq2seq.DECODER_FEATURES}
    like["decoder_loss_weights"] = np.zeros((1, Ld), np.float32)
  like = like or {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
  shape = lambda v: (c.data.batch_size, *getattr(v, "shape", (0, c.data.seq_len))[1:])
  return {
    k: jax.ShapeDtypeStruct(shape(v), jnp.dtype(getattr(v, "dtype", v)), sharding=batch_shd)
    for k, v in like.items()
  }


def train_program(c, mesh, vocab_size: int | None = None):
  """(the jitted train step, its abstract arguments), as train.py builds them:
  state.train_step with the state's shardings in and out, the state donated,
  the batch sharded over ("batch", "length"), the step number replicated."""
  V = vocab_size or statelib.vocab_size_of(c)
  with sharding.use(mesh, c):
    graphdef, abs_state, state_shd = statelib.abstract_state(c, V, mesh)
    batch_shd, repl = sharding.named(mesh, "batch", "length"), sharding.named(mesh)
  step = jax.jit(
    statelib.train_step(c, graphdef),
    in_shardings=(state_shd, batch_shd, repl),
    out_shardings=(state_shd, repl),
    donate_argnums=0,
  )
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, state_shd
  )
  return step, (
    state,
    abstract_batch(c, batch_shd),
    jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
  )


def decode_program(c, mesh, batch: int, cache_len: int, vocab_size: int | None = None):
  """(decode.forward with one token per row, its abstract arguments): the
  inference model (decode.for_inference: weights in model.dtype) and a KV
  cache of `cache_len` slots for `batch` rows, sharded by the logical names
  (batch, kv_heads, head_dim) as decoding shards them."""
  V = vocab_size or statelib.vocab_size_of(c)
  spec = cfglib.model_spec(c)
  m = decode.inference_spec(spec)
  with sharding.use(mesh, c):
    abs_model = nnx.eval_shape(lambda: decode.for_inference(Transformer(spec, V, rngs=nnx.Rngs(0))))
    graphdef, abs_state = nnx.split(abs_model)
    shd = nnx.get_named_sharding(abs_state, mesh)
    cache_names = {  # by rank: a per-layer [B, S, J, Z], a stacked [layers, B, S, J, Z]
      0: (),
      2: ("batch", None),
      4: ("batch", None, "kv_heads", "head_dim"),
      5: (None, "batch", None, "kv_heads", "head_dim"),
    }
    if m.attention == "mla":  # [B, S, C] latents and [B, S, R] RoPE keys (stacked: [layers, ...])
      cache_names = {
        0: (),
        2: ("batch", None),
        3: ("batch", None, None),
        4: (None, "batch", None, None),
      }
    place = lambda a, names: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=sharding.named(mesh, *names)
    )
    cache = jax.tree.map(
      lambda a: place(a, cache_names[a.ndim]),
      jax.eval_shape(lambda: decode.init_cache(m, batch, cache_len)),
    )
    row = lambda dt: place(jax.ShapeDtypeStruct((batch, 1), dt), ("batch", "length"))
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shd
  )
  step = jax.jit(functools.partial(decode.forward, graphdef), donate_argnames=("cache",))
  return step, (state, row(jnp.int32), row(jnp.float32), row(jnp.int32), cache)


def compiled_stats(step, args) -> dict:
  """Lowers and compiles the jitted `step` for abstract `args` (nothing is
  allocated). XLA's bytes per device (compiled.memory_analysis(): arguments,
  outputs, aliased = donated arguments reused as outputs, temporaries,
  generated code; total = arguments + outputs - aliased + temporaries +
  code), XLA's FLOPs per device (cost_analysis()), the seconds the compile
  took, and the Compiled itself ("compiled"). Run it under the mesh and the
  rules the step traces with (sharding.use): activations are constrained by
  logical names while tracing."""
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one per program
  out = {
    "arguments": mem.argument_size_in_bytes,
    "outputs": mem.output_size_in_bytes,
    "aliased": mem.alias_size_in_bytes,
    "temporaries": mem.temp_size_in_bytes,
    "code": mem.generated_code_size_in_bytes,
  }
  out["total"] = (
    out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
  )
  return {
    **out,
    "flops": float((cost or {}).get("flops", 0.0)),
    "seconds": seconds,
    "compiled": compiled,
  }


def compile_rows(
  c, num_devices: int, say=lambda msg: None, decode_step: bool = True
) -> dict[str, dict]:
  """The train step and (`decode_step`) the decode step of config `c`
  compiled for its mesh on `num_devices` CPU devices of this process
  (cpu_mesh): compiled_stats of each, with "analytic_flops" per device
  (summarize's FLOPs per token x the step's tokens / devices) beside XLA's.
  The decode step is one token per row for data.batch_size rows over a cache
  of data.seq_len slots; absent for a router that cannot decode."""
  mesh = cpu_mesh(c, num_devices)
  s = summarize(c)
  B, L = c.data.batch_size, c.data.seq_len
  out = {}
  with sharding.use(mesh, c):
    say(f"compiling the train step on {num_devices} CPU device(s)")
    out["train"] = compiled_stats(*train_program(c, mesh))
    out["train"]["analytic_flops"] = s["train_flops_per_token"] * B * L / num_devices
    m = cfglib.model_spec(c)
    encdec = c.model.get("arch") == "encoder_decoder"  # its decode step: not yet
    if decode_step and not encdec and (not m.is_moe or m.moe.router_facts.decodes):
      say(f"compiling the decode step (batch {B}, cache {L})")
      out["decode"] = compiled_stats(*decode_program(c, mesh, B, L))
      out["decode"]["analytic_flops"] = s["inference_flops_per_token"] * B / num_devices
  for stats in out.values():
    del stats["compiled"]  # the executables are not kept (their memory is the host's)
  return out


def check_fits(
  c, step, abs_state, state_shd, batch_shd, like_batch=None, say=print, *, bytes_limit=None
):
  """Refuses, before the first step, a train step that cannot fit in device memory.

  train.py calls it with its jitted train step, under its mesh. On a GPU or
  TPU, or with `bytes_limit` (tests), it compiles `step` for the abstract
  state (`abs_state` with `state_shd`) and a batch like `like_batch` (keys
  and dtypes) with `batch_shd`, and compares compiled_stats' total bytes per
  device with the device's memory_stats()["bytes_limit"] (or `bytes_limit`):
  over it, a RunError names both and the knobs that lower the need. Returns
  the step to call: the compiled one, so that the first step does not
  compile it again (the jitted `step` for a batch of other keys, shapes or
  dtypes). On CPU, or where the device reports no limit: `step` unchanged.
  XLA's total is the live buffers of the step alone; the input pipeline's
  prefetched batches and the eval step come on top, so a step that needs
  nearly all of the memory may still fail."""
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, state_shd
  )
  device = next(d for d in batch_shd.mesh.devices.flat if d.process_index == jax.process_index())
  if bytes_limit is None:
    if device.platform == "cpu":
      return step
    bytes_limit = (device.memory_stats() or {}).get("bytes_limit")
    if not bytes_limit:
      return step
  batch = abstract_batch(c, batch_shd, like_batch)
  repl = jax.sharding.NamedSharding(batch_shd.mesh, jax.sharding.PartitionSpec())
  stats = compiled_stats(step, (state, batch, jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)))
  need = stats["total"]
  say(
    f"train step: {_bytes(need)} per device (arguments {_bytes(stats['arguments'])}, "
    f"temporaries {_bytes(stats['temporaries'])}) of {_bytes(bytes_limit)}; "
    f"compiled in {stats['seconds']:.1f} s"
  )
  if need > bytes_limit:
    raise RunError(fit_message(c, need, bytes_limit, device, batch_shd.mesh))
  compiled, like = stats["compiled"], _signature(batch)

  def run(state, batch, step_num):
    fn = compiled if _signature(batch) == like else step
    return fn(state, batch, step_num)

  return run


def _signature(batch: dict) -> list:
  return [(k, tuple(v.shape), jnp.dtype(v.dtype)) for k, v in sorted(batch.items())]


def fit_message(c, need: int, available: int, device=None, mesh=None) -> str:
  """The one line of a step that does not fit: the bytes, and what lowers them."""
  where = f"{device.device_kind} " if device is not None else ""
  mesh = dict(mesh.shape) if mesh is not None else dict(c.mesh)
  knobs = []
  if "remat" in c.train:
    knobs.append(f"train.remat=full (now {c.train.remat!r}: recompute activations)")
  if "microbatches" in c.train:
    knobs.append(
      f"train.microbatches=N (now {c.train.microbatches}: 1/N of the activations at a time)"
    )
  if c.model.get("param_dtype", "bfloat16") == "float32":
    knobs.append("model.param_dtype=bfloat16 (halves the parameters and AdamW's moments)")
  knobs.append(
    f"a mesh over more devices or sharding the parameters (config.mesh, now {mesh}: fsdp, expert)"
  )
  knobs.append(f"a smaller data.batch_size (now {c.data.batch_size})")
  return (
    f"the train step needs {_bytes(need)} per device and the {where}device has "
    f"{_bytes(available)}: lower it with " + "; ".join(knobs) + "; "
    "python -m sparse_lm.inspect --config=... --compile --devices=N shows the bytes of a choice"
  )


# ------------------------------------------------------------------- the table


def _num(n: float) -> str:
  for unit, d in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= d:
      return f"{n / d:.2f}{unit}"
  return f"{n:.0f}"


def _bytes(b: float) -> str:
  for unit, d in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
    if b >= d:
      return f"{b / d:,.2f} {unit}"
  return f"{b / 2**10:,.2f} KiB"


def gqa_twin(m):
  """The standard-attention twin of an MLA model's spec (model.attention="mla"):
  the same heads, model.num_kv_heads of them for keys and values, each of
  qk_nope_head_dim (DeepSeek-V2 Table 1's d_h), to compare cache bytes with."""
  return m.replace(attention="mha", head_dim=m.mla.qk_nope_head_dim)


def kv_cache_row(m) -> str:
  """The decoding cache's bytes per token (all layers, model.dtype); an MLA
  model's beside its standard-attention twin's (`gqa_twin`: "MHA twin" where
  it has a kv head per head, as V3's 128), the paper's reduction."""
  kv = decode.cache_bytes(m, 1, 1)
  if m.attention != "mla":
    return _bytes(kv)
  twin_m = gqa_twin(m)
  twin, J = decode.cache_bytes(twin_m, 1, 1), twin_m.num_kv_heads
  name = "MHA twin" if J == m.num_heads else f"GQA twin ({J} kv heads)"
  return f"{_bytes(kv)} ({name} {_bytes(twin)}: {kv / twin:.2%})"


def fewest_devices(c) -> int:
  """The fewest devices config.mesh allows (its -1 axis resolved to 1)."""
  return math.prod(v for _, v in c.mesh if v != -1)


COMPILED_ROWS = (  # (row, compiled_stats key)
  ("compile time", "seconds"),
  ("arguments / device", "arguments"),
  ("outputs / device", "outputs"),
  ("  of which donated args", "aliased"),
  ("temporaries / device", "temporaries"),
  ("generated code", "code"),
  ("total / device", "total"),
  ("FLOPs / device: XLA", "flops"),
  ("FLOPs / device: analytic", "analytic_flops"),
)


def compiled_column(c, compiled: dict[str, dict]) -> dict[str, str]:
  """compile_rows' numbers as rows of the table."""
  rows = {}
  for step in ("train", "decode"):
    stats = compiled.get(step)
    if step == "decode":
      why = "encoder-decoder: not yet" if c.model.get("arch") == "encoder_decoder" else None
      rows["decode step: batch x cache"] = (
        f"{c.data.batch_size} x {c.data.seq_len}"
        if stats
        else f"n/a ({why or 'router cannot decode'})"
      )
    for name, key in COMPILED_ROWS:
      if not stats:
        value = "n/a"
      elif key == "seconds":
        value = f"{stats[key]:.1f} s"
      elif "flops" in key:
        value = _num(stats[key])
      else:
        value = _bytes(stats[key])
      rows[f"{step} step: {name}"] = value
  return rows


def column(
  c, num_devices: int = 0, compile_steps: bool = False, say=lambda msg: None
) -> dict[str, str]:
  """One config's rows of the table, as strings; with `compile_steps`, XLA's
  (compile_rows: needs `num_devices` CPU devices in this process)."""
  m = cfglib.model_spec(c)
  num_devices = num_devices or fewest_devices(c)
  sharding.mesh_sizes(c, num_devices)  # a bad count fails before any tracing
  model = statelib.abstract_model(c)
  s = summarize(c, model=model)
  d = per_device(c, model, num_devices)
  n_moe = len(m.moe_layers)
  if m.is_moe:
    routing = f"{m.moe.router}: {experts_per_token(m):g} of {m.moe.num_experts}"
    if m.moe.num_shared_experts:
      routing += f" + {m.moe.num_shared_experts} shared"
  else:
    routing = "dense"
  mesh = " ".join(f"{a}={n}" for a, n in d["mesh"].items() if n > 1) or "1 device"
  grads = d["param_bytes"]  # in the parameters' dtype, sharded like them
  return {
    "layers (MoE)": f"{m.num_layers} ({n_moe})"
    if c.model.get("arch") != "encoder_decoder"
    else f"{m.num_layers} + {m.num_layers} ({n_moe} + {n_moe})",
    "experts per token": routing,
    "total params": _num(s["total_params"]),
    "active params": _num(s["active_params"]),
    # GPT-OSS's model card counts active parameters without the lookup table.
    "active less input embedding": _num(s["active_params"] - s["input_embedding_params"]),
    **(
      {"MTP params (apart)": f"{_num(s['mtp_params'])} ({m.mtp_depth} module(s))"}
      if m.mtp_depth
      else {}
    ),
    "train FLOPs / token": _num(s["train_flops_per_token"]),
    "inference FLOPs / token": _num(s["inference_flops_per_token"]),
    "KV cache / token": kv_cache_row(m),
    f"params ({c.model.param_dtype})": _bytes(s["param_bytes"]),
    "optimizer state": f"{_bytes(s['optimizer_bytes'])} ({c.train.optimizer})",
    "mesh": mesh,
    "params / device": _bytes(d["param_bytes"]),
    "params+grads+opt / device": _bytes(d["param_bytes"] + grads + d["optimizer_bytes"]),
    "import: host peak (bf16 files)": _bytes(import_host_bytes(c, model)),
    "export: host peak (bf16)": _bytes(
      export_host_bytes(c, model, jnp.dtype(c.model.param_dtype).itemsize)
    ),
  } | (compiled_column(c, compile_rows(c, num_devices, say)) if compile_steps else {})


def table(columns: dict[str, dict[str, str]]) -> str:
  """Rows of every column's keys (in first-seen order; "-" where a column has
  none: the MTP row of a config without MTP), one column per config name."""
  keys = list(dict.fromkeys(k for col in columns.values() for k in col))
  columns = {name: {k: col.get(k, "-") for k in keys} for name, col in columns.items()}
  w = max(map(len, keys)) + 2
  widths = [max(len(name), *(len(col[k]) for k in keys)) + 3 for name, col in columns.items()]
  lines = ["".ljust(w) + "".join(n.rjust(cw) for n, cw in zip(columns, widths))]
  for k in keys:
    lines.append(
      k.ljust(w) + "".join(col[k].rjust(cw) for col, cw in zip(columns.values(), widths))
    )
  return "\n".join(lines)


def with_mesh(c, spec: str):
  """config `c` with config.mesh's sizes from --mesh 'axis=size,...' (axes
  not named: 1; the axes and their order stay the config's)."""
  if not spec:
    return c
  axes = [a for a, _ in c.mesh]
  sizes = {}
  for part in spec.split(","):
    axis, _, size = part.partition("=")
    axis = axis.strip()
    if axis not in axes or not size.strip().lstrip("-").isdigit():
      raise ConfigError(f"--mesh={spec!r}: each part is axis=size with an axis of {axes}")
    sizes[axis] = int(size)
  c.mesh = tuple((a, sizes.get(a, 1)) for a in axes)
  return c


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  configs, notes = {}, []
  for name in ("config", "compare"):
    flag = FLAGS[name]
    if flag.value is None:
      continue
    title = config_flags.get_config_filename(flag)
    overrides = config_flags.get_override_values(flag)
    if overrides or FLAGS.mesh:
      mark = "*" * (1 + len(configs))  # so the same file twice still gets two columns
      title += mark
      changed = [f"{k}={v!r}" for k, v in overrides.items()]
      changed += [f"--mesh={FLAGS.mesh}"] if FLAGS.mesh else []
      notes.append(f"{mark} " + ", ".join(changed))
    try:
      configs[title] = cfglib.validate(with_mesh(flag.value, FLAGS.mesh))
    except ConfigError as e:
      raise ConfigError(f"{title}: {e}") from None
  if not configs:
    raise app.UsageError("--config is required, e.g. --config=configs/mixtral.py:8x7b")
  if FLAGS.compile:  # before JAX's first operation (module docstring)
    simulate_devices(max(FLAGS.devices or fewest_devices(c) for c in configs.values()))
  say = lambda msg: print(msg, file=sys.stderr, flush=True)
  columns = {}
  for title, c in configs.items():
    try:
      columns[title] = column(c, FLAGS.devices, FLAGS.compile, say)
    except ConfigError as e:
      raise ConfigError(f"{title}: {e}") from None
  print(table(columns))
  for note in notes:
    print(note)


if __name__ == "__main__":
  from sparse_lm import cli  # pylint: disable=g-import-not-at-top

  _define_flags()
  cli.run(main, "sparse_lm.inspect", config_flags=("config", "compare"))
