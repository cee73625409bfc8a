"""The trainer: one function in sections (big_vision style), its plumbing beside it.

Mesh -> Input -> Model -> Update step -> Workdir -> Checkpoint -> Evals -> Loop.
Everything that can refuse the config (the fit check of the compiled step on
an accelerator included) comes before "Workdir" (where the lock is taken): a
refused run leaves no trace. A run always resumes from the
workdir's latest checkpoint (sparse_lm/checkpoint.py owns the workdir: lock,
finite-only saves, rotation, fallback past a broken checkpoint). The RNG of
step n is fold_in(seed, n), so model, optimizer, step and data position are
all the state there is, and a killed run resumes to the same losses step for
step. Every step's loss and gradient norm are checked on
the host one step late (the device never waits), except before an eval, a
save or a logged step, which wait for their step's own check: a non-finite
step stops the run (or, with train.skip_nonfinite_steps, is skipped and
counted) and is never saved; throughput is timed over finished device work.
Fine-tuning (init_from, freezing, routing drift) is sparse_lm/finetune.py.
"""

from __future__ import annotations

import math
import os
import signal
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib
from sparse_lm import data as datalib
from sparse_lm import finetune
from sparse_lm import inspect as inspectlib
from sparse_lm import metrics as metricslib
from sparse_lm import optimizer as optlib
from sparse_lm import params as paramslib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.errors import RunError
from sparse_lm.models import encoder_decoder

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


# ------------------------------------------------------------- Run plumbing


class Stop:
  """SIGTERM / Ctrl-C: finish the current step, save, exit cleanly (exit 0).

  A context manager: the handlers are installed for the whole run, final save
  included, and restored when it ends however it ends. A second signal while
  the run is already stopping is acknowledged, not obeyed, so a scheduler
  that sends two does not turn a safe stop into a failure."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)

  def _handle(self, signum, frame):
    del frame
    if self.requested:
      print(f"\nsignal {signum}: already stopping; the checkpoint is being saved", flush=True)
      return
    logging.warning("signal %d: saving a checkpoint and stopping", signum)
    print(f"\nsignal {signum}: saving a checkpoint after this step, then stopping", flush=True)
    self.requested = True


class Profile:
  """train.profile_steps: a jax.profiler trace of steps A..B in `path`
  (started before step A is dispatched, stopped once step B has finished)."""

  def __init__(self, window: tuple[int, int] | None, path: str, say):
    self.window, self.path, self.say, self.on = window, path, say, False

  def before(self, step: int):
    if self.window and step == self.window[0]:
      jax.profiler.start_trace(self.path)
      self.on = True

  def after(self, step: int, state):
    if self.on and step == self.window[1]:
      jax.block_until_ready(state)
      self.close()
      self.say(
        f"profile of steps {self.window[0]}..{step}: {self.path} "
        f"(tensorboard --logdir {self.path}, or the .trace.json.gz in ui.perfetto.dev)"
      )

  def close(self):
    if self.on:
      self.on = False
      jax.profiler.stop_trace()


class Monitor:
  """The loop's host side: checks each step's loss and gradient norm (a
  non-finite step stops the run, or with train.skip_nonfinite_steps is counted
  as skipped) and logs rows (metrics.jsonl, TensorBoard, console, wall time).

  Throughput (tokens_per_s) is timed over finished device work only: from a
  step the host waited for with no later step in flight (`check(...,
  drained=True)`: the loop drains the pipeline at logged, eval and checkpoint
  steps) to the next such step, so every step counted was dispatched after the
  clock started and had finished when it stopped. The first step of a process
  (it compiles) starts the clock; evals and checkpoint saves restart it."""

  def __init__(self, c, workdir, start, ckpt: ckptlib.Checkpointer, moe_ids):
    self.t, self.ckpt, self.moe_ids = c.train, ckpt, moe_ids
    self.tokens_per_step = c.data.batch_size * c.data.seq_len
    self.schedule = optlib.lr_schedule(c.train)
    self.writer = metricslib.Writer(workdir, resume_step=start if start else -1)
    self.progress = metricslib.Progress(c.train.num_steps, start)
    self.clock = ckptlib.WallClock(workdir)
    self.in_a_row = self.skipped = 0
    self.now = time.perf_counter
    self.drained: tuple[int, float] | None = None  # (step, when it was fetched, drained)
    self.since: tuple[int, float] | None = None  # (step, time) the rate is timed from

  def header(self, stats: dict, fingerprint: dict, evals: dict):
    """Step 0's row: the model's size, the data's numbers and `evals` (a
    fine-tuning run's evaluation before its first update)."""
    head = {k: stats[k] for k in ("total_params", "active_params", "train_flops_per_token")}
    nums = {f"data/{k}": v for k, v in fingerprint.items() if isinstance(v, (int, float))}
    self.writer.write(0, {**head, **nums, **evals})
    self.ckpt.say(f"data: {fingerprint}")
    if evals:
      self.ckpt.say(f"step 0 (before the first update): eval_loss {evals['eval_loss']:.4f}")

  def check(self, step, meas, *, drained: bool = False):
    """Fetches step's loss, gradient norm and finiteness (waiting for it).
    drained: no later step is in flight, so the device finished `step` and
    had nothing else to do: a point throughput is timed from or to."""
    vals = jax.device_get({k: meas[k] for k in ("loss", "grad_norm", "finite")})
    if drained:
      self.drained = (step, self.now())
      self.since = self.since or self.drained  # the first step (it compiles) is not timed
    if bool(vals["finite"]):
      self.in_a_row = 0
      return
    what = f"loss {float(vals['loss']):.4g} / gradient norm {float(vals['grad_norm']):.4g}"
    if not self.t.skip_nonfinite_steps:
      raise RunError(self.ckpt.nonfinite_message(step, what))
    self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
    self.ckpt.say(f"step {step}: {what}; update skipped ({self.in_a_row} in a row)")
    if self.in_a_row > self.t.skip_nonfinite_steps:
      n = self.t.skip_nonfinite_steps
      raise RunError(
        self.ckpt.nonfinite_message(
          step,
          f"{what}, for {self.in_a_row} steps in a row (more than train.skip_nonfinite_steps={n}),",
        )
      )

  def log(self, step, meas, evals):
    meas = jax.device_get(meas)
    row = {
      "train_loss": float(meas["ce"]),
      "grad_norm": float(meas["grad_norm"]),
      "lr": float(self.schedule(step - 1)),
      "tokens": self.tokens_per_step * step,
      **evals,
    }
    if self.drained and self.drained[0] == step and step > self.since[0]:
      (s0, t0), t1 = self.since, self.drained[1]
      row["tokens_per_s"] = self.tokens_per_step * (step - s0) / max(t1 - t0, 1e-9)
      self.since = self.drained
    if "mtp_ce" in meas:  # model.mtp_depth: the MTP modules' mean cross-entropy
      row["mtp_loss"] = float(meas["mtp_ce"])
    if self.t.skip_nonfinite_steps:
      row["skipped_steps"] = self.skipped
    if self.moe_ids:
      row["router_loss"] = float(meas["router_loss"])
      row.update(metricslib.flatten_moe(meas["moe"], self.moe_ids))
    self.writer.write(step, row)
    self.progress.print(step, row)
    self.clock.update()

  def restart(self):
    """After an eval or a checkpoint save: their time is not training
    throughput, and no step is in flight (the clock restarts now)."""
    if self.drained:
      self.since = (self.drained[0], self.now())

  def close(self):
    self.writer.close()
    self.clock.update()


# ---------------------------------------------------------------------- Main


def train_and_evaluate(c, workdir: str) -> dict:
  """Trains config `c` in `workdir` (resuming if it holds a checkpoint)."""
  c = cfglib.validate(c)
  return _train(c, os.path.abspath(os.path.expanduser(workdir)))


def _train(c, workdir: str) -> dict:
  t = c.train
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)

  # Every refusal of the config (mesh, data, resume, model, init rules, fit) comes
  # before the section "Workdir": a refused run leaves no trace (a fresh
  # workdir is not created, an existing one stays byte-identical).

  # ---- Mesh ----
  mesh = sharding.make_mesh(c)
  say(
    f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
    f"device(s), {jax.process_count()} process(es)"
  )
  with sharding.use(mesh, c):
    # ---- Input ----
    # Each process reads the block of global batch rows its devices hold; the
    # batches do not depend on the process count (data.num_streams).
    batch_shd, repl = sharding.named(mesh, "batch", "length"), sharding.named(mesh)
    share, shares = batch_share(c, batch_shd)
    train_input = datalib.make_input(c.data, seed=t.seed, process_index=share, process_count=shares)
    eval_data = datalib.eval_batches(
      c.data, t.eval_batches, process_index=share, process_count=shares
    )
    V = train_input.vocab_size
    ckptlib.check_resume(c, workdir, lambda cc: statelib.state_tree(cc, V), say)

    # ---- Model ----
    graphdef, abs_state, state_shd = statelib.abstract_state(c, V, mesh)
    abs_model = nnx.merge(graphdef, abs_state)[0]
    finetune.check_frozen(t, paramslib.param_list(abs_model))
    source_position = None
    if t.init_from and not ckptlib.has_checkpoints(workdir):
      plan = finetune.plan(c, abs_state)  # its rules against the source's metadata
      if t.init_data == "continue":  # the source's data position, where it stopped
        source_position = finetune.data_position(plan, train_input)
    stats = inspectlib.summarize(c, V, model=abs_model)
    moe_ids = list(cfglib.model_spec(c).moe_layers)
    if c.model.get("arch") == "encoder_decoder":  # both stacks': decoder layer j is num_layers + j
      moe_ids = encoder_decoder.moe_layer_ids(cfglib.model_spec(c))
    if t.microbatches > 1 and moe_ids and c.model.moe.dispatch == "capacity":
      say(
        f"train.microbatches={t.microbatches}: capacity dispatch drops tokens per micro-batch "
        "(an expert's capacity is counted over the micro-batch it sees)"
      )
    say(
      f"params: total {stats['total_params']:,}  active {stats['active_params']:,}  "
      f"train FLOPs/token {stats['train_flops_per_token']:.3g}  MoE layers {moe_ids or 'none'}"
    )

    # ---- Update step ----
    train_step, eval_step = statelib.train_step(c, graphdef), statelib.eval_step(graphdef)
    train_step = jax.jit(
      train_step,
      in_shardings=(state_shd, batch_shd, repl),
      out_shardings=(state_shd, repl),
      donate_argnums=0,
    )
    # GPU / TPU: refuses a step that cannot fit; returns it compiled (CPU: unchanged).
    train_step = inspectlib.check_fits(
      c, train_step, abs_state, state_shd, batch_shd, eval_data[0], say
    )
    eval_step = jax.jit(eval_step, in_shardings=(state_shd, batch_shd), out_shardings=repl)
    B = c.data.batch_size
    to_global = lambda batch: {
      k: jax.make_array_from_process_local_data(batch_shd, v, (B, *v.shape[1:]))
      for k, v in batch.items()
    }

    # ---- Workdir ----
    with ckptlib.open_workdir(workdir), Stop() as stop:
      # ---- Checkpoint ----
      ckpt = ckptlib.Checkpointer(workdir, keep=t.keep_checkpoints, say=say)
      start, state, data_state = ckpt.restore_latest(ckptlib.target(abs_state, state_shd))
      if start is not None:
        train_input.set_state(data_state)
        say(f"resumed from {ckpt.dir} step {start}")
        if 1 not in state:  # parameters only: an import, or train.save_optimizer=False
          state = statelib.with_fresh_optimizer(c, V, state[0], state_shd)
          say(f"step {start} holds parameters only: the optimizer state starts fresh")
      else:
        start = 0
        state = jax.jit(lambda: nnx.state(statelib.create(c, V)), out_shardings=state_shd)()
        if t.init_from:  # fine-tuning: another run's parameters, by name rules
          state, report = finetune.init_from(c, state, abs_state)
          say(report.line())
        if source_position is not None:
          train_input.set_state(source_position)
          say(f"data: continues {t.init_from}'s stream at batch {source_position['batches']}")
      ckptlib.save_config(c, workdir, train_input.fingerprint)  # this run's (resume may change it)
      drift = finetune.drifts(c) and finetune.RoutingDrift(
        c, workdir, graphdef, eval_data[0], to_global, start, state, moe_ids, say
      )

      # ---- Evals ----
      def evaluate():
        outs = jax.device_get([eval_step(state, to_global(batch)) for batch in eval_data])
        ce = float(np.mean([ce for ce, _ in outs]))
        out = {"eval_loss": ce, "eval_ppl": math.exp(min(ce, 50.0))}
        if moe_ids:  # the mean over the eval batches
          mean = jax.tree.map(lambda *xs: np.mean(xs, 0), *[moe for _, moe in outs])
          moe = metricslib.flatten_moe(mean, moe_ids)
          out.update({f"eval_{k}": v for k, v in moe.items() if "dropped_fraction" in k})
        return {**out, **(drift(state) if drift else {})}

      # ---- Loop ----
      monitor = Monitor(c, workdir, start, ckpt, moe_ids)
      if start == 0:  # a fine-tuning run is evaluated before its first update
        monitor.header(stats, train_input.fingerprint, evaluate() if t.init_from else {})
      say(
        f"training steps {start}..{t.num_steps}; logs: {workdir}/metrics.jsonl, "
        f"tensorboard: {workdir}/tensorboard"
      )
      # Step n's scalars are fetched after step n+1 is dispatched (the device
      # never waits for the host), except at eval / checkpoint steps, which first
      # wait for step n's own check (a step is evaluated and saved only once it
      # is known finite), and at logged steps and the first one, whose check
      # comes before the next step is dispatched (a bubble of one dispatch per
      # log_every steps) so that throughput is timed over finished work (Monitor).
      pending, step, last_eval = None, start, {}
      profile = Profile(cfglib.profile_window(t), os.path.join(workdir, "profile"), say)
      try:
        while step < t.num_steps and not stop.requested:
          if pending is not None and (pending[0] % t.log_every == 0 or pending[0] == start + 1):
            monitor.check(*pending, drained=True)
            if pending[0] % t.log_every == 0:
              monitor.log(*pending, {})
            pending = None
          profile.before(step + 1)
          state, meas = train_step(state, to_global(next(train_input)), jnp.int32(step))
          step += 1
          profile.after(step, state)
          if pending is not None:
            monitor.check(*pending)
          pending = (step, meas)
          eval_now = step % t.eval_every == 0 or step == t.num_steps
          save_now = step % t.checkpoint_every == 0 or step == t.num_steps or stop.requested
          if eval_now or save_now:
            monitor.check(step, meas, drained=True)
            pending = None
            last_eval = evaluate() if eval_now else last_eval
            if eval_now or step % t.log_every == 0:
              monitor.log(step, meas, last_eval if eval_now else {})
            if save_now:
              ckpt.save(step, state, train_input.get_state(), optimizer=t.save_optimizer)
            monitor.restart()
        if pending is not None:
          monitor.check(*pending, drained=True)
          monitor.log(*pending, {})
          ckpt.save(step, state, train_input.get_state(), optimizer=t.save_optimizer)
      finally:
        profile.close()
        try:
          ckpt.close()
        finally:
          monitor.close()
      last_eval = last_eval or evaluate()
      say(
        f"done at step {step}: eval_loss {last_eval['eval_loss']:.4f} "
        f"(ppl {last_eval['eval_ppl']:.2f}); metrics {workdir}/metrics.jsonl, "
        f"tensorboard {workdir}/tensorboard, checkpoints {ckpt.dir}"
      )
      return {"step": step, **last_eval}
