"""Fine-tuning: starting a run from another run's parameters, freezing some,
and watching how its routing moves.

Three parts, each used by the trainer (train.py); their config keys are
validated with the rest of the config (config.py):

* **Init rules and upcycling** (train.init_from, init_rules, init_gate_scale,
  init_router, init_reinit_fraction). `plan_init` decides, by name rules over parameter
  paths (sparse_lm/params.py's spelling, T5X's assignment map), which source
  parameter initialises each new one and how: copied, copied into every
  expert (sparse upcycling, Komatsuzaki et al. 2022), tiled over more
  experts, or fresh. `init_from` reads only those parameters from the source
  checkpoint (checkpoint.read_params: any mesh saved them, any mesh reads
  them) and transforms them: upcycling's copies divided by the router's gate
  mass at uniform routing (the router table's `gate_mass`), the new router
  at zero (init_router="zero": uniform routing, so the copies' output is
  exactly the dense MLP's), and Drop-Upcycling's partial re-initialisation
  (Nakamura et al. 2025).
* **Freezing** (train.frozen): a regex over parameter paths or a preset
  (FROZEN_PRESETS, ST-MoE's fine-tuning variants); frozen parameters get no
  gradient and no optimizer state (`trainable`).
* **Routing drift**: how far the routers moved from the run's start
  (`RoutingDrift` in training, `routing_drift` for evaluate's
  --compare_routing): KL(base || now) and the fraction of tokens whose top-1
  expert changed, per MoE layer, over all tokens and (instruction data)
  prompt and response tokens apart.

Data for fine-tuning (instruction examples packed with segment ids, the loss
on response tokens) is sparse_lm/data/sft.py.
"""

from __future__ import annotations

import os
import re
from typing import Any
from typing import NamedTuple
import zlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib
from sparse_lm import params as paramslib
from sparse_lm.errors import ConfigError
from sparse_lm.models.moe import routing

# ------------------------------------------------------------------- freezing

_ROUTER_PATH = re.compile(r"(^|/)(router|group_router)(_noise)?$")

# What train.frozen's presets (their names: config.FROZEN_PRESETS) freeze:
# (path, logical names) -> frozen. ST-MoE (Zoph et al. 2022, section 4.3)
# fine-tunes with the routers, the experts or everything else frozen.
FROZEN_PRESETS = {
  ":router": lambda path, names: bool(_ROUTER_PATH.search(path)),  # the gating matrices
  ":experts": paramslib.is_routed,  # the routed experts (shared experts are not routed)
  ":non_experts": lambda path, names: not paramslib.is_routed(path, names),
}


def frozen_predicate(frozen: str):
  """(path, logical names) -> whether train.frozen freezes that parameter:
  a preset of FROZEN_PRESETS, or a regex searched in the path."""
  if frozen in FROZEN_PRESETS:
    return FROZEN_PRESETS[frozen]
  rx = re.compile(frozen)
  return lambda path, names: bool(frozen) and bool(rx.search(path))


def check_frozen(t, params: list[tuple[str, tuple, tuple]]):
  """A one-line ConfigError when train.frozen freezes no parameter, or all of them.
  params: (path, shape, logical names) of every parameter (params.param_list)."""
  if not t.frozen:
    return
  is_frozen = frozen_predicate(t.frozen)
  n = sum(is_frozen(path, names) for path, _, names in params)
  if n == 0 or n == len(params):
    what = "no parameter" if n == 0 else "every parameter"
    raise ConfigError(f"config.train.frozen={t.frozen!r} is invalid: it freezes {what}")


def trainable(t):
  """The nnx filter of the parameters the optimizer trains: every nnx.Param
  that train.frozen does not freeze (frozen ones get no optimizer state).

  A stacked Param (model.scan_layers) is judged by its layers' per-layer
  names (params.layer_rows): frozen when train.frozen freezes all of them; a
  rule that freezes some of its layers but not the others is a ConfigError
  (one array has one optimizer state: freezing rows of it would need a
  per-row mask, which we do not build)."""
  if not t.frozen:
    return nnx.Param
  is_frozen = frozen_predicate(t.frozen)

  def keep(path, v):
    rows = paramslib.layer_rows(paramslib.path_str(path), v)
    frozen = [is_frozen(p, names) for p, names in rows]
    if any(frozen) and not all(frozen):
      some = [p for (p, _), f in zip(rows, frozen) if f]
      raise ConfigError(
        f"config.train.frozen={t.frozen!r} is invalid with model.scan_layers=True: it "
        f"freezes {_compact(some)} but not the other layers stored with it in "
        f"{paramslib.path_str(path)}; freeze all of {_compact([p for p, _ in rows])} or "
        "set model.scan_layers=False"
      )
    return not all(frozen)

  return nnx.All(nnx.Param, keep)


# ----------------------------------------------------------------- init rules


class Assign(NamedTuple):
  """How one parameter of the new run is initialised."""

  source: str | None  # the source path, or None: fresh (the new run's own init)
  how: str  # "copy", "experts" (copied into every expert: upcycling), "tile" (E -> m E), "fresh"


def plan_init(
  rules, targets: dict[str, tuple], sources: dict[str, tuple], key="train.init_rules"
) -> dict[str, Assign]:
  """Which source parameter initialises each target one, by name rules (T5X's
  assignment map): `rules` is an ordered list of (regex, source) pairs; the
  first regex that fully matches a target path decides: `source` is a
  re.sub template of the source path ("\\1" for groups) or None for a fresh
  init. A target no rule matches takes the source parameter of its own name,
  or is fresh when the source has none. targets: {path: (shape, logical
  names)}; sources: {path: (shape, dtype)}. Shapes decide the copy: equal
  (copy), the target one expert axis more (upcycling: every expert a copy), or
  the target's expert axis a multiple of the source's (tile). Anything else,
  a rule that matches nothing, or a source path that does not exist is a
  one-line ConfigError naming both paths and shapes."""
  compiled = []
  for i, (rx, src) in enumerate(rules):
    try:
      compiled.append((re.compile(rx), src))
    except re.error as e:
      raise ConfigError(f"config.{key}[{i}]={rx!r} is not a regex: {e}") from None
  used = [False] * len(compiled)
  plan = {}
  for path, (shape, names) in targets.items():
    hit = next((i for i, (rx, _) in enumerate(compiled) if rx.fullmatch(path)), None)
    if hit is None:
      src = path if path in sources else None
    else:
      used[hit] = True
      rx, template = compiled[hit]
      src = None if template is None else rx.fullmatch(path).expand(template)
      if src is not None and src not in sources:
        raise ConfigError(
          f"config.{key}[{hit}] maps {path} to {src}, which the source checkpoint does not have"
        )
    plan[path] = Assign(src, "fresh") if src is None else _how(path, shape, names, src, sources)
  unused = [rules[i][0] for i, u in enumerate(used) if not u]
  if unused:
    raise ConfigError(f"config.{key}: {unused[0]!r} matches no parameter of the new model")
  return plan


def _how(path, shape, names, src, sources) -> Assign:
  s_shape = tuple(sources[src][0])
  shape = tuple(shape)
  expert = bool(names) and names[0] == paramslib.EXPERT_AXIS
  if s_shape == shape:
    return Assign(src, "copy")
  if expert and shape[1:] == s_shape:
    return Assign(src, "experts")
  if expert and shape[1:] == s_shape[1:] and s_shape and shape[0] % s_shape[0] == 0:
    return Assign(src, "tile")
  raise ConfigError(
    f"config.train.init_from: {path} {shape} cannot take the source's {src} {s_shape} "
    "(shapes differ); re-initialise it with a train.init_rules entry (regex, None)"
  )


class InitReport(NamedTuple):
  """What init_from did to each parameter of the new run: {path: how}."""

  source: str
  step: int
  how: dict[str, str]  # "copied from P", "copied from P into every expert", "fresh", ...

  def line(self) -> str:
    """One line: which parameters came from where, and which are fresh."""
    groups: dict[str, list[str]] = {}
    for path, how in self.how.items():
      groups.setdefault(how.split(" from ")[0], []).append(path)
    parts = [f"{k} ({len(v)}): {_compact(v)}" for k, v in groups.items()]
    return f"init from {self.source} step {self.step}: " + "; ".join(parts)


def _compact(paths: list[str], n: int = 6) -> str:
  """Paths with their layer numbers folded: blocks/{0,2}/attn/wq."""
  folded: dict[str, list[str]] = {}
  for p in paths:
    m = re.match(r"(blocks/)(\d+)(/.*)", p)
    key, layer = ((m.group(1) + "{}" + m.group(3)), m.group(2)) if m else (p, None)
    folded.setdefault(key, []).append(layer)
  out = [
    k.format("{" + ",".join(ls) + "}" if len(ls) > 1 else ls[0]) if ls[0] is not None else k
    for k, ls in folded.items()
  ]
  return ", ".join(out[:n]) + (f", ... ({len(out) - n} more)" if len(out) > n else "")


def parse_source(spec: str, key: str = "train.init_from") -> tuple[str, int | None]:
  """'WORKDIR[:STEP]' -> (absolute workdir, step or None), or a one-line error."""
  path, step = spec, None
  head, sep, tail = spec.rpartition(":")
  if sep and tail.isdigit():
    path, step = head, int(tail)
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise ConfigError(f"config.{key}={spec!r} is invalid: {path} holds no run's checkpoints")
  return path, step


def source_params(workdir: str, step: int | None, key: str = "train.init_from"):
  """(step, {path: (shape, dtype)}) of the model variables in a run's checkpoint,
  read from its metadata (nothing is loaded)."""
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  step = steps[-1] if step is None and steps else step
  if step is None or step not in steps:
    raise ConfigError(
      f"config.{key} is invalid: {workdir}/checkpoints has no step {step} (it has {steps})"
    )
  return step, ckptlib.param_metadata(workdir, step)


def gate_mass(moe) -> float:
  """The sum of a token's chosen gates when every router logit is equal (a
  zero router): the router table's `gate_mass`. An upcycled MoE divides its
  copies' output by it (train.init_gate_scale="expected")."""
  return routing.ROUTERS[moe.router].gate_mass(moe)


class Plan(NamedTuple):
  """train.init_from's source checkpoint and what each new parameter takes from it."""

  source: str  # the source run's workdir
  step: int
  sources: dict[str, tuple]  # {path: (shape, dtype)} of the source's model variables
  assign: dict[str, Assign]  # {target path: Assign}


def plan(c, abs_state) -> Plan:
  """train.init_from's plan for the new run's abstract train state, from the
  source checkpoint's metadata (nothing is read): a one-line ConfigError for
  a source, rule or shape that does not fit. The trainer asks for it before
  it touches the workdir, and init_from follows it."""
  source, step = parse_source(c.train.init_from)
  step, sources = source_params(source, step)
  layout = paramslib.state_layout(abs_state)  # rules and reports name layers, stacked or not
  names = paramslib.per_layer(paramslib.logical_names(abs_state), layout, lambda n, r: n[1:])
  shapes = {p: leaf.shape for p, (_, leaf) in paramslib.model_leaves(abs_state).items()}
  shapes = paramslib.per_layer(shapes, layout, lambda shape, r: shape[1:])
  targets = {p: (shape, names.get(p, ())) for p, shape in shapes.items()}
  return Plan(source, step, sources, plan_init(c.train.init_rules, targets, sources))


def data_position(plan: Plan, train_input) -> dict:
  """train.init_data="continue": the data position the source checkpoint
  saved (its next batch is the first this run reads), if this run's input is
  the source's stream: the same data fingerprint (data.json: dataset,
  tokenizer, lengths, mixture) and the same seed, split and stream count.
  Otherwise a one-line ConfigError naming what differs (before the workdir
  is touched). Continued pretraining and upcycling read unseen data this way
  (Komatsuzaki et al. 2022 continue the dense run's data); SFT starts fresh."""
  import json  # pylint: disable=g-import-not-at-top

  key = "config.train.init_data='continue' is invalid"
  path = os.path.join(plan.source, "checkpoints", str(plan.step), "data", "metadata")
  fp_path = os.path.join(plan.source, "data.json")
  if not (os.path.exists(path) and os.path.exists(fp_path)):
    raise ConfigError(f"{key}: {plan.source} step {plan.step} has no saved data position")
  with open(path) as f:
    position = json.load(f)
  with open(fp_path) as f:
    theirs = json.load(f)
  mine = {k: v for k, v in train_input.fingerprint.items() if k != "path"}
  theirs = {k: v for k, v in theirs.items() if k != "path"}
  differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
  here = train_input.get_state()
  differ += [k for k in ("seed", "split", "num_streams") if position.get(k, here[k]) != here[k]]
  if differ:
    show = "; ".join(
      f"{k}: {theirs.get(k, position.get(k))!r} -> {mine.get(k, here.get(k))!r}" for k in differ
    )
    raise ConfigError(
      f"{key}: this run's data is not {plan.source}'s stream ({show}); use the source's data "
      "settings and train.seed, or train.init_data='fresh'"
    )
  return position


def init_from(c, state, abs_state) -> tuple[Any, InitReport]:
  """The new run's initial state with its model variables taken from
  train.init_from's checkpoint by train.init_rules (`plan`), transformed
  (copy / into every expert / tiled; upcycling's gate scale, the zero router
  and Drop-Upcycling re-init), placed with the new state's shardings. The optimizer and step
  stay fresh."""
  t, spec = c.train, cfglib.model_spec(c)
  source, step, sources, assign = plan(c, abs_state)
  # {per-layer path: (array, its row or None)}: a stacked layer is cut out
  # only where a transform needs its fresh values.
  leaves = {p: (x, None) for p, (_, x) in paramslib.model_leaves(state).items()}
  leaves = paramslib.per_layer(leaves, paramslib.state_layout(state), lambda xr, r: (xr[0], r))
  shardings = {
    p: x.sharding if r is None else paramslib.row(x.sharding, r) for p, (x, r) in leaves.items()
  }
  reads = {}
  for path, a in assign.items():
    if a.source is None:
      continue
    shd = shardings[path]
    if isinstance(shd, jax.sharding.NamedSharding) and a.how != "copy":
      # "experts": the target's sharding without its expert axis; "tile": replicated.
      pspec = shd.spec[1:] if a.how == "experts" else ()
      shd = jax.sharding.NamedSharding(shd.mesh, jax.sharding.PartitionSpec(*pspec))
    reads[a.source] = jax.ShapeDtypeStruct(sources[a.source][0], sources[a.source][1], sharding=shd)
  values = ckptlib.read_params(source, step, reads)
  scale = 1.0 / gate_mass(spec.moe) if t.init_gate_scale == "expected" else 1.0
  gating = set(routing.ROUTERS[spec.moe.router].gating) if spec.is_moe else set()
  new, how = {}, {}
  for path, a in assign.items():
    if a.source is None:
      if t.init_router == "zero" and path.rsplit("/", 1)[-1] in gating:
        x, r = leaves[path]
        shape, dtype = x.shape if r is None else x.shape[1:], x.dtype
        new[path] = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=shardings[path])()
        how[path] = "zero"  # every logit equal: the gates at uniform routing
        continue
      how[path] = "fresh"
      continue
    fresh, r = leaves[path]
    if r is not None:
      fresh = jax.jit(lambda x, r: x[r], out_shardings=shardings[path])(fresh, r)
    x = values[a.source]
    new[path] = _transform(x, fresh, a.how, path, scale, t.init_reinit_fraction, t.seed)
    how[path] = {
      "copy": f"copied from {a.source}",
      "experts": f"copied into every expert from {a.source}",
      "tile": f"tiled over the experts from {a.source}",
    }[a.how]
  return paramslib.replace(state, new), InitReport(f"{source}", step, how)


def _transform(x, fresh, how: str, path: str, scale: float, reinit: float, seed: int):
  """One target variable from its source value (see init_from)."""
  leaf = path.rsplit("/", 1)[-1]

  def make(x, fresh):
    x = x.astype(fresh.dtype)
    if how == "copy":
      return x
    if how == "tile":
      return jnp.tile(x, (fresh.shape[0] // x.shape[0],) + (1,) * (x.ndim - 1))
    y = jnp.broadcast_to(x[None], fresh.shape)
    if leaf == "wo":  # [E, F, D]: the copies' output projection carries the gate scale
      y = y * scale
    if reinit and leaf in ("wi", "wg", "wo"):
      # Drop-Upcycling (arXiv 2502.19261): per expert, a random fraction of the
      # hidden units keeps the fresh init (the same units for wi, wg and wo of
      # a layer; the paper draws them from the copied weights' statistics).
      E, F = fresh.shape[0], fresh.shape[2 if leaf != "wo" else 1]
      key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.rsplit("/", 1)[0].encode()))
      rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (E, F)), -1), -1)
      drop = rank < round(reinit * F)
      drop = drop[:, None, :] if leaf != "wo" else drop[:, :, None]
      y = jnp.where(drop, fresh, y)
    return y

  return jax.jit(make, out_shardings=fresh.sharding)(x, fresh)


# -------------------------------------------------------------- routing drift


def drifts(c) -> bool:
  """Whether a run logs routing drift: a fine-tuning run (train.init_from) of
  an MoE whose router gives each token a distribution over experts; not yet
  for an encoder-decoder (router_probs runs the decoder-only model on its
  batch)."""
  spec = cfglib.model_spec(c)
  if c.model.get("arch", "decoder") == "encoder_decoder":
    return False
  return bool(c.train.init_from) and spec.is_moe and routing.ROUTERS[spec.moe.router].drifts


def router_probs(model, batch) -> list:
  """Each MoE layer's router distribution [T, E] on a batch (evaluation mode)."""
  aux = model(
    batch["inputs"],
    mask_BxL=batch.get("mask", batch["weights"]),
    positions_BxL=batch.get("positions"),
    segments_BxL=batch.get("segment_ids"),
    return_experts=True,
  ).moe_aux
  return [a["probs_TxE"] for a in aux]


def routing_drift(base: list, now: list, sets: dict, layer_ids: list[int]) -> dict:
  """How far routing moved from a base model's, per MoE layer: the mean over
  tokens of KL(p_base || p_now) of the router distributions [T, E], and the
  fraction of tokens whose top-1 expert changed, over each token set of
  `sets` ({suffix: mask [T]}: "" all real tokens, "_prompt", "_response")."""
  out = {}
  for i, pb, pn in zip(layer_ids, base, now):
    pb, pn = np.asarray(pb, np.float64), np.asarray(pn, np.float64)
    kl = np.sum(pb * (np.log(np.maximum(pb, 1e-30)) - np.log(np.maximum(pn, 1e-30))), -1)
    moved = np.argmax(pb, -1) != np.argmax(pn, -1)
    for suffix, m in sets.items():
      m = np.asarray(m, bool).reshape(-1)
      if m.any():
        out[f"drift/layer{i}/kl{suffix}"] = float(kl[m].mean())
        out[f"drift/layer{i}/top1_changed{suffix}"] = float(moved[m].mean())
  for key in {k.split("/", 2)[2] for k in out}:
    out[f"drift/mean/{key}"] = float(
      np.mean([v for k, v in out.items() if k.endswith("/" + key) and "/layer" in k])
    )
  return out


def drift_sets(batch: dict) -> dict:
  """The token sets routing drift is measured over: all real tokens, and for
  instruction data its prompt and response tokens apart."""
  real = np.asarray(batch.get("mask", batch["weights"])).reshape(-1) > 0
  if "response_mask" not in batch:
    return {"": real}
  resp = np.asarray(batch["response_mask"]).reshape(-1) > 0
  return {"": real, "_prompt": real & ~resp, "_response": resp}


class RoutingDrift:
  """Fine-tuning's routing drift in training: on a fixed probe batch (the
  first eval batch), `routing_drift` of the current routers against the run's
  initial ones (the init_from run's), kept in workdir/routing_base.npz so
  that a resumed run measures against the same."""

  def __init__(self, c, workdir, graphdef, batch, to_global, start, state, moe_ids, say):
    self.path, self.moe_ids = os.path.join(workdir, "routing_base.npz"), moe_ids
    self.sets = drift_sets(batch)
    self.batch = to_global(batch)
    self.probs = jax.jit(lambda st, b: router_probs(nnx.merge(graphdef, st)[0], b))
    self.base = None
    if start == 0:
      self.base = [np.asarray(p) for p in jax.device_get(self.probs(state, self.batch))]
      if jax.process_index() == 0:
        np.savez(self.path, *self.base)
    elif os.path.exists(self.path):
      with np.load(self.path) as f:
        self.base = [f[f"arr_{i}"] for i in range(len(f.files))]
    else:
      say(f"no {self.path} (a run from before drift was logged): routing drift is off")

  def __call__(self, state) -> dict:
    if self.base is None:
      return {}
    now = jax.device_get(self.probs(state, self.batch))
    return routing_drift(self.base, now, self.sets, self.moe_ids)
