"""Routers: pure functions from router logits to a routing decision and aux terms.

A router decides, dispatch moves (dispatch.py), experts compute (layer.py).
Every function here is a function of its arguments only (logits, the config's
`model.moe` block, a PRNG key, a padding mask), so each is testable alone.
All router math is float32 whatever the compute dtype.

Each router is one entry of `ROUTERS` (the table below: its gating matrices,
its assignments per token, its config checks, its function, any routing-state
update, and the facts other modules ask about it: whether it decodes token by
token, whether its expert split must follow groups, ...); adding one touches
this file and config.py only, and no other module compares router names.
Token-choice routers (`switch`, `topk`, `mixtral`, `sigmoid_bias`,
`group_limited`, `hierarchical`) return a `Routing`: K (expert, gate) choices
per token, in priority order (choice 0 is the token's first choice). Capacity
dispatch serves all first choices before any second choice (GShard).
`expert_choice` returns an `ExpertChoiceRouting`: C (token, gate) slots per
expert.

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
  probs_TxE: Array | None = None  # the router's probabilities (P of the balance loss)
  stats: dict[str, Array] | None = None  # row sums the aux terms are made of (row_stats)


class ExpertChoiceRouting(NamedTuple):
  """An expert-choice decision: expert e takes tokens token_ExC[e]."""

  token_ExC: Array  # int32
  gate_ExC: Array  # float32, 0 where not valid
  valid_ExC: Array  # bool: the slot holds a real token
  aux: dict[str, Array]
  stats: dict[str, Array] | None = None


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
  """Shazeer 2017 eq. 8-10, per token: P(choice i stays in the top-k) (the load
  is its sum over tokens). clean/noisy/std: [T, ..., N] (top-k over the last
  axis); weight_T: [T, ...] multiplies each token's row (group membership)."""
  if k >= clean.shape[-1]:
    p = jnp.ones_like(clean)
  else:
    top_TxK1 = jax.lax.top_k(noisy, k + 1)[0]
    kth, kth_plus_1 = top_TxK1[..., k - 1 : k], top_TxK1[..., k : k + 1]
    # kth_excluding(H, k, i): the (k+1)-th value if i is in the top-k, else the k-th.
    threshold = jnp.where(noisy >= kth, kth_plus_1, kth)
    p = jax.scipy.stats.norm.cdf((clean - threshold) / std)
  return weight_T[..., None] * p


def cv_squared(x: Array) -> Array:
  """Squared coefficient of variation (population variance / mean^2)."""
  x = x.astype(jnp.float32)
  return jnp.var(x) / (jnp.mean(x) ** 2 + 1e-10)


def update_bias(bias_E: Array, counts_E: Array, rate: float) -> Array:
  """DeepSeek-V3 aux-loss-free balancing: bias += rate * sign(mean load - load)."""
  counts_E = jax.lax.stop_gradient(counts_E.astype(jnp.float32))
  return bias_E + rate * jnp.sign(jnp.mean(counts_E) - counts_E)


def _entropy(p_TxE: Array) -> Array:
  return -jnp.sum(jnp.where(p_TxE > 0, p_TxE * jnp.log(jnp.maximum(p_TxE, 1e-30)), 0.0), -1)


def _per_token(idx_TxK: Array, v_TxK: Array, n: int) -> Array:
  """[T, n]: v summed into column idx per token (counts, gates per expert)."""
  T = idx_TxK.shape[0]
  return jnp.zeros((T, n), jnp.float32).at[jnp.arange(T)[:, None], idx_TxK].add(v_TxK)


def row_stats(rows: int, mask_T: Array, **per_token: Array) -> dict[str, Array]:
  """Sums over each row's tokens ([R, ...] for R rows of T / R tokens) of the
  per-token quantities the aux terms are made of: "tokens" (real tokens),
  "counts" and "balance" (assignments per expert: all, or those f_e counts),
  "probs" (router probabilities), "z", "importance" (gates per expert),
  "entropy", "gates" (a token's gate sum), and a router's load parts. Sums
  add up over micro-batches and data shards: the aux terms of a global batch
  (`aux_terms`) do not depend on how it was split (train.microbatches)."""
  per_token = {"tokens": jnp.ones_like(mask_T), **per_token}
  return {
    k: jnp.sum((v * mask_T.reshape(-1, *[1] * (v.ndim - 1))).reshape(rows, -1, *v.shape[1:]), 1)
    for k, v in per_token.items()
  }


def summarize(s: dict[str, Array]) -> dict[str, Array]:
  """The aux terms of one set of summed statistics (see the module docstring)."""
  E = s["counts"].shape[-1]
  n, total = jnp.maximum(s["tokens"], 1.0), jnp.sum(s["counts"])
  balance_f_E = s["balance"] / jnp.maximum(jnp.sum(s["balance"]), 1.0)
  if "load_GxEg" in s:  # hierarchical, noisy: Load_H[g, m] = Load[g] Load_g[m] / |X^(g)|
    load = s["load_G"][:, None] * s["load_GxEg"] / jnp.maximum(s["n_G"], 1.0)[:, None]
  load = s.get("load", s["counts"]) if "load_GxEg" not in s else load.reshape(E)
  out = {
    "load_balance_loss": E * jnp.sum(jax.lax.stop_gradient(balance_f_E) * s["probs"] / n),
    "z_loss": s["z"] / n,
    "importance_loss": cv_squared(s["importance"]),
    "load_loss": cv_squared(load),
    "expert_fraction": s["counts"] / jnp.maximum(total, 1.0),
    "max_vio": jnp.where(total > 0, jnp.max(s["counts"]) * E / jnp.maximum(total, 1.0) - 1.0, 0),
    "router_entropy": s["entropy"] / n,
    "empty_experts": jnp.sum(s["counts"] == 0).astype(jnp.float32),
  }
  if "gates" in s:
    out["gate_mean"] = s["gates"] / n
  if "dropped" in s:  # the layer's dispatch: assignments (or real tokens) capacity dropped
    out["dropped_fraction"] = s["dropped"] / jnp.maximum(s["routed"], 1.0)
  return out


# Statistics of the whole batch, not of a row: [1] per batch (a micro-batch's
# dispatch drops), summed like the row sums.
BATCH_ONLY = ("dropped", "routed")

# The terms model.moe.balance_scope="sequence" computes per row (DeepSeek-V3's
# complementary sequence-wise balance loss) and averages over rows.
BALANCE_TERMS = ("load_balance_loss", "importance_loss", "load_loss")


def aux_terms(stats: dict[str, Array], moe: Any) -> dict[str, Array]:
  """Aux terms and diagnostics of a batch from its row statistics [R, ...]:
  over all its rows, except the balance terms under balance_scope
  "sequence" (the mean over rows with real tokens of each row's own), and
  router_loss, their weighted sum (model.moe.*_weight)."""
  out = summarize({k: jnp.sum(v, 0) for k, v in stats.items()})
  if moe.balance_scope == "sequence":
    per_row = jax.vmap(summarize)({k: v for k, v in stats.items() if k not in BATCH_ONLY})
    real_R = (stats["tokens"] > 0).astype(jnp.float32)
    for k in BALANCE_TERMS:
      out[k] = jnp.sum(per_row[k] * real_R) / jnp.maximum(jnp.sum(real_R), 1.0)
  out["router_loss"] = (
    moe.load_balance_weight * out["load_balance_loss"]
    + moe.z_loss_weight * out["z_loss"]
    + moe.importance_weight * (out["importance_loss"] + out["load_loss"])
  )
  return out


def _take(a_TxE, idx_TxK):
  return jnp.take_along_axis(a_TxE, idx_TxK, axis=-1)


# ------------------------------------------------------------------ routers
#
# A token-choice router is one function of the gating logits (a `Logits` per
# gating matrix: "router" [T, E], and "group_router" [T, G] for hierarchical)
# and the config's model.moe block, returning a `Decision`. `route()` does the
# steps they share once: noise keys, noisy gating, the aux terms.


class Logits(NamedTuple):
  """One gating matrix's logits: `clean` (the aux terms use these), `chosen`
  (what the choice is made on: noisy under noisy gating in training) and the
  noise std (None without noise)."""

  clean: Array
  chosen: Array
  std: Array | None


class Decision(NamedTuple):
  """A token-choice router's output before the shared aux terms."""

  expert_TxK: Array
  gate_TxK: Array
  probs_TxE: Array  # P of the load-balance loss (the router's probabilities)
  keep_TxK: Array | None = None  # None: every choice kept (second-expert policies drop some)
  z_T: Array | None = None  # None: logsumexp(clean router logits)^2
  load: dict[str, Array] | None = None  # per-token load parts; None: counts, or smooth under noise


def switch(lg: dict[str, Logits], moe: Any, **_) -> Decision:
  """Switch Transformer top-1 (Fedus et al. 2021 eq. 1-2): the expert of the
  highest softmax probability; gate = that probability (it does not sum to 1)."""
  probs_TxE = jax.nn.softmax(lg["router"].chosen, axis=-1)
  expert_Tx1 = jnp.argmax(probs_TxE, axis=-1)[:, None]
  return Decision(expert_Tx1, _take(probs_TxE, expert_Tx1), probs_TxE)


def topk(lg: dict[str, Logits], moe: Any, *, train: bool = False, rng=None, **_) -> Decision:
  """GShard (Lepikhin et al. 2020, Algorithm 1) / GLaM / NLLB top-k on softmax
  probabilities. Gates are the chosen probabilities, renormalised over the k
  chosen when model.moe.normalize_gates. Second-expert policies, training only
  (evaluation uses "all"):
    "all":      keep the top-k.
    "random":   keep choice j >= 1 when 2 * g_j > U(0, 1), g_j the gate share
                over the chosen (GShard); a dropped choice takes no capacity.
    "sampling": choices j >= 1 are the top-(k-1) of logits + Gumbel noise over
                the experts other than the first choice (sampling from the
                softmax without replacement; NLLB-200).
  """
  logits_TxE, k, policy = lg["router"].chosen, moe.top_k, moe.second_expert_policy
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
  keep_TxK = None
  if train and policy == "random" and k > 1:
    u_TxK = jax.random.uniform(rng, (T, k), jnp.float32)
    keep_TxK = (jnp.arange(k)[None, :] == 0) | (2.0 * share_TxK > u_TxK)
  gate_TxK = share_TxK if moe.normalize_gates else gate_TxK
  return Decision(expert_TxK, gate_TxK, probs_TxE, keep_TxK)


def mixtral(lg: dict[str, Logits], moe: Any, **_) -> Decision:
  """Mixtral (Jiang et al. 2024 eq. 2) / DBRX: gates = softmax over the top-k
  logits only (equal to top-k of the softmax renormalised)."""
  logits_TxE = lg["router"].chosen
  top_TxK, expert_TxK = jax.lax.top_k(logits_TxE, moe.top_k)
  return Decision(expert_TxK, jax.nn.softmax(top_TxK, -1), jax.nn.softmax(logits_TxE, -1))


def _sigmoid_choice(logits_TxE, allowed_TxE, bias_E, moe) -> Decision:
  """Top-k of sigmoid scores + bias (the bias changes the choice, not the
  gate) among the allowed experts; P = scores / sum(scores)."""
  scores_TxE = jax.nn.sigmoid(logits_TxE)
  biased_TxE = scores_TxE + jax.lax.stop_gradient(bias_E)[None, :]
  if allowed_TxE is not None:
    biased_TxE = jnp.where(allowed_TxE, biased_TxE, -jnp.inf)
  expert_TxK = jax.lax.top_k(biased_TxE, moe.top_k)[1]
  gate_TxK = _take(scores_TxE, expert_TxK)
  if moe.normalize_gates:
    gate_TxK = gate_TxK / (jnp.sum(gate_TxK, -1, keepdims=True) + _EPS)
  if moe.routed_scaling_factor != 1.0:  # DeepSeek-V3's routed_scaling_factor (2.5)
    gate_TxK = gate_TxK * moe.routed_scaling_factor
  return Decision(expert_TxK, gate_TxK, scores_TxE / jnp.sum(scores_TxE, -1, keepdims=True))


def sigmoid_bias(lg: dict[str, Logits], moe: Any, *, bias_E: Array, **_) -> Decision:
  """DeepSeek-V3 (Liu et al. 2024) eq. 15-16 with the aux-loss-free bias b_i:
  sigmoid scores; gates renormalised over the chosen when normalize_gates."""
  return _sigmoid_choice(lg["router"].chosen, None, bias_E, moe)


def group_limited(lg: dict[str, Logits], moe: Any, *, bias_E: Array, **_) -> Decision:
  """DeepSeek-V3 node-limited routing (Liu et al. 2024, section 2.1.2): the
  sigmoid_bias router, restricted to the experts of each token's top
  `top_k_groups` (the paper's M) of `num_groups` (G) contiguous expert groups,
  a group scored by the sum of its highest k // top_k_groups biased scores.
  This generalises DeepSeek: its released code (inference/model.py's Gate,
  transformers' DeepseekV3 MoE) always sums the top 2 (`topk(2)`), the same
  only where k // top_k_groups == 2 (V3's k=8, M=4); the DeepseekV3 import
  refuses the other shapes, and export refuses such a run
  (sparse_lm/convert/families/deepseek_v3.py).

  What it does here: the routing decision of the paper (a token's experts lie
  in at most top_k_groups groups). What it does not do here: exchange fewer
  bytes. In the paper a group is a node and the restriction bounds the nodes
  a token is sent to; our expert-parallel all-to-all (parallel.py) has a
  static send buffer of E x W rows per device whatever the groups, so the
  bytes moved are the same as for sigmoid_bias (and the expert split need not
  follow the groups).

  Shapes: Kg = top_k_groups (the groups a token keeps), Eg = E / G (the
  experts of one group), in the glossary's letters (config.py).
  """
  logits_TxE = lg["router"].chosen
  T, E = logits_TxE.shape
  G, Kg = moe.num_groups, moe.top_k_groups
  biased_TxE = jax.nn.sigmoid(logits_TxE) + jax.lax.stop_gradient(bias_E)[None, :]
  per = max(moe.top_k // Kg, 1)
  group_TxG = jnp.sum(jax.lax.top_k(biased_TxE.reshape(T, G, E // G), per)[0], -1)
  chosen_TxKg = jax.lax.top_k(group_TxG, Kg)[1]
  allowed_TxG = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], chosen_TxKg].set(True)
  return _sigmoid_choice(logits_TxE, jnp.repeat(allowed_TxG, E // G, axis=1), bias_E, moe)


def hierarchical(lg: dict[str, Logits], moe: Any, **_) -> Decision:
  """Shazeer et al. 2017 appendix B: a primary gate picks top_k_groups of G
  groups, each chosen group's own gate picks top_k of its E/G experts; gates
  multiply. Each level is softmax over its top-k logits (Shazeer's G =
  Softmax(KeepTopK)), so the gates of a token sum to 1. Choices are sorted by
  gate. z-loss: both levels; under noisy gating, the load estimator of app. B.

  Shapes, in the glossary's letters (config.py): G groups of Eg = E / G experts
  (the paper's "a groups of b experts": a = G, b = Eg); a token keeps Kg =
  top_k_groups groups and Ke = top_k experts in each, K = Kg * Ke in all.
  """
  ex, gr = lg["router"], lg["group_router"]
  T, E = ex.chosen.shape
  G, Kg, Ke = gr.chosen.shape[-1], moe.top_k_groups, moe.top_k
  Eg = E // G
  top1_TxKg, group_TxKg = jax.lax.top_k(gr.chosen, Kg)
  logits_TxGxEg = ex.chosen.reshape(T, G, Eg)
  chosen_TxKgxEg = jnp.take_along_axis(logits_TxGxEg, group_TxKg[..., None], axis=1)
  top2_TxKgxKe, local_TxKgxKe = jax.lax.top_k(chosen_TxKgxEg, Ke)
  gate_TxKgxKe = jax.nn.softmax(top1_TxKg, -1)[..., None] * jax.nn.softmax(top2_TxKgxKe, -1)
  expert_TxKgxKe = group_TxKg[..., None] * Eg + local_TxKgxKe
  gate_TxK, order_TxK = jax.lax.top_k(gate_TxKgxKe.reshape(T, -1), Kg * Ke)
  expert_TxK = _take(expert_TxKgxKe.reshape(T, -1), order_TxK)
  probs_TxGxEg = jax.nn.softmax(gr.chosen, -1)[..., None] * jax.nn.softmax(logits_TxGxEg, -1)
  z_T = jax.nn.logsumexp(gr.clean, -1) ** 2 + jnp.mean(
    jax.nn.logsumexp(ex.clean.reshape(T, G, Eg), -1) ** 2, -1
  )
  load = None if ex.std is None else _hierarchical_smooth_load(ex, gr, group_TxKg, Ke)
  return Decision(expert_TxK, gate_TxK, probs_TxGxEg.reshape(T, E), z_T=z_T, load=load)


def _hierarchical_smooth_load(ex: Logits, gr: Logits, group_TxKg, Ke) -> dict[str, Array]:
  """Per-token parts of Load_H[g, m] = Load_primary[g] * Load_g(X^(g))[m] /
  |X^(g)| (Shazeer 2017 app. B; `summarize` combines their sums)."""
  T, E = ex.clean.shape
  G = gr.clean.shape[-1]
  ones_T = jnp.ones((T,), jnp.float32)
  load_TxG = smooth_load(gr.clean, gr.chosen, gr.std, group_TxKg.shape[-1], ones_T)
  member_TxG = jnp.zeros((T, G), jnp.float32).at[jnp.arange(T)[:, None], group_TxKg].set(1.0)
  r = lambda a: a.reshape(T, G, E // G)
  load_TxGxEg = smooth_load(r(ex.clean), r(ex.chosen), r(ex.std), Ke, member_TxG)
  return {"load_G": load_TxG, "load_GxEg": load_TxGxEg, "n_G": member_TxG}


def expert_choice(
  logits_TxE: Array, capacity: int, mask_T: Array, moe: Any = None, rows: int = 1
) -> ExpertChoiceRouting:
  """Zhou et al. 2022 eq. 1: each expert takes its top-C tokens by softmax probability.

  Caution: in a causal LM this makes a token's routing (and so its output)
  depend on the other tokens of the batch, including later ones, which leaks
  future information during training; use it for studies, not for a causal
  decoder you intend to sample from.
  """
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  scores_ExT = jnp.where(mask_T[None, :] > 0, probs_TxE.T, -1.0)  # padding last
  gate_ExC, token_ExC = jax.lax.top_k(scores_ExT, capacity)
  valid_ExC = mask_T[token_ExC] > 0
  gate_ExC = jnp.where(valid_ExC, gate_ExC, 0.0)
  T, E = probs_TxE.shape
  into_TxE = lambda v_ExC: (
    jnp.zeros((T, E), jnp.float32).at[token_ExC, jnp.arange(E)[:, None]].add(v_ExC)
  )
  taken_TxE = into_TxE(valid_ExC.astype(jnp.float32))  # [T, E]: token t taken by expert e
  stats = row_stats(
    rows,
    mask_T,
    counts=taken_TxE,
    balance=taken_TxE,
    probs=probs_TxE,
    z=jax.nn.logsumexp(logits_TxE, -1) ** 2,
    importance=into_TxE(gate_ExC),
    entropy=_entropy(probs_TxE),
  )
  aux = summarize({k: jnp.sum(v, 0) for k, v in stats.items()}) if moe is None else None
  aux = aux_terms(stats, moe) if moe is not None else aux
  return ExpertChoiceRouting(token_ExC.astype(jnp.int32), gate_ExC, valid_ExC, aux, stats)


# ------------------------------------------------------------------ the table
#
# A router is one entry of ROUTERS: its gating matrices, its function (a
# token-choice `decide`, or expert_choice), how many assignments it makes per
# token, its config checks, and the facts other modules ask about it. The layer
# passes x @ W per gating matrix under its parameter name ("router" [T, E],
# "group_router" [T, G]; "<name>_noise" for noisy gating) and a state
# parameter ("router_bias" [E]) as its value. A state parameter is not
# trained; its new value comes back from `update(inputs, routing, moe)` and the
# caller writes it (MoeFfn returns it, the train step applies it).


class ParamSpec(NamedTuple):
  """A router parameter: shape, logical axes, init, and whether it is routing
  state (updated by `Router.update`, not by gradients)."""

  shape: tuple[int, ...]
  axes: tuple
  init: str = "fan_in"  # "fan_in" (layers.fan_in_init, model init scale) or "zeros"
  state: bool = False


class Router(NamedTuple):
  """One routing method. `check(moe)` returns (config key, why) for a bad config."""

  decide: Callable[..., Decision] | None  # token choice; None for expert choice
  # Gating matrices: "router" [D, E], and "group_router" [D, G] (hierarchical).
  gating: tuple[str, ...] = ("router",)
  bias: bool = False  # DeepSeek-V3's per-expert bias "router_bias" [E], routing state
  assignments_per_token: Callable[[Any], int] = lambda moe: moe.top_k
  check: Callable[[Any], tuple[str, str] | None] = lambda moe: None
  update: Callable[..., dict[str, Array]] | None = None
  # Experts pick tokens: routes to an ExpertChoiceRouting, capacity dispatch only.
  by_expert: bool = False
  # A token's routing depends on that token alone, so cached decoding (one
  # token at a time) equals the full forward (decode.py refuses the others).
  decodes: bool = True
  # Draws from the rng in training besides noisy gating (a second-expert policy).
  randomness: Callable[[Any], bool] = lambda moe: False
  # The expert split over devices must follow group boundaries (hierarchical).
  group_placement: bool = False
  # Reads model.moe.normalize_gates (the others' gates are what their paper says).
  normalizes: bool = False
  # The sum of a token's chosen gates when every router logit is equal (a zero
  # router): what sparse upcycling divides its expert copies by
  # (train.init_gate_scale="expected"); None where a token has no fixed gate sum.
  gate_mass: Callable[[Any], float] | None = lambda moe: 1.0
  # Whether the chosen gates sum to gate_mass for any logits (normalised
  # gates: an upcycled MoE is the dense model at step 0 with a fresh router),
  # or only when the logits are equal (Switch's gate is the chosen
  # probability, at least 1/E and about 2.9/E for logits of std 1 at E=8:
  # exact only with train.init_router="zero").
  fixed_gate_sum: Callable[[Any], bool] = lambda moe: True
  # A per-token distribution over experts that fine-tuning's routing drift compares.
  drifts: bool = True


def params(moe: Any, d_model: int) -> dict[str, ParamSpec]:
  """The parameters of router model.moe.router: its gating matrices, each with
  a noise-scale twin under noisy gating (Shazeer 2017 initialises both to zero;
  here the noise one only, the gate at the model's init), and its state."""
  router, out = ROUTERS[moe.router], {}
  for name in router.gating:
    shape = (d_model, moe.num_groups if name == "group_router" else moe.num_experts)
    out[name] = ParamSpec(shape, ("embed", None))
    if moe.noisy_gating:
      out[f"{name}_noise"] = ParamSpec(shape, ("embed", None), "zeros")
  if router.bias:
    out["router_bias"] = ParamSpec((moe.num_experts,), (None,), "zeros", state=True)
  return out


def _random_policy(moe) -> bool:
  return moe.top_k > 1 and moe.second_expert_policy != "all"


def _bias_update(state, stats, moe):
  """DeepSeek-V3 section 2.1.2: b_i += rate * sign(mean load - load_i), once per
  training step, from the step's counts over its whole batch (row_stats)."""
  counts_E = jnp.sum(stats["counts"], 0)
  return {"router_bias": update_bias(state["router_bias"], counts_E, moe.bias_update_rate)}


def _check_groups(moe, name, per_group_k):
  G = moe.num_groups
  if G < 2 or moe.num_experts % G:
    why = f"must be >= 2 and divide model.moe.num_experts={moe.num_experts} for router {name!r}"
    return "model.moe.num_groups", why
  if not 1 <= moe.top_k_groups <= G:
    return "model.moe.top_k_groups", f"must be in [1, num_groups={G}]"
  limit = moe.num_experts // G * (1 if per_group_k else moe.top_k_groups)
  if moe.top_k > limit:
    why = f"must be <= {limit} (the experts a token can reach) for router {name!r}"
    return "model.moe.top_k", why
  return None


def _check_expert_choice(moe):
  if moe.dispatch != "capacity":
    return "model.moe.dispatch", "must be 'capacity' for router 'expert_choice'"
  if moe.load_balance_choices != "all":
    why = "must be 'all' for router 'expert_choice' (an expert's slots have no first choice)"
    return "model.moe.load_balance_choices", why
  if moe.noisy_gating:
    return "model.moe.noisy_gating", "must be False for router 'expert_choice' (it has no effect)"
  return None


def _sigmoid_gate_mass(moe) -> float:
  return 1.0 if moe.normalize_gates else moe.top_k * 0.5  # sigmoid(0) per chosen expert


_SIGMOID = dict(
  bias=True,
  update=_bias_update,
  normalizes=True,
  gate_mass=_sigmoid_gate_mass,
  fixed_gate_sum=lambda moe: moe.normalize_gates,
)
ROUTERS: dict[str, Router] = {
  "switch": Router(
    switch,
    check=lambda moe: (
      ("model.moe.top_k", "must be 1 for router 'switch' (use 'topk')") if moe.top_k != 1 else None
    ),
    gate_mass=lambda moe: 1.0 / moe.num_experts,  # the chosen softmax probability
    fixed_gate_sum=lambda moe: False,
  ),
  "topk": Router(
    topk,
    randomness=_random_policy,
    normalizes=True,
    gate_mass=lambda moe: 1.0 if moe.normalize_gates else moe.top_k / moe.num_experts,
    fixed_gate_sum=lambda moe: moe.normalize_gates,
  ),
  "mixtral": Router(mixtral),
  "sigmoid_bias": Router(sigmoid_bias, **_SIGMOID),
  "group_limited": Router(
    group_limited, check=lambda moe: _check_groups(moe, "group_limited", False), **_SIGMOID
  ),
  "hierarchical": Router(
    hierarchical,
    gating=("router", "group_router"),
    assignments_per_token=lambda moe: moe.top_k * moe.top_k_groups,
    group_placement=True,
    check=lambda moe: _check_groups(moe, "hierarchical", True),
  ),
  "expert_choice": Router(
    None,
    by_expert=True,
    decodes=False,  # an expert's choice of tokens depends on the later tokens
    check=_check_expert_choice,
    gate_mass=None,  # a token is taken by any number of experts
    fixed_gate_sum=lambda moe: False,
    drifts=False,
  ),
}


def capacity(moe: Any, num_tokens: int, train: bool) -> int:
  """Per-expert capacity over the whole batch: max(min_capacity, ceil(cf*T*k/E)), <= T."""
  cf = moe.capacity_factor if train else moe.eval_capacity_factor
  k = ROUTERS[moe.router].assignments_per_token(moe)
  c = max(moe.min_capacity, math.ceil(cf * num_tokens * k / moe.num_experts))
  return max(1, min(c, num_tokens))


def route(
  moe: Any, *, mask_T: Array, train: bool, rng: Array | None = None, rows: int = 1, **inputs: Array
) -> Routing | ExpertChoiceRouting:
  """The routing decision of router model.moe.router, with its aux terms.

  inputs: x @ W per gating matrix by parameter name ("router" [T, E],
  "router_noise", "group_router" [T, G], ...) and the value of each state
  parameter ("router_bias" [E]). rng: needed in training for noisy gating and
  random second-expert policies (a ValueError without it)."""
  router = ROUTERS[moe.router]
  mask_T = mask_T.astype(jnp.float32)
  if router.by_expert:
    logits = inputs["router"].astype(jnp.float32)
    return expert_choice(logits, capacity(moe, logits.shape[0], train), mask_T, moe, rows)
  noisy = train and moe.noisy_gating
  keys = [None] * 3  # (router noise, group noise, second-expert policy)
  if noisy or (train and router.randomness(moe)):
    if rng is None:
      raise ValueError(
        "routing in training with noisy gating or a random second-expert policy needs an rng"
      )
    keys = list(jax.random.split(rng, 3))
  lg = {}
  for name, key in zip(router.gating, keys):
    clean = inputs[name].astype(jnp.float32)
    lg[name] = Logits(clean, clean, None)
    if noisy:
      lg[name] = Logits(clean, *add_gating_noise(clean, inputs[f"{name}_noise"], key))
  bias_E = inputs.get("router_bias")
  bias_E = None if bias_E is None else bias_E.astype(jnp.float32)
  d = router.decide(lg, moe, mask_T=mask_T, bias_E=bias_E, train=train, rng=keys[2])
  main = lg["router"]
  load = d.load
  if load is None and noisy:
    k = router.assignments_per_token(moe)
    load = {"load": smooth_load(main.clean, main.chosen, main.std, k, jnp.ones_like(mask_T))}
  # The shared aux terms, over the choices the router keeps for real tokens.
  expert_TxK = d.expert_TxK.astype(jnp.int32)
  valid_TxK = jnp.broadcast_to(mask_T[:, None] > 0, expert_TxK.shape)
  if d.keep_TxK is not None:
    valid_TxK = valid_TxK & d.keep_TxK
  gate_TxK = jnp.where(valid_TxK, d.gate_TxK, 0.0)
  E = d.probs_TxE.shape[-1]
  counts_TxE = _per_token(expert_TxK, valid_TxK.astype(jnp.float32), E)
  balance_TxE = counts_TxE  # "all"; "first": choice 0, always kept for real tokens
  if moe.load_balance_choices == "first":
    balance_TxE = _per_token(expert_TxK[:, :1], valid_TxK[:, :1].astype(jnp.float32), E)
  stats = row_stats(
    rows,
    mask_T,
    counts=counts_TxE,
    balance=balance_TxE,
    probs=d.probs_TxE,
    z=jax.nn.logsumexp(main.clean, -1) ** 2 if d.z_T is None else d.z_T,
    importance=_per_token(expert_TxK, gate_TxK, E),
    entropy=_entropy(d.probs_TxE),
    # How much of each expert's output reaches the residual stream (before
    # capacity drops): Switch's gate is p_i(x) (eq. 2), so a near-uniform
    # router over many experts scales each expert's output down (gate_mean).
    gates=jnp.sum(gate_TxK, -1),
    **(load or {}),
  )
  return Routing(expert_TxK, gate_TxK, valid_TxK, aux_terms(stats, moe), d.probs_TxE, stats)
