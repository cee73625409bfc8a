"""Decoding: a KV cache, prefill and one-token decode steps, sampling.

  checkpoint -> inference model (train.load_model(..., inference=True), or
  for_inference(model) of a model in memory)
  -> prompts, left-padded to one length -> prefill (the whole prompts, one
  jit; fills the cache) -> decode steps (one token per row, one jit) ->
  sampling -> token ids (sparse_lm/generate.py turns them into text).

Prompts of different lengths are left-padded; each row's positions count from
its own first real token (per-row positions), and padding is never visible to
a real token (layers.Attention), so a row decodes exactly as it would alone.
The cache holds the kv heads only ([B, S, J, Z] per layer, GQA), sharded by
the logical names batch / kv_heads / head_dim like everything else.

MoE at inference: a decode step routes B tokens, so the training capacity rule
would drop (or not) depending on the batch. model.moe.decode_dispatch
("dropless" by default) replaces model.moe.dispatch when a model is loaded
for inference, so cached decoding equals the full forward of the same
sequence; "capacity" keeps the training rule at eval_capacity_factor. Expert
choice routing is refused: which tokens an expert takes depends on the later
tokens of the batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm import sharding
from sparse_lm.cli import ConfigError
from sparse_lm.models import layers
from sparse_lm.models.moe import routing
from sparse_lm.models.spec import ModelSpec
from sparse_lm.models.transformer import Cache
from sparse_lm.models.transformer import Transformer

Array = jax.Array


def check_decodable(m: ModelSpec):
  """A one-line ConfigError for a model that cannot decode token by token."""
  if m.is_moe and routing.ROUTERS[m.moe.router].expert_choice:
    raise ConfigError(
      f"config.model.moe.router={m.moe.router!r} cannot decode: an expert's choice of tokens "
      "depends on later tokens of the batch, so a token's output changes as the text grows"
    )


def inference_spec(m: ModelSpec) -> ModelSpec:
  """The spec for decoding: model.moe.dispatch := model.moe.decode_dispatch."""
  check_decodable(m)
  return m.replace(moe={"dispatch": m.moe.decode_dispatch}) if m.is_moe else m


def for_inference(model: Transformer) -> Transformer:
  """The same weights (shared, not copied) in a model built from inference_spec."""
  spec = inference_spec(model.m)
  if spec == model.m:
    return model
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(spec, model.vocab_size, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, nnx.state(model))


def init_cache(m, batch: int, max_len: int) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens (in model.dtype)."""
  J, Z, dt = m.num_kv_heads, m.head_dim, layers.dtype_of(m)
  kv = lambda: jnp.zeros((batch, max_len, J, Z), dt)
  return Cache(
    tuple(layers.KVCache(kv(), kv()) for _ in range(m.num_layers)),
    jnp.zeros((batch, max_len), bool),
    jnp.zeros((), jnp.int32),
  )


def cache_bytes(m, batch: int, max_len: int) -> int:
  """Bytes of the KV cache: 2 (k, v) x layers x B x S x kv heads x head dim x dtype."""
  J, Z = m.num_kv_heads, m.head_dim
  return 2 * m.num_layers * batch * max_len * J * Z * jnp.dtype(layers.dtype_of(m)).itemsize


# ------------------------------------------------------------------ sampling


class Sampling(NamedTuple):
  """temperature 0 = greedy; top_k 0 and top_p 1.0 = off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


def sample(logits_BxV: Array, key: Array, s: Sampling) -> Array:
  """Next tokens [B] (int32): greedy, or softmax(logits / T) restricted to the
  top_k tokens and to the smallest set with probability >= top_p (nucleus)."""
  if s.temperature == 0.0:
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    sorted_BxV = jnp.sort(logits, -1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, -1)
    before = jnp.cumsum(probs, -1) - probs  # mass of the tokens ranked above
    keep = before < s.top_p  # the first token is always kept
    cutoff = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), -1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, -1).astype(jnp.int32)


# ------------------------------------------------------------------ steps


@functools.partial(jax.jit, static_argnames=("graphdef", "choices"), donate_argnames=("cache",))
def forward(graphdef, state, tokens_BxL, mask_BxL, positions_BxL, cache: Cache, choices=False):
  """One cached forward (prefill or decode step) -> (logits [B, L, V], cache, experts).

  experts: per MoE layer, each token's chosen experts [B, L, K] when
  `choices`, else None."""
  model = nnx.merge(graphdef, state)
  logits, moe_aux, cache = model(
    tokens_BxL,
    mask_BxL=mask_BxL,
    positions_BxL=positions_BxL,
    cache=cache,
    expert_choices=choices,
  )
  experts = None
  if choices:
    B, L = tokens_BxL.shape
    experts = [a["experts_TxK"].reshape(B, L, -1) for a in moe_aux if "experts_TxK" in a]
  return logits, cache, experts


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, mask, positions) [B, L]: prompts right-aligned; each row's
  positions start at 0 on its first real token (0 on the padding too)."""
  L = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), L), pad_id, np.int32)
  mask = np.zeros((len(prompts), L), np.float32)
  for b, p in enumerate(prompts):
    tokens[b, L - len(p) :] = p
    mask[b, L - len(p) :] = 1.0
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


class Generation(NamedTuple):
  tokens: list[list[int]]  # generated ids per prompt, up to (and without) the stop token
  experts: list[list] | None  # per prompt, per generated token: [layer][choice]
  prefill_s: float  # the prompts' forward, compilation included
  first_step_s: float  # the first decode step, compilation included
  decode_s: float  # the decode steps after the first
  steps: int  # decode steps after the first

  def tokens_per_s(self) -> float:
    """Decode speed, batch rows x steps after the first / their seconds."""
    return len(self.tokens) * self.steps / max(self.decode_s, 1e-9)


def generate(
  model,
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  sampling: Sampling | None = None,
  seed: int = 0,
  stop_ids: tuple[int, ...] = (),
  pad_id: int = 0,
  mesh=None,
  config=None,
  expert_choices: bool = False,
) -> Generation:
  """Samples up to max_new_tokens after each prompt (a batch, one jit per shape).

  `model` is an inference model (train.load_model(..., inference=True)); with
  `mesh` and `config`, it runs under that mesh and the config's rules (the
  state must already be placed there). Rows stop at their first stop id."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("every prompt must have at least one token")
  m = model.m
  sampling = sampling or Sampling()
  tokens, mask, positions = left_pad(prompts, pad_id)
  B, Lp = tokens.shape
  S = Lp + max_new_tokens
  if m.position == "learned" and S > m.max_len:
    raise ConfigError(
      f"config.model.max_len={m.max_len} is too small: the longest prompt ({Lp} tokens) "
      f"plus max_new_tokens={max_new_tokens} need {S} learned positions"
    )
  graphdef, state = nnx.split(model)
  ctx = sharding.use(mesh, config) if mesh is not None else contextlib.nullcontext()
  key = jax.random.key(seed)
  out = [[] for _ in range(B)]
  exp = [[] for _ in range(B)] if expert_choices else None
  done = np.zeros(B, bool)
  with ctx:
    cache = init_cache(m, B, S)
    t0 = time.perf_counter()
    logits, cache, experts = forward(
      graphdef,
      state,
      jnp.asarray(tokens),
      jnp.asarray(mask),
      jnp.asarray(positions),
      cache,
      choices=expert_choices,
    )
    nxt = sample(logits[:, -1], jax.random.fold_in(key, 0), sampling)
    nxt = np.asarray(nxt)
    t1 = t_first = time.perf_counter()
    pos = positions[:, -1:] + 1
    steps = -1
    for n in range(max_new_tokens):
      for b in range(B):
        if not done[b]:
          if int(nxt[b]) in stop_ids:
            done[b] = True
          else:
            out[b].append(int(nxt[b]))
      if (done.all() or n == max_new_tokens - 1) and not expert_choices:
        break
      step_mask = (~done[:, None]).astype(np.float32)
      logits, cache, experts = forward(
        graphdef,
        state,
        jnp.asarray(nxt[:, None]),
        jnp.asarray(step_mask),
        jnp.asarray(pos),
        cache,
        choices=expert_choices,
      )
      if expert_choices:  # the experts that routed each generated token when it was fed
        for b in range(B):
          if len(exp[b]) < len(out[b]):
            exp[b].append([np.asarray(e[b, 0]).tolist() for e in experts])
        if done.all() or n == max_new_tokens - 1:
          break
      nxt = np.asarray(sample(logits[:, -1], jax.random.fold_in(key, n + 1), sampling))
      pos = pos + 1
      steps += 1
      if steps == 0:
        t_first = time.perf_counter()
  t2 = time.perf_counter()
  return Generation(out, exp, t1 - t0, t_first - t1, t2 - t_first, max(steps, 0))


def param_bytes(model) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
