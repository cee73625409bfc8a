"""Import: a Hugging Face checkpoint folder -> a run workdir, read through
its family's description (config keys, tensor rules)."""

from __future__ import annotations

import json
import os
import shutil

from flax import nnx
import jax
from jax.experimental import multihost_utils
import ml_dtypes
import numpy as np

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib
from sparse_lm import params as paramslib
from sparse_lm import state as statelib
from sparse_lm.convert import describe
from sparse_lm.convert import fp8
from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import Rule
from sparse_lm.convert.families import family_of
from sparse_lm.convert.mxfp4 import dequantized
from sparse_lm.convert.safetensors_io import CHUNK_BYTES
from sparse_lm.convert.safetensors_io import Tensors
from sparse_lm.convert.safetensors_io import aligned_empty
from sparse_lm.convert.safetensors_io import read_rows
from sparse_lm.data import seq2seq
from sparse_lm.data import tokenizer as toklib
from sparse_lm.errors import ConfigError
from sparse_lm.errors import ConvertError
from sparse_lm.models.moe.layer import RouterState

# ------------------------------------------------------------------ config


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise ConvertError(f"--hf_dir={hf_dir}: no such folder")
  if not os.path.exists(path):
    raise ConvertError(f"{path}: no such file (a Hugging Face checkpoint folder has config.json)")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ConvertError(f"{path}: not JSON ({e})") from None


def source_dtype(hf: dict) -> str:
  """The checkpoint's tensor dtype as config.json names it: `dtype`
  (transformers 5) or `torch_dtype` (4.x, the released configs)."""
  return hf.get("dtype") or hf.get("torch_dtype") or "float32"


def hf_value(key: Key, hf: dict):
  """(the spelling read, the value) of `key` in config.json: its first
  spelling present and not null (null counts where `values` lists None),
  else its default."""
  null_is_value = key.values is not None and None in key.values
  for name in key.hf + key.legacy:
    v = describe.lookup(hf, name)
    if v is not describe.MISSING and (v is not None or null_is_value):
      return name, v
  name = key.hf[0]
  if key.default is describe.REQUIRED:
    raise ConvertError(f"config.json has no {name!r}")
  return name, key.default(hf) if callable(key.default) else key.default


def _apply(key: Key, hf: dict, c):
  """Sets the our-config values of `key` from config.json, or refuses it."""
  if key.is_fixed:
    if key.to_ours is not None:
      describe.put(c, key.ours[0], key.fixed(c) if callable(key.fixed) else key.fixed)
    return
  if key.read is None and key.to_ours is None and key.refuse is None:
    return  # written on export only
  name, v = (key.hf[0] if key.hf else "", key.read(hf)) if key.read else hf_value(key, hf)
  if key.refuse is not None and key.refuse(v):
    raise ConvertError(f"config.json {name}={v!r}: {key.why}")
  if key.values is not None:
    if not isinstance(v, (str, int, float, type(None))) or v not in key.values:
      raise ConvertError(f"config.json {name}={v!r}: {key.why}")
    v = key.values[v]
  elif key.to_ours is None:
    return
  else:
    v = key.to_ours(v)
  for k, x in zip(key.ours, v if len(key.ours) > 1 else (v,)):
    describe.put(c, k, x)


def config_of(fam: Family, hf: dict):
  """Our config for a config.json of family `fam` (not yet validated)."""
  c = cfglib.base_config()
  for key in fam.keys:
    _apply(key, hf, c)
  return c


def hf_to_config(hf_dir: str):
  """(family, our config) of a checkpoint folder's config.json, validated."""
  hf = read_hf_config(hf_dir)
  fam = family_of(hf, os.path.join(hf_dir, "config.json"))
  c = config_of(fam, hf)
  c.data.tokenizer, c.data.tokenizer_file = "huggingface", os.path.join(hf_dir, "tokenizer.json")
  try:
    cfglib.validate(c)
  except ConfigError as e:
    raise ConvertError(f"{hf_dir}/config.json gives an invalid config: {e}") from None
  return fam, c


# ------------------------------------------------------------------ tensors


def _layout(t: Tensors) -> bool:
  """True for transformers 5's fused expert layout (experts.gate_up_proj)."""
  return any(n.endswith("experts.gate_up_proj") for n in t.names())


def hf_names(rule: Rule, E: int) -> list[str]:
  """The checkpoint's tensors a rule reads (or writes), experts expanded."""
  if not rule.per_expert:
    return list(rule.hf)
  return [n.format(j=j) for n in rule.hf for j in range(E)]


def check_tensors(rules: list[Rule], t: Tensors, spec, shapes: dict[str, tuple]):
  """Every tensor the rules read is there with the shape the config implies,
  and no tensor is left unread: one line naming the first that is not."""
  E = spec.moe.num_experts
  wanted: set[str] = set()
  for r in rules:
    names = hf_names(r, E)
    if r.optional and not all(n in t for n in names):
      continue  # a copy the checkpoint lacks (Rule.optional)
    for n in names:
      if n not in t:
        what = "an expert's weight" if r.per_expert else "a tensor"
        raise ConvertError(f"{t.dir}: {what} {n!r} is missing from the checkpoint")
    wanted.update(names)
    # The expected hf shapes: our (abstract) parameters mapped back.
    zeros = [np.zeros(shapes[o][1:] if r.per_expert else shapes[o], np.float32) for o in r.ours]
    for n, want in zip(r.hf, r.to_hf(*zeros)):
      for name in [n.format(j=j) for j in range(E)] if r.per_expert else [n]:
        if t.shape(name) != want.shape:
          raise ConvertError(
            f"{t.dir}: tensor {name!r} has shape {list(t.shape(name))}, config.json implies "
            f"{list(want.shape)}"
          )
  extra = [n for n in t.names() if n not in wanted and not n.endswith("rotary_emb.inv_freq")]
  if extra:
    raise ConvertError(
      f"{t.dir}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not used by the "
      f"{spec.moe.num_experts}-expert config of config.json; a mapping is missing"
    )


def param_source(rules: list[Rule]) -> dict[str, tuple[Rule, int]]:
  """{our parameter path ("blocks/0/attn/wq"): (its rule, its index in
  rule.ours)}: the rule that reads it, never a copy (Rule.copy_of)."""
  return {o: (r, k) for r in rules if not r.copy_of for k, o in enumerate(r.ours)}


def check_copies(rules: list[Rule], t: Tensors, say=print):
  """Each copy tensor (Rule.copy_of, its shape checked by check_tensors)
  compared with the tensor it repeats, a block of rows of each at a time
  (the host holds two blocks): a note where they differ, since the import
  reads the original (our parameters share what the copy repeats)."""
  for r in rules:
    if not r.copy_of or (r.optional and r.hf[0] not in t):
      continue
    name, of = r.hf[0], r.copy_of
    if of not in t:
      raise ConvertError(f"{t.dir}: tensor {of!r} is missing from the checkpoint")
    if t.shape(of) != t.shape(name):
      raise ConvertError(
        f"{t.dir}: tensor {name!r} has shape {list(t.shape(name))}; it repeats {of!r}, "
        f"of shape {list(t.shape(of))}"
      )
    rows, width = t.shape(of)[0], int(np.prod(t.shape(of)[1:], dtype=np.int64))
    step, diff = max(1, CHUNK_BYTES // max(1, 4 * width)), 0.0
    for i in range(0, rows, step):
      a, b = (t.rows(n, i, min(rows, i + step)) for n in (name, of))
      if not np.array_equal(a, b):
        diff = max(diff, float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32)))))
      del a, b
    if diff:
      say(
        f"note: {name} differs from {of} (max |difference| {diff:.3g}); imported as {of} "
        "(our model shares it)"
      )


def without_mtp(fam: Family, c, rules: list[Rule], t: Tensors, E: int, say=print) -> bool:
  """Sets c.model.mtp_depth to 0 where config.json names MTP layers
  (model.mtp_depth > 0) but the checkpoint holds none of their tensors (a
  checkpoint transformers saved: it does not build them); says so in one
  line. True where it did."""
  mtp = [n for r in rules if any(o.startswith("mtp/") for o in r.ours) for n in hf_names(r, E)]
  if not mtp or any(n in t for n in mtp):
    return False
  key = next((k.hf[0] for k in fam.keys if "model.mtp_depth" in k.ours), "model.mtp_depth")
  say(
    f"note: config.json {key}={c.model.mtp_depth} but {t.dir} holds no tensor of those "
    f"layers (e.g. {mtp[0]!r}): imported without multi-token prediction (model.mtp_depth=0)"
  )
  c.model.mtp_depth = 0
  return True


def _read(t: Tensors, rule: Rule, k: int, shape, dtype=np.float32) -> np.ndarray:
  """Our parameter rule.ours[k] (of `shape`) as `dtype`, in one aligned array
  (safetensors_io.aligned_empty), made so that the host holds little else: a
  rule that says how its rows map (Rule.rows) is read a block of rows at a
  time, a routed expert array one expert at a time, anything else whole."""
  if rule.rows and not rule.per_expert and len(rule.hf) == 1:
    return read_rows(t, rule.hf[0], rule.rows, shape, dtype)
  out = aligned_empty(shape, dtype)
  if not rule.per_expert:
    out[...] = rule.to_ours(*(t.get(n) for n in rule.hf))[k]
    return out
  for j in range(shape[0]):
    out[j] = rule.to_ours(*(t.get(n.format(j=j)) for n in rule.hf))[k]
  return out


# ------------------------------------------------------------------ import


def import_checkpoint(hf_dir: str, workdir: str, mesh_spec=None, dtype=None, say=print) -> dict:
  """Writes `workdir` from the checkpoint folder `hf_dir`: a run whose step 0
  is a parameters-only checkpoint in `dtype` (default the source's), written
  from host memory one tensor at a time (no accelerator, no optimizer state:
  the run that starts from it makes that). mesh_spec: the run's config.mesh.
  Returns a summary."""

  hf_dir, workdir = (
    os.path.abspath(os.path.expanduser(hf_dir)),
    os.path.abspath(os.path.expanduser(workdir)),
  )
  fam, c = hf_to_config(hf_dir)
  if mesh_spec is not None:
    c.mesh = mesh_spec
    cfglib.validate(c)
  if not os.path.exists(c.data.tokenizer_file):
    raise ConvertError(
      f"{c.data.tokenizer_file}: no such file (the run needs the checkpoint's tokenizer)"
    )
  c.data.tokenizer_file = os.path.join(workdir, "hf", "tokenizer.json")
  if os.path.exists(os.path.join(workdir, "config.json")) or os.path.isdir(
    os.path.join(workdir, "checkpoints")
  ):
    raise ConvertError(f"--workdir={workdir} already holds a run; import into a new folder")
  t = fp8.dequantized(dequantized(Tensors(hf_dir)))  # MXFP4 / FP8 read as floats (mxfp4.py, fp8.py)
  spec = cfglib.model_spec(c)
  fused = _layout(t)
  rules = fam.rules(spec, fused)
  if without_mtp(fam, c, rules, t, spec.moe.num_experts, say):
    spec = cfglib.model_spec(c)
    rules = fam.rules(spec, fused)
  V = c.data.vocab_size

  out_dtype = np_dtype(dtype or source_dtype(read_hf_config(hf_dir)))
  model = statelib.abstract_model(c, V)
  variables = {paramslib.path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
  read_in = (nnx.Param, RouterState)  # DeepSeek-V3's e_score_correction_bias is routing state
  shapes = {p: tuple(v.get_value().shape) for p, v in variables.items() if isinstance(v, read_in)}
  check_tensors(rules, t, spec, shapes)
  check_copies(rules, t, say)
  src = param_source(rules)
  missing = sorted(set(shapes) - set(src))
  if missing:
    raise ConvertError(f"no mapping makes our parameter {missing[0]!r} ({len(missing)} in all)")

  def leaves():
    """(path, array) of every model variable, one made at a time from the
    memory-mapped files: a parameter through its rule, in the written dtype;
    routing state (no tensor holds it) as its zeros."""
    for path, v in variables.items():
      if path in shapes:
        rule, k = src[path]
        yield path, _read(t, rule, k, shapes[path], out_dtype)
      else:
        yield path, np.zeros(v.get_value().shape, v.get_value().dtype)

  # Nothing was written before this point: every check above is on input.
  # One staging folder, named the same by every process; process 0 makes,
  # fills and renames it; the others write their part of the checkpoint into
  # it between barriers (Orbax writes the arrays from process 0).
  staging, lead = f"{workdir}.importing", jax.process_index() == 0
  sync = lambda what: jax.process_count() > 1 and multihost_utils.sync_global_devices(what)
  if lead:
    shutil.rmtree(staging, ignore_errors=True)  # a killed import's
    os.makedirs(os.path.join(staging, "hf"))
  sync("import: staging folder made")
  try:
    if lead:
      for name in ("config.json", "generation_config.json", *toklib.TOKENIZER_FILES):
        if os.path.exists(os.path.join(hf_dir, name)):
          shutil.copy(os.path.join(hf_dir, name), os.path.join(staging, "hf", name))
      _ensure_eos(staging, hf_dir)
    sync("import: tokenizer files copied")
    tok = toklib.HuggingFaceTokenizer(os.path.join(staging, "hf", "tokenizer.json"), V)
    tok_fp = dict(tok.fingerprint, path=c.data.tokenizer_file)
    say(f"writing {len(variables)} arrays ({out_dtype.name}) into {staging}")
    written = ckptlib.write_params(staging, 0, leaves(), {"batches": 0}, say=say)
    fp = {"tokenizer": tok_fp, "imported_from": hf_dir}
    if c.data.get("objective") == "seq2seq":  # NLLB-MoE: its tokenizer's language tokens,
      fp["languages"] = seq2seq.tokenizer_languages(tok)  # no ids reserved above its vocabulary
    ckptlib.save_config(c, staging, fp)
    if lead:
      with open(os.path.join(staging, "hf", "import.json"), "w") as f:
        json.dump(
          {
            "family": fam.name,
            "layout": "fused" if fused else "per_expert",
            "from": hf_dir,
            "dtype": source_dtype(read_hf_config(hf_dir)),
            "written_dtype": out_dtype.name,
          },
          f,
        )
      os.makedirs(os.path.dirname(workdir) or ".", exist_ok=True)
      if os.path.isdir(workdir) and not os.listdir(workdir):
        os.rmdir(workdir)
      os.rename(staging, workdir)
    sync("import: renamed")
  except BaseException:
    if lead:
      shutil.rmtree(staging, ignore_errors=True)
    raise
  n = sum(int(np.prod(s)) for s in shapes.values())
  out = {"family": fam.name, "layout": "fused" if fused else "per_expert", "params": n}
  out["mtp_depth"] = c.model.mtp_depth
  return {**out, "bytes": written, "dtype": out_dtype.name}


def np_dtype(name: str) -> np.dtype:
  """A numpy dtype from config.json's / --dtype's name."""
  names = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
  if name not in names:
    raise ConvertError(f"dtype {name!r}: one of {', '.join(names)}")
  return np.dtype(names[name])


def _ensure_eos(staging: str, hf_dir: str):
  """tokenizer_config.json names eos_token (from config.json's eos_token_id
  when the checkpoint's does not)."""
  tc = os.path.join(staging, "hf", "tokenizer_config.json")
  tj = os.path.join(staging, "hf", "tokenizer.json")
  if not os.path.exists(tj):
    return
  cfg = {}
  if os.path.exists(tc):
    with open(tc) as f:
      cfg = json.load(f)
  if cfg.get("eos_token"):
    return
  eos = read_hf_config(hf_dir).get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos
  import tokenizers  # pylint: disable=g-import-not-at-top

  token = tokenizers.Tokenizer.from_file(tj).id_to_token(eos) if eos is not None else None
  if token is None:
    raise ConvertError(
      f"{hf_dir}: neither tokenizer_config.json nor config.json names an eos token"
    )
  cfg["eos_token"] = token
  with open(tc, "w") as f:
    json.dump(cfg, f, indent=1)
