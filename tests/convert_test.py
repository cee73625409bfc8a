"""Hugging Face checkpoints in and out (sparse_lm/convert/), against golden
fixtures made by transformers itself (tests/fixtures/hf/make_fixtures.py):
tiny random Mixtral, DBRX, Qwen2-MoE, Qwen3-MoE and OLMoE models, their
float32 logits and 16 greedy tokens. Neither torch nor transformers is
needed here: the fixtures are read with safetensors' numpy API. The tests
run over every fixture folder, so a new family is tested by adding its
module (sparse_lm/convert/families/) and its fixtures."""

import json
import pathlib
import shutil
import sys

from flax import nnx
from helpers import cli
from helpers import in_process
from helpers import one_line_error
from helpers import run
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib
from sparse_lm import convert
from sparse_lm import decode
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.convert import describe
from sparse_lm.convert import importer
from sparse_lm.errors import ConfigError
from sparse_lm.errors import ConvertError

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf"
FAMILIES = sorted(p.parent.name for p in FIX.glob("*/config.json"))  # mixtral_fused: fused experts
# The decoder-only ones; the encoder-decoder's logits and tokens (two inputs,
# a decoder start): tests/switch_transformers_test.py.
DECODERS = [
  f
  for f in FAMILIES
  if not json.loads((FIX / f / "config.json").read_text()).get("is_encoder_decoder")
]
TOL = 1e-4  # float32
EP_MESH = (("data", 1), ("fsdp", 1), ("expert", 8), ("tensor", 1))


def golden(family):
  return load_file(FIX / family.removesuffix("_fused") / "golden.safetensors")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """family -> the workdir it was imported into (once per module)."""
  done = {}

  def get(family):
    if family not in done:
      wd = tmp_path_factory.mktemp("imported") / family
      convert.import_checkpoint(str(FIX / family), str(wd), say=lambda *a: None)
      done[family] = wd
    return done[family]

  return get


def max_diff(model, family, mesh=None, config=None):
  ids = jnp.asarray(golden(family)["input_ids"])
  if mesh is None:
    logits = model(ids)[0]
  else:  # the batch axis is split over the mesh's 8 devices: 4 copies of the 2 rows
    with sharding.use(mesh, config):
      logits = model(jnp.tile(ids, (4, 1)))[0]
    logits = np.asarray(logits).reshape(4, *ids.shape, -1)
  return float(np.abs(np.asarray(logits) - golden(family)["logits"]).max())


def greedy(model, family, rows=1, **kw):
  g = golden(family)
  out = decode.generate(model, [g["prompt"][0].tolist()] * rows, max_new_tokens=16, **kw)
  assert all(t == out.tokens[0] for t in out.tokens)
  return out.tokens[0]


@pytest.mark.parametrize("family", DECODERS)
def test_import_matches_transformers(family, imported):
  # The decoding model: its prompt forward is the training forward here
  # (imports dispatch dropless; decode steps gather, checked by the tokens).
  model, _, _ = statelib.load_model(imported(family), inference=True)
  assert max_diff(model, family) < TOL
  assert greedy(model, family) == golden(family)["generated"][0].tolist()


def test_import_is_parameters_only_in_the_asked_dtype(imported, tmp_path):
  """The import's step 0 holds the model's parameters only (no optimizer
  state: about the parameters' bytes on disk, where AdamW's would triple
  them); --dtype=bfloat16 writes bfloat16, which loads as the run's float32
  parameters equal to the source's rounded to bfloat16."""
  wd = imported("olmoe")
  state_dir = wd / "checkpoints" / "0" / "state"
  assert not ckptlib.holds_optimizer(str(state_dir))
  meta = ckptlib.param_metadata(str(wd), 0)
  n = sum(int(np.prod(shape)) * dt.itemsize for shape, dt in meta.values())
  on_disk = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
  assert 0.8 * n < on_disk < 2 * n, (on_disk, n)
  bf = tmp_path / "bf16"
  out = convert.import_checkpoint(
    str(FIX / "olmoe"), str(bf), dtype="bfloat16", say=lambda *a: None
  )
  assert out["dtype"] == "bfloat16" and out["bytes"] == n // 2
  assert {str(dt) for _, dt in ckptlib.param_metadata(str(bf), 0).values()} == {"bfloat16"}
  params = lambda wd: nnx.to_flat_state(nnx.state(statelib.load_model(str(wd))[0], nnx.Param))
  for (path, a), (_, b) in zip(params(wd), params(bf)):
    a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
    assert b.dtype == np.float32, path
    np.testing.assert_array_equal(b, a.astype(jnp.bfloat16).astype(np.float32), err_msg=str(path))
  # The trainer's restore (train.py): the bfloat16 parameters-only step 0 comes
  # back as the float32 model part alone, and with_fresh_optimizer completes it.
  c = ckptlib.read_config(str(bf))
  V = statelib.vocab_size_of(c)
  _, abs_state, shd = statelib.abstract_state(c, V)
  ckpt = ckptlib.Checkpointer(str(bf), read_only=True)
  step, state, data = ckpt.restore_latest(ckptlib.target(abs_state, shd))
  ckpt.close()
  assert step == 0 and data == {"batches": 0} and set(state) == {0}
  with nnx.use_eager_sharding(False):  # one device: no mesh
    state = statelib.with_fresh_optimizer(c, V, state[0], shd)
  assert jax.tree.structure(state) == jax.tree.structure(abs_state)
  for kp, x in jax.tree_util.tree_leaves_with_path(state[1]):
    if jnp.issubdtype(x.dtype, jnp.floating):
      assert not np.any(np.asarray(x)), kp  # fresh moments
  restored = dict(nnx.to_flat_state(state[0]))
  for path, b in params(bf):
    np.testing.assert_array_equal(np.asarray(restored[path].get_value()), np.asarray(b.get_value()))


def test_import_onto_an_expert_parallel_mesh(tmp_path):
  """DBRX's 16 experts, 2 per device on 8 devices: the import records the
  mesh, load_model places the parameters shard by shard."""
  wd = tmp_path / "dbrx_ep"
  convert.import_checkpoint(str(FIX / "dbrx"), str(wd), EP_MESH, say=lambda *a: None)
  c = ckptlib.read_config(str(wd))
  mesh = sharding.make_mesh(c)
  assert dict(mesh.shape)["expert"] == 8
  model, c, _ = statelib.load_model(str(wd), inference=True, mesh=mesh)
  wi = model.blocks[0].ffn.wi[...]
  assert wi.sharding.shard_shape(wi.shape)[0] == 2
  assert max_diff(model, "dbrx", mesh, c) < TOL
  # (Decoding on an expert-parallel mesh gives the one-device tokens:
  # tests/inference_cli_test.py's every-mesh test.)


def test_a_wrong_mapping_fails_the_logits_test(imported, tmp_path):
  """The check can fail: one expert's weights swapped, or RoPE's pairs
  flipped, and the logits are far from transformers'."""
  model, _, _ = statelib.load_model(imported("mixtral"))
  wg = model.blocks[0].ffn.wg
  wg[...] = wg[...][jnp.array([1, 0, 2, 3])]
  assert max_diff(model, "mixtral") > 1e-2
  flipped = tmp_path / "flipped"
  shutil.copytree(imported("mixtral"), flipped)
  cfg = json.loads((flipped / "config.json").read_text())
  cfg["model"]["rope_layout"] = "interleaved"
  (flipped / "config.json").write_text(json.dumps(cfg))
  model, c, _ = statelib.load_model(str(flipped))
  assert c.model.rope_layout == "interleaved"
  assert max_diff(model, "mixtral") > 1e-2


def _hub_tensors(family):
  """The hub-layout tensors transformers wrote for `family` (the fused
  fixture's hub twin is the per-expert mixtral one)."""
  return load_file(FIX / family.removesuffix("_fused") / "model.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_export_is_the_hub_layout_and_round_trips_bit_exact(family, imported, tmp_path):
  out = tmp_path / "exported"
  convert.export_checkpoint(str(imported(family)), str(out), shard_mb=0.05, say=lambda *a: None)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  got = {}
  for shard in sorted(set(index["weight_map"].values())):
    got.update(load_file(out / shard))
  want = _hub_tensors(family)
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
    assert np.array_equal(got[name], w), name  # float32 in, float32 out: bit-exact
  hf_cfg = json.loads((FIX / family.removesuffix("_fused") / "config.json").read_text())
  out_cfg = json.loads((out / "config.json").read_text())
  for k, v in hf_cfg.items():
    if k == "num_nextn_predict_layers":  # an MTP layer transformers did not save:
      v = 0  # imported without it, exported as 0 (tests/deepseek_v3_test.py)
    if k not in ("transformers_version",):
      assert out_cfg.get(k) == v, (k, out_cfg.get(k), v)
  # export -> import is the identity: the importer reads the tensors (equal to
  # the hub's above, bit for bit), config.json through the family's keys and
  # the tokenizer files, so import(export) = import(hub) when the keys give
  # the same config and the files are the same. (A full re-import of an
  # export: tests/deepseek_v3_test.py's MTP case.)
  hub = FIX / family.removesuffix("_fused")
  (fa, ca), (fb, cb) = importer.hf_to_config(str(hub)), importer.hf_to_config(str(out))
  ca.data.tokenizer_file = cb.data.tokenizer_file = ""
  if "num_nextn_predict_layers" in hf_cfg:  # the import drops the MTP layer it lacks (above)
    ca.model.mtp_depth = 0
  assert fa.name == fb.name and ca.to_dict() == cb.to_dict()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (out / name).read_bytes() == (hub / name).read_bytes(), name
  if family.endswith("_fused"):  # and import(hub) = import(fused): the same parameters
    a, b = _params(imported(family)), _params(imported(str(hub.name)))
    assert sorted(a) == sorted(b)
    for k in a:
      assert np.array_equal(a[k], b[k]), k


def _params(workdir) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top

  model, _, _ = statelib.load_model(str(workdir))
  return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_export_in_bfloat16_on_every_mesh_writes_the_same_bytes(imported, tmp_path):
  # Read whole into host memory (the default), or onto this process's 8
  # simulated devices sharded by the run's rules (--mesh=fsdp, or a mesh that
  # puts one expert on each) and gathered: the same file.
  files = {}
  for mesh in (None, "fsdp", str(EP_MESH)):
    out = tmp_path / f"bf16_{mesh}"
    convert.export_checkpoint(str(imported("olmoe")), str(out), dtype="bfloat16", mesh=mesh)
    files[mesh] = (out / "model.safetensors").read_bytes()
  t = load_file(tmp_path / "bf16_None" / "model.safetensors")
  assert {str(v.dtype) for v in t.values()} == {"bfloat16"}
  assert json.loads((tmp_path / "bf16_None" / "config.json").read_text())["dtype"] == "bfloat16"
  assert len(set(files.values())) == 1, [len(v) for v in files.values()]


def test_export_of_a_run_trained_here(tmp_path):
  """A run of configs/mixtral.py:tiny (no hf/ folder): config.json built from
  scratch; importing the export gives the same logits."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  c = cfglib.load_config("configs/mixtral.py:tiny")
  c.model.d_model, c.model.d_ff, c.data.vocab_size = 32, 64, 320
  c.data.tokenizer, c.data.tokenizer_file = "huggingface", str(FIX / "mixtral" / "tokenizer.json")
  cfglib.validate(c)
  wd = tmp_path / "native"
  mesh = sharding.make_mesh(c)
  with sharding.use(mesh, c):
    _, _, shd = statelib.abstract_state(c, 320, mesh)
    state = jax.jit(lambda: nnx.state(statelib.create(c, 320)), out_shardings=shd)()
  ck = ckptlib.Checkpointer(str(wd), say=lambda *a: None)
  ck.save(0, state, {"batches": 0})
  ck.close()
  ckptlib.save_config(c, str(wd), {})
  out = tmp_path / "exported"
  convert.export_checkpoint(str(wd), str(out))
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 8
  shutil.copy(FIX / "mixtral" / "tokenizer.json", out)
  shutil.copy(FIX / "mixtral" / "tokenizer_config.json", out)
  convert.import_checkpoint(str(out), str(tmp_path / "back"), say=lambda *a: None)
  ids = jnp.asarray(golden("mixtral")["input_ids"])
  m1, _, _ = statelib.load_model(str(wd))
  m2, _, _ = statelib.load_model(str(tmp_path / "back"))
  assert np.array_equal(np.asarray(m1(ids)[0]), np.asarray(m2(ids)[0]))


def test_every_family_has_fixtures_and_its_keys_map_back():
  """Each family in sparse_lm/convert/families has a fixture folder, its keys
  name keys of our config, and config.json -> our config -> config.json ->
  our config gives the same model block (over the source's config.json, or
  from scratch: the context length and router_z_loss_coef are read, never
  written)."""
  assert sorted(convert.FAMILIES) == sorted({f.removesuffix("_fused") for f in FAMILIES})
  ours = cfglib.base_config()
  for fam in convert.FAMILIES.values():
    for key in fam.keys:
      for k in key.ours:
        describe.get(ours, k)  # raises where our config has no such key
    src = json.loads((FIX / fam.name / "config.json").read_text())
    assert convert.family_of(src, "config.json") is fam
    c = convert.config_of(fam, src)
    for base in (src, {}):
      back = convert.config_of(fam, convert.hf_config(fam, c, base))
      back.data.seq_len, back.model.moe.z_loss_weight = c.data.seq_len, c.model.moe.z_loss_weight
      assert back.model.to_dict() == c.model.to_dict(), fam.name


def test_export_refuses_what_the_family_cannot_hold(tmp_path, imported):
  with pytest.raises(
    ConvertError,
    match=r"config.model.moe.router='topk' cannot be exported as MixtralForCausalLM",
  ):
    convert.export_checkpoint(str(imported("olmoe")), str(tmp_path / "x"), family="mixtral")
  assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- bad input


def _copy(tmp_path, family="mixtral"):
  d = tmp_path / f"{family}_src"
  shutil.copytree(FIX / family, d)
  return d


def _edit_config(d, **kv):
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(kv)
  (d / "config.json").write_text(json.dumps(cfg))


def _add_tensor(d, name):
  t = load_file(d / "model.safetensors")
  t[name] = np.zeros((32, 32), np.float32)
  save_file(t, d / "model.safetensors")


def _drop_tensor(d, name):
  t = load_file(d / "model.safetensors")
  del t[name]
  save_file(t, d / "model.safetensors")


BAD = [
  ("no config.json", lambda d: (d / "config.json").unlink(), "config.json: no such file"),
  ("no weights", lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
  (
    "unknown architecture",
    lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]),
    "architectures ['GPT2LMHeadModel'] is not one of",
  ),
  (
    "a shape that disagrees",
    lambda d: _edit_config(d, intermediate_size=48),
    "tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape [32, 32], "
    "config.json implies [48, 32]",
  ),
  (
    "a missing expert",
    lambda d: _drop_tensor(d, "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
    "an expert's weight 'model.layers.1.block_sparse_moe.experts.3.w2.weight' is missing",
  ),
  (
    "an expert config.json does not count",
    lambda d: _add_tensor(d, "model.layers.0.block_sparse_moe.experts.4.w1.weight"),
    "tensor 'model.layers.0.block_sparse_moe.experts.4.w1.weight' (and 0 more) is not used",
  ),
  (
    "a shard the index names",
    lambda d: (d / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    ),
    "model-00002-of-00002.safetensors: named in model.safetensors.index.json but missing",
  ),
  ("sliding window", lambda d: _edit_config(d, sliding_window=16), "sliding_window=16"),
  ("no tokenizer", lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: no such file"),
]


@pytest.mark.parametrize("what,spoil,message", BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoint_is_one_line_and_writes_nothing(what, spoil, message, tmp_path):
  src = _copy(tmp_path)
  spoil(src)
  wd = tmp_path / "run"
  with pytest.raises(ConvertError) as e:
    convert.import_checkpoint(str(src), str(wd), say=lambda *a: None)
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not wd.exists() and not list(tmp_path.glob("run.importing-*"))


def test_import_never_overwrites_a_run(imported):
  wd = imported("olmoe")
  before = sorted(p.name for p in wd.iterdir())
  with pytest.raises(ConvertError, match="already holds a run"):
    convert.import_checkpoint(str(FIX / "mixtral"), str(wd))
  assert sorted(p.name for p in wd.iterdir()) == before


# ------------------------------------------------------- the command lines


def test_cli_import_generate_finetune_and_errors(tmp_path, tfds_dir, monkeypatch):
  """The README's commands: import, generate with the checkpoint's tokenizer,
  fine-tune from it (configs/finetune/imported.py), export; and a bad
  checkpoint is one line, exit 1. The bad import runs as a real process (the
  contract: exit status 1, one line on stderr); the other command lines run
  in this process (in_process: each program's own flags, parser and main)."""
  wd, ft = tmp_path / "olmoe", tmp_path / "olmoe_ft"
  p = in_process(
    [
      sys.executable,
      "-m",
      "sparse_lm.convert",
      "import",
      f"--hf_dir={FIX / 'olmoe'}",
      f"--workdir={wd}",
    ],
    monkeypatch=monkeypatch,
  )
  assert p.returncode == 0, p.stderr[-2000:]
  assert "imported olmoe (per_expert experts, 54,048 parameters, " in p.stdout
  p = in_process(
    [
      sys.executable,
      "-m",
      "sparse_lm.generate",
      f"--workdir={wd}",
      "--prompt=def fib(n):",
      "--max_new_tokens=8",
    ],
    monkeypatch=monkeypatch,
  )
  assert p.returncode == 0, p.stderr[-2000:]
  assert "def fib(n):" in p.stdout
  args = cli(
    ft,
    tfds_dir,
    "--config.data.dataset=stdlib",
    "--config.train.num_steps=2",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2",
    "--config.train.cooldown_steps=0",
    "--config.train.warmup_steps=1",
    config=f"configs/finetune/imported.py:{wd}",
  )
  args = [a for a in args if not a.startswith(("--config.model.", "--config.data.vocab_size"))]
  p = run(args)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "copied from" in p.stdout or "init" in p.stdout
  c = ckptlib.read_config(str(ft))
  assert c.data.tokenizer == "huggingface" and c.model.qk_norm == "full"
  p = in_process(
    [
      sys.executable,
      "-m",
      "sparse_lm.convert",
      "export",
      f"--workdir={ft}",
      f"--hf_dir={tmp_path / 'out'}",
    ],
    monkeypatch=monkeypatch,
  )
  assert p.returncode == 0, p.stderr[-2000:]
  assert sorted(load_file(tmp_path / "out" / "model.safetensors")) == sorted(_hub_tensors("olmoe"))
  bad = _copy(tmp_path, "olmoe")
  _edit_config(bad, architectures=["NoSuchForCausalLM"])
  p = run(
    [
      sys.executable,
      "-m",
      "sparse_lm.convert",
      "import",
      f"--hf_dir={bad}",
      f"--workdir={tmp_path / 'x'}",
    ]
  )
  one_line_error(p, "NoSuchForCausalLM", "is not one of")
  assert not (tmp_path / "x").exists()


def test_imported_config_file_is_valid(imported):
  c = cfglib.load_config(f"configs/finetune/imported.py:{imported('qwen2_moe')}")
  cfglib.validate(c)
  assert c.train.init_from == str(imported("qwen2_moe"))
  assert c.model.moe.shared_expert_gate and c.model.qkv_bias


def test_huggingface_tokenizer_kind():
  """The checkpoint's tokenizer.json: its <s> in front (as transformers'
  tokenizer(text)), decode drops it, eos from tokenizer_config.json, no pad
  (every target counts), a model vocabulary smaller than it refused."""
  from sparse_lm.data import pipeline  # pylint: disable=g-import-not-at-top
  from sparse_lm.data import tokenizer as toklib  # pylint: disable=g-import-not-at-top

  tok = toklib.HuggingFaceTokenizer(str(FIX / "mixtral" / "tokenizer.json"), 320)
  ids = tok.encode("def fib(n): return n")
  assert tok.prefix_ids == (1,) and ids[0] == 1 and tok.eos_id == 2 and tok.pad_id is None
  assert tok.decode(ids) == "def fib(n): return n"
  assert tok.fingerprint["kind"] == "huggingface" and len(tok.fingerprint["sha256"]) == 16
  with pytest.raises(ConfigError, match="vocab_size=100 is smaller than"):
    toklib.HuggingFaceTokenizer(str(FIX / "mixtral" / "tokenizer.json"), 100)
  c = cfglib.base_config()
  c.data.tokenizer, c.data.tokenizer_file, c.data.vocab_size = "huggingface", "/no/such.json", 320
  with pytest.raises(ConfigError, match=r"tokenizer_file='/no/such.json': no such file"):
    pipeline.make_tokenizer(c.data)


def test_convert_defines_its_flags_only_as_a_program():
  """Tests import convert beside sweep (both name --workdir): CI once failed
  collecting sweep_test with a DuplicateFlagError."""
  code = "import sparse_lm.convert, sparse_lm.sweep, sparse_lm.evaluate, sparse_lm.inspect"
  p = run([sys.executable, "-c", code])
  assert p.returncode == 0, p.stderr[-2000:]


def test_a_sliding_window_turned_off_is_not_refused(tmp_path):
  """Qwen's configs name a window that use_sliding_window=false turns off."""
  src = _copy(tmp_path, "qwen2_moe")
  _edit_config(src, sliding_window=32768, use_sliding_window=False)
  fam, c = convert.hf_to_config(str(src))
  assert fam.name == "qwen2_moe" and c.model.moe.shared_expert_gate
  _edit_config(src, use_sliding_window=True)
  with pytest.raises(ConvertError, match="sliding_window=32768"):
    convert.hf_to_config(str(src))
