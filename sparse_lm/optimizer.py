"""The optimizer and its learning-rate schedule (train.py and inspect.py build
them here; which parameters it trains is train.frozen, sparse_lm/finetune.py)."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from sparse_lm import params as paramslib


def lr_schedule(t) -> optax.Schedule:
  """Linear warmup, then cosine / inverse-sqrt decay, or constant; then, with
  train.cooldown_steps = N > 0, the last N steps scale it linearly down to 0
  (warmup-stable-decay, Hägele et al. 2024, "Scaling Laws and Compute-Optimal
  Training Beyond Fixed Training Durations"). Before the cooldown the rate is
  exactly the base schedule's, so a run resumed from a checkpoint before it
  with a cooldown added trains as if it had had one from the start.

  train.schedule_offset = K > 0 continues another run's schedule: step s reads
  the schedule of a run of K + num_steps steps at step K + s (sparse upcycling
  continues the dense run's schedule from the checkpoint it starts from,
  Komatsuzaki et al. 2022, section 3; without it the upcycled run would warm up
  to the peak rate again)."""
  peak, warm, off = t.learning_rate, t.warmup_steps, t.get("schedule_offset", 0)
  if t.schedule == "cosine":
    base = optax.warmup_cosine_decay_schedule(
      0.0, peak, warm, max(t.num_steps + off, warm + 1), end_value=peak * t.end_lr_fraction
    )
  else:
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
    if t.schedule == "rsqrt":
      decay = lambda s: peak * jnp.sqrt(max(warm, 1) / jnp.maximum(s + max(warm, 1), 1))
    else:
      decay = optax.constant_schedule(peak)
    base = optax.join_schedules([warmup, decay], [warm])
  if off:
    base = lambda s, unshifted=base: unshifted(s + off)
  n, steps = t.get("cooldown_steps", 0), t.num_steps  # read now, not when called
  if not n:
    return base
  return lambda s: base(s) * jnp.clip((steps - s) / n, 0.0, 1.0)


def _float32_state(opt: optax.GradientTransformation) -> optax.GradientTransformation:
  """`opt` computing in float32 whatever the parameters' dtype: its state
  (AdamW's moments, Adafactor's factors) is drawn from float32 copies of the
  parameters, and the gradients and parameters are cast to float32 before
  each update. optax keeps the moments in the parameters' dtype (its adamw
  has mu_dtype but no nu_dtype), so with model.param_dtype=bfloat16 this is
  train.moments_dtype=float32: 12 bytes a parameter become 10, and the
  second moment keeps its 24-bit mantissa (the mixed-precision recipe of
  Micikevicius et al. 2018, without the float32 master copy of the weights:
  the update is applied to the bfloat16 parameters by optax.apply_updates,
  rounding there). The cast keeps nnx Variables (their sharding names)."""
  cast = lambda tree: jax.tree.map(
    lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )

  def update(grads, state, params=None, **kw):
    return opt.update(cast(grads), state, None if params is None else cast(params), **kw)

  return optax.GradientTransformation(lambda params: opt.init(cast(params)), update)


def make_optimizer(t) -> optax.GradientTransformation:
  """AdamW or Adafactor with global-norm clipping; no weight decay on vectors;
  train.moments_dtype=float32 keeps the state in float32 (_float32_state)."""
  schedule = lr_schedule(t)
  # A vector is one per layer: a stacked one (model.scan_layers) has one axis more.
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
    lambda path, p: p.ndim - paramslib.is_stacked(path) >= 2, params
  )
  if t.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask)
  else:
    opt = optax.adafactor(
      schedule, weight_decay_rate=t.weight_decay or None, weight_decay_mask=decay_mask
    )
  if t.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
  if t.optimizer == "adafactor":
    # Its factored moments have another rank than their parameter, so the
    # parameter's sharding names (which nnx.Optimizer copies onto the state)
    # cannot apply: it sees plain arrays, and its small state is replicated.
    init = opt.init
    plain = lambda p: jax.tree.map(
      lambda v: v.get_value() if isinstance(v, nnx.Variable) else v,
      p,
      is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    opt = optax.GradientTransformation(lambda params: init(plain(params)), opt.update)
  if t.get("moments_dtype", "param") == "float32":
    opt = _float32_state(opt)
  return opt
