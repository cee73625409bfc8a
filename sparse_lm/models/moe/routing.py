"""Routers: pure functions from router logits to a routing decision and aux terms.

A router decides, dispatch moves (dispatch.py), experts compute (layer.py).
Every function here is a function of its arguments only (logits, the config's
`model.moe` block, a PRNG key, a padding mask), so each is testable alone.
All router math is float32 whatever the compute dtype.

Each router is one entry of `ROUTERS` (the table below: its parameters, its
choices per token, its config checks, its function and any routing-state
update); adding one touches this file and config.py only. Token-choice
routers (`switch`, `topk`, `mixtral`, `sigmoid_bias`, `group_limited`,
`hierarchical`) return a `Routing`: K (expert, gate) choices per token, in
priority order (choice 0 is the token's first choice). Capacity dispatch serves
all first choices before any second choice (GShard). `expert_choice` returns an
`ExpertChoiceRouting`: C (token, gate) slots per expert.

Auxiliary terms, all over real tokens only (mask 1; padding is excluded):
  load_balance_loss  Switch (Fedus et al. eq. 4-6): E * sum_e f_e * P_e, P_e
                     the mean router probability of e (softmax; normalised
                     sigmoid scores for `sigmoid_bias`; group prob x in-group
                     prob for `hierarchical`); gradients flow through P only.
                     f_e (before capacity drops) by `moe.load_balance_choices`:
                     "all": the fraction of all T*K assignments that go to e
                     (Megatron-Core's convention, for Mixtral / DBRX / DeepSeek
                     routers); "first": the fraction of tokens whose first
                     choice is e (GShard Algorithm 1's c_e / S, GLaM, fairseq's
                     top-2 gate). Both score 1 for a perfectly balanced router.
  z_loss             ST-MoE: mean over tokens of logsumexp(logits)^2 (the
                     clean logits; `hierarchical` adds both levels).
  importance_loss    Shazeer 2017: CV^2 over experts of the summed gates.
  load_loss          Shazeer 2017: CV^2 of the expert load; the smooth
                     estimator (probability of being in the top-k under fresh
                     noise) when noisy gating is on in training, else counts.
Diagnostics: expert_fraction [E] (= f), max_vio (max load / mean load - 1),
router_entropy (mean over tokens), empty_experts (experts with no assignment),
gate_mean (token-choice routers: mean over tokens of the summed chosen gates).
"""

from __future__ import annotations

import math
from typing import Any
from typing import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
_EPS = 1e-9


class Routing(NamedTuple):
  """A token-choice decision for T tokens with K choices each, priority order."""

  expert_TxK: Array  # int32 chosen experts
  gate_TxK: Array  # float32 combine weights, 0 where not valid
  valid_TxK: Array  # bool: a real token's assignment the router keeps
  aux: dict[str, Array]


class ExpertChoiceRouting(NamedTuple):
  """An expert-choice decision: expert e takes tokens token_ExC[e]."""

  token_ExC: Array  # int32
  gate_ExC: Array  # float32, 0 where not valid
  valid_ExC: Array  # bool: the slot holds a real token
  aux: dict[str, Array]


# ------------------------------------------------------------------ helpers


def jitter(x_TxD: Array, eps: float, rng: Array) -> Array:
  """Switch multiplicative jitter on the router input: x * U(1 - eps, 1 + eps)."""
  noise = jax.random.uniform(rng, x_TxD.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return x_TxD.astype(jnp.float32) * noise


def add_gating_noise(logits: Array, raw_noise_std: Array, rng: Array) -> tuple[Array, Array]:
  """Shazeer 2017 noisy gating: logits + N(0, 1) * softplus(raw). Returns (noisy, std)."""
  std = jax.nn.softplus(raw_noise_std.astype(jnp.float32))
  return logits + jax.random.normal(rng, logits.shape, jnp.float32) * std, std


def smooth_load(clean: Array, noisy: Array, std: Array, k: int, weight_T: Array) -> Array:
  """Shazeer 2017 eq. 8-10: sum over tokens of P(choice i stays in the top-k).

  clean/noisy/std: [T, ..., N] (top-k over the last axis); weight_T: [T, ...]
  multiplies each token's row (the padding mask, or group membership).
  Returns [..., N].
  """
  n = clean.shape[-1]
  if k >= n:
    p = jnp.ones_like(clean)
  else:
    top_TxK1 = jax.lax.top_k(noisy, k + 1)[0]
    kth, kth_plus_1 = top_TxK1[..., k - 1 : k], top_TxK1[..., k : k + 1]
    # kth_excluding(H, k, i): the (k+1)-th value if i is in the top-k, else the k-th.
    threshold = jnp.where(noisy >= kth, kth_plus_1, kth)
    p = jax.scipy.stats.norm.cdf((clean - threshold) / std)
  return jnp.sum(weight_T[..., None] * p, axis=0)


def cv_squared(x: Array) -> Array:
  """Squared coefficient of variation (population variance / mean^2)."""
  x = x.astype(jnp.float32)
  return jnp.var(x) / (jnp.mean(x) ** 2 + 1e-10)


def expert_counts(expert_TxK: Array, valid_TxK: Array, num_experts: int) -> Array:
  """Number of valid assignments per expert, float32 [E]."""
  return (
    jnp.zeros((num_experts,), jnp.float32)
    .at[expert_TxK.reshape(-1)]
    .add(valid_TxK.reshape(-1).astype(jnp.float32))
  )


def update_bias(bias_E: Array, counts_E: Array, rate: float) -> Array:
  """DeepSeek-V3 aux-loss-free balancing: bias += rate * sign(mean load - load)."""
  counts_E = jax.lax.stop_gradient(counts_E.astype(jnp.float32))
  return bias_E + rate * jnp.sign(jnp.mean(counts_E) - counts_E)


def _masked_mean(v_T: Array, mask_T: Array) -> Array:
  return jnp.sum(v_T * mask_T) / jnp.maximum(jnp.sum(mask_T), 1.0)


def _entropy(p_TxE: Array) -> Array:
  return -jnp.sum(jnp.where(p_TxE > 0, p_TxE * jnp.log(jnp.maximum(p_TxE, 1e-30)), 0.0), -1)


def _aux(
  *, probs_TxE, counts_E, importance_E, load_E, z_T, mask_T, balance_counts_E=None
) -> dict[str, Array]:
  """Losses and diagnostics shared by all routers (see the module docstring).

  balance_counts_E: the counts f_e of the load-balance loss is made of, if not
  counts_E (the "first" convention)."""
  E = counts_E.shape[0]
  total = jnp.sum(counts_E)
  f_E = counts_E / jnp.maximum(total, 1.0)
  if balance_counts_E is None:
    balance_f_E = f_E
  else:
    balance_f_E = balance_counts_E / jnp.maximum(jnp.sum(balance_counts_E), 1.0)
  P_E = jnp.sum(probs_TxE * mask_T[:, None], 0) / jnp.maximum(jnp.sum(mask_T), 1.0)
  return {
    "load_balance_loss": E * jnp.sum(jax.lax.stop_gradient(balance_f_E) * P_E),
    "z_loss": _masked_mean(z_T, mask_T),
    "importance_loss": cv_squared(importance_E),
    "load_loss": cv_squared(load_E),
    "expert_fraction": f_E,
    "max_vio": jnp.where(total > 0, jnp.max(counts_E) * E / jnp.maximum(total, 1.0) - 1.0, 0.0),
    "router_entropy": _masked_mean(_entropy(probs_TxE), mask_T),
    "empty_experts": jnp.sum(counts_E == 0).astype(jnp.float32),
  }


def _token_choice(
  expert_TxK, gate_TxK, valid_TxK, *, probs_TxE, z_T, mask_T, load_E=None, balance: str = "all"
):
  expert_TxK = expert_TxK.astype(jnp.int32)
  valid_TxK = valid_TxK & (mask_T[:, None] > 0)
  gate_TxK = jnp.where(valid_TxK, gate_TxK, 0.0)
  E = probs_TxE.shape[-1]
  counts_E = expert_counts(expert_TxK, valid_TxK, E)
  importance_E = jnp.zeros((E,), jnp.float32).at[expert_TxK.reshape(-1)].add(gate_TxK.reshape(-1))
  balance_counts_E = None
  if balance == "first":  # choice 0 is always kept for real tokens
    balance_counts_E = expert_counts(expert_TxK[:, :1], valid_TxK[:, :1], E)
  elif balance != "all":
    raise ValueError(f"unknown load-balance convention {balance!r}")
  aux = _aux(
    probs_TxE=probs_TxE,
    counts_E=counts_E,
    importance_E=importance_E,
    load_E=counts_E if load_E is None else load_E,
    z_T=z_T,
    mask_T=mask_T,
    balance_counts_E=balance_counts_E,
  )
  # How much of each expert's output reaches the residual stream (before
  # capacity drops): Switch's gate is p_i(x) (eq. 2), so a near-uniform
  # router over many experts scales each expert's output down.
  aux["gate_mean"] = _masked_mean(jnp.sum(gate_TxK, -1), mask_T)
  return Routing(expert_TxK, gate_TxK, valid_TxK, aux)


def _take(a_TxE, idx_TxK):
  return jnp.take_along_axis(a_TxE, idx_TxK, axis=-1)


# ------------------------------------------------------------------ routers


def switch(logits_TxE: Array) -> tuple[Array, Array, Array]:
  """Switch Transformer top-1: gate = the chosen expert's softmax probability."""
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  expert_Tx1 = jnp.argmax(probs_TxE, axis=-1)[:, None]
  return expert_Tx1, _take(probs_TxE, expert_Tx1), probs_TxE


def topk(
  logits_TxE: Array,
  k: int,
  *,
  normalize: bool,
  policy: str = "all",
  train: bool = False,
  rng: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
  """GShard / GLaM / NLLB top-k on softmax probabilities.

  Gates are the chosen probabilities, renormalised over the k chosen when
  `normalize`. Second-expert policies, training only (evaluation uses "all"):
    "all":      keep the top-k.
    "random":   keep choice j >= 1 when 2 * g_j > U(0, 1), g_j the gate share
                over the chosen (GShard); a dropped choice takes no capacity.
    "sampling": choices j >= 1 are the top-(k-1) of logits + Gumbel noise over
                the experts other than the first choice (sampling from the
                softmax without replacement; NLLB-200).
  Returns (expert [T, K], gate [T, K], keep [T, K] bool, probs [T, E]).
  """
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  T, E = probs_TxE.shape
  if train and policy == "sampling" and k > 1:
    first_Tx1 = jnp.argmax(logits_TxE, axis=-1)[:, None]
    noisy_TxE = logits_TxE + jax.random.gumbel(rng, (T, E), jnp.float32)
    noisy_TxE = jnp.where(jnp.arange(E)[None, :] == first_Tx1, -jnp.inf, noisy_TxE)
    expert_TxK = jnp.concatenate([first_Tx1, jax.lax.top_k(noisy_TxE, k - 1)[1]], axis=-1)
  else:
    expert_TxK = jax.lax.top_k(probs_TxE, k)[1]
  gate_TxK = _take(probs_TxE, expert_TxK)
  share_TxK = gate_TxK / (jnp.sum(gate_TxK, -1, keepdims=True) + _EPS)
  keep_TxK = jnp.ones((T, k), bool)
  if train and policy == "random" and k > 1:
    u_TxK = jax.random.uniform(rng, (T, k), jnp.float32)
    keep_TxK = (jnp.arange(k)[None, :] == 0) | (2.0 * share_TxK > u_TxK)
  return expert_TxK, share_TxK if normalize else gate_TxK, keep_TxK, probs_TxE


def mixtral(logits_TxE: Array, k: int) -> tuple[Array, Array, Array]:
  """Mixtral / DBRX: gates = softmax over the top-k logits only."""
  top_TxK, expert_TxK = jax.lax.top_k(logits_TxE, k)
  return expert_TxK, jax.nn.softmax(top_TxK, axis=-1), jax.nn.softmax(logits_TxE, axis=-1)


def sigmoid_bias(
  logits_TxE: Array, k: int, bias_E: Array, *, normalize: bool
) -> tuple[Array, Array, Array]:
  """DeepSeek-V3: sigmoid scores; the bias changes the choice, not the gate.

  Returns (expert, gate, normalised scores s / sum(s) used as P for the aux terms).
  """
  scores_TxE = jax.nn.sigmoid(logits_TxE)
  biased_TxE = scores_TxE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))[None, :]
  expert_TxK = jax.lax.top_k(biased_TxE, k)[1]
  gate_TxK = _take(scores_TxE, expert_TxK)
  if normalize:
    gate_TxK = gate_TxK / (jnp.sum(gate_TxK, -1, keepdims=True) + _EPS)
  return expert_TxK, gate_TxK, scores_TxE / jnp.sum(scores_TxE, -1, keepdims=True)


def group_limited(
  logits_TxE: Array, k: int, bias_E: Array, num_groups: int, top_groups: int, *, normalize: bool
) -> tuple[Array, Array, Array]:
  """DeepSeek-V3 node-limited routing (Liu et al. 2024, section 2.1.2): the
  sigmoid_bias router, restricted to the experts of each token's top
  `top_groups` of `num_groups` contiguous expert groups, a group scored by the
  sum of its highest k / top_groups biased scores (the released code's fixed 2
  is this for V3's k=8, M=4). Bounds how many devices a token's all-to-all
  reaches when groups are placed on devices.

  Returns (expert, gate, normalised scores s / sum(s) used as P for the aux terms).
  """
  T, E = logits_TxE.shape
  G = num_groups
  scores_TxE = jax.nn.sigmoid(logits_TxE)
  biased_TxE = scores_TxE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))[None, :]
  per = max(k // top_groups, 1)
  group_TxG = jnp.sum(jax.lax.top_k(biased_TxE.reshape(T, G, E // G), per)[0], -1)
  chosen_TxA = jax.lax.top_k(group_TxG, top_groups)[1]
  allowed_TxG = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], chosen_TxA].set(True)
  allowed_TxE = jnp.repeat(allowed_TxG, E // G, axis=1)
  expert_TxK = jax.lax.top_k(jnp.where(allowed_TxE, biased_TxE, -jnp.inf), k)[1]
  gate_TxK = _take(scores_TxE, expert_TxK)
  if normalize:
    gate_TxK = gate_TxK / (jnp.sum(gate_TxK, -1, keepdims=True) + _EPS)
  return expert_TxK, gate_TxK, scores_TxE / jnp.sum(scores_TxE, -1, keepdims=True)


def hierarchical(
  logits_TxE: Array, group_logits_TxG: Array, k_groups: int, k: int
) -> tuple[Array, Array, Array, Array]:
  """Shazeer 2017 appendix B: a primary gate picks k_groups of G groups, each
  chosen group's own gate picks k of its E/G experts; gates multiply.

  Each level is softmax over its top-k logits (Shazeer's G = Softmax(KeepTopK)).
  Returns (expert [T, k_groups*k], gate, group [T, k_groups], probs [T, E]);
  choices are sorted by gate, so choice 0 has the largest gate.
  """
  T, E = logits_TxE.shape
  G = group_logits_TxG.shape[-1]
  M = E // G
  top1_TxA, group_TxA = jax.lax.top_k(group_logits_TxG, k_groups)
  logits_TxGxM = logits_TxE.reshape(T, G, M)
  chosen_TxAxM = jnp.take_along_axis(logits_TxGxM, group_TxA[..., None], axis=1)
  top2_TxAxB, local_TxAxB = jax.lax.top_k(chosen_TxAxM, k)
  gate_TxAxB = jax.nn.softmax(top1_TxA, -1)[..., None] * jax.nn.softmax(top2_TxAxB, -1)
  expert_TxAxB = group_TxA[..., None] * M + local_TxAxB
  gate_TxK, order_TxK = jax.lax.top_k(gate_TxAxB.reshape(T, -1), k_groups * k)
  expert_TxK = _take(expert_TxAxB.reshape(T, -1), order_TxK)
  probs_TxE = (
    jax.nn.softmax(group_logits_TxG, -1)[..., None] * jax.nn.softmax(logits_TxGxM, -1)
  ).reshape(T, E)
  return expert_TxK, gate_TxK, group_TxA, probs_TxE


def expert_choice(logits_TxE: Array, capacity: int, mask_T: Array) -> ExpertChoiceRouting:
  """Zhou et al. 2022: each expert takes its top-C tokens by softmax probability.

  Caution: in a causal LM this makes a token's routing (and so its output)
  depend on the other tokens of the batch, including later ones, which leaks
  future information during training; use it for studies, not for a causal
  decoder you intend to sample from.
  """
  T, E = logits_TxE.shape
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  scores_ExT = jnp.where(mask_T[None, :] > 0, probs_TxE.T, -1.0)  # padding last
  gate_ExC, token_ExC = jax.lax.top_k(scores_ExT, capacity)
  valid_ExC = mask_T[token_ExC] > 0
  gate_ExC = jnp.where(valid_ExC, gate_ExC, 0.0)
  counts_E = jnp.sum(valid_ExC, -1).astype(jnp.float32)
  aux = _aux(
    probs_TxE=probs_TxE,
    counts_E=counts_E,
    importance_E=jnp.sum(gate_ExC, -1),
    load_E=counts_E,
    z_T=jax.nn.logsumexp(logits_TxE, -1) ** 2,
    mask_T=mask_T,
  )
  return ExpertChoiceRouting(token_ExC.astype(jnp.int32), gate_ExC, valid_ExC, aux)


# ------------------------------------------------------------------ the table
#
# A router is one entry of ROUTERS: the parameters it owns, how many
# assignments it makes per token, its config checks, and its function
#   route(inputs, moe, *, mask_T, train, rng) -> Routing | ExpertChoiceRouting
# where `inputs` holds x @ W for each of its matrix parameters (router logits:
# "router" [T, E], "router_noise", "group_router" [T, G], ...) and the value
# of each of its state parameters ("router_bias" [E]). A state parameter is
# not trained; its new value comes back from `update(inputs, routing, moe)`
# and the caller writes it (MoeFfn returns it, the train step applies it).


class ParamSpec(NamedTuple):
  """A router parameter: `shape(moe, d_model)`, logical axes, init, and
  whether it is routing state (updated by `Router.update`, not by gradients)."""

  shape: Callable[[Any, int], tuple[int, ...]]
  axes: tuple
  init: str = "fan_in"  # "fan_in" (layers.fan_in_init, model init scale) or "zeros"
  state: bool = False


class Router(NamedTuple):
  """One routing method. `check(moe)` returns (config key, why) for a bad config."""

  params: Callable[[Any], dict[str, ParamSpec]]
  route: Callable[..., Any]
  choices: Callable[[Any], int] = lambda moe: moe.top_k  # assignments per token
  check: Callable[[Any], tuple[str, str] | None] = lambda moe: None
  update: Callable[..., dict[str, Array]] | None = None
  expert_choice: bool = False  # routes by expert: ExpertChoiceRouting, capacity only
  # Draws from the rng in training besides noisy gating (a second-expert policy).
  randomness: Callable[[Any], bool] = lambda moe: False
  # The expert split over devices must follow group boundaries (hierarchical).
  group_placement: bool = False


def _matrix(n: Callable[[Any], int]) -> ParamSpec:
  return ParamSpec(lambda moe, d: (d, n(moe)), ("embed", None))


def _gating(name: str, n: Callable[[Any], int]) -> dict[str, ParamSpec]:
  """A gating matrix, and its noise-scale twin under noisy gating (Shazeer
  2017 initialises both to zero; here the noise one only, the gate at the
  model's init)."""
  specs = {name: _matrix(n)}
  return specs | {f"{name}_noise": ParamSpec(lambda moe, d: (d, n(moe)), ("embed", None), "zeros")}


_E = lambda moe: moe.num_experts
_G = lambda moe: moe.num_groups


def _params(*extra):
  def params(moe):
    out = _gating("router", _E)
    if not moe.noisy_gating:
      out.pop("router_noise")
    for name, spec in extra:
      if name.endswith("_noise") and not moe.noisy_gating:
        continue
      out[name] = spec
    return out

  return params


def _rngs(rng, moe, train, policy=False):
  """(noise, group noise, policy) keys, only where training needs them."""
  if not (train and (moe.noisy_gating or policy)):
    return None, None, None
  if rng is None:
    raise ValueError(
      "routing in training with noisy gating or a random second-expert policy needs an rng"
    )
  return tuple(jax.random.split(rng, 3))


def _chosen(inputs, name, moe, train, rng):
  """(clean logits, the logits the choice is made on, noise std or None)."""
  clean = inputs[name].astype(jnp.float32)
  if train and moe.noisy_gating:
    noisy, std = add_gating_noise(clean, inputs[f"{name}_noise"], rng)
    return clean, noisy, std
  return clean, clean, None


def _finish(choice, clean, chosen, std, moe, mask_T, k, keep_TxK=None, probs_TxE=None):
  expert_TxK, gate_TxK, probs = choice[0], choice[1], choice[-1]
  load_E = None if std is None else smooth_load(clean, chosen, std, k, mask_T)
  if keep_TxK is None:
    keep_TxK = jnp.ones(expert_TxK.shape, bool)
  return _token_choice(
    expert_TxK,
    gate_TxK,
    keep_TxK,
    probs_TxE=probs if probs_TxE is None else probs_TxE,
    z_T=jax.nn.logsumexp(clean, -1) ** 2,
    mask_T=mask_T.astype(jnp.float32),
    load_E=load_E,
    balance=moe.load_balance_choices,
  )


def _route_switch(inputs, moe, *, mask_T, train, rng=None):
  """Fedus et al. 2021 eq. 1-2: top-1 of the softmax; gate = its probability."""
  noise_key, _, _ = _rngs(rng, moe, train)
  clean, chosen, std = _chosen(inputs, "router", moe, train, noise_key)
  return _finish(switch(chosen), clean, chosen, std, moe, mask_T, 1)


def _route_topk(inputs, moe, *, mask_T, train, rng=None):
  """GShard (Lepikhin et al. 2020, Algorithm 1) / GLaM top-k with a second-expert policy."""
  noise_key, _, policy_key = _rngs(rng, moe, train, policy=_random_policy(moe))
  clean, chosen, std = _chosen(inputs, "router", moe, train, noise_key)
  expert, gate, keep, probs = topk(
    chosen,
    moe.top_k,
    normalize=moe.normalize_gates,
    policy=moe.second_expert_policy,
    train=train,
    rng=policy_key,
  )
  return _finish((expert, gate, probs), clean, chosen, std, moe, mask_T, moe.top_k, keep)


def _random_policy(moe) -> bool:
  return moe.top_k > 1 and moe.second_expert_policy != "all"


def _route_mixtral(inputs, moe, *, mask_T, train, rng=None):
  """Jiang et al. 2024 (Mixtral) eq. 2: softmax over the top-k logits."""
  noise_key, _, _ = _rngs(rng, moe, train)
  clean, chosen, std = _chosen(inputs, "router", moe, train, noise_key)
  return _finish(mixtral(chosen, moe.top_k), clean, chosen, std, moe, mask_T, moe.top_k)


def _route_sigmoid_bias(inputs, moe, *, mask_T, train, rng=None):
  """DeepSeek-V3 (Liu et al. 2024) eq. 15-16 with the aux-loss-free bias b_i."""
  noise_key, _, _ = _rngs(rng, moe, train)
  clean, chosen, std = _chosen(inputs, "router", moe, train, noise_key)
  choice = sigmoid_bias(chosen, moe.top_k, inputs["router_bias"], normalize=moe.normalize_gates)
  return _finish(choice, clean, chosen, std, moe, mask_T, moe.top_k)


def _route_group_limited(inputs, moe, *, mask_T, train, rng=None):
  """DeepSeek-V3 node-limited routing (section 2.1.2) with the aux-loss-free bias."""
  noise_key, _, _ = _rngs(rng, moe, train)
  clean, chosen, std = _chosen(inputs, "router", moe, train, noise_key)
  choice = group_limited(
    chosen,
    moe.top_k,
    inputs["router_bias"],
    moe.num_groups,
    moe.top_k_groups,
    normalize=moe.normalize_gates,
  )
  return _finish(choice, clean, chosen, std, moe, mask_T, moe.top_k)


def _bias_update(inputs, r, moe):
  """DeepSeek-V3 section 2.1.2: b_i += rate * sign(mean load - load_i), per batch."""
  counts_E = expert_counts(r.expert_TxK, r.valid_TxK, moe.num_experts)
  return {"router_bias": update_bias(inputs["router_bias"], counts_E, moe.bias_update_rate)}


def _route_hierarchical(inputs, moe, *, mask_T, train, rng=None):
  """Shazeer et al. 2017 appendix B: group gate x in-group gate."""
  noise_key, group_key, _ = _rngs(rng, moe, train)
  clean, chosen, std = _chosen(inputs, "router", moe, train, noise_key)
  g_clean, g_chosen, g_std = _chosen(inputs, "group_router", moe, train, group_key)
  T, E = clean.shape
  G = g_clean.shape[-1]
  expert, gate, group_TxA, probs = hierarchical(chosen, g_chosen, moe.top_k_groups, moe.top_k)
  z_T = jax.nn.logsumexp(g_clean, -1) ** 2 + jnp.mean(
    jax.nn.logsumexp(clean.reshape(T, G, E // G), -1) ** 2, -1
  )
  mask_T = mask_T.astype(jnp.float32)
  load_E = None
  if std is not None:
    load_E = _hierarchical_smooth_load(
      clean, chosen, std, g_clean, g_chosen, g_std, group_TxA, moe.top_k_groups, moe.top_k, mask_T
    )
  return _token_choice(
    expert,
    gate,
    jnp.ones(expert.shape, bool),
    probs_TxE=probs,
    z_T=z_T,
    mask_T=mask_T,
    load_E=load_E,
    balance=moe.load_balance_choices,
  )


def _route_expert_choice(inputs, moe, *, mask_T, train, rng=None):
  """Zhou et al. 2022 eq. 1: each expert takes its top-C tokens."""
  del rng
  logits = inputs["router"].astype(jnp.float32)
  return expert_choice(logits, capacity(moe, logits.shape[0], train), mask_T.astype(jnp.float32))


def _check_groups(moe, name, per_group_k):
  a = moe.num_groups
  if a < 2 or moe.num_experts % a:
    return (
      "model.moe.num_groups",
      f"must be >= 2 and divide model.moe.num_experts={moe.num_experts} for router {name!r}",
    )
  if not 1 <= moe.top_k_groups <= a:
    return "model.moe.top_k_groups", f"must be in [1, num_groups={a}]"
  limit = moe.num_experts // a * (1 if per_group_k else moe.top_k_groups)
  if moe.top_k > limit:
    return (
      "model.moe.top_k",
      f"must be <= {limit} (the experts a token can reach) for router {name!r}",
    )
  return None


ROUTERS: dict[str, Router] = {
  "switch": Router(
    _params(),
    _route_switch,
    check=lambda moe: (
      ("model.moe.top_k", "must be 1 for router 'switch' (use 'topk')") if moe.top_k != 1 else None
    ),
  ),
  "topk": Router(_params(), _route_topk, randomness=_random_policy),
  "mixtral": Router(_params(), _route_mixtral),
  "sigmoid_bias": Router(
    _params(
      ("router_bias", ParamSpec(lambda moe, d: (moe.num_experts,), (None,), "zeros", state=True))
    ),
    _route_sigmoid_bias,
    update=_bias_update,
  ),
  "group_limited": Router(
    _params(
      ("router_bias", ParamSpec(lambda moe, d: (moe.num_experts,), (None,), "zeros", state=True))
    ),
    _route_group_limited,
    update=_bias_update,
    check=lambda moe: _check_groups(moe, "group_limited", per_group_k=False),
  ),
  "hierarchical": Router(
    _params(*_gating("group_router", _G).items()),
    _route_hierarchical,
    choices=lambda moe: moe.top_k * moe.top_k_groups,
    group_placement=True,
    check=lambda moe: _check_groups(moe, "hierarchical", per_group_k=True),
  ),
  "expert_choice": Router(
    _params(),
    _route_expert_choice,
    expert_choice=True,
    check=lambda moe: (
      ("model.moe.dispatch", "must be 'capacity' for router 'expert_choice'")
      if moe.dispatch != "capacity"
      else (
        "model.moe.load_balance_choices",
        "must be 'all' for router 'expert_choice' (an expert's slots have no first choice)",
      )
      if moe.load_balance_choices != "all"
      else (
        "model.moe.noisy_gating",
        "must be False for router 'expert_choice' (it has no effect there)",
      )
      if moe.noisy_gating
      else None
    ),
  ),
}


def capacity(moe: Any, num_tokens: int, train: bool) -> int:
  """Per-expert capacity over the whole batch: max(min_capacity, ceil(cf*T*k/E)), <= T."""
  cf = moe.capacity_factor if train else moe.eval_capacity_factor
  k = ROUTERS[moe.router].choices(moe)
  c = max(moe.min_capacity, math.ceil(cf * num_tokens * k / moe.num_experts))
  return max(1, min(c, num_tokens))


def route(
  logits_TxE: Array, moe: Any, *, mask_T: Array, train: bool, rng: Array | None = None, **inputs
) -> Routing | ExpertChoiceRouting:
  """ROUTERS[moe.router].route on router logits [T, E] and the other inputs."""
  return ROUTERS[moe.router].route(
    {"router": logits_TxE, **inputs}, moe, mask_T=mask_T, train=train, rng=rng
  )


def _hierarchical_smooth_load(
  clean_TxE, noisy_TxE, std_TxE, clean_TxG, noisy_TxG, std_TxG, group_TxA, k_groups, k, mask_T
):
  """Load_H[g, m] = Load_primary[g] * Load_g(X^(g))[m] / |X^(g)| (Shazeer 2017 app. B)."""
  T, E = clean_TxE.shape
  G = clean_TxG.shape[-1]
  load_G = smooth_load(clean_TxG, noisy_TxG, std_TxG, k_groups, mask_T)
  member_TxG = jnp.zeros((T, G), jnp.float32).at[jnp.arange(T)[:, None], group_TxA].set(1.0)
  member_TxG = member_TxG * mask_T[:, None]
  r = lambda a: a.reshape(T, G, E // G)
  load_GxM = smooth_load(r(clean_TxE), r(noisy_TxE), r(std_TxE), k, member_TxG)
  n_G = jnp.maximum(jnp.sum(member_TxG, 0), 1.0)
  return (load_G[:, None] * load_GxM / n_G[:, None]).reshape(E)
