"""Instruction tasks from the stdlib's documented functions (sparse_lm/data/stdlib_tasks.py).

Extraction cuts a synthetic module exactly; the split is by module, nested
with the corpus split and deterministic; near-duplicates across the split and
exact duplicates within one are dropped; the n-gram check, the AST match and
the sandboxed doctest runner work on small inputs; the CLI runs end to end on
a slice of the real stdlib (the whole of it takes ~10 s).
"""

import ast
import json
import os

import pytest

from sparse_lm.data import stdlib_corpus
from sparse_lm.data import stdlib_tasks as st

MODULE = '''\
import os


class Box:
    @property
    def size(self,
             scale: int = 2) -> int:  # the header ends at this colon
        """Return the size.

        >>> Box().size
        4
        """
        # a comment starts the body
        text = """keep
  this indentation"""
        return self.size(scale) + len(text)

    async def close(self):
        """Close it."""
        raise NotImplementedError

    def undocumented(self):
        return 1


def fact(n):
    """Return fact of n."""
    def inner(k):
        """Inner doc."""
        return k
    return 1 if n == 0 else n * fact(n - 1)
'''


def by_name(fns):
  return {f.qualname: f for f in fns}


def test_extraction_cuts_header_docstring_and_body_exactly():
  fns = by_name(st.extract_functions(MODULE, "pkg/box.py"))
  assert list(fns) == ["Box.size", "Box.close", "fact", "fact.<locals>.inner"]
  size = fns["Box.size"]
  assert size.header == "def size(self,\n         scale: int = 2) -> int:"
  assert size.docstring == "Return the size.\n\n>>> Box().size\n4"
  assert size.docstring_source == '    """Return the size.\n\n    >>> Box().size\n    4\n    """'
  assert size.body_source == (
    '    # a comment starts the body\n    text = """keep\n  this indentation"""\n'
    "    return self.size(scale) + len(text)"
  )
  assert size.body == (
    '# a comment starts the body\ntext = """keep\n  this indentation"""\n'
    "return self.size(scale) + len(text)"
  )
  assert size.has_doctest and size.is_method and not size.trivial and size.body_lines == 4
  assert size.masked_source.splitlines()[0] == "def _(self,"
  assert "return self._(scale)" in size.masked_source and "Return the _." in size.masked_source
  # the pieces are the function: the original's AST, less the decorator (docstrings
  # compared cleaned: the literal is re-indented with the def)
  orig, cut = ast.parse(MODULE).body[1].body[0], ast.parse(size.source).body[0]
  orig.decorator_list = []
  for d in (orig, cut):
    d.body[0].value.value = ast.get_docstring(d)
  assert ast.dump(cut) == ast.dump(orig)

  close = fns["Box.close"]
  assert close.is_async and close.trivial and close.header == "async def close(self):"
  fact = fns["fact"]
  assert not fact.is_method and not fact.has_doctest and fact.body_lines == 4
  assert fact.masked_source.splitlines()[0] == "def _(n):"
  assert fact.masked_source.endswith("n * _(n - 1)") and "Return _ of n." in fact.masked_source
  assert fns["fact.<locals>.inner"].body == "return k"

  ex = {e["task"]: e for e in st.make_examples(fact)}
  assert list(ex) == list(st.TASKS) and all(e["function"] == "fact" for e in ex.values())
  assert ex["body"]["prompt"] == 'def fact(n):\n    """Return fact of n."""'
  assert ex["body"]["prompt"] + "\n" + ex["body"]["response"] == fact.source
  assert ex["docstring"]["response"] == "Return fact of n."
  assert ex["name"]["response"] == "fact" and "fact" not in ex["name"]["prompt"]
  assert ex["signature"]["response"] == "def fact(n):"


def test_name_task_skips_a_function_whose_name_stays_visible():
  src = 'def user(self, user):\n    """Send the user name."""\n    return user\n'
  (f,) = st.extract_functions(src, "m.py")
  assert [e["task"] for e in st.make_examples(f)] == ["body", "docstring", "signature"]


def modules_in(split: str, count: int) -> list[str]:
  names = [f"mod{i}.py" for i in range(200)]
  return [n for n in names if st.module_split(n) == split][:count]


def test_split_is_by_module_nested_with_the_corpus_split_and_deterministic():
  files = stdlib_corpus.list_files()
  every = files["train"] + files["validation"]
  held = st.heldout_modules()
  assert held == sorted(p for p in every if st.module_split(p) == "eval")
  assert held == st.heldout_modules()  # deterministic
  assert 0.08 < len(held) / len(every) < 0.16
  assert set(files["validation"]) <= set(held)  # validation files are held out
  assert set(st.heldout_modules(split="train")) == set(held) - set(files["validation"])
  # synthetic modules: every example lands in its module's split, none in both
  mods = modules_in("train", 3) + modules_in("eval", 2)
  sources = {m: f'def f(x):\n    """Add {i}."""\n    return x + {i}\n' for i, m in enumerate(mods)}
  splits, stats = st.build_from_sources(sources)
  mods = {s: {e["module"] for e in splits[s]} for s in st.SPLITS}
  assert mods["train"] == set(modules_in("train", 3)) and mods["eval"] == set(modules_in("eval", 2))
  assert stats["modules"]["heldout"] == 2


def test_near_duplicates_across_the_split_and_exact_duplicates_are_removed():
  heldout = (
    'def total(xs):\n    """Sum xs."""\n    t = 0\n    for x in xs:\n        t += x\n    return t\n'
  )
  renamed = (
    "def add_all(items):\n"
    '    """Add the items up."""\n'
    "    acc = 0  # the running sum\n"
    "    for item in items:\n"
    "        acc += item\n"
    "    return (acc)\n"
  )
  changed = renamed.replace("acc += item", "acc -= item").replace("add_all", "sub_all")
  long = 'def big():\n    """Big."""\n    return ' + " + ".join(["1"] * 800) + "\n"
  trivial = 'def stub():\n    """Stub."""\n    pass\n'
  (ev,) = modules_in("eval", 1)
  tr = modules_in("train", 2)
  sources = {ev: heldout, tr[0]: renamed + changed + long + trivial, tr[1]: changed}
  splits, stats = st.build_from_sources(sources)
  train_fns = {(e["module"], e["function"]) for e in splits["train"]}
  assert train_fns == {(tr[0], "sub_all")}  # tr[1]'s copy: all its examples are duplicates
  assert stats["dedup"]["near_duplicate_train_functions"] == 1
  # sub_all in tr[1] repeats tr[0]'s examples exactly
  assert stats["dedup"]["exact_duplicate_examples"] == {"train": len(st.TASKS), "eval": 0}
  assert stats["examples"]["train"]["total"] == len(st.TASKS)
  assert stats["functions"]["skipped_too_long"] == 1 and stats["functions"]["skipped_trivial"] == 1


def test_ngram_overlap():
  texts = ["q a b c d e r", "v w x", "y z"]
  responses = ["a b c d e", "b c d e f", "v w x y z", "a b"]
  # 1: shared 5-gram; 2: no; 3: only across two texts, which does not count; 4: too short
  assert st.ngram_overlap(responses, texts, n=5) == pytest.approx(1 / 4)
  assert list(st.NgramIndex(texts, n=5).flags(responses)) == [True, False, False, False]
  assert st.ngram_overlap(responses, texts, n=3) == pytest.approx(3 / 4)
  assert st.ngram_overlap([], texts) == 0.0
  assert st.ngram_overlap(["a b c"], [], n=3) == 0.0


def test_normalized_equal():
  ref = "    if x > 0:\n        return x + 1  # positive\n    return 'neg'\n"
  same = 'if (x>0):\n  # a comment\n  return (x + 1)\nreturn "neg"'
  assert st.normalized_equal(same, ref)
  assert not st.normalized_equal(same.replace("x + 1", "x - 1"), ref)
  assert not st.normalized_equal("if x >:\n  return", ref)
  assert not st.normalized_equal(ref, "return (")
  nested = '    def f():\n        """Doc\n        more."""\n        return 1\n'
  assert st.normalized_equal(nested, 'def f():\n    """Doc\n    more."""\n    return 1')


SMALL = '''def double(x):
    """Twice x.

    >>> double(2)
    4
    >>> double("ab")
    'abab'
    """
'''


def test_run_doctests_pass_fail_error_timeout():
  r = st.run_doctests(SMALL + "    return x * 2\n", "statistics.py", 8)
  assert (r.status, r.attempted, r.failed) == ("passed", 2, 0), r
  r = st.run_doctests(SMALL + "    return x + x if x else 0\n", "statistics.py", 8)
  assert r.status == "passed", r
  r = st.run_doctests(SMALL + "    return x * 3\n", "statistics.py", 8)
  assert (r.status, r.failed) == ("failed", 2), r
  assert st.run_doctests(SMALL + "    return (\n", "statistics.py", 8).status == "error"
  assert st.run_doctests(SMALL + "    return 1\n", "no_such_module.py", 8).status == "error"
  r = st.run_doctests(SMALL + "    while True:\n        pass\n", "statistics.py", 1.5)
  assert r.status == "timeout", r


SANDBOX = '''def probe():
    """
    >>> open("x", "w")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    PermissionError: x
    >>> import socket; socket.socket()  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    PermissionError: x
    >>> import os; os.remove("y")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    PermissionError: x
    >>> import subprocess; subprocess.run(["true"])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    PermissionError: x
    >>> os.listdir(".")
    []
    >>> bytearray(1 << 31)
    Traceback (most recent call last):
    MemoryError
    """
'''


def test_run_doctests_sandbox_blocks_writes_network_and_processes():
  r = st.run_doctests(SANDBOX, "statistics.py", 8)
  assert (r.status, r.attempted) == ("passed", 6), r.detail


def real_function(relpath: str, qualname: str) -> st.FunctionInfo:
  src = stdlib_corpus.read_source(os.path.join(stdlib_corpus.stdlib_dir(), relpath))
  return by_name(st.extract_functions(src, relpath))[qualname]


def test_run_doctests_on_real_stdlib_functions():
  f = real_function("statistics.py", "median")
  assert f.has_doctest
  assert st.run_doctests(f.source, f.module, 8).status == "passed"
  wrong = f"{f.header}\n{f.docstring_source}\n    return sorted(data)[0]"
  assert st.run_doctests(wrong, f.module, 8).status == "failed"
  m = real_function("fractions.py", "Fraction.limit_denominator")  # a method, patched on its class
  assert st.run_doctests(m.source, m.module, 8, qualname=m.qualname).status == "passed"
  bad = m.source.replace("return Fraction(", "return Fraction(1 + ", 1)
  assert st.run_doctests(bad, m.module, 8, qualname=m.qualname).status == "failed"


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(l) for l in f]


def test_cli_end_to_end_on_a_slice_of_the_stdlib(tmp_path, capsys):
  files = stdlib_corpus.list_files()
  held = st.heldout_modules()
  train = [p for p in files["train"] if p not in held and "/" not in p]
  # asyncio/tasks.py shares a 13-gram with one held-out body of held[:8].
  include = held[:8] + train[:12] + ["asyncio/tasks.py"]
  argv = ["--include", ",".join(include), "--max_chars=2000"]
  stats = st.main([f"--out={tmp_path / 'a'}", *argv])
  assert "functions with docstrings" in capsys.readouterr().out
  st.main([f"--out={tmp_path / 'b'}", *argv])
  names = ["train.jsonl", "eval.jsonl", "heldout_modules.json", "stats.json"]
  for name in names:  # deterministic
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  out = {s: read_jsonl(tmp_path / "a" / f"{s}.jsonl") for s in st.SPLITS}
  assert len(out["train"]) > 200 and len(out["eval"]) > 20
  assert {e["task"] for e in out["eval"]} == set(st.TASKS)
  assert all(list(e) == ["task", "prompt", "response", "module", "function"] for e in out["train"])
  assert not {e["module"] for e in out["train"]} & set(held)
  assert {e["module"] for e in out["eval"]} <= set(held[:8])
  hm = json.loads((tmp_path / "a" / "heldout_modules.json").read_text())
  assert hm["modules"] == held and set(hm["exclude_from_pretraining"]) <= set(files["train"])
  assert json.loads((tmp_path / "a" / "stats.json").read_text()) == stats
  assert stats["examples"]["train"]["total"] == len(out["train"])
  assert stats["functions"]["with_docstring"] >= stats["functions"]["kept"]["train"] > 50
  # The held-out bodies' n-gram overlap, recomputed naively: a body overlaps
  # if one of its n-grams of whitespace tokens is in one pretraining file.
  n, root = stats["ngram_overlap"]["n"], stdlib_corpus.stdlib_dir()
  grams = set()
  for p in files["train"]:
    if p.startswith(tuple(include)) and st.module_split(p) == "train":
      w = stdlib_corpus.read_source(os.path.join(root, p)).split()
      grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
  bodies = [e["response"].split() for e in out["eval"] if e["task"] == st.HELDOUT_TASK]
  hits = [any(tuple(w[i : i + n]) in grams for i in range(len(w) - n + 1)) for w in bodies]
  assert sum(hits) >= 1 and stats["ngram_overlap"]["body"] == round(sum(hits) / len(bodies), 4)
  assert all(len(e["prompt"]) + len(e["response"]) <= 2000 for e in out["train"] + out["eval"])


def test_near_duplicates_whatever_the_length_and_contamination_counts():
  from difflib import SequenceMatcher

  refs = [
    "return self._x",
    "if a:\n    return b\nreturn c",
    "x = 1\ny = 2\nz = x + y\nreturn z",
    "for i in range(n):\n    total += i\nreturn total",
  ]
  queries = [
    "    return self._x",  # short (2 words: no 13-gram), identical up to layout: 1.0
    "return self._y",  # one token of four differs: 0.75
    "x = 1\ny = 2\nz = x * y\nreturn z",  # one of 14: 0.93
    "for j in range(m):\n    acc -= j\nyield acc",
    "",
  ]
  got = st.NearDuplicateIndex(refs).best(queries, 0.8)
  # The pruned search flags exactly what comparing every pair flags.
  for q, (ratio, j) in zip(queries, got):
    best = max(
      SequenceMatcher(None, st.code_tokens(q), st.code_tokens(r), autojunk=False).ratio()
      for r in refs
    )
    assert (ratio >= 0.8) == (best >= 0.8), (q, ratio, best)
    assert j == -1 or ratio == pytest.approx(
      SequenceMatcher(None, st.code_tokens(q), st.code_tokens(refs[j]), autojunk=False).ratio()
    )
  assert [j for _, j in got] == [0, -1, 2, -1, -1]
  # A held-out function (tokenize.py) whose body is in the pretraining text
  # (lib2to3's copy) although shorter than a 13-gram window of its lines...
  root = stdlib_corpus.stdlib_dir()
  copy = os.path.join(root, "lib2to3", "pgen2", "tokenize.py")
  if not os.path.exists(copy):
    pytest.skip("no lib2to3 in this Python")
  assert (
    st.module_split("tokenize.py") == "eval" and st.module_split(copy[len(root) + 1 :]) == "train"
  )
  held = [
    e
    for f in st.extract_functions(
      stdlib_corpus.read_source(os.path.join(root, "tokenize.py")), "tokenize.py"
    )
    if f.name == "_get_normal_name"
    for e in st.make_examples(f)
  ]
  flags, counts = st.contamination(held, [stdlib_corpus.read_source(copy)])
  body = next(f for f in flags if f["task"] == "body")
  assert body["near_duplicate"] and body["flagged"] and body["ratio"] >= 0.8
  assert counts["body"]["examples"] == 1 and counts["body"]["near_duplicate"] == 1
  assert counts["docstring"]["near_duplicate"] == 1  # its docstring is copied as well
  # ...and one whose body is nowhere in it is not flagged.
  flags, counts = st.contamination(held, ["def f(a):\n    '''Doc.'''\n    return a\n"])
  assert not any(f["flagged"] for f in flags) and counts["body"]["flagged"] == 0


def test_choice_items_and_the_dev_test_split():
  def ex(task, module, fn, prompt, response):
    return {"task": task, "prompt": prompt, "response": response, "module": module, "function": fn}

  bodies = {"f": "return 1 + 2", "g": "return 3 * 40", "h": "x = 5\nreturn x", "k": "pass\n" * 20}
  examples = [ex("body", "m.py", n, f"def {n}():\n", b) for n, b in bodies.items()]
  examples += [
    ex("name", "m.py", n, f"def _():\n  return {'k' if n == 'f' else 1}", n) for n in bodies
  ]
  examples += [ex("name", "m.py", "C.j", "def _(self):\n  pass", "j")]
  examples += [
    ex("name", "other.py", "z", "def _(): pass", "z"),
    ex("body", "other.py", "z", "", "return 1 + 3"),
  ]
  items = st.choice_items(examples)
  again = st.choice_items(list(reversed(examples)))
  assert items == sorted(again, key=lambda i: items.index(i)) and len(items) == len(again)
  by = {(i["task"], i["function"]): i for i in items}
  # Bodies: the true one among the two others of its module closest in length;
  # "k" (100 characters) has no distractor within 1.5x: no item; other.py: too few.
  assert set(by) == {("body", "f"), ("body", "g"), ("body", "h")} | {
    ("name", n) for n in ("f", "g", "h", "k", "C.j")
  }
  for it in items:
    true = next(
      e["response"] for e in examples if (e["task"], e["function"]) == (it["task"], it["function"])
    )
    assert it["choices"][it["answer"]] == true and len(set(it["choices"])) == len(it["choices"])
    assert len(it["choices"]) == st.CHOICES[it["task"]] and it["module"] == "m.py"
    if it["task"] == "body":
      assert set(it["choices"]) <= set(bodies.values()) - {bodies["k"]}
      lens = [len(c) for c in it["choices"]]
      assert max(lens) <= st.BODY_LENGTH_RATIO * min(lens)
    else:
      assert set(it["choices"]) <= {"f", "g", "h", "k", "j"} and "z" not in it["choices"]
  assert "k" not in by[("name", "f")]["choices"]  # it is in that prompt: could be copied
  assert {i["answer"] for i in items} != {0}  # the true choice's place varies
  # Dev / test: by module, deterministic, both parts of the real held-out set used.
  held = st.heldout_modules()
  parts = [st.heldout_part(m) for m in held]
  assert parts == [st.heldout_part(m) for m in held] and set(parts) == {"dev", "test"}
  assert 0.2 < parts.count("dev") / len(parts) < 0.5


def test_multiple_choice_scores_equal_each_choice_run_alone():
  """evaluate.score_responses packs examples by length into rows, several
  batches of them; each choice's summed log-likelihood equals the model run
  on that prompt + choice alone (a tiny dropless Switch MoE, byte tokens)."""
  from flax import nnx
  import jax
  import jax.numpy as jnp
  import numpy as np

  from sparse_lm import config as cfglib
  from sparse_lm import evaluate
  from sparse_lm.data.tokenizer import ByteTokenizer
  from sparse_lm.models.transformer import Transformer

  c = cfglib.load_config("configs/switch.py:tiny")
  c.model.d_model, c.model.num_heads, c.model.d_ff, c.model.num_layers = 32, 4, 64, 2
  c.model.moe.num_experts, c.model.moe.dispatch, c.model.moe.jitter = 4, "dropless", 0.0
  c.model.init_scale = 1.0
  c.data.seq_len, c.data.tokenizer = 48, "byte"
  c.data.sft_template = "<{prompt}>{response}"
  tok = ByteTokenizer()
  spec = cfglib.model_spec(cfglib.validate(c))
  with nnx.use_eager_sharding(False):
    model = nnx.jit(lambda: Transformer(spec, tok.vocab_size, rngs=nnx.Rngs(0)))()
  items = [
    {"prompt": "def _(a, b):\n", "choices": ["add", "mul", "sub", "pow"], "answer": 2},
    {"prompt": "Q: 2+2?", "choices": ["4", "five", "22"], "answer": 0},
    {"prompt": "x" * 30, "choices": ["y" * 30, "z"], "answer": 1},  # the first is cut at 49
  ]
  r = evaluate.multiple_choice(model, c, tok, items, batch_size=2)  # 3 batches

  # The naive twin: each prompt + choice alone in its own row (right-padded:
  # a causal model never sees the padding), the sum over its response targets.
  L = c.data.seq_len
  rows = []
  for it in items:
    for ch in it["choices"]:
      p = list(tok.prefix_ids) + tok.encode(f"<{it['prompt']}>", False)
      rows.append((len(p), (p + tok.encode(ch, False) + [tok.eos_id])[: L + 1]))
  t_NxL = np.zeros((len(rows), L + 1), np.int32)
  for i, (_, t) in enumerate(rows):
    t_NxL[i, : len(t)] = t
  logits = nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(t_NxL[:, :-1]))
  lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
  flat = [
    sum(lp[i, j, t[j + 1]] for j in range(n - 1, len(t) - 1)) for i, (n, t) in enumerate(rows)
  ]
  want, at = [], 0
  for it in items:
    want.append(flat[at : at + len(it["choices"])])
    at += len(it["choices"])
  for n, it in enumerate(items):
    k = len(it["choices"])
    np.testing.assert_allclose(r["logprob"][n, :k], want[n], rtol=1e-5, atol=1e-4)
    assert np.isnan(r["logprob"][n, k:]).all()
    assert r["choice"][n] == int(np.argmax(want[n]))
    assert r["correct"][n] == (r["choice"][n] == it["answer"])
  assert list(r["truncated"]) == [False, False, True]
  s = evaluate.score_responses(model, c, tok, [{"prompt": "Q: 2+2?", "response": "five"}])
  assert s["tokens"][0] == len("five") + 1 and s["logprob"][0] == pytest.approx(
    want[1][1], abs=1e-4
  )
