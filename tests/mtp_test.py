"""Multi-token prediction (DeepSeek-V3 section 2.2; issue 31): model.mtp_depth
MTP modules (transformer.MtpModule), their loss (state.mtp_loss_fn), the main
model at inference (decode.for_inference drops them), and self-speculative
greedy decoding (decode.generate(speculative=True)); the loss formula at
depth 2. Two tests, in process, on configs/deepseek_v3.py:tiny shrunk to 1
MoE layer (its MTP blocks MoE too)."""

from flax import nnx
from helpers import FAST_COMPILE
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_lm import config as cfglib
from sparse_lm import decode
from sparse_lm import state as statelib
from sparse_lm.errors import ConfigError
from sparse_lm.models.transformer import mtp_reach
from sparse_lm.models.transformer import mtp_shift

V = 128


def tiny(depth: int):
  c = cfglib.load_config("configs/deepseek_v3.py:tiny")
  c.model.num_layers, c.model.moe.first_dense_layers, c.model.mtp_depth = 1, 0, depth
  c.data.batch_size, c.data.seq_len, c.data.num_streams = 4, 32, 4
  c.train.learning_rate, c.train.warmup_steps = 3e-3, 0
  return cfglib.validate(c)


def test_mtp_trains_with_the_main_model_and_is_dropped_at_inference():
  """(1) model.mtp_depth / mtp_loss_weight refused in one line naming the key;
  what module k reads and is scored on over packed examples (mtp_reach).
  (2) mtp_depth=1 (the released config's): 12 train steps (state.train_step)
  on a repeating batch lower both the main cross-entropy and the MTP one, and
  the MTP block's router bias (DeepSeek-V3's routing state) is updated.
  (3) The trained model's parameters are mtp_depth=0's plus "mtp/0/...": its
  forward lowers to the same StableHLO text as the mtp_depth=0 model's given
  the same parameters without the "mtp" subtree, decode.for_inference drops
  the module (the graph of mtp_depth=0's inference model, and its
  parameters: the same program on the same values). The module's logits at position i
  read tokens up to i + 1 and no later (a change to token i + 2 leaves them,
  one to token i + 1 moves them).
  (4) Self-speculative greedy decoding (module 1 drafts, the main model
  verifies) gives greedy decoding's 12 tokens for 2 prompts of different
  lengths, the trained pattern's (its drafts accepted) and a random one's."""
  for key, value in (("mtp_depth", -1), ("mtp_loss_weight", -0.1)):
    c = tiny(1)
    c.model[key] = value
    with pytest.raises(ConfigError, match=f"config.model.{key}="):
      cfglib.validate(c)
  # Module k's reach over packed examples: i + k in the sequence and i's segment.
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0]], jnp.int32)
  assert mtp_reach(1, 6, 1, seg).tolist() == [[1, 1, 0, 1, 0, 0]]
  assert mtp_reach(1, 6, 2, seg).tolist() == [[1, 0, 0, 0, 0, 0]]
  assert mtp_shift(seg, 2).tolist() == [[1, 2, 2, 0, 0, 0]]
  c = tiny(1)
  c.data.batch_size, c.train.microbatches = 8, 2
  with pytest.raises(ConfigError, match="config.model.mtp_depth=1 .*train.microbatches=2"):
    cfglib.validate(c)

  # (2) trained together.
  c = tiny(1)
  graphdef, _, _ = statelib.abstract_state(c, V)
  with nnx.use_eager_sharding(False):  # one compiled init, not one per parameter
    state = jax.jit(lambda: nnx.state(statelib.create(c, V)), compiler_options=FAST_COMPILE)()
  rows = np.random.default_rng(1).integers(3, V, (4, 8))
  seq = np.tile(rows, (1, 5))[:, :33]
  batch = {
    "inputs": jnp.asarray(seq[:, :32], jnp.int32),
    "targets": jnp.asarray(seq[:, 1:], jnp.int32),
    "weights": jnp.ones((4, 32), jnp.float32),
  }
  bias0 = np.asarray(state[0]["mtp"][0]["block"]["ffn"]["router_bias"][...])
  step = jax.jit(statelib.train_step(c, graphdef), compiler_options=FAST_COMPILE)
  ce, mtp_ce = [], []
  for n in range(12):
    state, meas = step(state, batch, jnp.int32(n))
    ce.append(float(meas["ce"]))
    mtp_ce.append(float(meas["mtp_ce"]))
  assert ce[-1] < 0.5 * ce[0] and mtp_ce[-1] < 0.5 * mtp_ce[0], (ce, mtp_ce)
  assert not np.array_equal(state[0]["mtp"][0]["block"]["ffn"]["router_bias"][...], bias0)

  # (3) the main model is mtp_depth=0's.
  model = nnx.merge(graphdef, state)[0]
  gd1, params = nnx.split(model)
  main = nnx.State({k: v for k, v in params.items() if k != "mtp"})
  with nnx.use_eager_sharding(False):
    gd0 = nnx.graphdef(nnx.eval_shape(lambda: statelib.create(tiny(0), V)[0]))
  assert sorted(params) == sorted([*nnx.to_pure_dict(main), "mtp"])
  toks = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 16)), jnp.int32)
  # The same program: the unused "mtp" arguments pruned, the StableHLO text is equal.
  fwd = jax.jit(lambda gd, s, t: nnx.merge(gd, s)(t).logits, static_argnums=0)
  assert fwd.lower(gd1, params, toks).as_text() == fwd.lower(gd0, main, toks).as_text()
  inf = decode.for_inference(model)
  inf0 = decode.for_inference(nnx.merge(gd0, main))
  assert not hasattr(inf, "mtp") and nnx.graphdef(inf) == nnx.graphdef(inf0)
  leaves = lambda mdl: [np.asarray(a).tobytes() for a in jax.tree.leaves(nnx.state(mdl))]
  assert leaves(inf) == leaves(inf0)
  with_mtp = jax.jit(
    lambda s, t: nnx.merge(gd1, s).with_mtp(t)[1][0].logits[:, 5], compiler_options=FAST_COMPILE
  )
  at5 = with_mtp(params, toks)
  moved = lambda t: np.abs(with_mtp(params, t) - at5).max()
  assert moved(toks.at[:, 7].add(1)) < 1e-5 and moved(toks.at[:, 6].add(1)) > 1e-2

  # (4) self-speculative greedy decoding gives greedy decoding's tokens.
  prompts = [seq[0, :11].tolist(), np.random.default_rng(5).integers(3, V, 5).tolist()]
  greedy = decode.generate(inf, prompts, max_new_tokens=12)
  fast = decode.generate(
    decode.for_inference(model, keep_mtp=True),
    prompts,
    max_new_tokens=12,
    speculative=True,
    check_every=1,
  )
  assert fast.tokens == greedy.tokens and all(len(t) == 12 for t in fast.tokens)
  assert fast.drafts[0] >= 0.75 * fast.drafts[1], fast.drafts  # (accepted, verified)
  # A module that drafts badly (its projection negated): the same tokens.
  proj = params["mtp"][0]["eh_proj"]
  proj.set_value(-proj.get_value())
  bad = decode.for_inference(nnx.merge(gd1, params), keep_mtp=True)
  slow = decode.generate(bad, prompts, max_new_tokens=12, speculative=True, check_every=1)
  assert slow.tokens == greedy.tokens and slow.drafts[0] < 0.75 * slow.drafts[1], slow.drafts


def test_mtp_loss_is_deepseek_v3_eq_24_25_at_depth_2():
  """The training loss with mtp_depth=2 (D > 1) is DeepSeek-V3's eq. 24-25,
  recomputed here from the model's with-MTP logits by slicing (not through
  state.mtp_loss_fn's mtp_shift / mtp_reach): the main CE + the router
  losses (the main layers' and both modules' blocks') + (mtp_loss_weight /
  D) x sum_k CE_k, CE_k module k's CE at position i for token i + k + 1,
  weighted by that token's weight (row 0's last 5 weights are 0 here)."""
  c = tiny(2)
  graphdef, _, _ = statelib.abstract_state(c, V)
  with nnx.use_eager_sharding(False):
    state = jax.jit(lambda: nnx.state(statelib.create(c, V)), compiler_options=FAST_COMPILE)()
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, V, (4, 33)), jnp.int32)
  w_BxL = jnp.ones((4, 32), jnp.float32).at[0, -5:].set(0.0)
  batch = {"inputs": tokens[:, :32], "targets": tokens[:, 1:], "weights": w_BxL}

  def both(s, rng):
    model = nnx.merge(graphdef, s)[0]
    loss, _ = statelib.loss_fn(model, batch, train=True, rng=rng)
    out, mtp = model.with_mtp(batch["inputs"], mask_BxL=w_BxL, train=True, rng=rng)
    router = [a["router_loss"] for a in [*out.moe_aux, *(o.aux for o in mtp)] if a]
    return loss, out.logits, [o.logits for o in mtp], sum(router)

  loss, logits, mtp_logits, router_loss = jax.jit(both, compiler_options=FAST_COMPILE)(
    state, jax.random.key(0)
  )
  assert len(mtp_logits) == 2 and float(router_loss) > 0
  ce = lambda lg, t, w: (
    jnp.sum(optax.softmax_cross_entropy_with_integer_labels(lg, t) * w) / jnp.sum(w)
  )
  targets = batch["targets"]
  ces = [ce(lg[:, : 32 - k], targets[:, k:], w_BxL[:, k:]) for k, lg in enumerate(mtp_logits, 1)]
  want = ce(logits, targets, w_BxL) + router_loss + c.model.mtp_loss_weight / 2 * sum(ces)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
