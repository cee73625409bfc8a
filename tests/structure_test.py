"""The code base's shape, as issue 26 defined it: where things may import
from, where router names may be compared, how big the MoE core is. Read from
the source (ast), nothing is imported or run."""

import ast
import io
import os
import re
import tokenize

import pytest

from sparse_lm import config as cfglib
from sparse_lm import finetune

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sparse_lm")


def modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  out = {}
  for d, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(d, f)
  return out


def imports(path: str) -> set[str]:
  """Every module a file imports, at any depth of the file (functions too)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def test_no_import_cycle_among_the_package_modules():
  mods = modules()
  graph = {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}
  # A package's __init__ importing its own modules is not a cycle of code.
  graph = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in graph.items()}
  seen, stack, cycles = set(), [], []

  def visit(m):
    if m in stack:
      cycles.append(stack[stack.index(m) :] + [m])
      return
    if m in seen:
      return
    seen.add(m)
    stack.append(m)
    for d in sorted(graph[m]):
      visit(d)
    stack.pop()

  for m in sorted(graph):
    visit(m)
  assert not cycles, cycles


@pytest.mark.parametrize(
  "where",
  [
    "sparse_lm.models",
    "sparse_lm.data",
    "sparse_lm.sharding",
    "sparse_lm.optimizer",
    "sparse_lm.errors",
    "sparse_lm.params",
  ],
)
def test_libraries_below_the_programs_import_neither_cli_nor_absl(where):
  for m, p in modules().items():
    if m == where or m.startswith(where + "."):
      bad = {i for i in imports(p) if i == "sparse_lm.cli" or i.split(".")[0] == "absl"}
      assert not bad, (m, bad)


def test_data_pipeline_does_not_import_models():
  for m, p in modules().items():
    if m.startswith("sparse_lm.data"):
      bad = {i for i in imports(p) if i.startswith(("sparse_lm.models", "sparse_lm.config"))}
      assert not bad, (m, bad)


ROUTER_NAME_COMPARED = re.compile(
  r'(==|!=|in) *\(?"(switch|topk|mixtral|hierarchical|expert_choice|sigmoid_bias|group_limited)"'
)


def test_router_names_are_compared_only_in_the_router_table_and_the_config():
  allowed = {"sparse_lm.models.moe.routing", "sparse_lm.config"}
  hits = [
    f"{m}:{i + 1}: {line.strip()}"
    for m, p in modules().items()
    if m not in allowed
    for i, line in enumerate(open(p))
    if ROUTER_NAME_COMPARED.search(line)
  ]
  assert not hits, hits


def code_lines(path: str) -> int:
  """Lines holding code: not blank, not only a comment, not in a docstring."""
  src = open(path).read()
  doc = set()
  for node in ast.walk(ast.parse(src)):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      first = node.body[0] if node.body else None
      if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        if isinstance(first.value.value, str):
          doc.update(range(first.lineno, first.end_lineno + 1))
  lines = set()
  skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
  for tok in tokenize.generate_tokens(io.StringIO(src).readline):
    if tok.type not in skip and tok.type != tokenize.ENDMARKER:
      lines.update(l for l in range(tok.start[0], tok.end[0] + 1) if l not in doc)
  return len(lines)


def test_the_moe_core_stays_under_1050_code_lines():
  # Issue 26: 1,075 code lines, cut to under 1,000; the goal is 900, while
  # doing more than MaxText's. Issues 29 and 31 added the routers' gate sums
  # (10 lines) and GPT-OSS's expert biases in every kernel, expert
  # parallelism included (30): 1,030 on 2026-12-07. The bound moves only
  # with a reason written here.
  core = [p for m, p in modules().items() if m.startswith("sparse_lm.models.moe")]
  assert sum(code_lines(p) for p in core) < 1050


def test_frozen_presets_named_in_the_config_are_the_ones_finetune_defines():
  assert set(cfglib.FROZEN_PRESETS) == set(finetune.FROZEN_PRESETS)
