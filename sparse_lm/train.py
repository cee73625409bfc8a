"""The trainer: one function, in sections (big_vision style).

Mesh -> Input -> Model -> Shard -> Update step -> Checkpoint -> Evals -> Loop.
A run always resumes from the workdir's latest checkpoint. The RNG of step n is
fold_in(seed, n), so model, optimizer, step and data position are all the
state there is, and a killed run resumes to the same losses step for step.

What a run guarantees (README, "Checkpoints"):
  * one process per workdir: a second launch is refused (a lock file that the
    OS releases when the holder dies, also after kill -9);
  * only finite states are saved: every step's loss and gradient norm are
    checked on the host (one step late, so the device never waits) and a
    checkpoint step waits for its own check plus a finite-check of the
    parameters; a non-finite step stops the run with one line naming the last
    finite checkpoint, so rotation (train.keep_checkpoints) only ever drops
    finite ones; train.skip_nonfinite_steps=N skips such updates instead;
  * a checkpoint that cannot be written ends the run with one line and a
    non-zero exit within seconds; earlier checkpoints are untouched;
  * a latest checkpoint that cannot be read is moved to
    workdir/broken_checkpoints/ (named in one line) and the run resumes from
    the step before it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import time

from absl import logging
import filelock
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from sparse_lm import cli
from sparse_lm import config as cfglib
from sparse_lm import data as datalib
from sparse_lm import inspect as inspectlib
from sparse_lm import metrics as metricslib
from sparse_lm import sharding
from sparse_lm.models.transformer import Transformer
from sparse_lm.models.transformer import apply_state_updates
from sparse_lm.models.transformer import moe_layer_indices

# Keys that define what a checkpoint holds; a workdir refuses a run that changes them.
ARCH_KEYS = ("model", "data.tokenizer", "data.vocab_size", "data.dataset")
NOT_ARCH_KEYS = ("model.moe.impl", "model.moe.decode_dispatch")  # how to compute, not what


# ----------------------------------------------------------------- Optimizer


def lr_schedule(t) -> optax.Schedule:
  """Linear warmup, then cosine / inverse-sqrt decay, or constant; then, with
  train.cooldown_steps = N > 0, the last N steps scale it linearly down to 0
  (warmup-stable-decay, Hägele et al. 2024, "Scaling Laws and Compute-Optimal
  Training Beyond Fixed Training Durations"). Before the cooldown the rate is
  exactly the base schedule's, so a run resumed from a checkpoint before it
  with a cooldown added trains as if it had had one from the start."""
  peak, warm = t.learning_rate, t.warmup_steps
  if t.schedule == "cosine":
    base = optax.warmup_cosine_decay_schedule(
      0.0, peak, warm, max(t.num_steps, warm + 1), end_value=peak * t.end_lr_fraction
    )
  else:
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
    if t.schedule == "rsqrt":
      decay = lambda s: peak * jnp.sqrt(max(warm, 1) / jnp.maximum(s + max(warm, 1), 1))
    else:
      decay = optax.constant_schedule(peak)
    base = optax.join_schedules([warmup, decay], [warm])
  n = t.get("cooldown_steps", 0)
  if not n:
    return base
  return lambda s: base(s) * jnp.clip((t.num_steps - s) / n, 0.0, 1.0)


def make_optimizer(t) -> optax.GradientTransformation:
  """AdamW or Adafactor with global-norm clipping; no weight decay on vectors."""
  schedule = lr_schedule(t)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  if t.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask)
  else:
    opt = optax.adafactor(
      schedule, weight_decay_rate=t.weight_decay or None, weight_decay_mask=decay_mask
    )
  if t.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
  return opt


# ---------------------------------------------------------------------- Loss


def loss_fn(model, batch, *, train: bool, rng):
  """Token-weighted cross-entropy + the MoE layers' weighted router losses."""
  logits_BxLxV, moe_aux = model(batch["inputs"], mask_BxL=batch["weights"], train=train, rng=rng)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
  w_BxL = batch["weights"]
  ce = jnp.sum(ce_BxL * w_BxL) / jnp.maximum(jnp.sum(w_BxL), 1.0)
  router_loss = sum((a["router_loss"] for a in moe_aux), jnp.float32(0.0))
  return ce + router_loss, {"ce": ce, "router_loss": router_loss, "moe": moe_aux}


# ------------------------------------------------------------------- Workdir


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_workdir(c, workdir: str):
  """Refuses a workdir whose saved run has a different architecture."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = _flat(json.load(f))
  new = _flat(json.loads(c.to_json()))
  # Keys only one side has are not compared: a key added to the code later
  # defaults to the old behaviour, so older workdirs stay usable.
  under = lambda k, keys: any(k == a or k.startswith(a + ".") for a in keys)
  diff = [
    f"{k}: {old[k]!r} -> {new[k]!r}"
    for k in sorted(set(old) & set(new))
    if under(k, ARCH_KEYS) and not under(k, NOT_ARCH_KEYS) and old[k] != new[k]
  ]
  if diff:
    raise cfglib.ConfigError(
      f"workdir {workdir} holds a run with a different architecture ({'; '.join(diff)}); "
      "use a new --workdir, or restore those values"
    )


def save_config(c, workdir: str):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
      f.write(c.to_json(indent=2))
    os.replace(tmp, os.path.join(workdir, "config.json"))


class RunError(cli.UserError, RuntimeError):
  """A run cannot go on; the message is one line that says what to do."""


class CheckpointWriteError(RunError):
  """A checkpoint could not be written. Orbax's save threads never finish
  after that, so the program exits with os._exit once the message is out."""

  hard_exit = True


def open_workdir(workdir: str) -> filelock.FileLock | None:
  """Checks that `workdir` is a writable directory (creating it) and takes its
  lock, so that a second run on it is refused. Process 0 only; None elsewhere."""
  if jax.process_index() != 0:
    return None
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f"--workdir {workdir} is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise RunError(f"--workdir {workdir} is not writable: {e.strerror or e}") from None
  lock = filelock.FileLock(os.path.join(workdir, ".lock"))
  owner = os.path.join(workdir, ".lock.owner")
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    who = open(owner).read().strip() if os.path.exists(owner) else "another process"
    raise RunError(
      f"workdir {workdir} is in use by another run ({who}); wait for it or "
      "stop it, or use another --workdir"
    ) from None
  with open(owner, "w") as f:
    f.write(
      f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
  return lock


class WallClock:
  """workdir/wall_time.json: this run's seconds over all its processes' lives
  (a resumed run adds to it), rewritten at every log step. Process 0 only."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "wall_time.json")
    self.enabled = jax.process_index() == 0
    self.before, self.t0 = 0.0, time.time()
    if self.enabled and os.path.exists(self.path):
      with open(self.path) as f:
        self.before = float(json.load(f)["seconds"])

  def update(self):
    if self.enabled:
      with open(self.path + ".tmp", "w") as f:
        json.dump({"seconds": self.before + time.time() - self.t0}, f)
      os.replace(self.path + ".tmp", self.path)


def restore_latest(mngr, args_fn, workdir: str, say) -> tuple[int | None, dict | None]:
  """(step, restored) of the newest checkpoint that restores, or (None, None).

  A checkpoint that fails to restore (truncated array, corrupt metadata) is
  moved to workdir/broken_checkpoints/ and named in one line; the next older
  one is tried. Moving it keeps it for inspection and frees its step number."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return step, mngr.restore(step, args=args_fn())
    except Exception as e:  # pylint: disable=broad-except  # any failure: try the older one
      why = " ".join(str(e).split())[:300]
      dest = os.path.join(workdir, "broken_checkpoints", f"{step}.{int(time.time())}")
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(os.path.join(workdir, "checkpoints", str(step)), dest)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"moved broken checkpoint {step}")
      mngr.reload()
      say(
        f"checkpoint of step {step} cannot be read ({type(e).__name__}: {why}); "
        f"moved to {dest}, trying the one before it"
      )
  return None, None


# --------------------------------------------------------------------- Input


def batch_share(c, batch_shd) -> tuple[int, int]:
  """(i, n): this process's devices hold rows [i B/n, (i+1) B/n) of each global batch."""
  B = c.data.batch_size
  idx = batch_shd.addressable_devices_indices_map((B, c.data.seq_len)).values()
  rows = sorted({(r.start or 0, B if r.stop is None else r.stop) for r, *_ in idx})
  lo, hi = rows[0][0], rows[0][0]
  for a, b in rows:
    hi = max(hi, b) if a <= hi else -1  # -1: a gap between the blocks
  if hi <= lo or B % (hi - lo) or lo % (hi - lo):
    raise cfglib.ConfigError(
      f"config.mesh={c.mesh!r} is invalid: process {jax.process_index()}'s devices hold "
      f"batch rows {rows}, not one aligned block; order the mesh axes so that each "
      "process's devices are contiguous along the batch axes"
    )
  return lo // (hi - lo), B // (hi - lo)


# ---------------------------------------------------------------------- Main


class _Stop:
  """SIGTERM / Ctrl-C: finish the current step, save, exit cleanly (exit 0).

  Installed for the whole run, final save included: a second signal while the
  run is already stopping is acknowledged, not obeyed, so a scheduler that
  sends two does not turn a safe stop into a failure."""

  def __init__(self):
    self.requested = False
    self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    if self.requested:
      print(f"\nsignal {signum}: already stopping; the checkpoint is being saved", flush=True)
      return
    logging.warning("signal %d: saving a checkpoint and stopping", signum)
    print(f"\nsignal {signum}: saving a checkpoint after this step, then stopping", flush=True)
    self.requested = True

  def restore(self):
    for s, h in self._old.items():
      signal.signal(s, h)


def train_and_evaluate(c, workdir: str) -> dict:
  """Trains config `c` in `workdir` (resuming if it holds a checkpoint)."""
  c = cfglib.validate(c)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  lock = open_workdir(workdir)
  try:
    check_workdir(c, workdir)
    return _train(c, workdir)
  finally:
    if lock is not None:
      lock.release()


def _train(c, workdir: str) -> dict:
  t, m = c.train, c.model
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)

  # ---- Mesh ----
  mesh = sharding.make_mesh(c)
  say(
    f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
    f"device(s), {jax.process_count()} process(es)"
  )

  # ---- Input ----
  # Each process reads the block of global batch rows its devices hold; the
  # batches themselves do not depend on the process count (data.num_streams).
  with sharding.use(mesh, c):
    share, shares = batch_share(c, sharding.named(mesh, "batch", "length"))
  train_input = datalib.make_input(c.data, seed=t.seed, process_index=share, process_count=shares)
  eval_data = datalib.eval_batches(
    c.data, t.eval_batches, process_index=share, process_count=shares
  )
  V = train_input.vocab_size

  # ---- Model ----
  def create():
    model = Transformer(m, V, rngs=nnx.Rngs(params=t.seed))
    return model, nnx.Optimizer(model, make_optimizer(t), wrt=nnx.Param)

  with sharding.use(mesh, c):
    # ---- Shard ----
    abs_model, abs_opt = nnx.eval_shape(create)
    graphdef, abs_state = nnx.split((abs_model, abs_opt))
    state_shd = nnx.get_named_sharding(abs_state, mesh)
    batch_shd = sharding.named(mesh, "batch", "length")
    repl = sharding.named(mesh)

  stats = inspectlib.summarize(c, V, model=abs_model)
  say(
    f"params: total {stats['total_params']:,}  active {stats['active_params']:,}  "
    f"train FLOPs/token {stats['train_flops_per_token']:.3g}  "
    f"MoE layers {moe_layer_indices(m) or 'none'}"
  )

  # ---- Update step ----
  def train_step(state, batch, step):
    old_state = jax.tree.map(lambda x: x, state)  # merge shares state's Variables
    model, opt = nnx.merge(graphdef, state)
    rng = jax.random.fold_in(jax.random.key(t.seed), step)
    grad_fn = nnx.value_and_grad(lambda mdl: loss_fn(mdl, batch, train=True, rng=rng), has_aux=True)
    (loss, aux), grads = grad_fn(model)
    opt.update(model, grads)
    apply_state_updates(model, aux["moe"])  # routing state (DeepSeek-V3's bias)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = nnx.state((model, opt))
    if t.skip_nonfinite_steps:
      # Keep the old state (optimizer moments, router bias and all) on a
      # non-finite step. optax.apply_if_finite would check the gradients only
      # and add fields to the optimizer state, so checkpoints would depend on
      # this flag.
      new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, old_state)
    measurements = {
      "loss": loss,
      "ce": aux["ce"],
      "router_loss": aux["router_loss"],
      "grad_norm": grad_norm,
      "finite": finite,
      "moe": aux["moe"],
    }
    return new_state, measurements

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    _, aux = loss_fn(model, batch, train=False, rng=None)
    return aux["ce"], aux["moe"]

  with sharding.use(mesh, c):
    train_step = jax.jit(
      train_step,
      in_shardings=(state_shd, batch_shd, repl),
      out_shardings=(state_shd, repl),
      donate_argnums=0,
    )
    eval_step = jax.jit(eval_step, in_shardings=(state_shd, batch_shd), out_shardings=repl)
    init = jax.jit(lambda: nnx.state(create()), out_shardings=state_shd)
    all_finite = jax.jit(
      lambda s: jnp.all(
        jnp.array(
          [
            jnp.all(jnp.isfinite(x))
            for x in jax.tree.leaves(s)
            if jnp.issubdtype(x.dtype, jnp.inexact)
          ]
        )
      ),
      in_shardings=(state_shd,),
      out_shardings=repl,
    )

  def to_global(batch):
    B = c.data.batch_size
    return {
      k: jax.make_array_from_process_local_data(batch_shd, v, (B, *v.shape[1:]))
      for k, v in batch.items()
    }

  # ---- Checkpoint ----
  ckpt_dir = os.path.join(workdir, "checkpoints")
  mngr = ocp.CheckpointManager(
    ckpt_dir,
    options=ocp.CheckpointManagerOptions(
      max_to_keep=t.keep_checkpoints, create=True, cleanup_tmp_directories=True
    ),
  )
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, state_shd
  )
  start, restored = restore_latest(
    mngr,
    lambda: ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
    workdir,
    say,
  )
  if start is not None:
    state = restored["state"]
    train_input.set_state(restored["data"])
    say(f"resumed from {ckpt_dir} step {start}")
  else:
    start = 0
    with sharding.use(mesh, c):
      state = init()
    save_config(c, workdir)
    if jax.process_index() == 0:  # what generate / evaluate check their tokenizer against
      with open(os.path.join(workdir, "data.json"), "w") as f:
        json.dump(getattr(train_input, "fingerprint", {}), f, indent=1)

  def save(step):
    """Saves step's state; it must already be known finite (see the loop)."""
    if not bool(all_finite(state)):
      raise RunError(nonfinite_message(step, "the parameters or optimizer state"))
    try:
      mngr.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(train_input.get_state())
        ),
      )
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises what the file system raised
      raise CheckpointWriteError(
        f"could not write the checkpoint of step {step} to {ckpt_dir} "
        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        + (f"; checkpoints up to step {last_saved[0]} are intact" if last_saved[0] else "")
      ) from None
    last_saved[0] = step

  last_saved = [start if start else None]

  def nonfinite_message(step, what):
    where = (
      f"the last checkpoint, step {last_saved[0]} in {ckpt_dir}, is finite"
      if last_saved[0] is not None
      else "no checkpoint was saved yet"
    )
    return (
      f"step {step}: {what} is not finite and was not saved; {where}. Run the same "
      "command with a lower --config.train.learning_rate (or with "
      "--config.train.skip_nonfinite_steps=N to skip such steps) to go on from it"
    )

  # ---- Evals ----
  moe_ids = moe_layer_indices(m)

  def evaluate():
    ces, moes = [], []
    with sharding.use(mesh, c):
      for batch in eval_data:
        ce, moe = eval_step(state, to_global(batch))
        ces.append(ce)
        moes.append(moe)
    ce = float(np.mean(jax.device_get(ces)))
    out = {"eval_loss": ce, "eval_ppl": math.exp(min(ce, 50.0))}
    if moe_ids:
      last = jax.device_get(moes[-1])
      out.update(
        {
          f"eval_{k}": v
          for k, v in metricslib.flatten_moe(last, moe_ids).items()
          if "dropped_fraction" in k
        }
      )
    return out

  # ---- Loop ----
  writer = metricslib.Writer(workdir, resume_step=start if start else -1)
  clock = WallClock(workdir)
  if start == 0:
    fp = getattr(train_input, "fingerprint", {})
    writer.write(
      0,
      {
        "total_params": stats["total_params"],
        "active_params": stats["active_params"],
        "train_flops_per_token": stats["train_flops_per_token"],
        **{f"data/{k}": v for k, v in fp.items() if isinstance(v, (int, float))},
      },
    )
    say(f"data: {json.dumps(fp)}")
  progress = metricslib.Progress(t.num_steps, start)
  stop = _Stop()
  schedule = lr_schedule(t)
  tokens_per_step = c.data.batch_size * c.data.seq_len
  last_eval = {}
  t_log, step_log = time.time(), start
  skipped = {"in_a_row": 0, "total": 0}
  say(
    f"training steps {start}..{t.num_steps}; logs: {workdir}/metrics.jsonl, "
    f"tensorboard: {workdir}/tensorboard"
  )

  def check(step, meas):
    """Step's loss and gradient norm on the host; a non-finite step stops the
    run (or, with skip_nonfinite_steps, was skipped on the device: counted)."""
    vals = jax.device_get({k: meas[k] for k in ("loss", "grad_norm", "finite")})
    if bool(vals["finite"]):
      skipped["in_a_row"] = 0
      return
    what = f"loss {float(vals['loss']):.4g} / gradient norm {float(vals['grad_norm']):.4g}"
    if not t.skip_nonfinite_steps:
      raise RunError(nonfinite_message(step, what))
    skipped["in_a_row"] += 1
    skipped["total"] += 1
    say(f"step {step}: {what}; update skipped ({skipped['in_a_row']} in a row)")
    if skipped["in_a_row"] > t.skip_nonfinite_steps:
      raise RunError(
        nonfinite_message(
          step,
          f"{what}, for {skipped['in_a_row']} steps in a row (more than "
          f"train.skip_nonfinite_steps={t.skip_nonfinite_steps}),",
        )
      )

  def log(step, meas, evals):
    nonlocal t_log, step_log
    meas = jax.device_get(meas)
    dt = time.time() - t_log
    row = {
      "train_loss": float(meas["ce"]),
      "grad_norm": float(meas["grad_norm"]),
      "lr": float(schedule(step - 1)),
      "tokens_per_s": tokens_per_step * (step - step_log) / max(dt, 1e-9),
      "tokens": tokens_per_step * step,
      **evals,
    }
    if t.skip_nonfinite_steps:
      row["skipped_steps"] = skipped["total"]
    if moe_ids:
      row["router_loss"] = float(meas["router_loss"])
      row.update(metricslib.flatten_moe(meas["moe"], moe_ids))
    writer.write(step, row)
    progress.print(step, row)
    clock.update()
    t_log, step_log = time.time(), step

  # Step n's scalars are fetched after step n+1 is dispatched (the device
  # never waits for the host), except at eval / checkpoint / log-with-eval
  # steps, which first wait for step n's own check: a step is evaluated and
  # saved only once it is known finite.
  pending = None  # (step, measurements) not yet checked
  step = start
  write_failed = False
  try:
    while step < t.num_steps and not stop.requested:
      batch = to_global(next(train_input))
      with sharding.use(mesh, c):
        state, meas = train_step(state, batch, jnp.int32(step))
      step += 1
      if pending is not None:
        check(*pending)
        if pending[0] % t.log_every == 0:
          log(*pending, {})
      pending = (step, meas)
      eval_now = step % t.eval_every == 0 or step == t.num_steps
      save_now = step % t.checkpoint_every == 0 or step == t.num_steps or stop.requested
      if eval_now or save_now:
        check(step, meas)
        pending = None
        if eval_now:
          last_eval = evaluate()
        if eval_now or step % t.log_every == 0:
          log(step, meas, last_eval if eval_now else {})
        if save_now:
          save(step)
    if pending is not None:
      check(*pending)
      log(*pending, {})
      pending = None
      save(step)
  except CheckpointWriteError:
    write_failed = True
    raise
  finally:
    if not write_failed:  # a failed save leaves threads that never finish
      try:
        mngr.wait_until_finished()
        mngr.close()
      except Exception as e:  # pylint: disable=broad-except  # an async write failed
        write_failed = True
        raise CheckpointWriteError(
          f"could not write the checkpoint of step {mngr.latest_step()} to {ckpt_dir} "
          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    writer.close()
    clock.update()

  if not last_eval:
    last_eval = evaluate()
  stop.restore()
  say(
    f"done at step {step}: eval_loss {last_eval['eval_loss']:.4f} "
    f"(ppl {last_eval['eval_ppl']:.2f}); metrics {workdir}/metrics.jsonl, "
    f"tensorboard {workdir}/tensorboard, checkpoints {ckpt_dir}"
  )
  return {"step": step, **last_eval}


def read_config(workdir: str):
  """A run's config.json over today's defaults (keys added to the code since
  the run keep their defaults, which reproduce the old behaviour)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RunError(f"{workdir} holds no run (no config.json): pass the --workdir of a training run")
  with open(path) as f:
    saved = json.load(f)

  def merge(base, new):
    for k, v in new.items():
      base[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base

  import ml_collections as mlc  # pylint: disable=g-import-not-at-top

  return mlc.ConfigDict(merge(json.loads(cfglib.base_config().to_json()), saved))


def load_model(workdir: str, step: int | None = None, *, inference: bool = False, mesh=None):
  """The model of a run's checkpoint (latest, or `step`): (model, config, tokenizer).

  inference: the model computes as decoding needs (decode.inference_model_config:
  MoE layers dispatch by model.moe.decode_dispatch). mesh: restore sharded by
  the config's rules onto this mesh (run the model under sharding.use(mesh,
  config)); default one device. Errors (no checkpoint, a step that is not
  there, a tokenizer that does not fit) are one line (RunError)."""
  from sparse_lm import decode  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(os.path.expanduser(workdir))
  c = read_config(workdir)
  tok = datalib.make_tokenizer(c.data)
  recorded = os.path.join(workdir, "data.json")
  if os.path.exists(recorded) and c.data.tokenizer == "sentencepiece":
    with open(recorded) as f:
      want = json.load(f).get("tokenizer", {}).get("sha256")
    got = tok.fingerprint.get("sha256")
    if want and got != want:
      raise RunError(
        f"the tokenizer {tok.fingerprint.get('path')} (sha256 {got}) is not the one {workdir} "
        f"was trained with (sha256 {want}); set --config.data.data_dir to the run's data dir"
      )
  ckpt_dir = os.path.join(workdir, "checkpoints")
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only manager will not save
  try:
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True))
  finally:
    logging.set_verbosity(verbosity)
  steps = mngr.all_steps()
  step = mngr.latest_step() if step is None else step
  if step is None or step not in steps:
    mngr.close()
    raise RunError(
      f"{ckpt_dir} holds no checkpoint"
      + (f" of step {step} (it has {sorted(steps)})" if step is not None else "")
    )
  m = decode.inference_model_config(c.model) if inference else c.model

  def create():
    model = Transformer(m, tok.vocab_size, rngs=nnx.Rngs(params=c.train.seed))
    return model, nnx.Optimizer(model, make_optimizer(c.train), wrt=nnx.Param)

  if mesh is None:
    with nnx.use_eager_sharding(False):
      graphdef, abs_state = nnx.split(nnx.eval_shape(create))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda a: dev, abs_state)
  else:
    with sharding.use(mesh, c):
      graphdef, abs_state = nnx.split(nnx.eval_shape(create))
      shardings = nnx.get_named_sharding(abs_state, mesh)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings
  )
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except Exception as e:  # pylint: disable=broad-except  # a shape that does not fit, a broken file
    raise RunError(
      f"the checkpoint of step {step} in {ckpt_dir} does not fit the run's config and tokenizer "
      f"(vocabulary {tok.vocab_size}) or cannot be read: {' '.join(str(e).split())[:300]}"
    ) from None
  finally:
    mngr.close()
  model, _ = nnx.merge(graphdef, restored["state"])
  return model, c, tok
