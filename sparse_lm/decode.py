"""Decoding: a KV cache, prefill and one-token decode steps, sampling.

  checkpoint -> inference model (state.load_model(..., inference=True), or
  for_inference(model) of a model in memory)
  -> prompts, left-padded to one length -> prefill (the whole prompts, one
  jit; fills the cache) -> decode steps (one token per row, one jit) ->
  sampling -> token ids (sparse_lm/generate.py turns them into text).

Prompts of different lengths are left-padded; each row's positions count from
its own first real token (per-row positions), and padding is never visible to
a real token (layers.Attention), so a row decodes exactly as it would alone.
The cache holds the kv heads only ([B, S, J, Z] per layer, GQA), sharded by
the logical names batch / kv_heads / head_dim like everything else; a
sliding-window layer's (model.sliding_window, GPT-OSS) holds a ring of
min(window, S) slots (cache_slots), so its bytes stay bounded.

MoE at inference: a decode step routes B tokens, so the training capacity rule
would drop (or not) depending on the batch. model.moe.decode_dispatch
("dropless" by default) replaces model.moe.dispatch when a model is loaded
for inference, so cached decoding equals the full forward of the same
sequence; "capacity" keeps the training rule at eval_capacity_factor. A
router whose decisions depend on other tokens (routing.Router.decodes false:
expert choice, where which tokens an expert takes depends on the later tokens
of the batch) is refused.

Compiles: one prefill, one first-token sampler and one decode step per shape
bucket (`bucket`). The decode loop's carry leaves every jitted function with
the same types and shardings it enters the next step with (`_placed`), so the
step does not compile a second time on its own outputs, and the decode rate
(`Generation.tokens_per_s`) counts only steps after the compiled first one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm import params as paramslib
from sparse_lm import sharding
from sparse_lm.data import seq2seq
from sparse_lm.errors import ConfigError
from sparse_lm.models import layers
from sparse_lm.models.encoder_decoder import DecodeState
from sparse_lm.models.spec import ModelSpec
from sparse_lm.models.transformer import Cache
from sparse_lm.models.transformer import Transformer

Array = jax.Array


def check_decodable(m: ModelSpec):
  """A one-line ConfigError for a model that cannot decode token by token."""
  if m.is_moe and not m.moe.router_facts.decodes:
    raise ConfigError(
      f"config.model.moe.router={m.moe.router!r} cannot decode: an expert's choice of tokens "
      "depends on later tokens of the batch, so a token's output changes as the text grows"
    )


def inference_spec(m: ModelSpec, keep_mtp: bool = False) -> ModelSpec:
  """The spec for decoding: model.moe.dispatch := model.moe.decode_dispatch;
  model.mtp_depth := 0 unless keep_mtp (the main model only)."""
  check_decodable(m)
  if m.mtp_depth and not keep_mtp:
    m = m.replace(mtp_depth=0)
  return m.replace(moe={"dispatch": m.moe.decode_dispatch}) if m.is_moe else m


def for_inference(model: Transformer, keep_mtp: bool = False) -> Transformer:
  """The model built from inference_spec, its weight matrices cast to
  model.dtype once (they are float32 for training; every step would cast them
  again). Routers stay float32 (their math is float32), and so do vectors.
  The MTP modules (model.mtp_depth, DeepSeek-V3 section 2.2) are dropped, as
  the paper does at inference, unless keep_mtp (speculative decoding): the
  main model is then the same program and parameters as mtp_depth=0's."""
  spec = inference_spec(model.m, keep_mtp)
  graphdef, state = nnx.split(model)
  if "mtp" in state and not spec.mtp_depth:
    state = nnx.State({k: v for k, v in state.items() if k != "mtp"})
  if spec != model.m:  # the same class: a Transformer or an EncoderDecoder
    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(lambda: type(model)(spec, model.vocab_size, rngs=nnx.Rngs(0)))
    graphdef = nnx.split(abstract)[0]
  dt = layers.dtype_of(spec)
  cast = lambda path, x: (
    x.astype(dt)
    if x.ndim - paramslib.is_stacked(path) >= 2 and not any("router" in str(k) for k in path)
    else x
  )  # a vector stays float32, stacked over layers (model.scan_layers) or not
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(cast, state))


def cache_slots(m, i: int, max_len: int) -> int:
  """Layer i's cache slots: max_len, or a sliding-window layer's ring of
  min(window, max_len) (model.sliding_window; layers.Attention)."""
  w = m.window(i)
  return min(w, max_len) if w else max_len


def _layer_cache(m, i: int, batch: int, max_len: int) -> layers.KVCache:
  """Layer i's empty KVCache (in model.dtype)."""
  dt = layers.dtype_of(m)
  if m.attention == "mla":  # the latent [B, S, C] and the RoPE key [B, S, R]
    return layers.KVCache(
      jnp.zeros((batch, max_len, m.mla.kv_lora_rank), dt),
      jnp.zeros((batch, max_len, m.mla.qk_rope_head_dim), dt),
    )
  kv = lambda: jnp.zeros((batch, cache_slots(m, i, max_len), m.num_kv_heads, m.head_dim), dt)
  return layers.KVCache(kv(), kv())


def init_cache(m, batch: int, max_len: int) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens (in model.dtype)."""
  return Cache(
    tuple(_layer_cache(m, i, batch, max_len) for i in range(m.num_layers)),
    jnp.zeros((batch, max_len), bool),
    jnp.zeros((), jnp.int32),
  )


def init_mtp_cache(m, batch: int, max_len: int) -> Cache:
  """An empty one-layer cache for MTP module 1's block (the last layer's
  kind; transformer.MtpModule), speculative decoding's."""
  return Cache(
    (_layer_cache(m, m.num_layers - 1, batch, max_len),),
    jnp.zeros((batch, max_len), bool),
    jnp.zeros((), jnp.int32),
  )


def cache_bytes(m, batch: int, max_len: int) -> int:
  """Bytes of the KV cache: 2 (k, v) x B x kv heads x head dim x dtype x the
  layers' slots (S each, a sliding-window layer's min(window, S)); MLA's:
  (kv_lora_rank + qk_rope_head_dim) values per slot."""
  J, Z = m.num_kv_heads, m.head_dim
  slots = sum(cache_slots(m, i, max_len) for i in range(m.num_layers))
  per_slot = 2 * J * Z  # MLA (model.attention="mla"): the latent and the RoPE key
  if m.attention == "mla":
    per_slot = m.mla.kv_lora_rank + m.mla.qk_rope_head_dim
  return slots * batch * per_slot * jnp.dtype(layers.dtype_of(m)).itemsize


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


@functools.partial(
  jax.jit, static_argnames=("graphdef", "return_experts"), donate_argnames=("cache",)
)
def forward(
  graphdef, state, tokens_BxL, mask_BxL, positions_BxL, cache: Cache, return_experts=False
):
  """One cached forward (prefill or decode step) -> (logits [B, L, V], cache, experts).

  experts: per MoE layer, each token's chosen experts [B, L, K] when
  `return_experts`, else None."""
  model = nnx.merge(graphdef, state)
  logits, moe_aux, cache = model(
    tokens_BxL,
    mask_BxL=mask_BxL,
    positions_BxL=positions_BxL,
    cache=cache,
    return_experts=return_experts,
  )
  experts = None
  if return_experts:
    B, L = tokens_BxL.shape
    experts = [a["experts_TxK"].reshape(B, L, -1) for a in moe_aux if "experts_TxK" in a]
  return logits, cache, experts


def bucket(n: int, smallest: int = 64) -> int:
  """The length a prompt or cache of n tokens is padded to: the next power of
  two from `smallest`, so that prompts of many lengths share a few compiled
  programs (a 100-prompt run of lengths 1..500 compiles 4 prefills, 4
  first-token samplers and 4 decode steps; README.md, "Decoding")."""
  b = smallest
  while b < n:
    b *= 2
  return b


def cache_length(longest_prompt: int, max_new_tokens: int) -> int:
  """The KV cache's length: the prompts' bucket plus the new tokens' bucket
  (not one bucket of the sum, which could double the cache)."""
  return bucket(longest_prompt) + bucket(max_new_tokens)


def left_pad(
  prompts: list[list[int]], pad_id: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, mask, positions) [B, L]: prompts right-aligned in rows of
  `length` (default: the longest); each row's positions start at 0 on its
  first real token (0 on the padding too)."""
  L = length or max(len(p) for p in prompts)
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
  prefill_s: float  # the prompts' forward and first sample, compilation included
  first_step_s: float  # the first decode step, compilation included
  decode_s: float  # the decode steps after the first (compiled: no compile in them)
  steps: int  # decode steps after the first
  # Speculative decoding: (drafts accepted, drafts verified) over all rows and
  # steps; a row's step gives 1 + its accepted drafts tokens. None otherwise.
  drafts: tuple[int, int] | None = None

  def tokens_per_s(self) -> float:
    """Decode speed, batch rows x steps after the first / their seconds
    (the first step compiles the decode step; the later ones run it); with
    speculative decoding, x the tokens a row's step gives on average."""
    per_step = 1.0 + (self.drafts[0] / max(self.drafts[1], 1) if self.drafts else 0.0)
    return len(self.tokens) * self.steps * per_step / max(self.decode_s, 1e-9)


class _Carry(NamedTuple):
  """The decode loop's state, all on the device."""

  cache: Cache
  next_B: Array  # int32: the token sampled last, fed next
  pos_B: Array  # int32: its position in its row
  done_B: Array  # bool: the row has stopped (before next_B)
  out_BxN: Array  # int32: generated tokens, -1 after a row stopped
  experts: tuple  # per MoE layer [B, N, K] (int32), when recording them


def _placed(carry: _Carry) -> _Carry:
  """The carry with its shardings fixed by logical names, the same out of
  `_start` as out of `_step`, so the step's arguments look alike at every step
  (committed, same types and shardings) and it compiles once per shape bucket.
  Fed arrays placed otherwise (made on the host, or uncommitted), the first
  step compiled, and the second compiled again on the first one's outputs."""
  c = sharding.constrain
  cache = carry.cache._replace(valid_BxS=c(carry.cache.valid_BxS, "batch", None))
  return _Carry(
    cache,
    c(carry.next_B, "batch"),
    c(carry.pos_B, "batch"),
    c(carry.done_B, "batch"),
    c(carry.out_BxN, "batch", None),
    tuple(c(e, "batch", None, None) for e in carry.experts),
  )


@functools.partial(
  jax.jit, static_argnames=("sampling", "N", "moe_layers", "K"), donate_argnames=("cache",)
)
def _start(logits_BxLxV, cache, positions_B, key, sampling, N, moe_layers, K) -> _Carry:
  """The decode loop's first carry: token 0 sampled from the prefill's logits."""
  B = logits_BxLxV.shape[0]
  first_B = sample(logits_BxLxV[:, -1], jax.random.fold_in(key, 0), sampling)
  return _placed(
    _Carry(
      cache,
      first_B,
      positions_B.astype(jnp.int32),
      jnp.zeros((B,), bool),
      jnp.full((B, N), -1, jnp.int32),
      tuple(jnp.full((B, N, K), -1, jnp.int32) for _ in range(moe_layers)),
    )
  )


def _record(carry: _Carry, n, stop_ids, xp=jnp):
  """(stopped, out): token n recorded (-1 for a row that has stopped)."""
  stopped = carry.done_B | xp.isin(carry.next_B, xp.asarray(stop_ids or (-1,), xp.int32))
  out = carry.out_BxN
  if xp is jnp:
    return stopped, jax.lax.dynamic_update_slice_in_dim(
      out, jnp.where(stopped, -1, carry.next_B)[:, None], n, 1
    )
  out = out.copy()
  out[:, n] = xp.where(stopped, -1, carry.next_B)
  return stopped, out


@functools.partial(
  jax.jit, static_argnames=("graphdef", "sampling", "stop_ids"), donate_argnums=(2,)
)
def _step(graphdef, state, carry: _Carry, n, key, sampling, stop_ids):
  """Decode step n, on the device: records token n (a stopped row records -1),
  feeds it (stopped rows masked) and samples token n + 1."""
  stopped, out = _record(carry, n, stop_ids)
  model = nnx.merge(graphdef, state)
  logits, aux, cache = model(
    carry.next_B[:, None],
    mask_BxL=(~stopped)[:, None].astype(jnp.float32),
    positions_BxL=carry.pos_B[:, None],
    cache=carry.cache,
    return_experts=bool(carry.experts),
  )
  experts = tuple(
    jax.lax.dynamic_update_slice_in_dim(buf, a["experts_TxK"][:, None, :], n, 1)
    for buf, a in zip(carry.experts, [a for a in aux if "experts_TxK" in a])
  )
  nxt = sample(logits[:, -1], jax.random.fold_in(key, n + 1), sampling)
  return _placed(_Carry(cache, nxt, carry.pos_B + 1, stopped, out, experts))


def _run_steps(run, carry, steps: int, check_every: int, t_first: float):
  """The host side of a decode loop: `run(carry, n)` for n < steps, timing
  the first (compiling) step, stopping early once every row is done (checked
  every `check_every` steps, the only time the host waits for the device).
  -> (carry, the first step's end time, the step count where all stopped or None)."""
  for n in range(steps):
    carry = run(carry, jnp.int32(n))
    if n == 0:
      jax.block_until_ready(carry.next_B)
      t_first = time.perf_counter()
    if (n + 1) % check_every == 0 and bool(jax.device_get(carry.done_B).all()):
      return carry, t_first, n + 1
  return carry, t_first, None


def _rows(out_BxN) -> list[list[int]]:
  """Each row's generated ids, up to its first -1 (the row stopped there)."""
  N = out_BxN.shape[1]
  return [list(map(int, row[: (row < 0).argmax() if (row < 0).any() else N])) for row in out_BxN]


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
  return_experts: bool = False,
  check_every: int = 16,
  speculative: bool = False,
) -> Generation:
  """Samples up to max_new_tokens after each prompt (a batch).

  return_experts: Generation.experts holds the experts each generated token
  was routed to, per MoE layer (generate.py's --expert_choices).
  speculative: self-speculative greedy decoding with the MTP modules
  (speculative_generate; the model loaded with keep_mtp=True).

  `model` is an inference model (state.load_model(..., inference=True)); with
  `mesh` and `config`, it runs under that mesh and the config's rules (the
  state must already be placed there). Rows stop at their first stop id.
  Prompts are left-padded and the cache sized to `bucket` lengths, so new
  prompt lengths rarely compile anew. Sampling, the stop check and the
  generated tokens stay on the device: the host waits for it only every
  `check_every` steps (to stop early) and at the end."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("every prompt must have at least one token")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  m = model.m
  sampling = sampling or Sampling()
  Lp = max(len(p) for p in prompts)
  if m.position == "learned" and Lp + max_new_tokens > m.max_len:
    raise ConfigError(
      f"config.model.max_len={m.max_len} is too small: the longest prompt ({Lp} tokens) "
      f"plus max_new_tokens={max_new_tokens} need {Lp + max_new_tokens} learned positions"
    )
  rs = dict(m.rope_scaling)
  if rs.get("rope_type") == "dynamic" and Lp + max_new_tokens > rs["max_position_embeddings"]:
    raise ConfigError(
      f"config.model.rope_scaling.rope_type='dynamic' changes its frequencies past "
      f"max_position_embeddings={rs['max_position_embeddings']}: the longest prompt plus "
      f"max_new_tokens need {Lp + max_new_tokens} positions (only the static case is supported)"
    )
  if speculative:
    return speculative_generate(
      model,
      prompts,
      max_new_tokens,
      sampling,
      stop_ids,
      pad_id,
      mesh,
      config,
      return_experts,
      check_every,
    )
  tokens, mask, positions = left_pad(prompts, pad_id, bucket(Lp))
  B, N = len(prompts), max_new_tokens
  S = cache_length(Lp, N)
  graphdef, state = nnx.split(model)
  ctx = sharding.use(mesh, config) if mesh is not None else contextlib.nullcontext()
  key = jax.random.key(seed)
  stop_ids = tuple(int(i) for i in stop_ids)
  with ctx:
    t0 = time.perf_counter()
    logits, cache, _ = forward(
      graphdef,
      state,
      jnp.asarray(tokens),
      jnp.asarray(mask),
      jnp.asarray(positions),
      init_cache(m, B, S),
    )
    moe_layers = len(m.moe_layers) if return_experts else 0
    K = m.moe.router_facts.assignments_per_token(m.moe) if moe_layers else 0
    first_pos = jnp.asarray(positions[:, -1] + 1)
    carry = _start(logits, cache, first_pos, key, sampling, N, moe_layers, K)
    jax.block_until_ready(carry.next_B)
    t1 = t_first = time.perf_counter()
    steps = N if return_experts else N - 1  # the last token is fed only to record its experts
    run = functools.partial(_step, graphdef, state, key=key, sampling=sampling, stop_ids=stop_ids)
    carry, t_first, done_at = _run_steps(run, carry, steps, check_every, t_first)
    carry = jax.device_get(carry._replace(cache=None))
    out = carry.out_BxN
    if done_at is None and not return_experts:  # the last token: recorded, never fed
      out = _record(carry, N - 1, stop_ids, np)[1]
    experts = carry.experts
  t2 = time.perf_counter()
  gen = _rows(out)
  exp = None
  if return_experts:
    exp = [[[e[b, i].tolist() for e in experts] for i in range(len(gen[b]))] for b in range(B)]
  timed = (done_at or steps) - 1  # decode steps after the first
  return Generation(gen, exp, t1 - t0, t_first - t1, t2 - t_first, max(timed, 0))


# ------------------------------------------------------- speculative decoding


class _SpecCarry(NamedTuple):
  """Speculative decoding's state, all on the device."""

  cache: Cache  # the main model's
  mtp_cache: Cache  # MTP module 1's block's
  next_B: Array  # int32: the newest verified token, not yet fed to the main model
  draft_B: Array  # int32: module 1's draft of the token after it
  pos_B: Array  # int32: next_B's position in its row
  done_B: Array  # bool: the row has stopped (a stop id, or N tokens)
  out_BxN: Array  # int32 [B, N + 1]: generated tokens (column N: scratch)
  count_B: Array  # int32: tokens recorded per row
  accepted: Array  # int32: drafts accepted, all rows and steps
  drafted: Array  # int32: drafts verified, all rows and steps


def _append(out, count, done, tok_B, ok_B, stop_ids, N: int):
  """Token tok_B recorded where ok_B and the row is not done; a stop id ends
  the row unrecorded (as generate's rows end), and so does its N-th token."""
  ok_B = ok_B & ~done
  stop_B = ok_B & jnp.isin(tok_B, jnp.asarray(stop_ids or (-1,), jnp.int32))
  write_B = ok_B & ~stop_B
  rows, col = jnp.arange(out.shape[0]), jnp.minimum(count, N)
  out = out.at[rows, col].set(jnp.where(write_B, tok_B, out[rows, col]))
  count = count + write_B.astype(jnp.int32)
  return out, count, done | stop_B | (count >= N)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "stop_ids", "N"), donate_argnames=("cache", "mtp_cache")
)
def _spec_prefill(
  graphdef, state, tokens_BxL, mask_BxL, positions_BxL, cache, mtp_cache, stop_ids, N
):
  """The prompts through the main model, then through MTP module 1 (position
  i reads h^0_i and token i + 1: the prompt's next token, the first sampled
  one at the last position) -> the first carry: token 0 and its draft."""
  model = nnx.merge(graphdef, state)
  out, h_BxLxD = model.decode_hidden(
    tokens_BxL, mask_BxL=mask_BxL, positions_BxL=positions_BxL, cache=cache
  )
  first_B = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)
  next_BxL = jnp.concatenate([tokens_BxL[:, 1:], first_B[:, None]], 1)
  logits, mtp_cache = model.mtp_decode(
    h_BxLxD, next_BxL, mask_BxL=mask_BxL, positions_BxL=positions_BxL, cache=mtp_cache
  )
  B = tokens_BxL.shape[0]
  zeros = jnp.zeros((B,), jnp.int32)
  o, count, done = _append(
    jnp.full((B, N + 1), -1, jnp.int32), zeros, zeros > 0, first_B, zeros == 0, stop_ids, N
  )
  return _SpecCarry(
    out.cache,
    mtp_cache,
    first_B,
    jnp.argmax(logits[:, -1], -1).astype(jnp.int32),
    positions_BxL[:, -1] + 1,
    done,
    o,
    count,
    jnp.zeros((), jnp.int32),
    jnp.zeros((), jnp.int32),
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "stop_ids", "N"), donate_argnums=(2,))
def _spec_step(graphdef, state, carry: _SpecCarry, stop_ids, N):
  """One step: the main model verifies [next, draft] in one cached forward
  (positions n, n + 1); the draft is accepted where it is the main model's
  greedy token g0 at n, and then g1 (at n + 1) comes with it; a rejected
  draft's cache slot is marked empty (every later step writes new slots: the
  shared cache index moves by 2 a step, and rows skip the slots they
  rejected). MTP module 1 then reads the verified positions (n, and n + 1
  where accepted) and drafts the token after the newest one."""
  model = nnx.merge(graphdef, state)
  active_B = ~carry.done_B
  toks_Bx2 = jnp.stack([carry.next_B, carry.draft_B], 1)
  mask_Bx2 = jnp.broadcast_to(active_B[:, None], toks_Bx2.shape).astype(jnp.float32)
  pos_Bx2 = carry.pos_B[:, None] + jnp.arange(2, dtype=jnp.int32)[None]
  out, h_Bx2xD = model.decode_hidden(
    toks_Bx2, mask_BxL=mask_Bx2, positions_BxL=pos_Bx2, cache=carry.cache
  )
  g_Bx2 = jnp.argmax(out.logits, -1).astype(jnp.int32)
  acc_B = active_B & (carry.draft_B == g_Bx2[:, 0])
  cache, slot = out.cache, out.cache.index - 1  # the draft's slot
  kept = jax.lax.dynamic_slice_in_dim(cache.valid_BxS, slot, 1, 1) & acc_B[:, None]
  cache = cache._replace(
    valid_BxS=jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, kept, slot, 1)
  )
  o, count, done = _append(
    carry.out_BxN, carry.count_B, carry.done_B, g_Bx2[:, 0], active_B, stop_ids, N
  )
  o, count, done = _append(o, count, done, g_Bx2[:, 1], acc_B, stop_ids, N)
  mtp_mask = jnp.stack([active_B, acc_B], 1).astype(jnp.float32)
  logits, mtp_cache = model.mtp_decode(
    h_Bx2xD, g_Bx2, mask_BxL=mtp_mask, positions_BxL=pos_Bx2, cache=carry.mtp_cache
  )
  draft_B = jnp.argmax(jnp.where(acc_B[:, None], logits[:, 1], logits[:, 0]), -1)
  return _SpecCarry(
    cache,
    mtp_cache,
    jnp.where(acc_B, g_Bx2[:, 1], g_Bx2[:, 0]),
    draft_B.astype(jnp.int32),
    carry.pos_B + 1 + acc_B.astype(jnp.int32),
    done,
    o,
    count,
    carry.accepted + jnp.sum(acc_B, dtype=jnp.int32),
    carry.drafted + jnp.sum(active_B, dtype=jnp.int32),
  )


def speculative_generate(
  model,
  prompts,
  max_new_tokens,
  sampling,
  stop_ids,
  pad_id,
  mesh,
  config,
  return_experts,
  check_every,
) -> Generation:
  """Self-speculative greedy decoding (DeepSeek-V3 section 2.2's MTP modules
  reused for drafting, as its section 5.4.3 evaluates: 85-90% of the second
  tokens accepted). Each step, MTP module 1 has drafted the token after the
  newest verified one; the main model reads both in one cached forward and
  keeps the draft where it equals its own greedy token, so a step gives 1 or
  2 tokens per row and the tokens are exactly greedy decoding's (up to
  float ties: the verifying forward reads 2 tokens at once). The main model's
  cache and the module's hold 2 slots a step (a rejected draft's left
  empty): cache_length(prompt, 2 x max_new_tokens). Generation.drafts counts
  the accepted and verified drafts. Drafts come from module 1 only (a chain
  of D modules drafting D tokens is not built); greedy only."""
  m = model.m
  if not getattr(model, "mtp", None):
    raise ConfigError(
      f"speculative decoding needs the MTP modules: config.model.mtp_depth={m.mtp_depth} "
      "(a run trained with mtp_depth >= 1, loaded with keep_mtp=True)"
    )
  if sampling.temperature != 0.0:
    raise ConfigError(
      f"speculative decoding is greedy only: temperature={sampling.temperature} (use 0)"
    )
  if return_experts or any(m.window(i) for i in range(m.num_layers)):
    what = "the experts' record" if return_experts else "config.model.sliding_window's ring cache"
    raise ConfigError(f"speculative decoding does not support {what}")
  Lp = max(len(p) for p in prompts)
  B, N = len(prompts), max_new_tokens
  tokens, mask, positions = left_pad(prompts, pad_id, bucket(Lp))
  S = cache_length(Lp, 2 * N)
  graphdef, state = nnx.split(model)
  ctx = sharding.use(mesh, config) if mesh is not None else contextlib.nullcontext()
  stop_ids = tuple(int(i) for i in stop_ids)
  with ctx:
    t0 = time.perf_counter()
    carry = _spec_prefill(
      graphdef,
      state,
      jnp.asarray(tokens),
      jnp.asarray(mask),
      jnp.asarray(positions),
      init_cache(m, B, S),
      init_mtp_cache(m, B, S),
      stop_ids,
      N,
    )
    jax.block_until_ready(carry.next_B)
    t1 = t_first = time.perf_counter()
    run = lambda c, n: _spec_step(graphdef, state, c, stop_ids, N)  # noqa: E731 (n unused)
    # each step gives every unfinished row >= 1 token
    carry, t_first, done_at = _run_steps(run, carry, N - 1, check_every, t_first)
    steps = done_at or N - 1
    carry = jax.device_get(carry._replace(cache=None, mtp_cache=None))
  t2 = time.perf_counter()
  gen = [list(map(int, row[:c])) for row, c in zip(carry.out_BxN, carry.count_B)]
  drafts = (int(carry.accepted), int(carry.drafted))
  return Generation(gen, None, t1 - t0, t_first - t1, t2 - t_first, max(steps - 1, 0), drafts)


# ------------------------------------------------------- encoder-decoder


SENTINEL = re.compile(r"<extra_id_(\d+)>")  # T5's name of span corruption's sentinel k


def seq2seq_example(c, tok, text: str, lang_ids: dict, src_lang=None, tgt_lang=None):
  """(data/seq2seq.py's Example of `text` as a source, whether it was cut to
  data.seq_len): seq2seq.encode_pair's layout, the one the run trained on
  ([src_lang] source </s>, the decoder start, the forced [tgt_lang] with
  languages; T5's source </s> and start 0 without). A span corruption run's
  text may hold T5's sentinels, <extra_id_k>, which become its sentinel ids
  (seq2seq.sentinel_top), the text between them tokenized piece by piece."""
  enc_len, dec_len = seq2seq.lengths(c.data)
  pair = {"source": text, "target": ""}
  if src_lang is not None:
    pair.update(src_lang=src_lang, tgt_lang=tgt_lang)
  if c.data.get("objective") != "span_corruption" or not SENTINEL.search(text):
    return seq2seq.encode_pair(pair, tok, lang_ids, enc_len, dec_len)
  top, ids = seq2seq.sentinel_top(tok)[0], []
  for i, piece in enumerate(SENTINEL.split(text)):  # text, k, text, k, ..., text
    ids += [top - 1 - int(piece)] if i % 2 else tok.encode(piece, False) if piece else []
  eos = np.asarray([tok.eos_id], np.int32)
  enc = np.concatenate([np.asarray(ids[: enc_len - 1], np.int32), eos])
  return seq2seq.Example(enc, eos, np.ones(1, np.float32), 0), len(ids) > enc_len - 1


def seq2seq_prompt(ex) -> tuple[list[int], list[int]]:
  """(encoder ids, decoder prefix) of a seq2seq.Example: the prefix is its
  decoder start token and the targets of weight 0 before its first weighted
  one (NLLB's [tgt_lang], which decoding forces as forced_bos_token_id does)."""
  forced = []
  for t, w in zip(ex.targets, ex.weights):
    if w > 0:
      break
    forced.append(int(t))
  return [int(i) for i in ex.encoder], [int(ex.decoder_start), *forced]


def reserved_names(c, tok, lang_ids: dict) -> dict[int, str]:
  """{id: text} of a seq2seq run's own tokens (seq2seq.py; ids reserved
  above the tokenizer's, or its own tokens of those names): span
  corruption's sentinels as <extra_id_k>, languages as <lang>."""
  names = {i: f"<{g}>" for g, i in lang_ids.items()}
  if c.data.get("objective") == "span_corruption":
    top = seq2seq.sentinel_top(tok)[0]
    names.update({top - 1 - k: f"<extra_id_{k}>" for k in range(seq2seq.EXTRA_IDS)})
  return names


def seq2seq_text(tok, ids: list[int], names: dict[int, str]) -> str:
  """Target ids as text: runs of the tokenizer's ids decoded by it, the
  reserved ids by reserved_names (any other id past the tokenizer: <id N>)."""
  out, run = [], []
  for i in ids:
    if i < tok.vocab_size and i not in names:
      run.append(i)
      continue
    if run:
      out.append(tok.decode(run))
      run = []
    out.append(names.get(i, f"<id {i}>"))
  if run:
    out.append(tok.decode(run))
  return "".join(out)


class _Seq2SeqCarry(NamedTuple):
  """An encoder-decoder's decode loop state, all on the device (_record reads
  next_B, done_B and out_BxN as in _Carry)."""

  state: DecodeState  # EncoderDecoder's: self-attention caches, cross keys / values
  next_B: Array  # int32: the token sampled last, fed next
  done_B: Array  # bool: the row has stopped (before next_B)
  out_BxN: Array  # int32: generated tokens, -1 after a row stopped


def _seq2seq_placed(carry: _Seq2SeqCarry) -> _Seq2SeqCarry:
  """The carry's shardings fixed by logical names, the same out of the start
  as out of a step (_placed's reason: the step compiles once)."""
  c = sharding.constrain
  kv = lambda x: layers.KVCache(*(c(a, "batch", None, "kv_heads", "head_dim") for a in x))
  st = carry.state
  state = st._replace(
    caches=tuple(map(kv, st.caches)),
    cross=tuple(map(kv, st.cross)),
    encoder_valid_BxS=c(st.encoder_valid_BxS, "batch", None),
  )
  return _Seq2SeqCarry(
    state, c(carry.next_B, "batch"), c(carry.done_B, "batch"), c(carry.out_BxN, "batch", None)
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "S", "N"))
def _seq2seq_start(graphdef, state, src_BxS, valid_BxS, prefix_BxP, key, sampling, S, N):
  """The encoder once, the decoder over the forced prefixes (one cached
  forward), token 0 sampled -> the first carry."""
  model = nnx.merge(graphdef, state)
  st = model.start_decoding(src_BxS, valid_BxS, S)
  logits, st = model.decode(prefix_BxP, st)
  first_B = sample(logits[:, -1], jax.random.fold_in(key, 0), sampling)
  B = src_BxS.shape[0]
  return _seq2seq_placed(
    _Seq2SeqCarry(st, first_B, jnp.zeros((B,), bool), jnp.full((B, N), -1, jnp.int32))
  )


@functools.partial(
  jax.jit, static_argnames=("graphdef", "sampling", "stop_ids"), donate_argnums=(2,)
)
def _seq2seq_step(graphdef, state, carry: _Seq2SeqCarry, n, key, sampling, stop_ids):
  """Decode step n: records token n (-1 once a row stopped), feeds it and
  samples token n + 1 (as _step)."""
  stopped, out = _record(carry, n, stop_ids)
  model = nnx.merge(graphdef, state)
  logits, st = model.decode(carry.next_B[:, None], carry.state)
  nxt = sample(logits[:, -1], jax.random.fold_in(key, n + 1), sampling)
  return _seq2seq_placed(_Seq2SeqCarry(st, nxt, stopped, out))


def seq2seq_generate(
  model,
  sources: list[list[int]],
  prefixes: list[list[int]],
  *,
  max_new_tokens: int,
  sampling: Sampling | None = None,
  seed: int = 0,
  stop_ids: tuple[int, ...] = (),
  mesh=None,
  config=None,
  check_every: int = 16,
) -> Generation:
  """Decoding of an encoder-decoder (models/encoder_decoder.py; an inference
  model: state.load_model(..., inference=True)): each row's source ids
  through the encoder once, the decoder prefilled with the row's forced
  prefix in one cached forward (its decoder start token, then NLLB's
  target-language token where the run has languages: what
  data/seq2seq.py's encode_pair gives, so decoding starts as training did),
  then one cached step per token (start_decoding / decode), sampled as
  `generate` samples. Rows stop at their first stop id; Generation.tokens
  holds the tokens after the prefix, without the stop. Every prefix has one
  length (a decode step writes one slot for all rows). Sources are
  right-padded to a `bucket` length (the padding hidden from every
  attention and routed nowhere) and the self-attention cache holds
  bucket(prefix + max_new_tokens) slots, so new lengths rarely compile anew.
  The host waits for the device every `check_every` steps (to stop early)."""
  if not sources or any(len(s) == 0 for s in sources) or len(prefixes) != len(sources):
    raise ConfigError("every source must have at least one token, and a decoder prefix")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  P = len(prefixes[0])
  if P == 0 or any(len(p) != P for p in prefixes):
    lengths = sorted({len(p) for p in prefixes})
    raise ConfigError(f"the decoder prefixes must have one length >= 1, not {lengths}")
  sampling = sampling or Sampling()
  B, N = len(sources), max_new_tokens
  Ls = bucket(max(len(s) for s in sources))
  src = np.zeros((B, Ls), np.int32)
  valid = np.zeros((B, Ls), bool)
  for b, s in enumerate(sources):
    src[b, : len(s)], valid[b, : len(s)] = s, True
  graphdef, state = nnx.split(model)
  ctx = sharding.use(mesh, config) if mesh is not None else contextlib.nullcontext()
  key = jax.random.key(seed)
  stop_ids = tuple(int(i) for i in stop_ids)
  with ctx:
    t0 = time.perf_counter()
    args = (jnp.asarray(src), jnp.asarray(valid), jnp.asarray(prefixes, jnp.int32))
    carry = _seq2seq_start(graphdef, state, *args, key, sampling, bucket(P + N), N)
    jax.block_until_ready(carry.next_B)
    t1 = t_first = time.perf_counter()
    run = functools.partial(
      _seq2seq_step, graphdef, state, key=key, sampling=sampling, stop_ids=stop_ids
    )
    # the last token is recorded, never fed
    carry, t_first, done_at = _run_steps(run, carry, N - 1, check_every, t_first)
    carry = jax.device_get(carry._replace(state=None))
    out = carry.out_BxN if done_at is not None else _record(carry, N - 1, stop_ids, np)[1]
  t2 = time.perf_counter()
  gen = _rows(out)
  timed = (done_at or N - 1) - 1  # decode steps after the first
  return Generation(gen, None, t1 - t0, t_first - t1, t2 - t_first, max(timed, 0))


def param_bytes(model) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
