"""MoeFfn against a naive per-token reference twin, forward and gradients.

The reference decides routing with explicit loops over tokens and choices in
numpy (and the GShard capacity rule by an explicit loop over assignments in
priority order), runs every expert densely on every token, and sums
gate * expert(x) over each token's kept choices. Gates are jnp functions of the
logits so gradients flow through them; the decision is piecewise constant.
"""

from flax import nnx
from helpers import D
from helpers import E
from helpers import F
from helpers import build
from helpers import layer_grads
from helpers import model_cfg
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_lm import config as cfglib
from sparse_lm import sharding
from sparse_lm.models.moe import dispatch as dispatch_lib
from sparse_lm.models.moe import grouped
from sparse_lm.models.moe import policy
from sparse_lm.models.moe import routing
from sparse_lm.models.moe.layer import MoeFfn
from sparse_lm.models.moe.layer import RouterState

B, L = 2, 12
T = B * L
HI = jax.lax.Precision.HIGHEST


def inputs(seed=1, pad=False):
  kx, kc = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (B, L, D))
  ct = jax.random.normal(kc, (B, L, D))
  mask = None
  if pad:
    mask = jnp.ones((B, L)).at[0, -3:].set(0).at[1, 4].set(0)
  return x, ct, mask


def params_of(layer) -> dict:
  return {k: np.asarray(v[...]) for k, v in vars(layer).items() if isinstance(v, nnx.Variable)}


# ---------------------------------------------------------------- fast path


def fast(layer, x, ct, mask=None, train=False, rng=None, **impl):
  """Forward + gradients (w.r.t. params and x) of sum(y * ct), one jit per config.
  impl: model.moe.impl parts (capacity_layout / grouped_kernel / positions) to
  compute with instead of the layer's."""
  impl = {k: v for k, v in impl.items() if v is not None}
  if impl:
    m = layer.m.replace(moe={"impl": layer.m.moe.impl._replace(**impl)})
    with nnx.use_eager_sharding(False):
      other = MoeFfn(m, rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(layer))
    layer = other
  return layer_grads(*nnx.split(layer), x, ct, mask, rng, train)


# ---------------------------------------------------------------- reference


def ref_decide(p, x_TxD, mask_T, moe, capacity):
  """Naive routing: per-token loops. Returns (tok, exp, kept) arrays over assignments
  and `choice` [T, K] / `groups` needed by ref_gates."""
  logits = np.asarray(jnp.dot(x_TxD, p["router"], precision=HI), np.float64)
  real = np.asarray(mask_T) > 0
  Tn, En = logits.shape
  if moe.router == "expert_choice":
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    tok, exp = [], []
    for e in range(En):
      order = [t for t in np.argsort(-prob[:, e], kind="stable") if real[t]][:capacity]
      tok += order
      exp += [e] * len(order)
    n = len(tok)
    return np.array(tok, int), np.array(exp, int), np.ones(n, bool), None, None
  K = moe.top_k
  choice = np.zeros((Tn, K if moe.router != "hierarchical" else moe.top_k_groups * K), int)
  groups = None
  for t in range(Tn):
    if moe.router in ("switch", "topk", "mixtral"):
      choice[t] = np.argsort(-logits[t], kind="stable")[:K]
    elif moe.router == "sigmoid_bias":
      s = 1 / (1 + np.exp(-logits[t]))
      choice[t] = np.argsort(-(s + p["router_bias"]), kind="stable")[:K]
    elif moe.router == "group_limited":
      # Groups scored by the sum of their k // Kg best biased scores; the top Kg kept
      # (Kg = top_k_groups: the glossary's K for groups).
      b = 1 / (1 + np.exp(-logits[t])) + p["router_bias"]
      n = En // moe.num_groups
      per = max(K // moe.top_k_groups, 1)
      score = [np.sort(b[g * n : (g + 1) * n])[::-1][:per].sum() for g in range(moe.num_groups)]
      keep = set(np.argsort(score, kind="stable")[::-1][: moe.top_k_groups])
      allowed = [e for e in range(En) if e // n in keep]
      choice[t] = sorted(allowed, key=lambda e: -b[e])[:K]
    elif moe.router == "hierarchical":
      gl = np.asarray(jnp.dot(x_TxD, p["group_router"], precision=HI), np.float64)
      if groups is None:
        groups = np.zeros((Tn, moe.top_k_groups), int)
      Eg = En // moe.num_groups
      groups[t] = np.argsort(-gl[t], kind="stable")[: moe.top_k_groups]
      cand, gate = [], []
      pg = np.exp(gl[t, groups[t]] - gl[t, groups[t]].max())
      pg /= pg.sum()
      for a, g in enumerate(groups[t]):
        local = np.argsort(-logits[t, g * Eg : (g + 1) * Eg], kind="stable")[:K]
        pl = np.exp(logits[t, g * Eg + local] - logits[t, g * Eg + local].max())
        pl /= pl.sum()
        cand += list(g * Eg + local)
        gate += list(pg[a] * pl)
      choice[t] = np.array(cand)[np.argsort(-np.array(gate), kind="stable")]
  # Capacity: all first choices (token order) before second choices.
  count = np.zeros(En, int)
  tok, exp, kept = [], [], []
  for k in range(choice.shape[1]):
    for t in range(Tn):
      if not real[t]:
        continue
      e = choice[t, k]
      ok = capacity is None or count[e] < capacity
      count[e] += ok
      tok.append(t)
      exp.append(e)
      kept.append(ok)
  return np.array(tok), np.array(exp), np.array(kept), choice, groups


def ref_gates(p, x_TxD, moe, tok, exp, choice, groups):
  """Gate of each assignment (tok[a], exp[a]) as a jnp function of the params."""
  logits = jnp.dot(x_TxD, p["router"], precision=HI)
  if moe.router in ("switch", "expert_choice"):
    return jax.nn.softmax(logits, -1)[tok, exp]
  rows = choice[tok]  # [A, K]: the token's chosen experts
  ar = np.arange(len(tok))
  pos = np.array([list(r).index(e) for r, e in zip(rows, exp)], int)
  pick = lambda a: a[tok[:, None], rows]
  if moe.router == "topk":
    pr = pick(jax.nn.softmax(logits, -1))
    return pr[ar, pos] / (pr.sum(-1) if moe.normalize_gates else 1.0)
  if moe.router == "mixtral":
    return jax.nn.softmax(pick(logits), -1)[ar, pos]
  if moe.router in ("sigmoid_bias", "group_limited"):
    s = pick(jax.nn.sigmoid(logits))
    return s[ar, pos] / s.sum(-1)
  # hierarchical: primary gate over chosen groups x secondary over chosen in-group.
  Eg = E // moe.num_groups
  gl = jnp.dot(x_TxD, p["group_router"], precision=HI)
  grp = exp // Eg
  gpos = np.array([list(groups[t]).index(g) for t, g in zip(tok, grp)], int)
  pg = jax.nn.softmax(gl[tok[:, None], groups[tok]], -1)[ar, gpos]
  local = np.array([[c for c in choice[t] if c // Eg == g] for t, g in zip(tok, grp)], int)
  lpos = np.array([list(r).index(e) for r, e in zip(local, exp)], int)
  return pg * jax.nn.softmax(logits[tok[:, None], local], -1)[ar, lpos]


def ref_act(h, g, activation):
  return {
    "gelu": lambda: jax.nn.gelu(h),
    "relu": lambda: jax.nn.relu(h),
    "swiglu": lambda: jax.nn.silu(g) * h,
    "geglu": lambda: jax.nn.gelu(g) * h,
  }[activation]()


def ref_forward(p, x_TxD, moe, activation, decision):
  """Every expert on every token, combined with the reference decision's gates."""
  tok, exp, kept, choice, groups = decision
  gates = ref_gates(p, x_TxD, moe, tok, exp, choice, groups)
  h = jnp.einsum("td,edf->etf", x_TxD, p["wi"], precision=HI)
  g = jnp.einsum("td,edf->etf", x_TxD, p["wg"], precision=HI) if "wg" in p else None
  y_all = jnp.einsum("etf,efd->etd", ref_act(h, g, activation), p["wo"], precision=HI)
  k = np.flatnonzero(kept)
  y = jnp.zeros_like(x_TxD).at[tok[k]].add(gates[k][:, None] * y_all[exp[k], tok[k]])
  if "shared_wi" in p:
    h = jnp.dot(x_TxD, p["shared_wi"], precision=HI)
    g = jnp.dot(x_TxD, p["shared_wg"], precision=HI) if "shared_wg" in p else None
    y = y + jnp.dot(ref_act(h, g, activation), p["shared_wo"], precision=HI)
  return y


def reference(layer, x, ct, mask, capacity):
  """(y, grads, decision) of the naive twin for the layer's current params."""
  m = layer.m
  p = {k: jnp.asarray(v) for k, v in params_of(layer).items()}
  x_TxD = x.reshape(T, D)
  mask_T = jnp.ones(T) if mask is None else mask.reshape(T)
  decision = ref_decide(p, x_TxD, mask_T, m.moe, capacity)
  act = m.moe.activation

  @jax.jit
  def run(p, x_TxD):
    def loss(tp, x_TxD):
      y = ref_forward({**p, **tp}, x_TxD, m.moe, act, decision)
      return jnp.sum(y * ct.reshape(T, D)), y

    trainable = {k: v for k, v in p.items() if k != "router_bias"}
    (_, y), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(trainable, x_TxD)
    return y, g

  y, (g_p, g_x) = run(p, x_TxD)
  grads = {k: np.asarray(v) for k, v in g_p.items()}
  grads["x"] = np.asarray(g_x).reshape(B, L, D)
  return np.asarray(y).reshape(B, L, D), grads, decision


def assert_grads_close(g, g_ref, tol=2e-4):
  for k, v in g_ref.items():
    np.testing.assert_allclose(g[k], v, rtol=tol, atol=tol, err_msg=k)


# ---------------------------------------------------------------- tests

COMBOS = [
  (r, d)
  for r in (
    "switch",
    "topk",
    "mixtral",
    "sigmoid_bias",
    "group_limited",
    "hierarchical",
    "expert_choice",
  )
  for d in ("capacity", "dropless")
  if not (r == "expert_choice" and d == "dropless")
]


@pytest.mark.parametrize("router,dispatch", COMBOS)
def test_matches_reference_without_drops(router, dispatch):
  """Forward and gradients equal the naive twin when nothing is dropped."""
  m = model_cfg(router, dispatch)
  layer = build(m)
  x, ct, mask = inputs(pad=router in ("topk", "hierarchical"))
  with jax.default_matmul_precision("highest"):
    y, aux, g = fast(layer, x, ct, mask)
    cap = None if router != "expert_choice" else T  # expert choice: C = T here
    y_ref, g_ref, _ = reference(layer, x, ct, mask, cap)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert_grads_close(g, g_ref)
  np.testing.assert_allclose(aux["dropped_fraction"], 0.0)
  want = (
    m.moe.load_balance_weight * aux["load_balance_loss"]
    + m.moe.z_loss_weight * aux["z_loss"]
    + m.moe.importance_weight * (aux["importance_loss"] + aux["load_loss"])
  )
  np.testing.assert_allclose(aux["router_loss"], want, rtol=1e-6)
  if mask is not None:  # padding: zero routed output
    assert not np.any(y[np.asarray(mask) == 0])


@pytest.mark.parametrize(
  "router,impl",
  [
    ("switch", "grouped"),
    ("topk", "grouped"),
    ("topk", "batched"),
    ("hierarchical", "grouped"),
    ("hierarchical", "batched"),
    ("sigmoid_bias", "grouped"),
    ("expert_choice", None),
  ],
)
def test_tight_capacity_drops_like_reference(router, impl):
  """Training capacity factor 0.5: the same assignments drop as in the naive loop,
  computing on the padded [E, C, D] buffer ("batched") or the kept rows ("grouped")."""
  m = model_cfg(router, "capacity", capacity_factor=0.5)
  layer = build(m, seed=3)
  x, ct, mask = inputs(seed=4, pad=True)
  C = routing.capacity(m.moe, T, train=True)
  with jax.default_matmul_precision("highest"):
    y, aux, g = fast(layer, x, ct, mask, train=True, rng=jax.random.key(0), capacity_layout=impl)
    y_ref, g_ref, (tok, exp, kept, _, _) = reference(layer, x, ct, mask, C)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert_grads_close(g, g_ref)
  real = np.asarray(mask).reshape(T) > 0
  if router == "expert_choice":
    served = np.zeros(T, bool)
    served[tok] = True
    want = np.sum(real & ~served) / real.sum()
  else:
    want = 1 - kept.mean()
    assert (~kept).sum() > 0  # the test exercises drops
    # Which tokens lost all their choices: zero routed output exactly there.
    lost = np.ones(T, bool)
    lost[tok[kept]] = False
    if router != "sigmoid_bias":  # (its shared expert makes every output non-zero)
      np.testing.assert_array_equal(np.all(y.reshape(T, D) == 0, -1), lost | ~real)
  np.testing.assert_allclose(aux["dropped_fraction"], want, rtol=1e-6)


@pytest.mark.parametrize("router", ["topk", "mixtral"])
def test_capacity_and_dropless_agree(router):
  x, ct, mask = inputs(seed=5)
  with jax.default_matmul_precision("highest"):
    outs = [fast(build(model_cfg(router, d)), x, ct, mask) for d in ("capacity", "dropless")]
    ragged = fast(build(model_cfg(router, "dropless")), x, ct, mask, grouped_kernel="ragged")
  for other in (outs[1], ragged):
    np.testing.assert_allclose(outs[0][0], other[0], rtol=1e-5, atol=1e-5)
    assert_grads_close(outs[0][2], other[2])
  for key in ("load_balance_loss", "z_loss", "expert_fraction", "router_entropy"):
    np.testing.assert_allclose(outs[0][1][key], outs[1][1][key], rtol=1e-6)


def test_capacity_impls_agree_with_expert_dropout():
  """Expert dropout draws one [E, C, F] mask by capacity slot, whatever computes."""
  m = model_cfg("topk", "capacity", capacity_factor=0.75, expert_dropout=0.5)
  layer = build(m)
  x, ct, mask = inputs(pad=True)
  run = lambda impl: fast(
    layer, x, ct, mask, train=True, rng=jax.random.key(4), capacity_layout=impl
  )
  (y_b, aux_b, g_b), (y_g, aux_g, g_g) = run("batched"), run("grouped")
  np.testing.assert_allclose(y_b, y_g, rtol=1e-5, atol=1e-5)
  assert_grads_close(g_b, g_g)
  assert aux_b["dropped_fraction"] > 0
  for k in aux_b:
    np.testing.assert_allclose(aux_b[k], aux_g[k], rtol=1e-5, atol=1e-7, err_msg=k)
  y_eval, _, _ = fast(layer, x, ct, mask, capacity_layout="grouped")
  assert np.abs(y_g - y_eval).max() > 1e-3  # dropout did something


@pytest.mark.parametrize("method", ["cumsum", "sort"])
def test_position_methods_agree(method):
  m = model_cfg("topk", "capacity", capacity_factor=0.5)
  layer = build(m)
  x, ct, mask = inputs(pad=True)
  base = fast(layer, x, ct, mask, train=True, rng=jax.random.key(0))
  other = fast(layer, x, ct, mask, train=True, rng=jax.random.key(0), positions=method)
  np.testing.assert_allclose(base[0], other[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(base[1]["dropped_fraction"], other[1]["dropped_fraction"])


@pytest.mark.parametrize("activation,masked", [("gelu", False), ("swiglu", True)])
def test_ffn_blocks_two_block_sizes(activation, masked):
  """The CPU grouped FFN with small blocks (big blocks, remainders, empty experts)."""
  sizes = jnp.array([9, 0, 2, 13, 4], jnp.int32)  # sum 28 of N=31 rows (3 unused)
  N, En = 31, 5
  ks = jax.random.split(jax.random.key(2), 6)
  x = jax.random.normal(ks[0], (N, D))
  wi, wg = (jax.random.normal(k, (En, D, F)) / 4 for k in ks[1:3])
  wo = jax.random.normal(ks[3], (En, F, D)) / 5
  hm = jax.random.bernoulli(ks[4], 0.7, (N, F)) * 1.0 if masked else None
  ct = jax.random.normal(ks[5], (N, D))
  eid = np.repeat(np.arange(En), np.asarray(sizes))
  n = len(eid)

  def ref(x, wi, wg, wo):
    h = jnp.einsum("nd,ndf->nf", x[:n], wi[eid], precision=HI)
    g = jnp.einsum("nd,ndf->nf", x[:n], wg[eid], precision=HI)
    a = ref_act(h, g, activation) * (1 if hm is None else hm[:n])
    return jnp.einsum("nf,nfd->nd", a, wo[eid], precision=HI)

  def blk(x, wi, wg, wo):
    return grouped.ffn_blocks(x, sizes, wi, wg, wo, activation, hm, block_sizes=(4, 2))[:n]

  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(
      jax.jit(blk)(x, wi, wg, wo), ref(x, wi, wg, wo), rtol=1e-5, atol=1e-5
    )
    loss = lambda f: lambda *a: jnp.sum(f(*a) * ct[:n])
    g_blk = jax.jit(jax.grad(loss(blk), (0, 1, 2, 3)))(x, wi, wg, wo)
    g_ref = jax.grad(loss(ref), (0, 1, 2, 3))(x, wi, wg, wo)
  for a, b, name in zip(g_blk, g_ref, ("x", "wi", "wg", "wo")):
    if name == "wg" and activation == "gelu":
      continue
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_padding_takes_no_capacity_and_is_excluded():
  """Padding tokens: not routed, no capacity, and aux equal to the real tokens alone."""
  m = model_cfg("topk", "capacity")
  layer = build(m)
  x, ct, mask = inputs(seed=6, pad=True)
  real = np.flatnonzero(np.asarray(mask).reshape(T))
  y, aux, _ = fast(layer, x, ct, mask)
  x_real = x.reshape(T, D)[real][None]
  y2, aux2, _ = fast(layer, x_real, ct.reshape(T, D)[real][None], None)
  np.testing.assert_allclose(y.reshape(T, D)[real], y2[0], rtol=1e-5, atol=1e-5)
  for k in aux:
    np.testing.assert_allclose(aux[k], aux2[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_randomness_only_in_training():
  m = model_cfg(
    "topk",
    "capacity",
    jitter=0.1,
    noisy_gating=True,
    expert_dropout=0.3,
    eom_rate=0.5,
    second_expert_policy="sampling",
  )
  layer = build(m)
  x, ct, _ = inputs()
  y_eval, _, _ = fast(layer, x, ct)
  y_eval_rng, _, _ = fast(layer, x, ct, rng=jax.random.key(1))
  np.testing.assert_array_equal(y_eval, y_eval_rng)
  y1, _, _ = fast(layer, x, ct, train=True, rng=jax.random.key(1))
  y1b, _, _ = fast(layer, x, ct, train=True, rng=jax.random.key(1))
  y2, _, _ = fast(layer, x, ct, train=True, rng=jax.random.key(2))
  np.testing.assert_array_equal(y1, y1b)  # deterministic given the key
  assert np.any(y1 != y2) and np.any(y1 != y_eval)
  # EOM: about half of the tokens have their whole routed output masked.
  zero_rows = np.all(y1.reshape(T, D) == 0, -1).mean()
  assert 0.2 < zero_rows < 0.8, zero_rows
  with pytest.raises(ValueError, match="rng"):
    layer(x, train=True)


def test_eom_masks_tokens_in_train_and_scales_them_in_eval():
  m = model_cfg("switch", "capacity", eom_rate=0.25)
  layer = build(m)
  x, ct, _ = inputs()
  y0, _, _ = fast(layer, x, ct)
  y1, _, _ = fast(layer, x, ct, train=True, rng=jax.random.key(3))
  y0, y1 = y0.reshape(T, D), y1.reshape(T, D)
  masked = np.all(y1 == 0, -1)
  assert masked.any() and not np.all(y0 == 0, -1).any()
  # Unmasked tokens are not rescaled in training (no other randomness here);
  # evaluation scales every token by 1 - rate (fairseq's MOELayer).
  np.testing.assert_allclose(y1[~masked] * 0.75, y0[~masked], rtol=1e-6, atol=1e-6)


def test_sigmoid_bias_update_survives_train_step():
  """The bias update inside nnx.value_and_grad + Optimizer(wrt=Param) under nnx.jit."""
  m = model_cfg("sigmoid_bias", "dropless", bias_update_rate=0.01)
  with nnx.use_eager_sharding(False):
    layer = MoeFfn(m, rngs=nnx.Rngs(0))
  layer.router[...] = layer.router[...].at[:, 3].add(1.0)  # expert 3 overloaded
  opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
  x, _, _ = inputs()

  @nnx.jit
  def step(layer, opt, x, rng):
    def loss_fn(layer):
      y, aux = layer(x, train=True, rng=rng)
      return jnp.mean(y**2) + aux["router_loss"], aux

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(layer)
    opt.update(layer, grads)
    layer.apply_state_updates(aux)  # the caller writes the routing state (train.py does)
    return loss, aux

  router0 = np.asarray(layer.router[...])
  _, aux = step(layer, opt, x, jax.random.key(0))
  bias = np.asarray(layer.router_bias[...])
  frac = np.asarray(aux["expert_fraction"])
  assert isinstance(layer.router_bias, RouterState)
  np.testing.assert_allclose(bias, 0.01 * np.sign(frac.mean() - frac), atol=1e-7)
  assert bias[3] < 0 and frac[3] == frac.max()
  assert not np.allclose(np.asarray(layer.router[...]), router0)  # params trained too
  assert not any(
    isinstance(v, RouterState)
    for v in jax.tree.leaves(
      nnx.state(opt, nnx.OptState), is_leaf=lambda v: isinstance(v, nnx.Variable)
    )
  )
  step(layer, opt, x, jax.random.key(1))
  bias2 = np.asarray(layer.router_bias[...])
  assert bias2[3] < bias[3]
  nnx.jit(lambda layer, x: layer(x, train=False))(layer, x)  # eval: no update
  np.testing.assert_array_equal(bias2, np.asarray(layer.router_bias[...]))


def test_params_names_init_and_dtypes():
  m = model_cfg("topk", "capacity", init_scale=0.1).replace(dtype="bfloat16")
  layer = build(m)
  assert layer.wi.out_sharding == ("expert", "embed", "expert_mlp")
  assert layer.wo.out_sharding == ("expert", "expert_mlp", "embed")
  assert layer.router.out_sharding == ("embed", None)
  assert layer.wi[...].dtype == jnp.float32 and layer.router[...].dtype == jnp.float32
  big = model_cfg("topk", "capacity", init_scale=0.1).replace(d_model=256, moe={"num_experts": 4})
  with nnx.use_eager_sharding(False):
    wide = MoeFfn(big, rngs=nnx.Rngs(0))
  std = float(jnp.std(wide.wi[...]))  # truncated normal: per-expert fan-in, not E * D
  np.testing.assert_allclose(std, np.sqrt(0.1 / 256), rtol=0.1)  # Fedus et al. 2.4: sqrt(s/n)
  x, ct, _ = inputs()
  y, aux, _ = fast(layer, x.astype(jnp.bfloat16), ct)
  assert y.dtype == jnp.bfloat16
  assert all(v.dtype == np.float32 for v in aux.values())
  y32, _, _ = fast(build(model_cfg("topk", "capacity", init_scale=0.1)), x, ct)
  np.testing.assert_allclose(y.astype(np.float32), y32, rtol=0.1, atol=0.05)


def test_sharded_matches_unsharded():
  """Under a (data, expert) mesh with the config's rules: same numbers."""
  c = cfglib.base_config()
  c.mesh = [("data", 4), ("fsdp", 1), ("expert", 2), ("tensor", 1)]
  m = model_cfg("topk", "capacity")
  x, ct, mask = inputs(pad=True)
  with jax.default_matmul_precision("highest"):
    y0, aux0, _ = fast(build(m), x, ct, mask)
    mesh = sharding.make_mesh(c, jax.devices()[:8])
    with sharding.use(mesh, c):
      layer = nnx.jit(lambda: MoeFfn(m, rngs=nnx.Rngs(0)))()
      assert layer.wi[...].sharding.spec[0] == "expert"
      y1, aux1, _ = fast(layer, x, ct, mask)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux1["load_balance_loss"], aux0["load_balance_loss"], rtol=1e-6)


@pytest.mark.parametrize(
  "router", ["switch", "topk", "mixtral", "sigmoid_bias", "group_limited", "hierarchical"]
)
def test_gather_dispatch_matches_reference(router, monkeypatch):
  """Decoding's gather path (each assignment's expert weights gathered by id)
  against the naive twin, forward and gradients, padding included: the B x L
  tokens as B x L decode-step rows of one token (only decode steps gather)."""
  m = model_cfg(router, "dropless")
  layer = build(m.replace(moe={"dispatch": "gather"}))
  x, ct, mask = inputs(seed=7, pad=True)
  calls = []
  real = dispatch_lib.gather_dispatch
  monkeypatch.setattr(dispatch_lib, "gather_dispatch", lambda *a: calls.append(1) or real(*a))
  step = lambda a: a.reshape(T, 1, *a.shape[2:])
  with jax.default_matmul_precision("highest"):
    y, aux, g = fast(layer, step(x), step(ct), step(mask))
    y_ref, g_ref, _ = reference(layer, x, ct, mask, None)
  assert calls, "the gather path did not run"
  y, g["x"] = y.reshape(B, L, D), g["x"].reshape(B, L, D)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert_grads_close(g, g_ref)
  assert not np.any(y[np.asarray(mask) == 0]) or router == "sigmoid_bias"  # (shared expert)


@pytest.mark.parametrize(
  "rows,length,want", [(1, 1, "gather"), (2, 1, "gather"), (3, 1, "dropless"), (1, 2, "dropless")]
)
def test_auto_decode_dispatch_gathers_only_few_assignments(rows, length, want, monkeypatch):
  # Decode steps (one token per row) of at most the limit's assignments gather;
  # more rows, or a prefill of several tokens, take the grouped path.
  monkeypatch.setitem(policy.GATHER_MAX_ASSIGNMENTS, jax.default_backend(), 2)
  calls = []
  real = dispatch_lib.gather_dispatch
  monkeypatch.setattr(dispatch_lib, "gather_dispatch", lambda *a: calls.append(1) or real(*a))
  layer = build(model_cfg("switch", "dropless").replace(moe={"dispatch": "auto"}))
  y = layer(jax.random.normal(jax.random.key(0), (rows, length, D)))[0]
  assert bool(calls) == (want == "gather") and y.shape == (rows, length, D)
