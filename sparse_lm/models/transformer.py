"""Decoder-only Transformer LM; each layer's FFN slot is dense or MoE by the spec.

`model.moe.every` / `.offset` / `.first_dense_layers` pick the MoE layers
(ModelSpec.moe_layer); the trainer never needs to know which.

How it computes, never what (each gives the same logits, router losses and
gradients; tests/scale_model_test.py):
  model.scan_layers  the layers run as one jax.lax.scan over a super-block of
      `model.moe.every` layers (1 for a dense model; scan_plan): one traced
      and compiled body. first_dense_layers and a remainder that does not fill
      a super-block run one by one. Design (MaxText's): the scanned layers'
      parameters are stored stacked, `self.scan[j]` one Block whose Variables
      are [repeats, ...] (a leading logical axis never sharded) for position j
      of the super-block, row r being layer start + r * period + j; the other
      layers stay `self.blocks[i]` (None where a layer is stacked). So the
      optimizer's state is stacked too and AdamW, the gradient norm and the
      clipping run once per kind of array, not once per layer, and the
      scanned layers' router outputs stay stacked too (LayerAux): the train
      step of mixtral.py:tiny at 32 layers compiles in about the time of 4
      (0.99x at load 0.6; 3.73x with per-layer parameters stacked by the forward;
      benchmarks/README.md). Values are drawn per layer, then stacked: the same
      as unscanned for the same seed. Names change with the key ("scan/0/attn/wq"
      holds "blocks/{start}/attn/wq", ...): every boundary that names
      parameters (checkpoints, which keep their run's layout and restore across
      it; train.init_from and its rules; train.frozen; sparse_lm/convert/;
      inspect) reads them by per-layer names through sparse_lm/params.py, the
      one mapping. Decoding (a KV cache) runs the layers one by one, a stacked
      layer's row sliced inside the jitted step: a scan would stack and
      unstack the whole cache every step. What the scan also buys: a backward
      loop that XLA cannot merge with the forward, so train.remat saves memory
      on XLA:CPU too (which drops the optimization barriers that keep an
      unscanned block's recomputation apart).
  train.remat  what a block's backward pass keeps from its forward
      (REMAT_POLICIES); the rest is recomputed. Applies to the scanned body too.
  model.param_dtype  the Params' dtype (drawn in float32, then rounded);
      model.dtype is the compute dtype, and the router computes in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from sparse_lm import params
from sparse_lm.models import layers
from sparse_lm.models.moe.layer import MoeFfn
from sparse_lm.models.spec import ModelSpec
from sparse_lm.sharding import constrain

# train.remat: what a block's backward pass keeps; everything else is recomputed
# from the block's input. "moe" keeps the attention and dense-FFN matmul outputs
# and the routing decision (expert indices, gates, validity), tagged with
# jax.ad_checkpoint.checkpoint_name where they are computed (layers.py,
# moe/layer.py), and recomputes the expert FFNs (dispatch, the experts'
# matmuls, combine; shared experts too): their [T * k, F] hidden activations
# are most of an MoE layer's memory. The recomputed dispatch reads the kept
# decision; the router's small [T, E] softmax is recomputed where the gates'
# gradient needs it. Router losses come out of the forward once, whatever the
# policy (recomputation only feeds the backward pass).
MOE_SAVES = ("attn_qkv", "attn_context", "attn_out", "mlp_hidden", "mlp_out", "moe_routing")
REMAT_POLICIES = {
  "none": None,  # not rematerialised
  "full": jax.checkpoint_policies.nothing_saveable,  # only each block's input
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmul outputs
  "moe": jax.checkpoint_policies.save_only_these_names(*MOE_SAVES),
}


def scan_plan(m: ModelSpec) -> tuple[int, int, int]:
  """(start, period, repeats) of model.scan_layers: layers [start, start +
  period * repeats) run as `repeats` iterations of one super-block of `period`
  layers (model.moe.every; 1 for a dense model), every one of which has the
  same kind of FFN at the same place. The first_dense_layers before it and a
  remainder after it run one by one."""
  if not m.is_moe:
    return 0, 1, m.num_layers
  start, period = m.moe.first_dense_layers, m.moe.every
  return start, period, max(0, (m.num_layers - start) // period)


def _block_fn(graphdef, treedef, remat: str, scanned: bool, rng, kw: dict):
  """fn(leaves, x [B, L, D], layer index) -> the block's (x, aux, cache): the
  block rebuilt from its state's leaves (stacked slices in a scan), its
  backward pass rematerialised by `remat` (train.remat)."""

  def fn(leaves, x_BxLxD, layer):
    block = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    layer_rng = None if rng is None else jax.random.fold_in(rng, layer)
    return block(x_BxLxD, rng=layer_rng, **kw)

  if remat == "none":
    return fn
  # A scan already keeps its body's recomputation from being merged with the
  # forward (prevent_cse costs an optimization barrier per block otherwise).
  return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)); x + ffn(norm(x)). FFN is dense or MoE."""

  def __init__(self, m: ModelSpec, layer: int, *, rngs: nnx.Rngs):
    self.m, self.layer = m, layer
    self.is_moe = m.moe_layer(layer)
    self.attn_norm = layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)
    attention = layers.MLAttention if m.attention == "mla" else layers.Attention
    self.attn = attention(m, layer, rngs=rngs)
    self.ffn_norm = layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)
    if self.is_moe:
      self.ffn = MoeFfn(m, rngs=rngs)
    else:
      act = layers.spelled(m.activation, m)
      self.ffn = layers.Mlp(m.d_model, m.d_ff, act, rngs=rngs, init_scale=m.init_scale)

  def __call__(
    self,
    x_BxLxD,
    positions_BxL,
    mask_BxL,
    *,
    train: bool,
    rng,
    cache=None,
    index=None,
    valid_BxS=None,
    return_experts=False,
    segments_BxL=None,
  ):
    """-> (x [B, L, D], the MoE layer's aux dict ({} if dense), the layer's
    updated KVCache or None)."""
    aux = {}
    h_BxLxD = self.attn_norm(x_BxLxD)
    attn, cache = self.attn(h_BxLxD, positions_BxL, cache, index, valid_BxS, segments_BxL)
    x_BxLxD = x_BxLxD + self._dropout(attn, train, rng, 0)
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if self.is_moe:
      h_BxLxD, aux = self.ffn(
        h_BxLxD,
        mask_BxL=mask_BxL,
        train=train,
        rng=None if rng is None else jax.random.fold_in(rng, 1),
        return_experts=return_experts,
      )
    else:
      h_BxLxD = self.ffn(h_BxLxD)
    x_BxLxD = x_BxLxD + self._dropout(h_BxLxD, train, rng, 2)
    return constrain(x_BxLxD, "batch", "length", "act_embed"), aux, cache

  def _dropout(self, x, train, rng, salt):
    p = self.m.dropout
    if not train or p == 0.0 or rng is None:
      return x
    keep = jax.random.bernoulli(jax.random.fold_in(rng, salt), 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)


def mtp_shift(a_BxL, k: int, fill=0):
  """a[:, i + k] at position i, `fill` where i + k is past the sequence: MTP
  module k's inputs and targets (DeepSeek-V3 section 2.2: module k at
  position i reads token t_{i+k} and predicts t_{i+k+1})."""
  B, L = a_BxL.shape
  pad = jnp.full((B, min(k, L)), fill, a_BxL.dtype)
  return jnp.concatenate([a_BxL[:, k:], pad], 1)


def mtp_reach(B: int, L: int, k: int, segments_BxL=None):
  """[B, L] float32: 1 where position i + k is in the sequence and, for packed
  examples (segments_BxL), in position i's own segment: where MTP module k
  has an input and a target for position i."""
  ok_BxL = jnp.broadcast_to(jnp.arange(L) + k < L, (B, L))
  if segments_BxL is not None:
    ok_BxL = ok_BxL & (mtp_shift(segments_BxL, k, -1) == segments_BxL)
  return ok_BxL.astype(jnp.float32)


class MtpModule(nnx.Module):
  """Multi-token prediction module k (DeepSeek-V3 section 2.2, eq. 21-23):
  h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], then one Transformer
  block, h^k = TRM_k(h'), whose final norm feeds the output head shared with
  the main model (as is the embedding). h^0 is the main model's final hidden
  state (after its final norm, as vLLM's and Megatron-Core's MTP read it).

  As the released checkpoint's layer 61 (num_nextn_predict_layers; vLLM's
  deepseek_mtp.py): enorm, hnorm, eh_proj [2d, d] over the embedding's norm
  *first* (the paper's eq. 21 writes h first: a permutation of M_k's rows),
  shared_head.norm (here head_norm). The block is the last layer's kind
  (Block(m, num_layers - 1)): an MoE layer in DeepSeek-V3, as its layer 61."""

  def __init__(self, m: ModelSpec, *, rngs: nnx.Rngs):
    self.enorm = layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)
    self.hnorm = layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)
    self.eh_proj = layers.param(
      rngs, layers.fan_in_init(scale=m.init_scale), (2 * m.d_model, m.d_model), (None, "embed")
    )
    self.block = Block(m, m.num_layers - 1, rngs=rngs)
    self.head_norm = layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)

  def project(self, h_BxLxD, e_BxLxD):
    """M_k [RMSNorm(emb); RMSNorm(h)] -> the block's input [B, L, D]."""
    x_BxLx2D = jnp.concatenate([self.enorm(e_BxLxD), self.hnorm(h_BxLxD)], -1)
    x_BxLxD = x_BxLx2D @ self.eh_proj[...].astype(x_BxLx2D.dtype)
    return constrain(x_BxLxD, "batch", "length", "act_embed")


class MtpOut(NamedTuple):
  """One MTP module's outputs (Transformer.with_mtp)."""

  logits: jax.Array  # [B, L, V] float32: position i predicts t_{i+k+1}
  aux: dict  # its block's MoE aux dict ({} if dense)
  hidden: jax.Array  # h^k [B, L, D], the next module's input
  cache: layers.KVCache | None  # its block's updated KVCache when decoding


class Cache(NamedTuple):
  """The decoding state (sparse_lm/decode.py): every layer's KVCache, which
  cache slots hold real tokens, and the next slot to write (shared by all rows)."""

  layers: tuple[layers.KVCache, ...]
  valid_BxS: jax.Array  # bool
  index: jax.Array  # int32 scalar


class Output(NamedTuple):
  """What the Transformer returns, whatever its arguments."""

  logits: jax.Array  # [B, L, V] float32
  moe_aux: LayerAux  # one aux dict per MoE layer, in layer order
  cache: Cache | None  # the updated decoding Cache; None when not decoding


class _Row(Mapping):
  """Row r of a scanned position's aux dict (its values stacked over the
  position's layers): a value is sliced when read, not before."""

  def __init__(self, stacked: dict, r: int):
    self.stacked, self.r = stacked, r

  def __getitem__(self, key):
    return jax.tree.map(lambda a: a[self.r], self.stacked[key])

  def __contains__(self, key):
    return key in self.stacked

  def __iter__(self):
    return iter(self.stacked)

  def __len__(self):
    return len(self.stacked)


@jax.tree_util.register_pytree_with_keys_class
class LayerAux(Sequence):
  """Output.moe_aux: the MoE layers' aux dicts, in layer order (a sequence of
  dicts). A scanned position's layers keep the aux the scan returned, stacked
  over them, and a read slices what it reads: as a pytree (a train step's
  measurements, a jit's output) it is those stacked arrays, not one slice per
  layer and value, which XLA compiled one by one (about 20 an MoE layer: most
  of what the 32-layer step compiled more than the 4-layer one, scanned;
  benchmarks/README.md)."""

  def __init__(self, parts: list, rows: tuple):
    self.parts, self.rows = parts, rows  # rows[i]: (part, its row or None) of layer i

  @classmethod
  def of(cls, entries: list) -> LayerAux:
    """From per-layer dicts and _Row views (grouped by the dict they view)."""
    parts, rows = [], []
    for e in entries:
      d = e.stacked if isinstance(e, _Row) else e
      k = next((i for i, p in enumerate(parts) if p is d), None)
      if k is None:
        parts.append(d)
        k = len(parts) - 1
      rows.append((k, e.r if isinstance(e, _Row) else None))
    return cls(parts, tuple(rows))

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[k] for k in range(len(self))[i]]
    part, r = self.rows[i]
    return self.parts[part] if r is None else _Row(self.parts[part], r)

  def __len__(self):
    return len(self.rows)

  def __eq__(self, other):  # as the list of its layers' dicts (`aux == []`)
    return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

  __hash__ = None

  def tree_flatten_with_keys(self):
    return [(jax.tree_util.SequenceKey(i), p) for i, p in enumerate(self.parts)], self.rows

  @classmethod
  def tree_unflatten(cls, rows, parts):
    return cls(list(parts), rows)


class Transformer(nnx.Module):
  """tokens [B, L] -> Output(logits [B, L, V] float32, per-MoE-layer aux dicts, cache).

  With `cache` (decoding), Output.cache is the updated Cache (else None): the
  tokens fill slots [cache.index, cache.index + L); `positions_BxL` gives each
  token's position in its own sequence (per-row positions: left-padded prompts
  start at 0). segments_BxL: packed examples (sft: data) attend only within
  their segment; give their restarting positions too. return_experts: the MoE
  layers' aux also hold each token's experts and router probabilities.
  """

  def __init__(self, m: ModelSpec, vocab_size: int, *, rngs: nnx.Rngs):
    if not isinstance(m, ModelSpec):
      raise TypeError(f"Transformer takes a ModelSpec (config.model_spec(c)), not {type(m)}")
    self.m, self.vocab_size = m, vocab_size
    self.embed = layers.Embed(vocab_size, m.d_model, rngs=rngs)
    if m.position == "learned":
      self.pos_embed = layers.param(
        rngs, nnx.initializers.normal(0.02), (m.max_len, m.d_model), (None, "embed")
      )
    blocks = [Block(m, i, rngs=rngs) for i in range(m.num_layers)]
    start, period, repeats = scan_plan(m)
    if m.scan_layers and repeats:
      # Drawn per layer (the unscanned model's values for the same seed), then
      # stacked: position j of the super-block holds its `repeats` layers.
      rows = lambda j: [blocks[start + r * period + j] for r in range(repeats)]
      self.scan = nnx.List([_stack(rows(j)) for j in range(period)])
      blocks[start : start + period * repeats] = [None] * (period * repeats)
    self.blocks = nnx.List(blocks)  # None where a layer is stacked in self.scan
    self.final_norm = layers.Norm(m.d_model, m.norm, m.norm_eps, m.norm_bias)
    if not m.tie_embeddings:
      self.unembed = layers.param(
        rngs, layers.fan_in_init(scale=m.init_scale), (m.d_model, vocab_size), ("embed", "vocab")
      )
    if m.mtp_depth:  # drawn after the main model: its values are mtp_depth=0's
      self.mtp = nnx.List([MtpModule(m, rngs=rngs) for _ in range(m.mtp_depth)])
    if m.param_dtype != "float32":
      # Drawn in float32 (the same draws as a float32 model), then rounded. Only
      # Params: routing state (DeepSeek-V3's bias) accumulates small steps.
      for _, v in nnx.iter_graph(self):
        if isinstance(v, nnx.Param):
          v.set_value(v.get_value().astype(m.param_dtype))

  def __call__(
    self,
    tokens_BxL,
    *,
    mask_BxL=None,
    train: bool = False,
    rng=None,
    positions_BxL=None,
    cache: Cache | None = None,
    return_experts: bool = False,
    segments_BxL=None,
  ) -> Output:
    x_BxLxD, moe_aux, new_cache, _ = self._trunk(
      tokens_BxL, mask_BxL, train, rng, positions_BxL, cache, return_experts, segments_BxL
    )
    return Output(self._head(x_BxLxD), moe_aux, new_cache)

  def _trunk(
    self, tokens_BxL, mask_BxL, train, rng, positions_BxL, cache, return_experts, segments_BxL
  ):
    """The main model up to its final norm -> (x [B, L, D], moe_aux, the
    updated Cache or None, the blocks' keyword arguments)."""
    B, L = tokens_BxL.shape
    dt = layers.dtype_of(self.m)
    if mask_BxL is None:
      mask_BxL = jnp.ones((B, L), jnp.float32)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    x_BxLxD = self.embed(tokens_BxL, dt)
    if self.m.position == "learned":
      x_BxLxD = x_BxLxD + jnp.take(self.pos_embed[...], positions_BxL, axis=0).astype(dt)
    x_BxLxD = constrain(x_BxLxD, "batch", "length", "act_embed")
    valid_BxS = index = None
    if cache is not None:
      index = cache.index
      valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, mask_BxL > 0, index, 1)
    kw = dict(
      positions_BxL=positions_BxL,
      mask_BxL=mask_BxL,
      train=train,
      index=index,
      valid_BxS=valid_BxS,
      return_experts=return_experts,
      segments_BxL=segments_BxL,
    )
    x_BxLxD, aux, kv = self._layers(x_BxLxD, rng, cache, kw)
    moe_aux = LayerAux.of([a for i, a in enumerate(aux) if self.m.moe_layer(i)])
    x_BxLxD = self.final_norm(x_BxLxD)
    new_cache = None if cache is None else Cache(tuple(kv), valid_BxS, index + L)
    return x_BxLxD, moe_aux, new_cache, kw

  def _head(self, x_BxLxD):
    """The output head (shared by the MTP modules): logits [B, L, V] float32."""
    dt = layers.dtype_of(self.m)
    if self.m.tie_embeddings:
      logits_BxLxV = self.embed.attend(x_BxLxD)
    else:
      logits_BxLxV = x_BxLxD @ self.unembed[...].astype(dt)
    logits_BxLxV = constrain(logits_BxLxV, "batch", "length", "vocab")
    return logits_BxLxV.astype(jnp.float32)

  def with_mtp(
    self,
    tokens_BxL,
    *,
    mask_BxL=None,
    train: bool = False,
    rng=None,
    positions_BxL=None,
    segments_BxL=None,
  ) -> tuple[Output, list[MtpOut]]:
    """The main model's Output and the model.mtp_depth MTP modules' outputs
    (DeepSeek-V3 section 2.2), in order: module k (1-based) at position i
    reads h^{k-1}_i and the embedding of token i + k (tokens_BxL[:, i + k],
    mtp_shift) and predicts token i + k + 1; where i + k is past the sequence
    or (segments_BxL) in another packed example, its input is a filler that
    the causal mask keeps from every real position and the loss skips
    (mtp_reach). The MoE routing of module k's block counts those positions
    out (its mask is mask_BxL x mask_BxL[:, i + k] x reach)."""
    x_BxLxD, moe_aux, _, kw = self._trunk(
      tokens_BxL, mask_BxL, train, rng, positions_BxL, None, False, segments_BxL
    )
    out = Output(self._head(x_BxLxD), moe_aux, None)
    B, L = tokens_BxL.shape
    mask_BxL = kw["mask_BxL"]
    mtp = []
    for k in range(1, self.m.mtp_depth + 1):
      reach_BxL = mtp_reach(B, L, k, segments_BxL)
      kw_k = dict(kw, mask_BxL=mask_BxL * mtp_shift(mask_BxL, k) * reach_BxL)
      mtp.append(self._mtp_step(k, x_BxLxD, mtp_shift(tokens_BxL, k), rng, None, kw_k))
      x_BxLxD = mtp[-1].hidden
    return out, mtp

  def decode_hidden(self, tokens_BxL, *, mask_BxL, positions_BxL, cache: Cache):
    """A cached forward (decoding) -> (Output, the final hidden state x [B, L,
    D] after the final norm: the MTP modules' h^0; speculative decoding)."""
    x_BxLxD, moe_aux, new_cache, _ = self._trunk(
      tokens_BxL, mask_BxL, False, None, positions_BxL, cache, False, None
    )
    return Output(self._head(x_BxLxD), moe_aux, new_cache), x_BxLxD

  def mtp_decode(self, h_BxLxD, next_tokens_BxL, *, mask_BxL, positions_BxL, cache: Cache):
    """MTP module 1 over its own one-layer Cache (decode.init_mtp_cache), as
    with_mtp computes it: position i reads h^0_i and token i + 1
    (next_tokens_BxL[:, i]) -> (its logits [B, L, V], the updated Cache)."""
    index, L = cache.index, next_tokens_BxL.shape[1]
    valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, mask_BxL > 0, index, 1)
    kw = dict(
      positions_BxL=positions_BxL,
      mask_BxL=mask_BxL,
      train=False,
      index=index,
      valid_BxS=valid_BxS,
      return_experts=False,
      segments_BxL=None,
    )
    o = self._mtp_step(1, h_BxLxD, next_tokens_BxL, None, cache.layers[0], kw)
    return o.logits, Cache((o.cache,), valid_BxS, index + L)

  def _mtp_step(self, k: int, h_BxLxD, next_tokens_BxL, rng, layer_cache, kw) -> MtpOut:
    """MTP module k (1-based) on h^{k-1} and the tokens it reads."""
    module = self.mtp[k - 1]
    e_BxLxD = self.embed(next_tokens_BxL, layers.dtype_of(self.m))
    x_BxLxD = module.project(h_BxLxD, e_BxLxD)
    remat = self.m.remat if layer_cache is None else "none"
    x_BxLxD, aux, kv = self._run_block(
      module.block, x_BxLxD, rng, self.m.num_layers + k - 1, layer_cache, kw, remat
    )
    return MtpOut(self._head(module.head_norm(x_BxLxD)), aux, x_BxLxD, kv)

  def _run_block(self, block, x_BxLxD, rng, i: int, layer_cache, kw: dict, remat: str):
    """One unscanned block (its dropout RNG folded with i), rematerialised by `remat`."""
    if remat == "none":
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      return block(x_BxLxD, rng=layer_rng, cache=layer_cache, **kw)
    graphdef, state = nnx.split(block)
    leaves, treedef = jax.tree.flatten(state)
    fn = _block_fn(graphdef, treedef, remat, False, rng, kw)
    return fn(leaves, x_BxLxD, i)

  def _layers(self, x_BxLxD, rng, cache: Cache | None, kw: dict):
    """All blocks -> (x, every layer's aux dict, every layer's KVCache or None).
    Decoding (a cache) runs every layer on its own, a stacked one's row sliced
    out of its position's arrays (inside the jitted step)."""
    m = self.m
    remat = m.remat if cache is None else "none"  # decoding is never differentiated
    start, period, repeats = scan_plan(m) if hasattr(self, "scan") else (0, 1, 0)
    stop = start + period * repeats
    aux, kv = [], []
    for i in range(m.num_layers):
      if i == start and repeats and cache is None:
        x_BxLxD, scanned = self._scan(x_BxLxD, start, period, repeats, remat, rng, kw)
        aux, kv = aux + scanned, kv + [None] * len(scanned)
      if start <= i < stop and cache is None:
        continue
      block = self.blocks[i]
      if block is None:  # decoding a stacked layer
        graphdef, state = nnx.split(self.scan[(i - start) % period])
        row = jax.tree.map(lambda a, r=(i - start) // period: a[r], state)
        block = nnx.merge(graphdef, row)
      layer_cache = None if cache is None else cache.layers[i]
      x_BxLxD, a, layer_kv = self._run_block(block, x_BxLxD, rng, i, layer_cache, kw, remat)
      aux.append(a)
      kv.append(layer_kv)
    return x_BxLxD, aux, kv

  def _scan(self, x_BxLxD, start: int, period: int, repeats: int, remat: str, rng, kw: dict):
    """Layers [start, start + period * repeats) as one jax.lax.scan over
    `repeats` super-blocks of `period` layers, over the stacked parameters of
    self.scan. -> (x, the layers' aux dicts in layer order: views of the
    scan's stacked outputs, which LayerAux keeps stacked)."""
    fns, stacks = [], []
    for block in self.scan:
      graphdef, state = nnx.split(block)
      leaves, treedef = jax.tree.flatten(state)
      fns.append(_block_fn(graphdef, treedef, remat, True, rng, kw))
      stacks.append(leaves)

    def body(x_BxLxD, xs):
      stack, first = xs
      auxes = []
      for j, fn in enumerate(fns):
        x_BxLxD, aux, _ = fn(stack[j], x_BxLxD, first + j)
        auxes.append(aux)
      return x_BxLxD, auxes

    firsts = start + period * jnp.arange(repeats, dtype=jnp.int32)
    x_BxLxD, ys = jax.lax.scan(body, x_BxLxD, (stacks, firsts))
    return x_BxLxD, [_Row(ys[j], r) for r in range(repeats) for j in range(period)]


def _stack(blocks: list[Block]) -> Block:
  """One Block whose Variables are its layers' stacked ([layers, ...]; a
  leading logical axis that is never sharded, params.LAYER_AXIS), each
  Variable naming the layers of its rows (metadata "layers", which
  train.frozen's filter reads)."""
  graphdef, _ = nnx.split(blocks[0])
  layers = tuple(b.layer for b in blocks)

  def stack(*vs):
    names = vs[0].get_metadata().get("out_sharding")
    meta = {"out_sharding": (params.LAYER_AXIS, *names)} if names else {}
    value = jnp.stack([v.get_value() for v in vs])
    return vs[0].replace(value, **meta, layers=layers)

  is_var = lambda x: isinstance(x, nnx.Variable)
  states = [nnx.state(b) for b in blocks]
  return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=is_var))


def apply_state_updates(model: Transformer, moe_aux: list[dict], mtp_aux=()) -> None:
  """Writes the routing state the MoE layers of a training forward returned
  (a stacked position's: its layers' updates stacked in row order), and the
  MTP modules' MoE blocks' (mtp_aux: one aux dict per module)."""
  m = model.m
  for module, a in zip(getattr(model, "mtp", ()), mtp_aux):
    if module.block.is_moe:
      module.block.ffn.apply_state_updates(a)
  by_layer = dict(zip(m.moe_layers, moe_aux))
  start, period, repeats = scan_plan(m) if hasattr(model, "scan") else (0, 1, 0)
  for i, block in enumerate(model.blocks):
    if block is not None and block.is_moe:
      block.ffn.apply_state_updates(by_layer[i])
  for j, block in enumerate(getattr(model, "scan", [])):
    if not block.is_moe:
      continue
    updates = [by_layer[start + r * period + j].get("state_updates", {}) for r in range(repeats)]
    if updates[0]:
      stacked = {k: jnp.stack([u[k] for u in updates]) for k in updates[0]}
      block.ffn.apply_state_updates({"state_updates": stacked})
