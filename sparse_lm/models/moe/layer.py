"""MoeFfn: the MoE FFN layer's parameters, and the glue router -> dispatch -> combine.

Every step is a pure function elsewhere: routing.py (ROUTERS: the parameters
a router owns and how it decides), dispatch.py (one program that moves tokens
to their experts and back, run as is on one device or by parallel.py across
an expert mesh), experts.py (the expert FFNs), policy.py (how to compute, per
backend). Built from the resolved spec (models/spec.py: d_model, dtype and the
model.moe block, whose d_ff, activation and init_scale are already resolved).
Router math in float32; expert matmuls in model.dtype; parameters float32 with
logical axis names.
"""

from __future__ import annotations

from flax import nnx
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from sparse_lm.models import layers
from sparse_lm.models.moe import dispatch as dispatch_lib
from sparse_lm.models.moe import experts as experts_lib
from sparse_lm.models.moe import parallel
from sparse_lm.models.moe import policy
from sparse_lm.models.moe import routing as routing_lib
from sparse_lm.models.spec import ModelSpec

Array = jax.Array


class RouterState(nnx.Variable):
  """Routing state that is not trained (DeepSeek-V3's per-expert bias): no
  gradient, no optimizer slot. A training forward returns its new value in
  aux["state_updates"]; the caller writes it (apply_state_updates)."""


# Named PRNG streams of one MoE forward (folded into the layer's rng).
_JITTER, _NOISE, _DROPOUT, _EOM = range(4)


class MoeFfn(nnx.Module):
  """Sparse MoE FFN. __call__(x [B, L, D]) -> (y [B, L, D], aux dict).

  The residual is added by the Transformer block, so a dropped token (or a
  padding token, which is never routed) gets a zero MoE output.
  """

  def __init__(self, m: ModelSpec, *, rngs: nnx.Rngs):
    moe = m.moe
    self.m = m
    E, D, F, s = moe.num_experts, m.d_model, moe.d_ff, moe.init_scale
    self.activation = layers.spelled(moe.activation, m)
    router_params = routing_lib.params(moe, D)
    self.router_params = tuple(router_params)
    self.state_names = tuple(n for n, p in router_params.items() if p.state)
    for name, spec in router_params.items():
      if spec.state:
        setattr(self, name, RouterState(jnp.zeros(spec.shape, jnp.float32)))
        continue
      init = layers.fan_in_init(scale=s) if spec.init == "fan_in" else nnx.initializers.zeros
      setattr(self, name, layers.param(rngs, init, spec.shape, spec.axes))
    init = layers.fan_in_init((1,), s, batch_axes=(0,))  # [E, fan_in, fan_out]
    self.wi = layers.param(rngs, init, (E, D, F), ("expert", "embed", "expert_mlp"))
    if layers.is_gated(self.activation):
      self.wg = layers.param(rngs, init, (E, D, F), ("expert", "embed", "expert_mlp"))
    self.wo = layers.param(rngs, init, (E, F, D), ("expert", "expert_mlp", "embed"))
    zeros = nnx.initializers.zeros
    if moe.expert_bias:  # GPT-OSS's (gated), NLLB-200's (ReLU: no bg)
      for name, n, ax in (("bi", F, "expert_mlp"), ("bg", F, "expert_mlp"), ("bo", D, "embed")):
        if name != "bg" or layers.is_gated(self.activation):
          setattr(self, name, layers.param(rngs, zeros, (E, n), ("expert", ax)))
    if moe.router_logit_bias:  # GPT-OSS: a trained bias on the router logits
      self.router_logit_bias = layers.param(rngs, zeros, (E,), (None,))
    if moe.num_shared_experts:
      # S shared experts of hidden F == one dense FFN of hidden S * F
      # (moe.shared_d_ff: that width, or any other).
      SF = moe.shared_d_ff
      dense_init = layers.fan_in_init(scale=s)
      self.shared_wi = layers.param(rngs, dense_init, (D, SF), ("embed", "mlp"))
      if layers.is_gated(self.activation):
        self.shared_wg = layers.param(rngs, dense_init, (D, SF), ("embed", "mlp"))
      self.shared_wo = layers.param(rngs, dense_init, (SF, D), ("mlp", "embed"))
      if moe.shared_expert_gate:  # Qwen2-MoE: sigmoid(x @ w) scales the shared output
        self.shared_gate = layers.param(rngs, dense_init, (D, 1), ("embed", None))

  def expert_weights(self, dt=None) -> experts_lib.Weights:
    """The experts' weights, cast to dt (None: as stored)."""
    wg = self.wg[...] if layers.is_gated(self.activation) else None
    w = experts_lib.Weights(self.wi[...], wg, self.wo[...])
    if self.m.moe.expert_bias:
      bg = self.bg[...] if layers.is_gated(self.activation) else None
      w = w._replace(bi=self.bi[...], bg=bg, bo=self.bo[...])
    return w if dt is None else w.astype(dt)

  def apply_state_updates(self, aux: dict) -> None:
    """Writes the routing state a training forward returned (aux["state_updates"];
    a micro-batched step computes it from the whole step's statistics)."""
    for name, value in aux.get("state_updates", {}).items():
      getattr(self, name)[...] = value

  def __call__(
    self,
    x_BxLxD: Array,
    *,
    mask_BxL: Array | None = None,
    train: bool = False,
    rng: Array | None = None,
    return_experts: bool = False,
  ) -> tuple[Array, dict[str, Array]]:
    """y [B, L, D] in model.dtype and the aux dict (router_loss, its terms,
    diagnostics, and "state_updates" for the caller). rng is used only when
    train=True (jitter, noisy gating, second-expert policy, expert dropout,
    expert output masking). return_experts: aux also holds each token's
    experts "experts_TxK" (-1 where dropped) and router probabilities
    "probs_TxE" (token-choice routers)."""
    m, moe = self.m, self.m.moe
    B, L, D = x_BxLxD.shape
    T, E = B * L, moe.num_experts
    dt = layers.dtype_of(m)
    router = moe.router_facts
    x_TxD = x_BxLxD.reshape(T, D).astype(dt)
    mask_T = (
      jnp.ones((T,), jnp.float32) if mask_BxL is None else mask_BxL.reshape(T).astype(jnp.float32)
    )
    key = self._rng(train, rng)
    stream = lambda i: None if key is None else jax.random.fold_in(key, i)

    # Router: x @ W for each gating matrix (float32, or model.dtype under
    # router_dtype "compute"; everything after it is float32), and the state.
    rdt = jnp.float32 if moe.router_dtype == "float32" else dt
    xr_TxD = x_TxD.astype(rdt)
    if train and moe.jitter > 0:
      xr_TxD = routing_lib.jitter(xr_TxD, moe.jitter, stream(_JITTER)).astype(rdt)
    inputs = {}
    for name in self.router_params:
      v = getattr(self, name)
      inputs[name] = (
        v[...]
        if isinstance(v, RouterState)
        else jnp.dot(xr_TxD, v[...].astype(rdt), precision=jax.lax.Precision.HIGHEST)
      ).astype(jnp.float32)
    if moe.router_logit_bias:
      inputs["router"] = inputs["router"] + self.router_logit_bias[...].astype(jnp.float32)[None]
    r = routing_lib.route(moe, mask_T=mask_T, train=train, rng=stream(_NOISE), rows=B, **inputs)
    # The decision (experts or tokens, gates, validity): what train.remat="moe"
    # keeps of the routing (models/transformer.py, REMAT_POLICIES).
    r = r._replace(**{f: checkpoint_name(getattr(r, f), "moe_routing") for f in r._fields[:3]})

    # Dispatch -> experts -> combine (one program; parallel.py places it).
    place = parallel.placement(E, moe.d_ff)
    dispatch = moe.dispatch
    if dispatch in ("auto", "gather"):  # decoding (decode.inference_spec)
      # Only a decode step (one new token per row) may gather; a prefill takes
      # the grouped path (gathering its T x k experts' weights would not fit).
      step = L == 1 and place.n == 1 and moe.expert_dropout == 0 and not router.by_expert
      dispatch = policy.decode_dispatch(moe, r.expert_TxK.size) if step else "dropless"
    if dispatch == "gather":
      y_TxD, info = dispatch_lib.gather_dispatch(x_TxD, r, self.expert_weights(), self.activation)
    else:
      y_TxD, info = self._dispatch(x_TxD, r, dispatch, place, mask_T, train, stream)

    if train and moe.eom_rate > 0:
      # NLLB-200 Expert Output Masking: drop the whole routed output of a
      # fraction of tokens. Kept tokens are not rescaled by 1 / (1 - rate)...
      keep_T = jax.random.bernoulli(stream(_EOM), 1.0 - moe.eom_rate, (T,))
      y_TxD = y_TxD * keep_T[:, None]
    elif moe.eom_rate > 0:
      # ...so evaluation scales the routed output by 1 - rate, its mean in
      # training: fairseq's MOELayer (moe_tok_dropout, the NLLB-200 MoE's
      # 0.2) and transformers' NllbMoeExperts, so a released checkpoint
      # computes its own function.
      y_TxD = y_TxD * (1.0 - moe.eom_rate)
    y_TxD = y_TxD.astype(dt)
    if moe.num_shared_experts:
      y_TxD = y_TxD + self._shared(x_TxD)
    # Dispatch drops as sums ([1]: this batch's), so that micro-batches add up.
    routed = jnp.sum(r.stats["tokens" if router.by_expert else "counts"])[None]
    stats = {**r.stats, "routed": routed, "dropped": info["dropped_fraction"] * routed}
    aux = {k: v.astype(jnp.float32) for k, v in routing_lib.aux_terms(stats, moe).items()}
    aux["stats"] = stats
    if train and router.update:
      state = {n: inputs[n] for n in self.state_names}
      aux["state"], aux["state_updates"] = state, router.update(state, stats, moe)
    if return_experts and not router.by_expert:
      aux["experts_TxK"] = jnp.where(r.valid_TxK, r.expert_TxK, -1)
      aux["probs_TxE"] = r.probs_TxE
    return y_TxD.reshape(B, L, D), aux

  def _dispatch(self, x_TxD, r, dispatch, place, mask_T, train, stream):
    """Capacity, dropless or expert-choice dispatch -> experts -> combine."""
    moe, impl = self.m.moe, policy.resolve(self.m.moe)
    T, E, dt = x_TxD.shape[0], moe.num_experts, x_TxD.dtype
    w = self.expert_weights(dt)
    if moe.router_facts.by_expert:
      run, rows, kw = dispatch_lib.expert_choice_dispatch, r.token_ExC.shape, {"mask_T": mask_T}
    elif dispatch == "capacity":
      C = routing_lib.capacity(moe, T, train)
      run, rows, kw = dispatch_lib.capacity_dispatch, (E, C), {"capacity": C}
    else:
      run, rows, kw = dispatch_lib.dropless_dispatch, (r.expert_TxK.size,), {}
    if "mask_T" not in kw:
      kw["positions"] = impl.positions
    mask = experts_lib.dropout_mask(stream(_DROPOUT), moe.expert_dropout, rows + (w.hidden,), dt)
    ex = dispatch_lib.Experts(w, self.activation, impl.capacity_layout, impl.grouped_kernel, mask)
    return run(x_TxD, r, ex, place=place, **kw)

  def _shared(self, x_TxD):
    dt = x_TxD.dtype
    h = x_TxD @ self.shared_wi[...].astype(dt)
    g = x_TxD @ self.shared_wg[...].astype(dt) if layers.is_gated(self.activation) else None
    y = layers.activate(h, self.activation, g) @ self.shared_wo[...].astype(dt)
    if self.m.moe.shared_expert_gate:
      y = y * jax.nn.sigmoid(x_TxD @ self.shared_gate[...].astype(dt))
    return y

  def _rng(self, train, rng):
    """The layer's key in training (None in evaluation). Routing checks its
    own needs (noisy gating, second-expert policy); the layer checks these."""
    if not train:
      return None
    needs = [k for k in ("jitter", "expert_dropout", "eom_rate") if getattr(self.m.moe, k) > 0]
    if rng is None and needs:
      raise ValueError(f"MoeFfn(train=True) needs an rng for model.moe.{needs[0]}")
    return rng
