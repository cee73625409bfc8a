"""Expert parallelism (sparse_lm/models/moe/parallel.py) equals the single-device layer.

Every router and dispatch mode, under meshes data x expert = 2x4, 1x8, 8x1 and
one with FSDP on: the same forward output, every aux value, and gradients
w.r.t. x and every parameter as MoeFfn on one device (same params, inputs,
rng), with a tight capacity so that tokens drop. Plus: parameter shardings,
per-device expert-weight memory vs the expert axis, a few training steps of a
tiny MoE Transformer, and the mesh errors.
"""

from flax import nnx
import helpers
from helpers import FAST_COMPILE
from helpers import D
from helpers import E
from helpers import F
from helpers import build
from helpers import layer_grads
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_lm import config as cfglib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.errors import ConfigError
from sparse_lm.models.moe import parallel
from sparse_lm.models.transformer import Transformer

B, L = 8, 4  # T = 32 tokens: 4 per device on 8 devices
T = B * L

# (data, fsdp, expert): "fsdp" maps "embed" (parameters' d_model) to the fsdp axis.
MESHES = {"2x4": (2, 1, 4), "1x8": (1, 1, 8), "8x1": (8, 1, 1), "fsdp2x2x2": (2, 2, 2)}


def mesh_config(data, fsdp, expert, tensor=1):
  c = cfglib.base_config()
  c.mesh = [("data", data), ("fsdp", fsdp), ("expert", expert), ("tensor", tensor)]
  c.data.batch_size = B
  return c


def model_cfg(router, dispatch, **moe):
  """The MoE layer tests' config (helpers) with a tight training capacity: tokens drop."""
  return helpers.model_cfg(router, dispatch, **{"capacity_factor": 0.5, **moe})


def inputs(seed=1):
  kx, kc = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (B, L, D))
  ct = jax.random.normal(kc, (B, L, D))
  mask = jnp.ones((B, L)).at[0, -2:].set(0).at[5, 1].set(0)  # some padding
  return x, ct, mask


def run(graphdef, state, x, ct, mask, rng):
  """Training forward + gradients (w.r.t. every variable and x) of sum(y * ct)."""
  return layer_grads(graphdef, state, x, ct, mask, rng, train=True)


def on_mesh(c, state):
  """(mesh, state placed with the rules' shardings); use under sharding.use(mesh, c)."""
  mesh = sharding.make_mesh(c, jax.devices()[:8])
  with sharding.use(mesh, c):
    return mesh, jax.device_put(state, nnx.get_named_sharding(state, mesh))


@pytest.fixture
def ep_calls(monkeypatch):
  """Counts layer traces that took the expert-parallel path."""
  calls = []
  real = parallel.placement

  def spy(*a, **k):
    d = real(*a, **k)
    calls.append(isinstance(d, parallel.ExpertParallel))
    return d

  monkeypatch.setattr(parallel, "placement", spy)
  return calls


ROUTERS = [
  ("switch", {"jitter": 0.1, "expert_dropout": 0.2}),
  ("topk", {"second_expert_policy": "all", "eom_rate": 0.25}),
  ("topk", {"second_expert_policy": "random"}),
  ("topk", {"second_expert_policy": "sampling", "noisy_gating": True}),
  ("mixtral", {"expert_dropout": 0.2}),
  ("sigmoid_bias", {}),
  ("group_limited", {}),
  ("hierarchical", {}),
  ("expert_choice", {"expert_dropout": 0.2}),
]
COMBOS = [
  (r, d, kw)
  for r, kw in ROUTERS
  for d in ("capacity", "dropless")
  if not (r == "expert_choice" and d == "dropless")
]
IDS = [f"{r}-{kw.get('second_expert_policy', '')}-{d}".replace("--", "-") for r, d, kw in COMBOS]


@pytest.mark.parametrize("router,dispatch,kw", COMBOS, ids=IDS)
def test_meshes_match_single_device(router, dispatch, kw, ep_calls):
  # Both layouts of each path: the routing variants of topk and hierarchical run the
  # capacity experts on the padded [E, C, D] buffer ("batched", the GPU / TPU default)
  # and the dropless ones with ragged_dot (the GPU / TPU grouped matmul); the others
  # take the CPU defaults (kept rows only, grouped.ffn_blocks).
  impl = {}
  if kw.get("second_expert_policy", "all") != "all" or router == "hierarchical":
    impl = (
      {"capacity_layout": "batched"} if dispatch == "capacity" else {"grouped_kernel": "ragged"}
    )
  m = model_cfg(router, dispatch, impl=impl, **kw)
  layer = build(m)
  graphdef, state = nnx.split(layer)
  x, ct, mask = inputs()
  rng = jax.random.key(42)
  with jax.default_matmul_precision("highest"):
    y0, aux0, g0 = run(graphdef, state, x, ct, mask, rng)
    if dispatch == "capacity":
      assert aux0["dropped_fraction"] > 0.05  # the test exercises drops
    for name, (data, fsdp, expert) in MESHES.items():
      c = mesh_config(data, fsdp, expert)
      mesh, st = on_mesh(c, state)
      with sharding.use(mesh, c):
        wi_spec = nnx.merge(graphdef, st).wi[...].sharding.spec
        assert wi_spec[0] == "expert" and wi_spec[1] == "fsdp", wi_spec
        del ep_calls[:]
        y, aux, g = run(graphdef, st, x, ct, mask, rng)
      assert ep_calls == [expert > 1], (name, ep_calls)
      err = f"{router}/{dispatch} on {name}"
      np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5, err_msg=err)
      assert set(aux) == set(aux0)
      for k in aux0:
        np.testing.assert_allclose(aux[k], aux0[k], rtol=1e-5, atol=1e-6, err_msg=f"{err}: {k}")
      assert set(g) == set(g0)
      for k in g0:
        np.testing.assert_allclose(g[k], g0[k], rtol=2e-4, atol=2e-5, err_msg=f"{err}: d{k}")


@pytest.mark.parametrize(
  "router,dispatch", [("topk", "dropless"), ("switch", "capacity"), ("expert_choice", "capacity")]
)
def test_tensor_axis_splits_expert_hidden(router, dispatch, ep_calls):
  """data 2 x expert 2 x tensor 2 ("expert_mlp" -> tensor): F stays split, psum'd."""
  m = model_cfg(router, dispatch, expert_dropout=0.2)
  graphdef, state = nnx.split(build(m))
  x, ct, mask = inputs(seed=2)
  rng = jax.random.key(3)
  with jax.default_matmul_precision("highest"):
    y0, aux0, g0 = run(graphdef, state, x, ct, mask, rng)
    c = mesh_config(2, 1, 2, tensor=2)
    mesh, st = on_mesh(c, state)
    del ep_calls[:]
    with sharding.use(mesh, c):
      assert tuple(nnx.merge(graphdef, st).wi[...].sharding.spec) == ("expert", "fsdp", "tensor")
      y, aux, g = run(graphdef, st, x, ct, mask, rng)
  assert ep_calls == [True]
  np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
  for k in aux0:
    np.testing.assert_allclose(aux[k], aux0[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for k in g0:
    np.testing.assert_allclose(g[k], g0[k], rtol=2e-4, atol=2e-5, err_msg=k)


def test_expert_weight_memory_falls_with_expert_axis():
  """Per-device expert weights and compiled argument bytes shrink as E is split."""
  m = model_cfg("topk", "capacity")
  graphdef, state = nnx.split(build(m))
  x, ct, mask = inputs()
  arg_bytes = []
  for n in (1, 2, 4, 8):
    c = mesh_config(8 // n, 1, n)
    mesh, st = on_mesh(c, state)
    with sharding.use(mesh, c):
      wi = nnx.merge(graphdef, st).wi[...]
      assert {s.data.shape for s in wi.addressable_shards} == {(E // n, D, F)}
      fwd = jax.jit(
        lambda st, x: nnx.merge(graphdef, st)(x, mask_BxL=mask)[0], compiler_options=FAST_COMPILE
      )
      lowered = fwd.lower(st, x)
      assert ("all-to-all" in lowered.as_text(dialect="hlo")) == (n > 1)
      arg_bytes.append(lowered.compile().memory_analysis().argument_size_in_bytes)
  assert all(a > b for a, b in zip(arg_bytes, arg_bytes[1:])), arg_bytes
  w = 3 * E * D * F * 4  # wi, wg, wo (swiglu), float32: E / n experts' worth per device
  assert arg_bytes[1] - arg_bytes[2] == w // 2 - w // 4, arg_bytes
  assert arg_bytes[2] - arg_bytes[3] == w // 4 - w // 8, arg_bytes


def tiny_lm_config(mesh):
  c = cfglib.load_config("configs/switch.py:tiny")
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = 32, 2, 2, 64
  m.moe.capacity_factor = 1.0  # some drops
  c.data.batch_size, c.data.seq_len, c.data.num_streams = 8, 16, 8
  c.mesh = mesh
  return cfglib.validate(c)


def test_transformer_training_matches_across_meshes():
  """3 steps of a tiny Switch Transformer (train.loss_fn + optax, as train.py builds the
  state and step): same losses on 1 device, data x expert 2x4 and FSDP 2 x expert 4."""
  V, steps = 64, 3
  toks = jax.random.randint(jax.random.key(0), (steps, 8, 17), 0, V)
  meshes = {
    "1 device": ([("data", 1), ("fsdp", 1), ("expert", 1), ("tensor", 1)], 1),
    "2x4": ([("data", 2), ("fsdp", 1), ("expert", 4), ("tensor", 1)], 8),
    "fsdp 2 x expert 4": ([("data", 1), ("fsdp", 2), ("expert", 4), ("tensor", 1)], 8),
  }
  losses = {}
  for name, (mesh_axes, n) in meshes.items():
    c = tiny_lm_config(mesh_axes)
    mesh = sharding.make_mesh(c, jax.devices()[:n])

    def create():
      model = Transformer(cfglib.model_spec(c), V, rngs=nnx.Rngs(0))
      return model, nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    def train_step(state, batch, i):
      model, opt = nnx.merge(graphdef, state)
      rng = jax.random.fold_in(jax.random.key(0), i)
      (loss, aux), grads = nnx.value_and_grad(
        lambda mdl: statelib.loss_fn(mdl, batch, train=True, rng=rng), has_aux=True
      )(model)
      opt.update(model, grads)
      return nnx.state((model, opt)), (loss, aux["moe"][0]["dropped_fraction"])

    with jax.default_matmul_precision("highest"), sharding.use(mesh, c):
      graphdef, abs_state = nnx.split(nnx.eval_shape(create))
      state_shd = nnx.get_named_sharding(abs_state, mesh)
      state = jax.jit(
        lambda: nnx.state(create()), out_shardings=state_shd, compiler_options=FAST_COMPILE
      )()
      step = jax.jit(train_step, compiler_options=FAST_COMPILE)
      wi = nnx.merge(graphdef, state)[0].blocks[1].ffn.wi[...]
      assert wi.addressable_shards[0].data.shape[0] == (2 if n == 8 else 8)  # 8 experts / 4
      out = []
      for i in range(steps):
        batch = {
          "inputs": toks[i, :, :-1],
          "targets": toks[i, :, 1:],
          "weights": jnp.ones((8, 16), jnp.float32),
        }
        batch = jax.device_put(batch, sharding.named(mesh, "batch", "length"))
        state, metrics = step(state, batch, i)
        out.append(tuple(map(float, metrics)))
    losses[name] = np.array(out)
  base = losses["1 device"]
  assert base[:, 1].max() > 0  # capacity drops some tokens
  assert base[-1, 0] < base[0, 0]
  for name, got in losses.items():
    np.testing.assert_allclose(got, base, rtol=1e-5, err_msg=name)


# ------------------------------------------------------------------ mesh errors


def _cfg(mesh, num_experts=8, batch_size=8, seq_len=128, **kw):
  """A validated config with mesh axes, model.moe keys, sharding rules and data keys."""
  c = cfglib.base_config()
  c.model.moe.num_experts = num_experts
  c.model.moe.top_k = 1
  for k, v in kw.items():
    if k in c.model.moe:
      c.model.moe[k] = v
  c.data.batch_size, c.data.num_streams = 8, 8
  c.mesh = mesh + [(a, 1) for a in ("data", "fsdp", "expert", "tensor") if a not in dict(mesh)]
  c = cfglib.validate(c)
  c.sharding_rules = [(n, kw.get(n, a)) for n, a in c.sharding_rules]
  c.data.batch_size, c.data.seq_len = batch_size, seq_len
  return c


@pytest.mark.parametrize(
  "mesh,moe,rules,data,message,key",
  [
    # hierarchical: 3 groups of 4 experts over 4 expert shards: a shard would straddle groups
    (
      [("data", 2), ("expert", 4)],
      {"num_experts": 12, "router": "hierarchical", "num_groups": 3},
      {},
      {},
      "group boundaries",
      "model.moe.num_groups",
    ),
    # "batch" without the expert axis: tokens are also split over it; 6 tokens, 8 shards
    (
      [("data", 2), ("expert", 4)],
      {},
      {"batch": "data"},
      {"batch_size": 2, "seq_len": 3},
      "token mesh axes ('data', 'expert') (size 8)",
      "data.batch_size",
    ),
    (
      [("data", 2), ("expert", 4)],
      {"num_experts": 6},
      {},
      {},
      "expert mesh axis (4)",
      "model.moe.num_experts",
    ),
  ],
)
def test_mesh_errors(mesh, moe, rules, data, message, key):
  c = _cfg(mesh, **moe, **rules, **data)
  with pytest.raises(ConfigError, match=f"config.{key}=") as e:
    sharding.mesh_sizes(c, 8)
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("groups,expert", [(2, 4), (4, 2), (4, 4), (8, 2)])
def test_hierarchical_groups_on_expert_boundaries_are_fine(groups, expert):
  c = _cfg([("data", 8 // expert), ("expert", expert)], router="hierarchical", num_groups=groups)
  assert sharding.mesh_sizes(c, 8)["expert"] == expert


def test_indivisible_tokens_fail_before_compiling():
  m = model_cfg("topk", "capacity")
  graphdef, state = nnx.split(build(m))
  c = mesh_config(2, 1, 4)
  mesh, st = on_mesh(c, state)
  x = jnp.ones((2, 3, D))  # 6 tokens over 8 token shards
  with sharding.use(mesh, c), pytest.raises(ConfigError, match="token mesh axes"):
    jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[0]).lower(st, x)
