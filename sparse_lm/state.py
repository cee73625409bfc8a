"""A config's train state: built, shaped without allocating, its loss, and read back.

The programs (train, evaluate, generate, convert, inspect) import this module,
never the trainer. A train state is `nnx.state((model, optimizer))`
(sparse_lm/params.py names its parts).
"""

from __future__ import annotations

import ast
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib
from sparse_lm import data as datalib
from sparse_lm import decode
from sparse_lm import finetune
from sparse_lm import optimizer as optlib
from sparse_lm import params as paramslib
from sparse_lm import sharding
from sparse_lm.data import seq2seq
from sparse_lm.data.tokenizer import ByteTokenizer
from sparse_lm.errors import ConfigError
from sparse_lm.errors import RunError
from sparse_lm.errors import UserError
from sparse_lm.models.encoder_decoder import EncoderDecoder
from sparse_lm.models.encoder_decoder import apply_state_updates
from sparse_lm.models.moe import routing
from sparse_lm.models.transformer import Transformer
from sparse_lm.models.transformer import mtp_reach
from sparse_lm.models.transformer import mtp_shift


def vocab_size_of(c) -> int:
  """The vocabulary size of config `c`'s tokenizer, without building it."""
  return ByteTokenizer.vocab_size if c.data.tokenizer == "byte" else c.data.vocab_size


def model_class(c):
  """The model of config `c`: the decoder-only Transformer, or the
  EncoderDecoder for model.arch="encoder_decoder" (issue 30)."""
  return EncoderDecoder if c.model.get("arch", "decoder") == "encoder_decoder" else Transformer


def create(c, vocab_size: int):
  """(model, optimizer) of config `c`, initialised from train.seed."""
  model = model_class(c)(cfglib.model_spec(c), vocab_size, rngs=nnx.Rngs(params=c.train.seed))
  return model, nnx.Optimizer(
    model, optlib.make_optimizer(c.train), wrt=finetune.trainable(c.train)
  )


def with_fresh_optimizer(c, vocab_size: int, model_state, shardings):
  """The train state of config `c` whose model variables are `model_state`
  (part 0 of a train state: a parameters-only checkpoint's) and whose
  optimizer state is fresh, placed on `shardings`. In one jit the fresh
  init of the parameters is dead code (the optimizer's zeros do not read
  them) and `model_state`'s buffers are donated: the devices hold the model
  once."""

  def build(model_state):
    model, opt = create(c, vocab_size)
    nnx.update(model, model_state)
    return nnx.state((model, opt))

  return jax.jit(build, out_shardings=shardings, donate_argnums=0)(model_state)


def abstract_model(c, vocab_size: int | None = None):
  """The Transformer of config `c` with ShapeDtypeStructs for values."""
  V = vocab_size or vocab_size_of(c)
  spec = cfglib.model_spec(c)
  with nnx.use_eager_sharding(False):  # shapes only: no mesh needed
    return nnx.eval_shape(lambda: model_class(c)(spec, V, rngs=nnx.Rngs(0)))


def abstract_state(c, vocab_size: int, mesh=None):
  """(graphdef, abstract train state, its shardings): on `mesh` by the config's
  rules (run under sharding.use(mesh, c)), or on the first device."""
  if mesh is None:
    with nnx.use_eager_sharding(False):
      graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: create(c, vocab_size)))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return graphdef, abs_state, jax.tree.map(lambda a: dev, abs_state)
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: create(c, vocab_size)))
  return graphdef, abs_state, nnx.get_named_sharding(abs_state, mesh)


def state_tree(c, vocab_size: int) -> list:
  """What a checkpoint of config `c` holds: (path, shape, dtype) of every
  parameter and optimizer-state leaf (shapes only: optax's own init), in
  per-layer names: a run saved with model.scan_layers restores without it and
  back (the checkpoint converts, sparse_lm/params.py), so both compare equal."""
  if c.model.get("scan_layers"):
    c = c.copy_and_resolve_references()
    c.model.scan_layers = False
  model = abstract_model(c, vocab_size)
  params = nnx.to_pure_dict(nnx.state(model, finetune.trainable(c.train)))
  opt = jax.eval_shape(optlib.make_optimizer(c.train).init, params)
  leaves = jax.tree_util.tree_flatten_with_path((nnx.to_pure_dict(nnx.state(model)), opt))[0]
  return [(jax.tree_util.keystr(p), a.shape, str(a.dtype)) for p, a in leaves]


def forward(model, batch, *, train: bool, rng):
  """(summed weighted cross-entropy, summed weights, the MoE layers' aux) of a batch.

  batch["weights"] weights the loss; batch["mask"] (default: the weights) marks
  the real tokens, which routing statistics and the balance losses count;
  packed examples (sft: data) bring "segment_ids" and their "positions".
  An encoder-decoder's batch (sparse_lm/data/seq2seq.py's T5X features) is
  scored on decoder_target_tokens weighted by decoder_loss_weights."""
  if "decoder_target_tokens" in batch:
    return _encoder_decoder_forward(model, batch, train=train, rng=rng)
  w_BxL = batch["weights"]
  logits_BxLxV, moe_aux, _ = model(
    batch["inputs"],
    mask_BxL=batch.get("mask", w_BxL),
    positions_BxL=batch.get("positions"),
    segments_BxL=batch.get("segment_ids"),
    train=train,
    rng=rng,
  )
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
  return jnp.sum(ce_BxL * w_BxL), jnp.sum(w_BxL), moe_aux


def _encoder_decoder_forward(model, batch, *, train: bool, rng):
  """forward() of an EncoderDecoder: its MoE aux dicts are the encoder's, then the decoder's."""
  w_BxL = batch["decoder_loss_weights"]
  logits_BxLxV, moe_aux, _ = model(
    batch["encoder_input_tokens"],
    batch["decoder_input_tokens"],
    encoder_segments_BxS=batch["encoder_segment_ids"],
    decoder_segments_BxL=batch["decoder_segment_ids"],
    train=train,
    rng=rng,
  )
  targets_BxL = batch["decoder_target_tokens"]
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  return jnp.sum(ce_BxL * w_BxL), jnp.sum(w_BxL), moe_aux


def loss_fn(model, batch, *, train: bool, rng):
  """Token-weighted cross-entropy (the mean over the weighted tokens of the
  whole batch) + the MoE layers' weighted router losses; in training, with
  model.mtp_depth > 0, + the multi-token prediction loss (mtp_loss_fn)."""
  if train and model.m.mtp_depth:
    return mtp_loss_fn(model, batch, rng=rng)
  ce_sum, w_sum, moe_aux = forward(model, batch, train=train, rng=rng)
  ce = ce_sum / jnp.maximum(w_sum, 1.0)
  router_loss = sum((a["router_loss"] for a in moe_aux), jnp.float32(0.0))
  return ce + router_loss, {"ce": ce, "router_loss": router_loss, "moe": moe_aux}


def mtp_loss_fn(model, batch, *, rng):
  """loss_fn's training loss with multi-token prediction (DeepSeek-V3 section
  2.2, eq. 24-25): CE + router losses + lambda / D x sum_k CE_k, lambda =
  model.mtp_loss_weight, D = model.mtp_depth. CE_k is MTP module k's
  cross-entropy for token i + k + 1 at position i (batch["targets"][:, i + k]),
  weighted by batch["weights"][:, i + k] where i + k is in the sequence and
  in position i's packed example (transformer.mtp_reach), averaged over its
  weighted tokens as CE is (the paper divides by T). The router losses of the
  modules' MoE blocks are added to router_loss. Measurements: "mtp_ce"
  (1/D sum_k CE_k, logged as mtp_loss) and "mtp_moe" (the blocks' aux)."""
  w_BxL = batch["weights"]
  segments_BxL = batch.get("segment_ids")
  out, mtp = model.with_mtp(
    batch["inputs"],
    mask_BxL=batch.get("mask", w_BxL),
    positions_BxL=batch.get("positions"),
    segments_BxL=segments_BxL,
    train=True,
    rng=rng,
  )
  mean_ce = lambda logits, targets, w: (
    jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * w)
    / jnp.maximum(jnp.sum(w), 1.0)
  )
  ce = mean_ce(out.logits, batch["targets"], w_BxL)
  B, L = w_BxL.shape
  ces = []
  for k, o in enumerate(mtp, 1):
    w_k = mtp_shift(w_BxL, k) * mtp_reach(B, L, k, segments_BxL)
    ces.append(mean_ce(o.logits, mtp_shift(batch["targets"], k), w_k))
  mtp_ce = sum(ces) / len(ces)
  router_loss = sum(
    (a["router_loss"] for a in [*out.moe_aux, *(o.aux for o in mtp)] if a), jnp.float32(0.0)
  )
  loss = ce + router_loss + model.m.mtp_loss_weight * mtp_ce
  aux = {"ce": ce, "router_loss": router_loss, "moe": out.moe_aux}
  return loss, {**aux, "mtp_ce": mtp_ce, "mtp_moe": [o.aux for o in mtp]}


def _micro_batches(batch, n: int):
  """[B, ...] -> [n, B / n, ...]: micro-batch i holds rows i, n + i, 2n + i, ...
  so that each device keeps its own rows (the batch is sharded in blocks)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def _join(stats_N: dict) -> dict:
  """Micro-batches' row statistics [n, R, ...] -> the batch's [n R, ...]."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in stats_N.items()}


def micro_grads(c, model, batch, rng, wrt):
  """(loss, aux, grads) of one step over train.microbatches = n micro-batches
  inside one program (scans), equal to the whole batch's up to float32
  rounding whatever n (tests/microbatch_test.py), for every router whose
  routing of a token does not depend on the batch (expert choice's does);
  an encoder-decoder's batch (its T5X features, rows split alike) too.

  The cross-entropy is a sum over tokens: each micro-batch adds its own,
  divided by the whole batch's weight. The router losses are functions F of
  sums over tokens (routing.row_stats), which do not add up: under
  model.moe.balance_scope "global" (or "sequence") a first forward-only pass
  gives the whole batch's statistics S, and each micro-batch m then adds the
  gradient of <dF/dS (S), S_m>, whose sum over m is the gradient of F(S)
  (F depends on the parameters only through S). The cost: one more forward
  per step. Under "micro" each micro-batch's own F is averaged (what most
  peers do; it depends on n). Routing state (DeepSeek-V3's bias) is updated
  once, from the whole step's counts."""
  n, moe = c.train.microbatches, cfglib.model_spec(c).moe
  gd, params, rest = nnx.split(model, wrt, ...)
  mbs = _micro_batches(batch, n)
  w_key = "decoder_loss_weights" if "decoder_target_tokens" in batch else "weights"
  w_total = jnp.maximum(jnp.sum(batch[w_key]), 1.0)
  idx = jnp.arange(n)

  def fwd(p, mb, i):
    return forward(nnx.merge(gd, p, rest), mb, train=True, rng=jax.random.fold_in(rng, i))

  router_loss = lambda stats: sum(
    (routing.aux_terms(s, moe)["router_loss"] for s in stats), jnp.float32(0.0)
  )
  two_pass = moe.balance_scope != "micro" and any(
    (moe.load_balance_weight, moe.z_loss_weight, moe.importance_weight)
  )
  coef = None
  if two_pass:
    stats_of = lambda xs: [a["stats"] for a in fwd(params, *xs)[2]]
    whole = [_join(s) for s in jax.lax.map(stats_of, (mbs, idx))]
    coef = jax.grad(router_loss)(whole)
    coef = [{k: v.reshape(n, -1, *v.shape[1:]) for k, v in cl.items()} for cl in coef]

  def body(acc, xs):
    mb, i, coef_i = xs

    def f(p):
      ce_sum, _, aux = fwd(p, mb, i)
      extra = jnp.float32(0.0)
      if coef_i is not None:  # the gradient of F(S) through this micro-batch's S_m
        for cl, a in zip(coef_i, aux):
          extra += sum(jnp.sum(jax.lax.stop_gradient(cl[k]) * a["stats"][k]) for k in cl)
      elif moe.balance_scope == "micro":
        extra = router_loss([a["stats"] for a in aux]) / n
      return ce_sum / w_total + extra, (ce_sum, aux)

    grads, (ce_sum, aux) = jax.grad(f, has_aux=True)(params)
    # Per-layer dicts: stacked over micro-batches, a scanned group's aux
    # (transformer.LayerAux) would take the new axis before its layers'.
    return jax.tree.map(jnp.add, acc, grads), (ce_sum, [dict(a) for a in aux])

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (ce_sums, auxes) = jax.lax.scan(body, zeros, (mbs, idx, coef))
  ce = jnp.sum(ce_sums) / w_total
  moe_aux = []
  for a in auxes:  # per MoE layer, each value stacked over micro-batches
    stats = _join(a["stats"])
    out = {**routing.aux_terms(stats, moe), "stats": stats}
    if moe.balance_scope == "micro":  # what was optimised: the micro-batches' mean
      for k in (*routing.BALANCE_TERMS, "z_loss", "router_loss"):
        out[k] = jnp.mean(a[k])
    if "state" in a:
      state = jax.tree.map(lambda v: v[0], a["state"])
      out["state_updates"] = moe.router_facts.update(state, stats, moe)
    moe_aux.append(out)
  rl = sum((a["router_loss"] for a in moe_aux), jnp.float32(0.0))
  return ce + rl, {"ce": ce, "router_loss": rl, "moe": moe_aux}, grads


def train_step(c, graphdef):
  """The update step of config `c` (to jit with the state's shardings):
  (state, batch, step) -> (new state, measurements: loss, grad_norm, finite,
  ce, router_loss, moe). The RNG of step n is fold_in(train.seed, n); frozen
  parameters (train.frozen) get no gradient; train.microbatches > 1 splits
  the batch inside the step (micro_grads); routing state (DeepSeek-V3's
  bias) is updated from the step's routing; with train.skip_nonfinite_steps a
  non-finite step keeps the old state."""
  t = c.train

  def step_fn(state, batch, step):
    old_state = jax.tree.map(lambda x: x, state)  # merge shares state's Variables
    model, opt = nnx.merge(graphdef, state)
    rng = jax.random.fold_in(jax.random.key(t.seed), step)
    wrt = finetune.trainable(t)  # frozen parameters get no gradient
    if t.microbatches > 1:
      loss, aux, grads = micro_grads(c, model, batch, rng, wrt)
    else:
      loss = lambda mdl: loss_fn(mdl, batch, train=True, rng=rng)
      grad_fn = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt), has_aux=True)
      (loss, aux), grads = grad_fn(model)
    opt.update(model, grads)
    # routing state (DeepSeek-V3's bias), the MTP modules' MoE blocks' too
    apply_state_updates(model, aux["moe"], aux.get("mtp_moe", ()))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = nnx.state((model, opt))
    if t.skip_nonfinite_steps:
      # Keep the old state (optimizer moments, router bias and all) on a
      # non-finite step. optax.apply_if_finite would check the gradients only
      # and add fields to the optimizer state, so checkpoints would depend on
      # this flag.
      new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, old_state)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}

  return step_fn


def eval_step(graphdef):
  """(state, batch) -> (cross-entropy, MoE statistics) in evaluation mode."""

  def step_fn(state, batch):
    _, aux = loss_fn(nnx.merge(graphdef, state)[0], batch, train=False, rng=None)
    return aux["ce"], aux["moe"]

  return step_fn


def seq2seq_languages(c, tok, workdir: str | None = None) -> dict[str, int]:
  """{language: token id} of a seq2seq run (data.objective="seq2seq";
  sparse_lm/data/seq2seq.py's NLLB language tokens): the ids its data.json
  recorded when it trained, else those its dataset gives now; {} for a
  dataset without languages."""
  recorded = os.path.join(workdir, "data.json") if workdir else ""
  if recorded and os.path.exists(recorded):
    with open(recorded) as f:
      langs = json.load(f).get("languages")
    if langs is not None:
      return {k: int(v) for k, v in langs.items()}
  return seq2seq.encode_split(c.data, tok, c.data.eval_split)[1]["languages"]


def model_vocab_size(c, tok, workdir: str | None = None) -> int:
  """The model's vocabulary of config `c` with tokenizer `tok`: what the
  training input gave it (train.py's train_input.vocab_size): the
  tokenizer's, grown by span corruption's sentinels or seq2seq's reserved
  language ids (sparse_lm/data/seq2seq.py)."""
  objective = c.data.get("objective", "lm")
  if objective == "span_corruption":
    return seq2seq.sentinel_top(tok)[1]
  if objective == "seq2seq":
    return max([tok.vocab_size, *(i + 1 for i in seq2seq_languages(c, tok, workdir).values())])
  return tok.vocab_size


def load_model(
  workdir: str,
  step: int | None = None,
  *,
  inference: bool = False,
  mesh=None,
  config=None,
  keep_mtp: bool = False,
):
  """The model of a run's checkpoint (latest, or `step`): (model, config, tokenizer).

  Reads the model's variables only, never the optimizer state (a checkpoint
  saved with it or without: an import, train.save_optimizer=False), each
  straight onto its device shards (checkpoint.read_params): a model that
  fits the mesh loads whatever it was trained with.

  inference: the model computes as decoding needs (decode.inference_spec: MoE
  layers dispatch by model.moe.decode_dispatch). mesh: shard by the config's
  rules onto this mesh (run the model under sharding.use(mesh, config));
  default one device. config: the run's config as the caller changed it for
  `mesh` (mesh_for_use); default the run's own. keep_mtp: also read the
  multi-token prediction modules (model.mtp_depth; generate --speculative);
  by default they are not read and the model is the main one, mtp_depth=0's
  (DeepSeek-V3 section 2.2 drops them at inference). An encoder-decoder run
  (model.arch="encoder_decoder") loads as its EncoderDecoder, with the
  vocabulary its input gave it (model_vocab_size). Errors (no checkpoint, a
  step that is not there, a tokenizer that does not fit) are one line
  (RunError)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  c = config if config is not None else ckptlib.read_config(workdir)
  tok = datalib.make_tokenizer(c.data)
  datalib.check_tokenizer(tok, workdir)
  V = model_vocab_size(c, tok, workdir)
  ckpt = ckptlib.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.resolve(step)
  finally:
    ckpt.close()
  built = c
  if c.model.get("mtp_depth") and not keep_mtp:  # the main model: its parameters only
    built = c.copy_and_resolve_references()
    built.model.mtp_depth = 0
  if mesh is None:
    graphdef, abs_vars = nnx.split(abstract_model(built, V))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shd = jax.tree.map(lambda a: dev, abs_vars)
  else:
    with sharding.use(mesh, c):
      spec = cfglib.model_spec(built)
      model = nnx.eval_shape(lambda: model_class(c)(spec, V, rngs=nnx.Rngs(0)))
      graphdef, abs_vars = nnx.split(model)
      shd = nnx.get_named_sharding(abs_vars, mesh)
  flat = jax.tree_util.tree_flatten_with_path(ckptlib.target(abs_vars, shd))[0]
  targets = {paramslib.path_str(kp): t for kp, t in flat}
  try:
    values = ckptlib.read_params(workdir, step, targets)
  except Exception as e:  # pylint: disable=broad-except  # a shape that does not fit, a broken file
    raise RunError(
      f"the checkpoint of step {step} in {ckpt.dir} does not fit the run's config or "
      f"cannot be read ({ckptlib.broken_part(e)})"
    ) from None
  state = jax.tree_util.tree_map_with_path(lambda kp, _: values[paramslib.path_str(kp)], abs_vars)
  model = nnx.merge(graphdef, state)
  if inference:
    model = decode.for_inference(model, keep_mtp)
  return model, c, tok


# What evaluate, generate and export load onto by default: the parameters
# sharded over every device along d_model (the "embed" rule's fsdp axis), each
# batch computed whole on every device (rule "batch" unsharded), so any batch
# size and any model that fits the devices' memory together will do.
FSDP_FOR_USE = (("data", 1), ("fsdp", -1), ("expert", 1), ("tensor", 1))


def mesh_for_use(c, text: str | None):
  """(config, mesh) of the --mesh flag of evaluate, generate and export: "fsdp"
  (the default: FSDP_FOR_USE), "one" (the first device, no mesh: mesh None),
  or a config.mesh tuple as text (the run's sharding rules). A bad value is a
  one-line UserError naming the flag."""
  text = text or "fsdp"
  if text == "one":
    return c, None
  c = c.copy_and_resolve_references()
  if text == "fsdp":
    c.mesh = FSDP_FOR_USE
    c.sharding_rules = tuple((n, None if n == "batch" else a) for n, a in c.sharding_rules)
  else:
    try:
      c.mesh = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      why = 'not "fsdp", "one" or a tuple of (axis, size) pairs'
      raise UserError(f"--mesh={text}: {why}") from None
  try:
    return c, sharding.make_mesh(c)
  except ConfigError as e:
    raise UserError(f"--mesh={text}: {e}") from None
