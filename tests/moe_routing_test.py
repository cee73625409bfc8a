"""Routers (sparse_lm/models/moe/routing.py) against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from sparse_lm import config as cfglib
from sparse_lm.errors import ConfigError
from sparse_lm.models.moe import dispatch
from sparse_lm.models.moe import routing


def moe_cfg(**kw) -> mlc.ConfigDict:
  moe = cfglib.base_config().model.moe
  moe.num_experts = 4
  for k, v in kw.items():
    moe[k] = v
  return moe


# The router inputs by the names of the router's parameters (routing.ROUTERS).
INPUTS = {
  "noise_TxE": "router_noise",
  "group_logits_TxG": "group_router",
  "group_noise_TxG": "group_router_noise",
  "bias_E": "router_bias",
}


def route(logits, moe, *, train, rng=None, **arrays):
  """routing.route under one jit (eager op-by-op dispatch is far slower)."""
  arrays = {INPUTS.get(k, k): v for k, v in arrays.items()}
  fn = lambda logits, rng, arrays: routing.route(moe, train=train, rng=rng, router=logits, **arrays)
  return jax.jit(fn)(logits, rng, arrays)


def softmax(a):
  a = np.asarray(a, np.float64)
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# Three tokens, four experts; the last token is padding in the masked tests.
LOGITS = np.array([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5], [1.0, 0.0, 2.5, 2.0]], np.float32)


def test_switch_top1_gate_is_probability():
  r = route(jnp.asarray(LOGITS), moe_cfg(router="switch"), mask_T=jnp.ones(3), train=False)
  p = softmax(LOGITS)
  np.testing.assert_array_equal(r.expert_TxK[:, 0], [0, 1, 2])
  np.testing.assert_allclose(r.gate_TxK[:, 0], p.max(-1), rtol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_gates_renormalised_over_chosen(normalize):
  r = route(
    jnp.asarray(LOGITS),
    moe_cfg(router="topk", top_k=2, normalize_gates=normalize),
    mask_T=jnp.ones(3),
    train=False,
  )
  p = softmax(LOGITS)
  top2 = np.argsort(-p, -1)[:, :2]
  np.testing.assert_array_equal(r.expert_TxK, top2)
  g = np.take_along_axis(p, top2, -1)
  want = g / g.sum(-1, keepdims=True) if normalize else g
  np.testing.assert_allclose(r.gate_TxK, want, rtol=1e-6)
  if normalize:
    np.testing.assert_allclose(r.gate_TxK.sum(-1), 1.0, rtol=1e-6)


def test_mixtral_gates_are_softmax_over_topk_logits():
  r = route(
    jnp.asarray(LOGITS), moe_cfg(router="mixtral", top_k=2), mask_T=jnp.ones(3), train=False
  )
  for t in range(3):
    top = np.argsort(-LOGITS[t])[:2]
    np.testing.assert_array_equal(r.expert_TxK[t], top)
    np.testing.assert_allclose(r.gate_TxK[t], softmax(LOGITS[t, top]), rtol=1e-6)
  # The identity behind "top-k with renormalised gates == Mixtral" (GLaM vs Mixtral).
  p = softmax(LOGITS)
  top = np.argsort(-LOGITS, -1)[:, :2]
  g = np.take_along_axis(p, top, -1)
  np.testing.assert_allclose(r.gate_TxK, g / g.sum(-1, keepdims=True), rtol=1e-6)


def test_dbrx_16_choose_4():
  logits = jax.random.normal(jax.random.key(0), (5, 16))
  r = route(
    logits, moe_cfg(router="mixtral", num_experts=16, top_k=4), mask_T=jnp.ones(5), train=False
  )
  assert r.expert_TxK.shape == (5, 4)
  np.testing.assert_allclose(r.gate_TxK.sum(-1), 1.0, rtol=1e-6)


def test_sigmoid_bias_changes_choice_not_gate():
  logits = jnp.array([[1.0, 0.9, -2.0, -3.0]])
  bias = jnp.array([0.0, 0.0, 0.0, 10.0])  # forces expert 3 in
  moe = moe_cfg(router="sigmoid_bias", top_k=2)
  r = route(logits, moe, mask_T=jnp.ones(1), train=False, bias_E=bias)
  assert set(np.asarray(r.expert_TxK[0]).tolist()) == {3, 0}
  s = 1 / (1 + np.exp(-np.asarray(logits[0], np.float64)))
  want = s[np.asarray(r.expert_TxK[0])]
  np.testing.assert_allclose(r.gate_TxK[0], want / want.sum(), rtol=1e-6)
  r0 = route(logits, moe, mask_T=jnp.ones(1), train=False, bias_E=jnp.zeros(4))
  assert set(np.asarray(r0.expert_TxK[0]).tolist()) == {0, 1}


def test_bias_update_direction():
  counts = jnp.array([10.0, 2.0, 4.0, 4.0])  # mean 5: expert 0 overloaded
  new = routing.update_bias(jnp.zeros(4), counts, 0.1)
  np.testing.assert_allclose(new, [-0.1, 0.1, 0.1, 0.1])


def test_hierarchical_gates_multiply():
  T, G, Eg = 4, 2, 3
  key1, key2 = jax.random.split(jax.random.key(1))
  logits = jax.random.normal(key1, (T, G * Eg))
  glogits = jax.random.normal(key2, (T, G))
  moe = moe_cfg(router="hierarchical", num_experts=G * Eg, num_groups=G, top_k_groups=1, top_k=2)
  r = route(logits, moe, mask_T=jnp.ones(T), train=False, group_logits_TxG=glogits)
  L, GL = np.asarray(logits), np.asarray(glogits)
  for t in range(T):
    g = int(np.argmax(GL[t]))
    local = np.argsort(-L[t, g * Eg : (g + 1) * Eg])[:2]
    np.testing.assert_array_equal(r.expert_TxK[t], g * Eg + local)
    # top_k_groups=1: primary gate is 1; secondary = softmax over the top-2 logits.
    np.testing.assert_allclose(r.gate_TxK[t], softmax(L[t, g * Eg + local]), rtol=1e-5)
  moe.top_k_groups = 2
  r = route(logits, moe, mask_T=jnp.ones(T), train=False, group_logits_TxG=glogits)
  np.testing.assert_allclose(r.gate_TxK.sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.diff(np.asarray(r.gate_TxK), axis=-1) <= 0)  # sorted by gate
  for t in range(T):
    pg = softmax(GL[t])  # both groups chosen: primary gate = softmax over both
    for e, gate in zip(np.asarray(r.expert_TxK[t]), np.asarray(r.gate_TxK[t])):
      g = e // Eg
      top = np.argsort(-L[t, g * Eg : (g + 1) * Eg])[:2]
      assert e - g * Eg in top
      np.testing.assert_allclose(
        gate, pg[g] * softmax(L[t, g * Eg + top])[list(top).index(e - g * Eg)], rtol=1e-5
      )


def test_expert_choice_takes_top_c_tokens_and_skips_padding():
  T, E, C = 6, 3, 2
  logits = jax.random.normal(jax.random.key(2), (T, E))
  mask = jnp.array([1, 1, 1, 1, 0, 0.0])
  r = jax.jit(routing.expert_choice, static_argnums=1)(logits, C, mask)
  p = softmax(np.asarray(logits))
  for e in range(E):
    real = np.argsort(-np.where(np.asarray(mask) > 0, p[:, e], -1))[:C]
    np.testing.assert_array_equal(r.token_ExC[e], real)
    np.testing.assert_allclose(r.gate_ExC[e], p[real, e], rtol=1e-6)
  assert not np.any(np.isin(np.asarray(r.token_ExC), [4, 5]))
  # More slots than real tokens: padding fills them, but as invalid, gate 0.
  r = jax.jit(routing.expert_choice, static_argnums=1)(logits, 5, mask)
  np.testing.assert_array_equal(np.asarray(r.valid_ExC).sum(-1), [4, 4, 4])
  assert np.all(np.asarray(r.gate_ExC)[~np.asarray(r.valid_ExC)] == 0)


def test_load_balance_and_z_loss_by_hand():
  moe = moe_cfg(router="topk", top_k=2)
  r = route(jnp.asarray(LOGITS), moe, mask_T=jnp.ones(3), train=False)
  p = softmax(LOGITS)
  # top-2 per token: t0 {0,1}, t1 {1,2}, t2 {2,3} -> counts 1,2,2,1 of 6.
  f = np.array([1, 2, 2, 1]) / 6
  np.testing.assert_allclose(r.aux["expert_fraction"], f, rtol=1e-6)
  np.testing.assert_allclose(r.aux["load_balance_loss"], 4 * np.sum(f * p.mean(0)), rtol=1e-5)
  lse = np.log(np.exp(LOGITS.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(r.aux["z_loss"], np.mean(lse**2), rtol=1e-5)
  np.testing.assert_allclose(r.aux["max_vio"], 2 / 1.5 - 1, rtol=1e-6)
  np.testing.assert_allclose(r.aux["empty_experts"], 0)
  ent = -(p * np.log(p)).sum(-1).mean()
  np.testing.assert_allclose(r.aux["router_entropy"], ent, rtol=1e-5)
  # Importance (summed gates) and load (counts) CV^2, population variance.
  g = np.asarray(r.gate_TxK)
  imp = np.zeros(4)
  for t in range(3):
    for k in range(2):
      imp[int(r.expert_TxK[t, k])] += g[t, k]
  np.testing.assert_allclose(r.aux["importance_loss"], imp.var() / imp.mean() ** 2, rtol=1e-5)
  cnt = np.array([1, 2, 2, 1.0])
  np.testing.assert_allclose(r.aux["load_loss"], cnt.var() / cnt.mean() ** 2, rtol=1e-5)


def test_gate_mean_is_the_mean_chosen_gate_of_real_tokens():
  # Switch (eq. 2): the gate is the top-1 softmax probability; the padding
  # token (mask 0) does not count. topk with renormalised gates sums to 1.
  mask = jnp.array([1.0, 1.0, 0.0])
  r = route(jnp.asarray(LOGITS), moe_cfg(router="switch", top_k=1), mask_T=mask, train=False)
  want = softmax(LOGITS).max(-1)[:2].mean()
  np.testing.assert_allclose(r.aux["gate_mean"], want, rtol=1e-6)
  r = route(jnp.asarray(LOGITS), moe_cfg(router="topk", top_k=2), mask_T=mask, train=False)
  np.testing.assert_allclose(r.aux["gate_mean"], 1.0, rtol=1e-6)


@pytest.mark.parametrize(
  "router,k", [("topk", 2), ("mixtral", 2), ("sigmoid_bias", 3), ("switch", 1)]
)
@pytest.mark.parametrize("choices", ["all", "first"])
def test_load_balance_conventions_per_token_reference(router, k, choices):
  # A per-token loop: f_e counts either every (token, choice) or each real
  # token's first choice; P_e is the mean router probability over real tokens.
  T, E = 40, 6
  logits = jax.random.normal(jax.random.key(3), (T, E)) * 2
  mask = (jnp.arange(T) < 33).astype(jnp.float32)  # 7 padding tokens
  moe = moe_cfg(router=router, top_k=k, num_experts=E, load_balance_choices=choices)
  kw = {"bias_E": jnp.linspace(-0.2, 0.2, E)} if router == "sigmoid_bias" else {}
  r = route(logits, moe, mask_T=mask, train=False, **kw)
  lg, m = np.asarray(logits, np.float64), np.asarray(mask)
  if router == "sigmoid_bias":
    score = 1 / (1 + np.exp(-lg))
    p = score / score.sum(-1, keepdims=True)
  else:
    p = softmax(lg)
  counts, P = np.zeros(E), np.zeros(E)
  for t in range(T):
    if not m[t]:
      continue
    P += p[t] / m.sum()
    chosen = np.asarray(r.expert_TxK[t])  # the router's own choices, in priority order
    for e in chosen if choices == "all" else chosen[:1]:
      counts[e] += 1
  want = E * np.sum(counts / counts.sum() * P)
  np.testing.assert_allclose(r.aux["load_balance_loss"], want, rtol=1e-5)
  if choices == "first" and k > 1:  # the two conventions differ on these logits
    other = route(
      logits, moe_cfg(router=router, top_k=k, num_experts=E), mask_T=mask, train=False, **kw
    )
    assert abs(float(other.aux["load_balance_loss"]) - want) > 1e-4


def test_load_balance_first_choice_is_gshard_algorithm_1():
  # GShard Algorithm 1 by hand on LOGITS (top-2 of 4): first choices are
  # experts 0, 1, 2, so c = (1, 1, 1, 0) / 3 and l_aux = E * sum_e c_e * m_e.
  moe = moe_cfg(router="topk", top_k=2, load_balance_choices="first")
  r = route(jnp.asarray(LOGITS), moe, mask_T=jnp.ones(3), train=False)
  c = np.array([1, 1, 1, 0]) / 3
  np.testing.assert_allclose(
    r.aux["load_balance_loss"], 4 * np.sum(c * softmax(LOGITS).mean(0)), rtol=1e-5
  )


def test_uniform_router_balance_loss_is_one():
  # Balanced choices and uniform probabilities: E * sum_e (1/E) * (1/E) = 1.
  logits = jnp.zeros((8, 4)) + jnp.eye(4)[jnp.arange(8) % 4] * 1e-3
  r = route(logits, moe_cfg(router="switch"), mask_T=jnp.ones(8), train=False)
  np.testing.assert_allclose(r.aux["load_balance_loss"], 1.0, rtol=1e-3)
  np.testing.assert_allclose(r.aux["max_vio"], 0.0, atol=1e-6)


@pytest.mark.parametrize("router", ["switch", "topk", "mixtral", "sigmoid_bias", "hierarchical"])
def test_padding_excluded_from_losses_and_diagnostics(router):
  T, E = 10, 4
  k1, k2 = jax.random.split(jax.random.key(3))
  logits = jax.random.normal(k1, (T, E)) * 2
  glog = jax.random.normal(k2, (T, 2))
  mask = jnp.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 0.0])
  real = np.flatnonzero(np.asarray(mask))
  moe = moe_cfg(router=router, top_k=1 if router == "switch" else 2, num_groups=2, top_k_groups=1)
  if router == "hierarchical":
    moe.top_k = 2
  kw = dict(train=False, bias_E=jnp.zeros(E))
  r = route(logits, moe, mask_T=mask, group_logits_TxG=glog, **kw)
  r_real = route(logits[real], moe, mask_T=jnp.ones(len(real)), group_logits_TxG=glog[real], **kw)
  for key in r.aux:
    np.testing.assert_allclose(r.aux[key], r_real.aux[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert not np.any(np.asarray(r.valid_TxK)[np.asarray(mask) == 0])
  assert np.all(np.asarray(r.gate_TxK)[np.asarray(mask) == 0] == 0)


def test_random_policy_keeps_second_by_gate_share():
  T = 4000
  logits = jnp.tile(jnp.array([[1.0, 0.2, -1.0, -2.0]]), (T, 1))
  moe = moe_cfg(router="topk", top_k=2, second_expert_policy="random")
  r = route(logits, moe, mask_T=jnp.ones(T), train=True, rng=jax.random.key(0))
  p = softmax(np.asarray(logits[0]))
  share2 = p[1] / (p[0] + p[1])
  assert np.all(np.asarray(r.valid_TxK[:, 0]))
  np.testing.assert_allclose(np.mean(np.asarray(r.valid_TxK[:, 1])), min(1, 2 * share2), atol=0.03)
  # Dropped second choices are not counted as routed load.
  np.testing.assert_allclose(np.asarray(r.aux["expert_fraction"]).sum(), 1.0, rtol=1e-6)
  r_eval = route(logits, moe, mask_T=jnp.ones(T), train=False)
  assert np.all(np.asarray(r_eval.valid_TxK))


def test_sampling_policy_samples_second_from_softmax():
  T, E = 6000, 4
  row = np.array([2.0, 1.0, 0.5, -0.5], np.float32)
  logits = jnp.tile(jnp.asarray(row)[None], (T, 1))
  moe = moe_cfg(router="topk", top_k=2, second_expert_policy="sampling")
  r = route(logits, moe, mask_T=jnp.ones(T), train=True, rng=jax.random.key(1))
  assert np.all(np.asarray(r.expert_TxK[:, 0]) == 0)
  freq = np.bincount(np.asarray(r.expert_TxK[:, 1]), minlength=E) / T
  want = softmax(row[1:])
  np.testing.assert_allclose(freq[1:], want, atol=0.03)
  r_eval = route(logits, moe, mask_T=jnp.ones(T), train=False)
  assert np.all(np.asarray(r_eval.expert_TxK[:, 1]) == 1)


def noisy_topk(T, seed):
  """Random logits and noise-scale inputs [T, 4] for top-2 with noisy gating."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  moe = moe_cfg(router="topk", top_k=2, noisy_gating=True)
  return jax.random.normal(k1, (T, 4)), jax.random.normal(k2, (T, 4)), moe


def test_noisy_gating_only_in_training():
  T = 64
  logits, raw, moe = noisy_topk(T, 4)
  clean = route(logits, moe_cfg(router="topk", top_k=2), mask_T=jnp.ones(T), train=False)
  ev = route(logits, moe, mask_T=jnp.ones(T), train=False, noise_TxE=raw)
  for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(ev)):
    np.testing.assert_array_equal(a, b)
  tr = route(logits, moe, mask_T=jnp.ones(T), train=True, rng=jax.random.key(5), noise_TxE=raw)
  assert np.any(np.asarray(tr.expert_TxK) != np.asarray(ev.expert_TxK))
  with pytest.raises(ValueError, match="rng"):
    route(logits, moe, mask_T=jnp.ones(T), train=True, noise_TxE=raw)


def test_smooth_load_estimator_by_hand():
  clean = np.array([[1.0, 0.5, -0.2]], np.float32)
  noisy = np.array([[1.2, 0.1, 0.3]], np.float32)  # top-1 is expert 0
  std = np.array([[0.5, 1.0, 2.0]], np.float32)
  phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
  # k=1: expert 0 is in the top-1, threshold = 2nd value 0.3; others: 1st value 1.2.
  want = [phi((1.0 - 0.3) / 0.5), phi((0.5 - 1.2) / 1.0), phi((-0.2 - 1.2) / 2.0)]
  got = routing.smooth_load(
    jnp.asarray(clean), jnp.asarray(noisy), jnp.asarray(std), 1, jnp.ones(1)
  ).sum(0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_noisy_load_loss_has_gradient():
  T = 32
  logits, raw, moe = noisy_topk(T, 6)
  f = lambda l: route(
    l, moe, mask_T=jnp.ones(T), train=True, rng=jax.random.key(0), noise_TxE=raw
  ).aux["load_loss"]
  assert float(jnp.abs(jax.grad(f)(logits)).sum()) > 0


def test_hierarchical_noisy_load_matches_counts_without_noise():
  T, G, Eg = 16, 2, 2
  k1, k2 = jax.random.split(jax.random.key(7))
  logits, glog = jax.random.normal(k1, (T, G * Eg)), jax.random.normal(k2, (T, G))
  moe = moe_cfg(
    router="hierarchical", num_experts=4, num_groups=2, top_k_groups=1, top_k=1, noisy_gating=True
  )
  # Tiny noise scale: the smooth estimator tends to hard counts.
  big_neg = jnp.full((T, G * Eg), -40.0)
  r = route(
    logits,
    moe,
    mask_T=jnp.ones(T),
    train=True,
    rng=jax.random.key(0),
    noise_TxE=big_neg,
    group_noise_TxG=jnp.full((T, G), -40.0),
    group_logits_TxG=glog,
  )
  counts = np.bincount(np.asarray(r.expert_TxK).reshape(-1), minlength=4)
  np.testing.assert_allclose(r.aux["load_loss"], routing.cv_squared(counts), rtol=1e-4)


def test_jitter_is_bounded_multiplicative_noise():
  x = jnp.ones((100, 8))
  y = routing.jitter(x, 0.01, jax.random.key(0))
  assert float(jnp.min(y)) >= 0.99 and float(jnp.max(y)) <= 1.01 and float(jnp.std(y)) > 0


@pytest.mark.parametrize("method", ["cumsum", "sort"])
def test_positions_in_expert(method):
  A, E = 50, 5
  ex = jax.random.randint(jax.random.key(8), (A,), 0, E)
  valid = jax.random.bernoulli(jax.random.key(9), 0.8, (A,))
  pos, counts = dispatch.positions_in_expert(ex, valid, E, method)
  seen = np.zeros(E, int)
  for a in range(A):
    if valid[a]:
      assert pos[a] == seen[ex[a]]
      seen[ex[a]] += 1
  np.testing.assert_array_equal(counts, seen)


def test_capacity_formula():
  moe = moe_cfg(
    num_experts=8, top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4
  )
  assert routing.capacity(moe, 100, train=True) == math.ceil(1.25 * 100 * 2 / 8)
  assert routing.capacity(moe, 100, train=False) == 50
  assert routing.capacity(moe, 8, train=True) == 4  # min_capacity
  moe.min_capacity = 1000
  assert routing.capacity(moe, 8, train=True) == 8  # never more than T


@pytest.mark.parametrize(
  "E,G,Kg,k,scale,shift",
  [
    (16, 4, 2, 4, 1.0, 0.0),
    (8, 4, 1, 2, 1.0, 0.0),
    (12, 3, 2, 3, 1.0, 0.0),
    # The released DeepSeek-V3 / R1 (config.json: n_routed_experts 256, n_group
    # 8, topk_group 4, num_experts_per_tok 8, routed_scaling_factor 2.5), its
    # biases shifted by -2.5 so every biased score is negative: the choice must
    # not change (a constant on the bias shifts every group and expert score
    # alike), which holds only where the experts of dropped groups are -inf,
    # as DeepSeek's model.py since "fix scores mask" and transformers 5; the
    # earlier model.py zeroed them (scores * mask) and would pick them here.
    (256, 8, 4, 8, 2.5, -2.5),
    # n_group 1 (Moonlight-16B-A3B: 64 experts, top-6, scale 2.446; Kimi-K2):
    # one group limits nothing, and import maps it to router "sigmoid_bias".
    (64, 1, 1, 6, 2.446, 0.0),
  ],
)
def test_group_limited_matches_per_token_reference(E, G, Kg, k, scale, shift):
  # DeepSeek-V3 node-limited routing by a loop over tokens, as the Gate of
  # DeepSeek's inference/model.py (deepseek-ai/DeepSeek-V3 at 9b4e978) and
  # transformers 5's DeepseekV3TopkRouter: sigmoid scores s, biased b = s +
  # bias; score each group by the sum of its `per` best biased scores (their
  # code's fixed topk(2), which is k // Kg for the release's 8 / 4: ours
  # generalises it), keep the top Kg groups, take the top-k biased scores
  # among their experts, gate = the chosen s renormalised, times scale.
  T = 24
  k1, k2 = jax.random.split(jax.random.key(11))
  logits = jax.random.normal(k1, (T, E)) * 2
  bias = jax.random.normal(k2, (E,)) * 0.3 + shift
  moe = moe_cfg(
    router="group_limited" if G > 1 else "sigmoid_bias",
    num_experts=E,
    num_groups=G if G > 1 else 0,
    top_k_groups=Kg,
    top_k=k,
    routed_scaling_factor=scale,
  )
  cfglib.validate(_with_moe(moe))
  r = route(logits, moe, mask_T=jnp.ones(T), train=False, bias_E=bias)
  s = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  b = s + np.asarray(bias, np.float64)
  per = max(k // Kg, 1)
  assert per == 2 or E != 256 or G == 1  # the released code's constant
  Eg = E // G
  zeroed = 0  # tokens the earlier model.py (dropped groups' experts at 0) routes elsewhere
  for t in range(T):
    group_score = b[t].reshape(G, Eg)
    group_score = np.sort(group_score, -1)[:, ::-1][:, :per].sum(-1)
    groups = np.argsort(-group_score, kind="stable")[:Kg]
    masked = np.full(E, -np.inf)
    for g in groups:
      masked[g * Eg : (g + 1) * Eg] = b[t, g * Eg : (g + 1) * Eg]
    want = list(np.argsort(-masked, kind="stable")[:k])
    zeroed += want != list(np.argsort(-np.where(np.isinf(masked), 0, masked), kind="stable")[:k])
    got = [int(e) for e in np.asarray(r.expert_TxK[t])]
    assert got == want, (t, got, want)
    assert len({e // Eg for e in got}) <= Kg  # the point: at most Kg groups per token
    gate = s[t, want] / s[t, want].sum() * scale
    np.testing.assert_allclose(np.asarray(r.gate_TxK[t]), gate, rtol=1e-5)
  if shift:
    assert b.max() < 0 and zeroed == T
    r0 = route(logits, moe, mask_T=jnp.ones(T), train=False, bias_E=bias - shift)
    np.testing.assert_array_equal(r0.expert_TxK, r.expert_TxK)
  p = s / s.sum(-1, keepdims=True)
  counts = np.bincount(np.asarray(r.expert_TxK).reshape(-1), minlength=E)
  np.testing.assert_allclose(
    r.aux["load_balance_loss"], E * np.sum(counts / counts.sum() * p.mean(0)), rtol=1e-5
  )


def _with_moe(moe):
  c = cfglib.base_config()
  c.model.moe = moe
  return c


@pytest.mark.parametrize(
  "kw,key",
  [
    ({"num_groups": 3}, "model.moe.num_groups"),
    ({"top_k_groups": 5}, "model.moe.top_k_groups"),
    ({"top_k": 5, "top_k_groups": 1}, "model.moe.top_k"),
  ],
)
def test_group_limited_config_errors_name_the_key(kw, key):
  moe = moe_cfg(router="group_limited", num_experts=8, num_groups=4, top_k_groups=2, top_k=2)
  for k, v in kw.items():
    moe[k] = v
  with pytest.raises(ConfigError, match=f"config.{key}="):
    cfglib.validate(_with_moe(moe))
