"""Export: a run's checkpoint -> a Hugging Face checkpoint folder, written
through a family's description (config keys, tensor rules); refused, one
line naming the key, where the family cannot hold the run's config."""

from __future__ import annotations

import json
import os
import shutil
import types

from flax import nnx
import jax
from jax.experimental import multihost_utils
import numpy as np

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib
from sparse_lm import finetune
from sparse_lm import params as paramslib
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.convert import describe
from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import Rule
from sparse_lm.convert.families import FAMILIES
from sparse_lm.convert.families import FAMILIES_BY_ARCH
from sparse_lm.convert.importer import np_dtype
from sparse_lm.convert.importer import param_source
from sparse_lm.convert.importer import source_dtype
from sparse_lm.convert.safetensors_io import write_shards
from sparse_lm.data import tokenizer as toklib
from sparse_lm.errors import ConvertError
from sparse_lm.errors import RunError

DEFAULT_FAMILY = "mixtral"  # for a run trained here (no source config.json)
DEFAULT_ENCODER_DECODER = "switch_transformers"  # the same, model.arch="encoder_decoder"
DEFAULT_SINUSOIDAL = "nllb_moe"  # the same, model.position="sinusoidal" (fairseq's)

# ------------------------------------------------------------------ config


class _Model:
  """model.* as export reads them: the spec's value, else the config's (a key
  the spec does not carry, e.g. model.arch)."""

  def __init__(self, spec, model):
    self._spec, self._model = spec, model

  def __getattr__(self, name):
    return getattr(self._spec, name) if hasattr(self._spec, name) else self._model[name]


def _resolved(c):
  """The config's values as export reads them: model.* from the spec ("0 =
  inherit" keys resolved), else the config's; data.* as they are."""
  return types.SimpleNamespace(model=_Model(cfglib.model_spec(c), c.model), data=c.data)


def _refusal(key: Key, view) -> tuple[str, str] | None:
  """(our key, why) where `key` cannot hold the config's values."""
  if key.is_fixed:
    want = key.fixed(view) if callable(key.fixed) else key.fixed
    got = describe.get(view, key.ours[0])
    return None if got == want else (key.ours[0], key.why or f"must be {want!r}")
  if key.values is None or not key.ours:
    return None
  got = tuple(describe.get(view, k) for k in key.ours)
  entries = [e if isinstance(e, tuple) else (e,) for e in key.values.values()]
  for i, k in enumerate(key.ours):
    if not any(e[: i + 1] == got[: i + 1] for e in entries):
      options = dict.fromkeys(e[i] for e in entries if e[:i] == got[:i])
      given = "".join(f" with {o}={v!r}" for o, v in zip(key.ours[:i], got))
      return k, "must be " + " or ".join(map(repr, options)) + given
  return None


def check_exportable(c, fam: Family):
  """One line naming the first config key the family cannot represent."""
  view = _resolved(c)
  dense = ("model.moe.num_experts", "a dense model has no MoE family")
  found = None if view.model.is_moe else dense
  # Multi-token prediction (model.mtp_depth): only a family with the key has its layers.
  if view.model.mtp_depth and not any("model.mtp_depth" in key.ours for key in fam.keys):
    found = found or ("model.mtp_depth", "{family} has no multi-token prediction layers")
  found = found or next(filter(None, (_refusal(key, view) for key in fam.keys)), None)
  if found:
    key, why = found
    raise ConvertError(
      f"config.{key}={describe.get(c, key)!r} cannot be exported as {fam.architecture}: "
      + why.format(family=fam.name)
    )


def hf_config(fam: Family, c, base: dict, dtype: str = "float32") -> dict:
  """config.json for config `c`: `base` (the source's config.json) with every
  key of the family written, older spellings dropped (first: a key may write
  a name another reads as legacy, e.g. the top-level rope_theta), and the
  architecture and the tensors' `dtype` under both of its names (`dtype`,
  transformers 5's, and `torch_dtype`, what transformers 4.x and vLLM read)."""
  view, hf = _resolved(c), dict(base)
  for key in fam.keys:
    for old in key.legacy if key.hf else ():
      describe.drop(hf, old)
  for key in fam.keys:
    if not key.hf or (key.to_hf is None and key.write is None):
      continue
    if key.write is not None:
      v = key.write(view)
    else:
      got = [describe.get(view, k) for k in key.ours]
      if key.values is not None:
        v = {ours: h for h, ours in key.values.items()}[got[0] if len(got) == 1 else tuple(got)]
      else:
        v = key.to_hf(*got)
    name = next((n for n in key.hf if describe.lookup(base, n) is not describe.MISSING), key.hf[0])
    if key.keep and describe.lookup(base, name) is not describe.MISSING:
      continue
    if key.optional and describe.lookup(base, name) in (describe.MISSING, None):
      if v == (key.default(hf) if callable(key.default) else key.default):
        continue
    describe.assign(hf, name, v)
  hf["architectures"], hf["model_type"] = [fam.architecture], fam.model_type or fam.name
  hf["dtype"] = hf["torch_dtype"] = dtype
  return hf


def generation_config(hf: dict) -> dict:
  """generation_config.json for an export whose source has none: its token
  ids from config.json, as transformers' GenerationConfig.from_model_config."""
  ids = ("bos_token_id", "eos_token_id", "pad_token_id")
  return {"_from_model_config": True, **{k: hf[k] for k in ids if hf.get(k) is not None}}


def token_ids(c) -> dict:
  """bos / eos / pad ids of a run's tokenizer.json, those it has, for the
  config.json of a run trained here (an import's has the source's): {} for
  the other tokenizer kinds."""
  path = os.path.expanduser(c.data.tokenizer_file)
  if c.data.tokenizer != "huggingface" or not os.path.exists(path):
    return {}
  tok = toklib.HuggingFaceTokenizer(path, c.data.vocab_size)
  ids = {"bos_token_id": tok.prefix_ids[0] if tok.prefix_ids else None, "eos_token_id": tok.eos_id}
  ids["pad_token_id"] = tok.pad_id
  return {k: v for k, v in ids.items() if v is not None}


# ------------------------------------------------------------------ export


def export_checkpoint(
  workdir: str,
  hf_dir: str,
  step=None,
  family=None,
  dtype=None,
  shard_mb=2000,
  say=print,
  mesh: str | None = None,
) -> dict:
  """Writes `hf_dir` (config.json, safetensors shards and their index, the
  run's tokenizer files) from a run's checkpoint, in `dtype` (default: the
  source's for a run imported or fine-tuned from an import, else float32).
  mesh: None (the default) reads each parameter whole into host memory, no
  accelerator used; "fsdp", "one" or a config.mesh tuple (the --mesh of
  evaluate, state.mesh_for_use) reads it onto that mesh's devices, sharded
  by the run's rules, and gathers it to the host (across processes)."""
  workdir, hf_dir = (
    os.path.abspath(os.path.expanduser(workdir)),
    os.path.abspath(os.path.expanduser(hf_dir)),
  )
  c = ckptlib.read_config(workdir)
  src_hf = hf_folder_of(workdir)
  base = {}
  if src_hf:
    with open(os.path.join(src_hf, "config.json")) as f:
      base = json.load(f)
  arch = (base.get("architectures") or [""])[0]
  if family is None:
    encdec = c.model.get("arch", "decoder") == "encoder_decoder"
    default = DEFAULT_ENCODER_DECODER if encdec else DEFAULT_FAMILY
    if encdec and c.model.position == "sinusoidal":
      default = DEFAULT_SINUSOIDAL
    family = FAMILIES_BY_ARCH[arch].name if arch in FAMILIES_BY_ARCH else default
  if family not in FAMILIES:
    raise ConvertError(f"--family={family!r}: one of {', '.join(FAMILIES)}")
  fam = FAMILIES[family]
  if arch != fam.architecture:
    base = {"architectures": [fam.architecture], "model_type": fam.model_type or fam.name}
  if not src_hf:
    base = {**token_ids(c), **base}
  check_exportable(c, fam)
  if os.path.exists(hf_dir) and os.listdir(hf_dir):
    raise ConvertError(f"--hf_dir={hf_dir} is not empty; export into a new folder")
  rules = _write_order([r for r in fam.rules(cfglib.model_spec(c), False) if not r.optional])
  ckpt = ckptlib.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.resolve(step)
  finally:
    ckpt.close()
  saved = ckptlib.param_metadata(workdir, step)  # per-layer names, whatever the layout
  params = {p for p, _, _ in paramslib.param_list(statelib.abstract_model(c))}
  src = param_source(rules)
  missing = sorted(params - set(src))
  if missing:
    raise ConvertError(f"{fam.name} has no tensor for our parameter {missing[0]!r}")
  dtype = dtype or (source_dtype(base) if src_hf else "float32")  # an import's: its source's
  out_dtype = np_dtype(dtype)
  E = cfglib.model_spec(c).moe.num_experts

  where = _placement(c, mesh)

  def read(paths: list[str]) -> dict[str, np.ndarray]:
    """Parameters read from the checkpoint into host memory, whatever mesh
    saved them: whole (every process reads them; nothing goes to an
    accelerator), or onto `mesh`'s shards, then gathered."""
    targets = {p: jax.ShapeDtypeStruct(*saved[p], sharding=where(p)) for p in paths}
    out = ckptlib.read_params(workdir, step, targets)
    for p, x in out.items():
      gathered = x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)
      out[p] = np.asarray(gathered)
    return out

  # Rules are read in groups of at most the largest parameter's bytes: one
  # read (one metadata and TensorStore round) per group, not per parameter,
  # and the host still holds about one parameter's worth.
  nbytes = lambda p: int(np.prod(saved[p][0])) * np.dtype(saved[p][1]).itemsize
  budget = max(nbytes(o) for r in rules for o in r.ours)
  groups, size = [[]], 0
  for r in rules:
    n = 0 if r.copy_of else sum(nbytes(o) for o in r.ours)  # a copy: its original's read
    if groups[-1] and n and size + n > budget:
      groups.append([])
      size = 0
    groups[-1].append(r)
    size += n

  def pairs(read):
    """(hf name, array) in the rules' order, a group of parameters read at a time."""
    for group in groups:
      got = read([o for r in group for o in r.ours])
      for r in group:
        ours = [got[o] for o in r.ours]
        if r.per_expert:
          for j in range(E):
            yield from zip((n.format(j=j) for n in r.hf), r.to_hf(*(a[j] for a in ours)))
        else:
          yield from zip(r.hf, r.to_hf(*ours))
      del got, ours  # before the next group's read, not after it

  # The shards' headers are planned from the shapes alone (zeros that are
  # never written are never resident), then the tensors stream into them: the
  # host holds one parameter and a block of rows being cast (write_shards).
  zeros = lambda paths: {p: np.zeros(saved[p][0], np.float32) for p in paths}
  plan = [(n, v.shape, out_dtype) for n, v in pairs(zeros)]
  tensors = pairs(read)  # views of the parameter read: write_shards casts them by blocks

  # One staging folder, named the same by every process: process 0 writes
  # the files and renames it; every process reads the parameters (a restore
  # is collective across processes) between barriers.
  staging, lead = f"{hf_dir}.exporting", jax.process_index() == 0
  sync = lambda what: jax.process_count() > 1 and multihost_utils.sync_global_devices(what)
  if lead:
    shutil.rmtree(staging, ignore_errors=True)  # a killed export's
    os.makedirs(staging)
  sync("export: staging folder made")
  try:
    if not lead:
      for _ in tensors:
        pass
      sync("export: written")
      return {"family": fam.name}
    out = write_shards(plan, tensors, staging, shard_mb)
    hf = hf_config(fam, c, base, dtype)
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
    for name in ("generation_config.json", *toklib.TOKENIZER_FILES):
      if src_hf and os.path.exists(os.path.join(src_hf, name)):
        shutil.copy(os.path.join(src_hf, name), os.path.join(staging, name))
    if not os.path.exists(os.path.join(staging, "generation_config.json")):
      with open(os.path.join(staging, "generation_config.json"), "w") as f:
        json.dump(generation_config(hf), f, indent=2)
    if not os.path.exists(os.path.join(staging, "tokenizer.json")):
      say(
        f"{workdir}'s tokenizer is data.tokenizer={c.data.tokenizer!r}, not a tokenizer.json: "
        "the export holds the weights and config.json only"
      )
    if os.path.isdir(hf_dir):
      os.rmdir(hf_dir)
    os.makedirs(os.path.dirname(hf_dir) or ".", exist_ok=True)
    os.rename(staging, hf_dir)
    sync("export: written")
  except BaseException:
    if lead:
      shutil.rmtree(staging, ignore_errors=True)
    raise
  return {"family": fam.name, **out}


def _write_order(rules: list[Rule]) -> list[Rule]:
  """The rules in the order their tensors are written: each copy
  (Rule.copy_of) right after the rule that reads the same parameters, so
  that both are written from one read (one group of `export_checkpoint`)."""
  copies: dict[tuple, list[Rule]] = {}
  for r in rules:
    if r.copy_of:
      copies.setdefault(r.ours, []).append(r)
  out = []
  for r in rules:
    if not r.copy_of:
      out += [r, *copies.pop(r.ours, [])]
  return out + [r for rs in copies.values() for r in rs]


def _placement(c, mesh: str | None):
  """path -> the sharding a parameter is read onto: the host CPU's one device
  for mesh None, else the run's rules on state.mesh_for_use(c, mesh)."""
  if mesh is None:
    host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    return lambda path: host
  c, m = statelib.mesh_for_use(c, mesh)
  if m is None:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return lambda path: one
  c = c.copy_and_resolve_references()
  c.model.scan_layers = False  # the export reads per-layer names, whatever the layout
  V, spec = statelib.vocab_size_of(c), cfglib.model_spec(c)
  with sharding.use(m, c):  # as state.load_model places a model
    abstract = nnx.eval_shape(lambda: statelib.model_class(c)(spec, V, rngs=nnx.Rngs(0)))
    shardings = nnx.get_named_sharding(nnx.state(abstract), m)
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  by_path = {paramslib.path_str(kp): s for kp, s in flat}
  return lambda path: by_path[path]


def hf_folder_of(workdir: str) -> str:
  """The hf/ folder of an imported run, or of the run its weights came from
  (train.init_from, followed back): its config.json and tokenizer files are
  what an export starts from. "" when there is none (a run trained here)."""
  for _ in range(16):
    if os.path.exists(os.path.join(workdir, "hf", "config.json")):
      return os.path.join(workdir, "hf")
    try:
      source = ckptlib.read_config(workdir).train.init_from
    except RunError:
      return ""
    if not source:
      return ""
    workdir = finetune.parse_source(source)[0]
  return ""
