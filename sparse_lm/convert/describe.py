"""What a checkpoint family is: its tensor rules and its config keys, both ways.

A family (families/<name>.py) is a `Family`: config.json's architecture and a
list of `Key`s (config.json <-> our config: import reads them in order, export
writes them in order and refuses what they cannot hold) and `rules(spec,
fused)`, the `Rule`s that make each of our parameters from its tensors (and
back). importer.py, exporter.py and their checks read nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import Callable

import numpy as np

# ------------------------------------------------------------------ tensors


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our parameters `ours` ("blocks/0/attn/wq") made of the checkpoint's
  tensors `hf` (and back).

  `to_ours(*hf arrays) -> tuple of our arrays`, `to_hf(*our arrays) -> tuple
  of hf arrays`. With `per_expert`, the hf names hold "{j}" and both functions
  map one expert j; our arrays are stacked over experts on axis 0.

  `rows`: how the import may read the one hf tensor a block of its rows at a
  time instead of whole: "same" (ours is the tensor reshaped) or "t" (ours
  is its transpose, reshaped); "" when only `to_ours` knows.

  `copy_of`: the checkpoint tensor that this rule's one hf tensor repeats
  (DeepSeek-V3's MTP layer holds the embedding and the output head again,
  README_WEIGHTS.md: "shares parameters"). Import checks that it is there
  with the shape `ours` implies and compares it with `copy_of` (a note where
  they differ), but reads `ours` from `copy_of`'s rule; export writes it from
  the same parameter, so the written folder holds both, as the hub's.

  `optional` (a copy only): the checkpoint may hold it or not (T5's tied
  embed_tokens / lm_head: transformers 4.x checkpoints may hold them, 5.x
  saves shared.weight alone); import checks and compares it where present,
  export does not write it."""

  ours: tuple[str, ...]
  hf: tuple[str, ...]
  to_ours: Callable[..., tuple]
  to_hf: Callable[..., tuple]
  per_expert: bool = False
  rows: str = ""
  copy_of: str = ""
  optional: bool = False


def same(ours: str, hf: str) -> Rule:
  return Rule((ours,), (hf,), lambda w: (w,), lambda a: (a,), rows="same")


def linear(ours: str, hf: str, per_expert: bool = False) -> Rule:
  """torch Linear [out, in] -> ours [in, out] (expert j's with `per_expert`)."""
  return Rule((ours,), (hf,), lambda w: (w.T,), lambda a: (a.T,), per_expert, rows="t")


def copy(rule: Rule, of: str, optional: bool = False) -> Rule:
  """`rule` as a copy of the checkpoint tensor `of` (Rule.copy_of, Rule.optional)."""
  return dataclasses.replace(rule, copy_of=of, optional=optional)


def heads_in(ours: str, hf: str, n: int, z: int) -> Rule:
  """q / k / v projection [n * Z, D] -> ours [D, n, Z]."""
  return Rule(
    (ours,),
    (hf,),
    lambda w: (w.T.reshape(-1, n, z),),
    lambda a: (a.reshape(a.shape[0], -1).T,),
    rows="t",
  )


def heads_out(ours: str, hf: str, h: int, z: int) -> Rule:
  """Output projection [D, H * Z] -> ours [H, Z, D]."""
  return Rule(
    (ours,),
    (hf,),
    lambda w: (w.T.reshape(h, z, -1),),
    lambda a: (a.reshape(h * z, -1).T,),
    rows="t",
  )


def bias(ours: str, hf: str, n: int, z: int) -> Rule:
  return Rule((ours,), (hf,), lambda b: (b.reshape(n, z),), lambda a: (a.reshape(-1),), rows="same")


def swap12(a: np.ndarray) -> np.ndarray:
  """[E, out, in] <-> [E, in, out]: stacked torch Linears and ours."""
  return np.swapaxes(a, 1, 2)


def fused_experts(p: str, hf: str, F: int) -> list[Rule]:
  """transformers 5's fused experts: gate_up_proj [E, 2F, D] (gate rows
  first), down_proj [E, D, F]."""
  return [
    Rule(
      (f"{p}/wg", f"{p}/wi"),
      (f"{hf}.gate_up_proj",),
      lambda gu: (swap12(gu[:, :F]), swap12(gu[:, F:])),
      lambda wg, wi: (np.concatenate([swap12(wg), swap12(wi)], 1),),
    ),
    Rule((f"{p}/wo",), (f"{hf}.down_proj",), lambda d: (swap12(d),), lambda wo: (swap12(wo),)),
  ]


# ------------------------------------------------------------------ config


class _Marker:
  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return self.name


REQUIRED = _Marker("REQUIRED")  # Key.default: config.json must have the key
MISSING = _Marker("MISSING")  # what `lookup` returns for an absent key
_FREE = _Marker("FREE")  # Key.fixed: our key may hold anything


def _as_is(*v):
  return v[0] if len(v) == 1 else v


@dataclasses.dataclass(frozen=True)
class Key:
  """One fact of a family's config, in both directions.

  ours     our config key(s), dotted ("model.moe.top_k"); several when one
           config.json value makes several of ours.
  hf       config.json's key, dotted where nested ("attn_config.clip_qkv");
           a tuple of spellings transformers reads alike: import reads the
           first present, export writes the one the source has, else the first.
  legacy   older spellings import reads after `hf`; export drops them.
  default  what an absent or null config.json key means: a value, a function
           of config.json (transformers derives it from other keys), or
           REQUIRED (import refuses a config.json without it).
  values   a two-way table {config.json value: our value(s)}: import and
           export refuse whatever it does not list; with None among its keys,
           null is a value, not the default.
  to_ours  config.json value -> our value(s); None: import does not set ours.
  to_hf    our value(s) -> config.json value; None: export does not write it.
  fixed    ours always holds this (a value, or a function of the config):
           import sets it, export refuses anything else.
  refuse   a predicate on the config.json value that import refuses.
  why      the refusal's reason: import's for `refuse` / `values`, export's
           for `fixed` ("{family}" is the family's name).
  read     config.json -> its value, for a key that depends on several
           (import; replaces the lookup and the default).
  write    our config -> the config.json value (export; replaces `to_hf`).
  optional export writes it only where the source has it or its value is not
           the default (head_dim: older configs of the family lack it).
  keep     export keeps the source's value where it has one and writes
           `to_hf` / `write` only where it has none (a fact our config does
           not hold, e.g. SwitchTransformers' expert_capacity).

  On export the config's values are resolved (config.model_spec): "0 =
  inherit" keys read as what they inherit."""

  ours: str | tuple[str, ...] = ()
  hf: str | tuple[str, ...] = ()
  legacy: tuple[str, ...] = ()
  default: Any = REQUIRED
  values: dict | None = None
  to_ours: Callable | None = _as_is
  to_hf: Callable | None = _as_is
  fixed: Any = _FREE
  refuse: Callable[[Any], bool] | None = None
  why: str = ""
  read: Callable[[dict], Any] | None = None
  write: Callable[[Any], Any] | None = None
  optional: bool = False
  keep: bool = False

  def __post_init__(self):
    for name in ("ours", "hf"):
      if isinstance(getattr(self, name), str):
        object.__setattr__(self, name, (getattr(self, name),))

  @property
  def is_fixed(self) -> bool:
    return self.fixed is not _FREE


def fixed(ours: str, value, why: str = "", *, on_import: bool = True) -> Key:
  """Our key `ours` is always `value` in this family: import sets it (unless
  not `on_import`: the default already holds it), export refuses other values."""
  return Key(ours, fixed=value, why=why, to_ours=_as_is if on_import else None)


def preset(ours: str, value) -> Key:
  """Import sets `ours` to `value` (a training choice, e.g. dropless
  dispatch); export does not look at it."""
  return Key(ours, read=lambda hf: value, to_hf=None)


def refuse(hf: str, when: Callable[[Any], bool], why: str, read=None) -> Key:
  """Import refuses config.json's `hf` where `when(value)`: a feature we do
  not represent (export never writes it)."""
  return Key(hf=hf, default=None, refuse=when, why=why, read=read, to_ours=None, to_hf=None)


@dataclasses.dataclass(frozen=True)
class Family:
  """One Hugging Face architecture.

  name          ours (--family) and config.json's model_type (unless model_type).
  architecture  config.json's "architectures" entry.
  keys          config.json <-> our config, in config.json's order (export
                writes new keys in this order; refusals are checked in it).
  rules         rules(spec, fused) -> [Rule]: the tensors of a model spec,
                in the per-expert hub layout or (fused) transformers 5's."""

  name: str
  architecture: str
  keys: tuple[Key, ...]
  rules: Callable[..., list[Rule]]
  model_type: str = ""  # config.json's, where it is not `name` (NLLB-MoE's "nllb-moe")


# --------------------------------------------- dotted keys of configs and dicts


def get(c, key: str):
  """Our config's (or a spec's) value at dotted `key` ("model.moe.top_k")."""
  return functools.reduce(getattr, key.split("."), c)


def put(c, key: str, value):
  *parents, last = key.split(".")
  setattr(functools.reduce(getattr, parents, c), last, value)


def lookup(d: dict, key: str):
  """config.json's value at dotted `key`, or MISSING."""
  for part in key.split("."):
    if not isinstance(d, dict) or part not in d:
      return MISSING
    d = d[part]
  return d


def assign(d: dict, key: str, value):
  """Sets dotted `key` in `d`, copying the nested dicts it passes (the
  source's config.json is never changed); a new key goes last."""
  *parents, last = key.split(".")
  for part in parents:
    d[part] = dict(d.get(part) or {})
    d = d[part]
  d[last] = value


def drop(d: dict, key: str):
  """Removes dotted `key` from `d` where it is there (copying as `assign`)."""
  if lookup(d, key) is MISSING:
    return
  *parents, last = key.split(".")
  for part in parents:
    d[part] = dict(d[part])
    d = d[part]
  del d[last]
