"""sparse_lm.generate and sparse_lm.evaluate through the CLI, on a trained tiny checkpoint.

Each program runs as a real process once (an error case: exit status 1, one
line on stderr); every other command line runs in this process (in_process:
the program's own flags, parser and main, a UserError printed by cli.fail),
which spares a Python + JAX start and the compiles of a child per scenario.
"""

import json
import os
import shutil
import sys

from helpers import cli
from helpers import in_process
from helpers import rows
from helpers import run
import numpy as np
import pytest

PROMPTS = ["def fib(n):", "import os", "class A:", "x = [", "for i in", "print(", "# ", "if x"]
EP_MESH = "(('data', 1), ('fsdp', 1), ('expert', 8), ('tensor', 1))"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  """A tiny Switch run (8 experts, GQA off), 40 steps; returns its workdir."""
  wd = str(tmp_path_factory.mktemp("inference") / "switch")
  p = run(
    cli(
      wd,
      tfds_dir,
      "--config.train.num_steps=40",
      "--config.train.eval_every=40",
      config="configs/switch.py:tiny",
    )
  )
  assert p.returncode == 0, p.stderr[-3000:]
  return wd


def generate_cmd(wd, *args):
  return [sys.executable, "-m", "sparse_lm.generate", f"--workdir={wd}", *args]


def evaluate_cmd(wd, *args):
  return [sys.executable, "-m", "sparse_lm.evaluate", f"--workdir={wd}", *args]


def generate(wd, *args, monkeypatch):
  """The generate command line, run in this process."""
  return in_process(generate_cmd(wd, *args), monkeypatch=monkeypatch)


def test_greedy_generation_is_deterministic_and_writes_jsonl(trained, tmp_path, monkeypatch):
  outs = []
  for i in range(2):
    out = str(tmp_path / f"g{i}.jsonl")
    p = generate(
      trained,
      "--prompt=def fib(n):",
      "--prompt=import os",
      "--max_new_tokens=12",
      f"--output={out}",
      "--expert_choices",
      monkeypatch=monkeypatch,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tokens/s" in p.stdout and "no compile in them" in p.stdout  # rate without compiles
    outs.append([json.loads(l) for l in open(out)])
  assert outs[0] == outs[1]
  first = outs[0][0]
  assert first["prompt"] == "def fib(n):" and isinstance(first["completion"], str)
  assert 1 <= len(first["tokens"]) <= 12
  assert len(first["experts"]) == len(first["tokens"])  # one MoE layer, top-1: [[e]] per token
  assert all(len(e) == 1 and 0 <= e[0][0] < 8 for e in first["experts"])


def test_every_mesh_generates_the_same_tokens(trained, tmp_path, monkeypatch):
  # This process has 8 (simulated) devices: --mesh=one puts the model on the
  # first, the default (fsdp) shards its parameters over the 8, and the
  # expert-parallel mesh puts one expert on each.
  prompts = tmp_path / "p.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  args = [
    f"--prompts={prompts}",
    "--max_new_tokens=8",
    "--temperature=0.9",
    "--top_p=0.9",
    "--seed=3",
  ]
  meshes = {"one": ["--mesh=one"], "fsdp": [], "ep": [f"--mesh={EP_MESH}"]}
  for name, mesh in meshes.items():
    out = f"--output={tmp_path / name}.jsonl"
    p = generate(trained, *args, out, *mesh, monkeypatch=monkeypatch)
    assert p.returncode == 0, (name, p.stderr[-2000:])
  toks = lambda name: [json.loads(l)["tokens"] for l in open(tmp_path / f"{name}.jsonl")]
  assert toks("one") == toks("fsdp") == toks("ep")
  assert len(toks("one")) == 8


def test_evaluate_reproduces_the_runs_eval_loss(trained, tmp_path, monkeypatch):
  out = str(tmp_path / "eval.json")
  p = in_process(evaluate_cmd(trained, "--batches=2", f"--output={out}"), monkeypatch=monkeypatch)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.load(open(out))
  final = [x["eval_loss"] for x in rows(trained) if "eval_loss" in x][-1]
  assert abs(r["loss"] - final) < 1e-4, (r["loss"], final)
  assert r["step"] == 40 and r["split"] == "validation" and r["tokens"] == 2 * 8 * 64
  layer = r["moe_layers"]["1"]
  assert len(layer["expert_fraction"]) == 8 and abs(sum(layer["expert_fraction"]) - 1) < 1e-5
  assert 0 < layer["gate_mean"] <= 1 + 1e-6, layer["gate_mean"]  # the chosen gates' mean sum
  assert "perplexity" in p.stdout or "loss" in p.stdout
  one = evaluate(
    trained, str(tmp_path / "one.json"), "--batches=2", "--mesh=one", monkeypatch=monkeypatch
  )
  assert abs(one["loss"] - r["loss"]) < 1e-6, (one["loss"], r["loss"])
  for k, v in r["moe_layers"]["1"].items():
    np.testing.assert_allclose(one["moe_layers"]["1"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def evaluate(wd, out, *args, monkeypatch):
  p = in_process(evaluate_cmd(wd, f"--output={out}", *args), monkeypatch=monkeypatch)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.load(open(out))


def test_eval_dropped_fraction_is_the_mean_over_the_eval_batches(tmp_path, tfds_dir, monkeypatch):
  # Issue 17, smell 2: the logged eval_moe/.../dropped_fraction was the last batch's.
  wd = str(tmp_path / "drops")
  args = ["--config.train.num_steps=10", "--config.train.eval_every=10"]
  args += ["--config.train.eval_batches=4", "--config.model.moe.eval_capacity_factor=0.5"]
  assert run(cli(wd, tfds_dir, *args, config="configs/switch.py:tiny")).returncode == 0
  logged = rows(wd)[-1]["eval_moe/layer1/dropped_fraction"]
  mean = evaluate(wd, str(tmp_path / "4.json"), monkeypatch=monkeypatch)
  mean = mean["moe_layers"]["1"]["dropped_fraction"]
  first = evaluate(wd, str(tmp_path / "1.json"), "--batches=1", monkeypatch=monkeypatch)
  first = first["moe_layers"]["1"]
  assert abs(first["dropped_fraction"] - mean) > 1e-4  # the batches differ
  assert abs(logged - mean) < 1e-6, (logged, mean)


def assert_one_line_error(p, needle):
  assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert needle in p.stderr.strip().splitlines()[-1]


# The first case of each program runs as a real process (the contract: exit
# status 1, one line on stderr, no traceback); the others in this process.
@pytest.mark.parametrize(
  "args,needle",
  [
    ([], "give a --prompt or a --prompts file"),
    (["--prompt=x", "--step=7"], "holds no checkpoint of step 7"),
    (["--prompt=x", "--top_p=0"], "--top_p=0.0: must be in (0, 1]"),
    (["--prompts=/nonexistent.txt"], "--prompts=/nonexistent.txt: no such file"),
  ],
)
def test_generate_errors_are_one_line(trained, args, needle, monkeypatch):
  cmd = generate_cmd(trained, *args)
  p = run(cmd) if not args else in_process(cmd, monkeypatch=monkeypatch)
  assert_one_line_error(p, needle)


@pytest.mark.parametrize(
  "args,needle",
  [
    (["--split=nope"], "config.data.eval_split='nope' is invalid"),
    (["--dataset=files:/nonexistent/*.txt"], "the glob matches no files"),
    (["--step=3"], "holds no checkpoint of step 3"),
  ],
)
def test_evaluate_errors_are_one_line(trained, args, needle, monkeypatch):
  cmd = evaluate_cmd(trained, *args)
  p = run(cmd) if args == ["--split=nope"] else in_process(cmd, monkeypatch=monkeypatch)
  assert_one_line_error(p, needle)


def test_a_tokenizer_that_is_not_the_runs_is_refused(trained, tmp_path, monkeypatch):
  # The run records its tokenizer's hash (data.json); another one is a one-line error.
  wd = str(tmp_path / "copy")
  shutil.copytree(trained, wd, ignore=shutil.ignore_patterns(".lock*"))
  data = json.load(open(os.path.join(wd, "data.json")))
  data["tokenizer"]["sha256"] = "0" * 16
  json.dump(data, open(os.path.join(wd, "data.json"), "w"))
  p = in_process(evaluate_cmd(wd), monkeypatch=monkeypatch)
  assert p.returncode == 1 and "is not the one" in p.stderr.strip().splitlines()[-1]
