"""Routers: pure functions from router logits to a routing decision and aux terms.

A router decides, dispatch moves (dispatch.py), experts compute (layer.py).
Every function here is a function of its arguments only (logits, the config's
`model.moe` block, a PRNG key, a padding mask), so each is testable alone.
All router math is float32 whatever the compute dtype.

Token-choice routers (`switch`, `topk`, `mixtral`, `sigmoid_bias`,
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
router_entropy (mean over tokens), empty_experts (experts with no assignment).
"""

from __future__ import annotations

from typing import Any, NamedTuple

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
    kth, kth_plus_1 = top_TxK1[..., k - 1:k], top_TxK1[..., k:k + 1]
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
  return jnp.zeros((num_experts,), jnp.float32).at[expert_TxK.reshape(-1)].add(
      valid_TxK.reshape(-1).astype(jnp.float32))


def update_bias(bias_E: Array, counts_E: Array, rate: float) -> Array:
  """DeepSeek-V3 aux-loss-free balancing: bias += rate * sign(mean load - load)."""
  counts_E = jax.lax.stop_gradient(counts_E.astype(jnp.float32))
  return bias_E + rate * jnp.sign(jnp.mean(counts_E) - counts_E)


def _masked_mean(v_T: Array, mask_T: Array) -> Array:
  return jnp.sum(v_T * mask_T) / jnp.maximum(jnp.sum(mask_T), 1.0)


def _entropy(p_TxE: Array) -> Array:
  return -jnp.sum(jnp.where(p_TxE > 0, p_TxE * jnp.log(jnp.maximum(p_TxE, 1e-30)), 0.0), -1)


def _aux(*, probs_TxE, counts_E, importance_E, load_E, z_T, mask_T,
         balance_counts_E=None) -> dict[str, Array]:
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


def _token_choice(expert_TxK, gate_TxK, valid_TxK, *, probs_TxE, z_T, mask_T, load_E=None,
                  balance: str = "all"):
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
  aux = _aux(probs_TxE=probs_TxE, counts_E=counts_E, importance_E=importance_E,
             load_E=counts_E if load_E is None else load_E, z_T=z_T, mask_T=mask_T,
             balance_counts_E=balance_counts_E)
  return Routing(expert_TxK, gate_TxK, valid_TxK, aux)


def _take(a_TxE, idx_TxK):
  return jnp.take_along_axis(a_TxE, idx_TxK, axis=-1)


# ------------------------------------------------------------------ routers


def switch(logits_TxE: Array) -> tuple[Array, Array, Array]:
  """Switch Transformer top-1: gate = the chosen expert's softmax probability."""
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  expert_Tx1 = jnp.argmax(probs_TxE, axis=-1)[:, None]
  return expert_Tx1, _take(probs_TxE, expert_Tx1), probs_TxE


def topk(logits_TxE: Array, k: int, *, normalize: bool, policy: str = "all",
         train: bool = False, rng: Array | None = None) -> tuple[Array, Array, Array, Array]:
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


def sigmoid_bias(logits_TxE: Array, k: int, bias_E: Array, *,
                 normalize: bool) -> tuple[Array, Array, Array]:
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


def hierarchical(logits_TxE: Array, group_logits_TxG: Array, k_groups: int,
                 k: int) -> tuple[Array, Array, Array, Array]:
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
  probs_TxE = (jax.nn.softmax(group_logits_TxG, -1)[..., None]
               * jax.nn.softmax(logits_TxGxM, -1)).reshape(T, E)
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
  aux = _aux(probs_TxE=probs_TxE, counts_E=counts_E, importance_E=jnp.sum(gate_ExC, -1),
             load_E=counts_E, z_T=jax.nn.logsumexp(logits_TxE, -1) ** 2, mask_T=mask_T)
  return ExpertChoiceRouting(token_ExC.astype(jnp.int32), gate_ExC, valid_ExC, aux)


def route(logits_TxE: Array, moe: Any, *, mask_T: Array, train: bool,
          rng: Array | None = None, noise_TxE: Array | None = None,
          group_logits_TxG: Array | None = None, group_noise_TxG: Array | None = None,
          bias_E: Array | None = None) -> Routing:
  """Dispatches on `moe.router` for the token-choice routers.

  logits_TxE: float32 router logits (for `hierarchical`, the secondary gates of
  all groups side by side, group g owning columns [g*E/G, (g+1)*E/G)).
  noise_TxE / group_noise_TxG: raw noise-scale logits (x @ W_noise) for noisy
  gating, used only when `train and moe.noisy_gating`. mask_T: 1 real, 0 pad.
  rng: needed in training for noisy gating and the random / sampling policies.
  """
  logits_TxE = logits_TxE.astype(jnp.float32)
  mask_T = mask_T.astype(jnp.float32)
  noisy = bool(train and moe.noisy_gating)
  if noisy or (train and moe.router == "topk" and moe.second_expert_policy != "all"
               and moe.top_k > 1):
    if rng is None:
      raise ValueError("routing in training with noisy gating or a random second-expert "
                       "policy needs an rng")
    rng_noise, rng_group_noise, rng_policy = jax.random.split(rng, 3)
  z_T = jax.nn.logsumexp(logits_TxE, -1) ** 2
  chosen_TxE, load_E = logits_TxE, None
  if noisy:
    chosen_TxE, std_TxE = add_gating_noise(logits_TxE, noise_TxE, rng_noise)
  k, name = moe.top_k, moe.router
  keep_TxK = None
  if name == "switch":
    expert_TxK, gate_TxK, probs_TxE = switch(chosen_TxE)
  elif name == "topk":
    expert_TxK, gate_TxK, keep_TxK, probs_TxE = topk(
        chosen_TxE, k, normalize=moe.normalize_gates, policy=moe.second_expert_policy,
        train=train, rng=rng_policy if train and moe.second_expert_policy != "all" else None)
  elif name == "mixtral":
    expert_TxK, gate_TxK, probs_TxE = mixtral(chosen_TxE, k)
  elif name == "sigmoid_bias":
    expert_TxK, gate_TxK, probs_TxE = sigmoid_bias(chosen_TxE, k, bias_E,
                                                   normalize=moe.normalize_gates)
  elif name == "hierarchical":
    group_logits_TxG = group_logits_TxG.astype(jnp.float32)
    T, E = logits_TxE.shape
    G = group_logits_TxG.shape[-1]
    z_T = jax.nn.logsumexp(group_logits_TxG, -1) ** 2 + jnp.mean(
        jax.nn.logsumexp(logits_TxE.reshape(T, G, E // G), -1) ** 2, -1)
    chosen_TxG = group_logits_TxG
    if noisy:
      chosen_TxG, std_TxG = add_gating_noise(group_logits_TxG, group_noise_TxG, rng_group_noise)
    expert_TxK, gate_TxK, group_TxA, probs_TxE = hierarchical(
        chosen_TxE, chosen_TxG, moe.top_k_groups, k)
    if noisy:
      load_E = _hierarchical_smooth_load(
          logits_TxE, chosen_TxE, std_TxE, group_logits_TxG, chosen_TxG, std_TxG,
          group_TxA, moe.top_k_groups, k, mask_T)
  else:
    raise ValueError(f"route() handles token-choice routers, not {name!r}")
  if noisy and name != "hierarchical":
    load_E = smooth_load(logits_TxE, chosen_TxE, std_TxE, k, mask_T)
  if keep_TxK is None:
    keep_TxK = jnp.ones(expert_TxK.shape, bool)
  return _token_choice(expert_TxK, gate_TxK, keep_TxK, probs_TxE=probs_TxE, z_T=z_T,
                       mask_T=mask_T, load_E=load_E, balance=moe.load_balance_choices)


def _hierarchical_smooth_load(clean_TxE, noisy_TxE, std_TxE, clean_TxG, noisy_TxG, std_TxG,
                              group_TxA, k_groups, k, mask_T):
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
