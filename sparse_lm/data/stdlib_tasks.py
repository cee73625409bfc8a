"""Instruction tasks built from the documented functions of the stdlib corpus.

What is built. Every function and method (sync or async, nested ones too) of
the corpus files (`stdlib_corpus.list_files()`, read with `read_source`) that
has a non-empty docstring is cut, from its original source text, into a header
(the `def ...:` line(s) as written, decorators left out), the docstring literal
and the body after it. Each kept function gives one example per entry of
`TASKS` (a small table: a task is one entry), a dict {"task", "prompt",
"response", "module", "function"} of plain strings (a template joins them):
  * "body" (the held-out task): header + docstring -> body,
  * "docstring": header + body -> the cleaned docstring (`ast.get_docstring`),
  * "name": the function with its name replaced by `_` (def line, recursive
    calls `name(...)` / `self.name(...)`, and whole-word mentions in the
    docstring) -> the name; skipped for a function whose name stays visible
    (a parameter or a string of the same name, `other.name(...)`: ~20%),
  * "signature": docstring + body -> the header.
Source texts keep their layout: the def line starts at column 0 and the
docstring and body keep their indentation relative to it, so
`prompt + "\\n" + response` of a "body" example is the function's source (less
decorators and comments between header and docstring); `FunctionInfo.body` is
the same body dedented to column 0. Lines inside multi-line strings of the body
are never re-indented, so the texts parse to the original AST (docstrings, which
move with their code, to the same cleaned text).

Filters: functions whose body is trivial (only `pass`, `...`, a string,
`raise NotImplementedError`, a bare `return`) or empty are skipped, and so are
functions with any example longer than `MAX_CHARS` characters of prompt +
response (2,000: with about 3-4 characters per token of a code tokenizer, an
example fits a 512-1024 token training sequence with its template). One-line
functions (docstring on the def line, or code on the docstring's last line) are
skipped as well: their pieces cannot be cut apart as lines.

Split, by module: `zlib.crc32(relpath) % 100 < HELDOUT_PERCENT` (12) -> "eval"
(the held-out modules), plus the four doctest-rich modules of `DOCTEST_HELDOUT`
(so that pass@1 has functions to run), the rest -> "train". It is the hash the corpus splits
with (`stdlib_corpus.split_of`: < 5 -> validation), so every corpus validation
file is a held-out module and the held-out modules are the validation files
plus ~7% of the corpus train files: the validation files stay unseen by every
training phase, and pretraining only has to drop the held-out corpus train
files (`heldout_modules(split="train")`, in heldout_modules.json as
"exclude_from_pretraining"; dropping the validation ones as well would empty
the corpus validation split).

Contamination: a train function whose normalised body (AST without positions,
its local names, i.e. parameters and names bound in it, renamed in order of first
use; globals, builtins, attributes and constants kept) equals a held-out one's is
dropped, and exact duplicate (prompt, response) pairs are dropped within each
split (first kept). `ngram_overlap` measures what remains: the fraction of
held-out responses sharing a 13-gram of whitespace tokens with the pretraining
text (corpus train files without the held-out modules). `contamination` adds,
per held-out body and docstring, a near-duplicate check against every
pretraining function body (resp. docstring), whatever its length: difflib's
ratio over code tokens >= NEAR_DUPLICATE_RATIO (0.8), pruned by a bound that
never drops such a pair (NearDuplicateIndex), and a flag on each example.

Held-out modules are split again, by module, into a dev part (DEV_PERCENT, for
choosing rates and horizons) and a test part (reported): `heldout_part`.
`choice_items` makes multiple-choice items with signal at small scale: the
true name among 4 names of the same module, the true body among 3 bodies of
the same module of similar length (scored by evaluate.multiple_choice).

Metrics for the study: `normalized_equal` (AST exact match of a predicted body)
and `run_doctests` (pass@1: the docstring's doctests of a generated function,
run in a sandboxed subprocess in the namespace of its stdlib module).

CLI: `python -m sparse_lm.data.stdlib_tasks --out=DIR [--max_chars=N]` writes
DIR/train.jsonl, DIR/eval.jsonl (one example a line, all tasks),
DIR/heldout_modules.json and DIR/stats.json (counts per task and split,
filters, dedup removals, n-gram overlap per task), byte-identical for the same
Python. `--include=PREFIX,...` keeps only matching relpaths (quick runs).
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from typing import Callable
from typing import NamedTuple
from typing import Sequence
import zlib

import numpy as np

from sparse_lm.data import stdlib_corpus

MAX_CHARS = 2000  # prompt + response characters of every example of a kept function
HELDOUT_PERCENT = 12  # crc32(relpath) % 100 below this -> held-out ("eval") module
# Held out besides the hashed 12%: the hash leaves one held-out function with
# doctests, so pass@1 would measure nothing. These four pure-Python modules
# hold most of the corpus's runnable doctests (turtle's need a display).
DOCTEST_HELDOUT = ("_pydecimal.py", "collections/__init__.py", "pickletools.py", "statistics.py")
NGRAM = 13  # whitespace tokens per n-gram of the contamination check
PLACEHOLDER = "_"  # the name task's stand-in for the function's name
SPLITS = ("train", "eval")
HELDOUT_TASK = "body"
STATUSES = ("passed", "failed", "error", "timeout")  # run_doctests
_WORD = re.compile(r"\w+")

assert stdlib_corpus.VALIDATION_PERCENT <= HELDOUT_PERCENT  # validation files are held out


@dataclasses.dataclass(frozen=True)
class FunctionInfo:
  """A documented function, cut from its source text."""

  module: str  # relpath in the stdlib dir, e.g. "json/decoder.py"
  qualname: str  # "f", "C.m", "f.<locals>.g"
  name: str
  lineno: int
  is_async: bool
  is_method: bool  # defined in a class body
  header: str  # the `def ...:` line(s) as written, no decorators, at column 0
  docstring: str  # cleaned (ast.get_docstring), trailing blanks removed
  docstring_source: str  # the literal as written, indented relative to the def
  body_source: str  # the statements after the docstring, indented relative to the def
  body: str  # the same, dedented to column 0
  masked_source: str  # header + docstring + body, the name replaced by PLACEHOLDER
  has_doctest: bool  # the docstring has `>>>` examples
  body_lines: int  # lines of the body
  trivial: bool  # the body is only pass / ... / raise NotImplementedError / return
  body_key: str  # hash of the normalised body (see body_key)

  @property
  def source(self) -> str:
    """The function (less decorators): header, docstring literal, body."""
    return f"{self.header}\n{self.docstring_source}\n{self.body_source}"


def _name_task(f: FunctionInfo) -> tuple[str, str] | None:
  """Skipped where the name is still visible (parameters, other calls, strings)."""
  if f.name in f.masked_source and f.name in _WORD.findall(f.masked_source):
    return None
  return f.masked_source, f.name


# The tasks: name -> FunctionInfo -> (prompt, response), or None to skip the
# function. A new task is one entry.
TASKS: dict[str, Callable[[FunctionInfo], tuple[str, str] | None]] = {
  "body": lambda f: (f"{f.header}\n{f.docstring_source}", f.body_source),
  "docstring": lambda f: (f"{f.header}\n{f.body_source}", f.docstring),
  "name": _name_task,
  "signature": lambda f: (f"{f.docstring_source}\n{f.body_source}", f.header),
}


# ---------------------------------------------------------------- extraction


def _char_col(line: str, byte_col: int) -> int:
  """An AST column (UTF-8 bytes) as a str index into `line`."""
  if line.isascii():
    return byte_col
  return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


def _render(
  lines: list[str],
  first: int,
  last: int,
  strip: int,
  protected: set[int] | frozenset[int] = frozenset(),
  end_col: int | None = None,
  edits: dict[int, str] | None = None,
) -> str:
  """Lines first..last (1-based) with up to `strip` leading blanks removed, except
  on `protected` lines (inside multi-line strings); `end_col` cuts the last one."""
  out = []
  for i in range(first, last + 1):
    line = edits.get(i, lines[i - 1]) if edits else lines[i - 1]
    if i == last and end_col is not None:
      line = line[:end_col]
    if i not in protected:
      k = len(line) - len(line.lstrip(" \t\f"))
      line = line[min(k, strip) :]
    out.append(line)
  return "\n".join(out)


def _header_end(lines: list[str], node: ast.AST, stop: int) -> tuple[int, int] | None:
  """(line, char col) of the colon that ends a def's header on lines before `stop`."""
  text = "\n".join(lines[node.lineno - 1 : stop - 1]) + "\n"
  depth = 0
  try:
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
      if tok.type == tokenize.OP:
        if tok.string in "([{":
          depth += 1
        elif tok.string in ")]}":
          depth -= 1
        elif tok.string == ":" and depth == 0:
          return node.lineno + tok.start[0] - 1, tok.start[1]
  except (tokenize.TokenError, SyntaxError):
    return None
  return None


def _is_trivial(stmt: ast.stmt) -> bool:
  """pass, ..., a string, return [None], raise NotImplementedError[(...)]."""
  if isinstance(stmt, ast.Pass):
    return True
  if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
    return stmt.value.value is Ellipsis or isinstance(stmt.value.value, str)
  if isinstance(stmt, ast.Return):
    return stmt.value is None or (isinstance(stmt.value, ast.Constant) and stmt.value.value is None)
  if isinstance(stmt, ast.Raise) and stmt.exc is not None:
    exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
  return False


_NAME_FIELD = re.compile(r"(?:\bid=|\barg\(arg=)'([^']*)'")


def body_key(stmts: Sequence[ast.stmt], params: Sequence[str] = ()) -> str:
  """A hash of statements' AST without positions, the local names (`params` and
  every name bound in them) renamed in order of first use; global and builtin
  names, attributes and constants are kept."""
  local = set(params)
  for n in ast.walk(ast.Module(body=list(stmts), type_ignores=[])):
    if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
      local.add(n.id)
    elif isinstance(n, ast.arg):
      local.add(n.arg)
    elif isinstance(n, ast.ExceptHandler) and n.name:
      local.add(n.name)
  dump = ast.dump(ast.Module(body=list(stmts), type_ignores=[]))
  names: dict[str, str] = {}

  def rename(m: re.Match) -> str:
    if m.group(1) not in local:
      return m.group(0)
    new = names.setdefault(m.group(1), f"v{len(names)}")
    return m.group(0).replace(f"'{m.group(1)}'", f"'{new}'")

  return hashlib.sha1(_NAME_FIELD.sub(rename, dump).encode()).hexdigest()[:16]


def _all_args(args: ast.arguments) -> list[ast.arg]:
  extra = [a for a in (args.vararg, args.kwarg) if a is not None]
  return args.posonlyargs + args.args + args.kwonlyargs + extra


def _defs(node: ast.AST, prefix: str, in_class: bool):
  """(FunctionDef, qualname, is_method) for every def under `node`, in order."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield child, prefix + child.name, in_class
      yield from _defs(child, f"{prefix}{child.name}.<locals>.", False)
    elif isinstance(child, ast.ClassDef):
      yield from _defs(child, f"{prefix}{child.name}.", True)
    elif not isinstance(child, ast.expr):  # defs are statements: skip expressions
      yield from _defs(child, prefix, in_class)


class _Refs(NamedTuple):
  """What one walk of a module's AST finds for the cutting of its functions."""

  protected: set[int]  # lines that continue a multi-line string
  names: dict[str, list[tuple[int, int, int]]]  # Name id -> (line, col, end col)
  self_attrs: dict[str, list[tuple[int, int]]]  # self.x / cls.x: x -> (end line, end col)


def _refs(tree: ast.AST) -> _Refs:
  """Lines inside multi-line strings (their indentation is text; strings that
  are statements, i.e. docstrings, are left out: re-indenting them keeps their
  cleaned text, and nested docstrings line up with their code), and where
  names and `self.` / `cls.` attributes are used (byte cols)."""
  protected: set[int] = set()
  names = collections.defaultdict(list)
  attrs = collections.defaultdict(list)
  statements = set()
  for n in ast.walk(tree):
    if isinstance(n, ast.Name):
      names[n.id].append((n.lineno, n.col_offset, n.end_col_offset))
    elif isinstance(n, ast.Attribute):
      if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
        attrs[n.attr].append((n.end_lineno, n.end_col_offset))
    elif isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant):
      statements.add(id(n.value))
    elif isinstance(n, (ast.Constant, ast.JoinedStr)) and n.end_lineno > n.lineno:
      if id(n) not in statements and (
        isinstance(n, ast.JoinedStr) or isinstance(n.value, (str, bytes))
      ):
        protected.update(range(n.lineno + 1, n.end_lineno + 1))
  return _Refs(protected, names, attrs)


_DEF = re.compile(r"(?:async\s+)?def\s+(\w+)")


def _name_edits(
  lines: list[str], node: ast.AST, is_method: bool, header_end: int, refs: _Refs
) -> tuple[tuple[int, int] | None, dict[int, str]]:
  """Where the def line names the function (char cols), and the body lines with
  recursive calls renamed to PLACEHOLDER (`name` in a function, `self.name` /
  `cls.name` in a method)."""
  name = node.name
  m = _DEF.match(lines[node.lineno - 1], node.col_offset)
  in_body = lambda line: header_end < line <= node.end_lineno
  spans = collections.defaultdict(list)  # line -> [(start, end) char cols]
  if is_method:
    for line, end in refs.self_attrs.get(name, ()):
      if in_body(line):
        end = _char_col(lines[line - 1], end)
        spans[line].append((end - len(name), end))
  else:
    for line, a, b in refs.names.get(name, ()):
      if in_body(line):
        l = lines[line - 1]
        spans[line].append((_char_col(l, a), _char_col(l, b)))
  edits = {}
  for i, cols in spans.items():
    text = lines[i - 1]
    for a, b in sorted(set(cols), reverse=True):
      text = text[:a] + PLACEHOLDER + text[b:]
    edits[i] = text
  return (m.span(1) if m and m.group(1) == name else None), edits


def extract_functions(
  source: str, module: str, skipped: collections.Counter | None = None
) -> list[FunctionInfo]:
  """The functions with a non-empty docstring in a module's source, in source
  order (trivial ones included, flagged). One-line layouts are skipped and
  counted in `skipped["layout"]`."""
  source = source.replace("\r\n", "\n").replace("\r", "\n")
  tree = ast.parse(source)
  lines = source.split("\n")
  refs = _refs(tree)
  protected = refs.protected
  out = []
  for node, qualname, is_method in _defs(tree, "", False):
    doc = ast.get_docstring(node)
    if not doc or not doc.strip():
      continue
    ds = node.body[0]
    rest = node.body[1:]
    colon = _header_end(lines, node, ds.lineno) if ds.lineno > node.lineno else None
    if colon is None or (rest and rest[0].lineno == ds.end_lineno):
      if skipped is not None:
        skipped["layout"] += 1
      continue
    col = node.col_offset
    header = _render(lines, node.lineno, colon[0], col, protected, colon[1] + 1)
    doc_end = _char_col(lines[ds.end_lineno - 1], ds.end_col_offset)
    docstring_source = _render(lines, ds.lineno, ds.end_lineno, col, end_col=doc_end)
    if rest:
      first = ds.end_lineno + 1
      while not lines[first - 1].strip():
        first += 1
      body_source = _render(lines, first, node.end_lineno, col, protected)
      body = _render(lines, first, node.end_lineno, rest[0].col_offset, protected)
      n_lines = node.end_lineno - first + 1
    else:
      body_source = body = ""
      n_lines = 0
    span, edits = _name_edits(lines, node, is_method, colon[0], refs)
    if span is None:  # `async` and `def` on separate lines: not in the stdlib
      if skipped is not None:
        skipped["layout"] += 1
      continue
    masked_header = header[: span[0] - col] + PLACEHOLDER + header[span[1] - col :]
    masked_doc = docstring_source
    if node.name in masked_doc:  # whole-word mentions
      mask = lambda m: PLACEHOLDER if m.group() == node.name else m.group()
      masked_doc = _WORD.sub(mask, masked_doc)
    masked = f"{masked_header}\n{masked_doc}"
    if rest:
      masked += "\n" + _render(lines, first, node.end_lineno, col, protected, edits=edits)
    out.append(
      FunctionInfo(
        module=module,
        qualname=qualname,
        name=node.name,
        lineno=node.lineno,
        is_async=isinstance(node, ast.AsyncFunctionDef),
        is_method=is_method,
        header=header,
        docstring=doc.rstrip(),
        docstring_source=docstring_source,
        body_source=body_source,
        body=body,
        masked_source=masked,
        has_doctest=re.search(r"^\s*>>>", doc, re.MULTILINE) is not None,
        body_lines=n_lines,
        trivial=all(_is_trivial(s) for s in rest),
        body_key=body_key(rest, [x.arg for x in _all_args(node.args)]),
      )
    )
  return out


# --------------------------------------------------------------------- split


def module_split(relpath: str) -> str:
  """The split of a module: "eval" if held out, else "train" (nests the corpus split)."""
  if relpath in DOCTEST_HELDOUT:
    return "eval"
  return "eval" if zlib.crc32(relpath.encode()) % 100 < HELDOUT_PERCENT else "train"


def heldout_modules(root: str | None = None, split: str | None = None) -> list[str]:
  """Relpaths of the held-out corpus files, sorted; `split`: only those of that
  corpus split ("train": what pretraining must exclude)."""
  files = stdlib_corpus.list_files(root)
  splits = [split] if split else list(files)
  return sorted(p for s in splits for p in files[s] if module_split(p) == "eval")


def remove_near_duplicates(
  train: Sequence[FunctionInfo], heldout: Sequence[FunctionInfo]
) -> tuple[list[FunctionInfo], int]:
  """Train functions without those whose normalised body is a held-out one's,
  and how many were dropped."""
  keys = {f.body_key for f in heldout}
  kept = [f for f in train if f.body_key not in keys]
  return kept, len(train) - len(kept)


def make_examples(fn: FunctionInfo) -> list[dict]:
  """The function's example for each task that takes it, in TASKS order."""
  out = []
  for task, make in TASKS.items():
    made = make(fn)
    if made is None:
      continue
    prompt, response = made
    out.append(
      {
        "task": task,
        "prompt": prompt,
        "response": response,
        "module": fn.module,
        "function": fn.qualname,
      }
    )
  return out


# ------------------------------------------------------------- contamination


class NgramIndex:
  """The set of n-grams (of whitespace tokens, hashed to 64 bits) of texts."""

  _MULT = np.uint64(0x9E3779B97F4A7C15)

  def __init__(self, texts: Sequence[str], n: int = NGRAM):
    self.n = n
    self._vocab: dict[str, int] = {}
    words = [t.split() for t in texts]
    ids = [[self._vocab.setdefault(w, len(self._vocab)) for w in ws] for ws in words]
    rng = np.random.default_rng(0)
    self._table = rng.integers(0, 2**63, size=len(self._vocab) + 1, dtype=np.uint64) * 2 + 1
    self._hashes = np.sort(self._ngrams(ids)[0])

  def _ngrams(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the n-grams within each id list (-1: unknown, in none), and
    the index of the list each comes from."""
    n = self.n
    flat = np.fromiter((i for seq in ids for i in seq), dtype=np.int64)
    doc = np.repeat(np.arange(len(ids)), [len(seq) for seq in ids])
    m = len(flat) - n + 1
    if m <= 0:
      return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    x = self._table[np.where(flat < 0, len(self._vocab), flat)]
    h = np.zeros(m, np.uint64)
    for k in range(n):
      h = h * self._MULT + x[k : k + m]
    unknown = np.concatenate([[0], np.cumsum(flat < 0)])
    valid = (doc[:m] == doc[n - 1 :]) & (unknown[n:] == unknown[:m])
    return h[valid], doc[:m][valid]

  def flags(self, responses: Sequence[str]) -> np.ndarray:
    """Per response: does it share an n-gram with the texts? (fewer than n tokens: no)"""
    ids = [[self._vocab.get(w, -1) for w in r.split()] for r in responses]
    h, doc = self._ngrams(ids)
    out = np.zeros(len(responses), bool)
    pos = np.minimum(np.searchsorted(self._hashes, h), max(len(self._hashes) - 1, 0))
    hit = self._hashes[pos] == h if len(self._hashes) else np.zeros(len(h), bool)
    out[doc[hit]] = True
    return out


def ngram_overlap(heldout_responses: Sequence[str], texts: Sequence[str], n: int = NGRAM) -> float:
  """Fraction of responses sharing at least one n-gram of whitespace tokens with
  the texts (responses shorter than n tokens count as not sharing)."""
  if not heldout_responses:
    return 0.0
  return float(NgramIndex(texts, n).flags(heldout_responses).mean())


NEAR_DUPLICATE_RATIO = 0.8  # difflib ratio of code tokens: a near-duplicate at or above
_CODE_TOKEN = re.compile(r"\w+|[^\w\s]")


def code_tokens(text: str) -> list[str]:
  """Words and single punctuation marks: layout and indentation left out."""
  return _CODE_TOKEN.findall(text)


class NearDuplicateIndex:
  """Reference texts, and for a query the most similar one by difflib's
  SequenceMatcher ratio (2 M / (|a| + |b|), M the matched tokens) over code
  tokens, whatever the query's length (the n-gram check sees nothing in a
  text shorter than its window).

  An exact ratio for every pair would take hours (600 x 40k pairs), so a
  bound prunes first: M is at most the multiset intersection of the two token
  bags, which is at most sum over shared token types of either side's counts
  (two sparse products), and is at most the shorter length; a pair is compared
  exactly only when 2 bound / (|a| + |b|) >= the threshold, best bound first,
  stopping at the first pair at or above it. The bound never prunes a pair at
  or above the threshold, so the flags equal the exhaustive check's."""

  def __init__(self, texts: Sequence[str]):
    import scipy.sparse  # pylint: disable=g-import-not-at-top

    self._sp = scipy.sparse
    self._vocab: dict[str, int] = {}
    self._tokens = [code_tokens(t) for t in texts]
    self._counts = self._matrix(self._tokens, grow=True)
    self._binary = (self._counts > 0).astype(np.float32).T.tocsr()
    self._counts_t = self._counts.T.tocsr()
    self._len = np.array([len(t) for t in self._tokens], np.float32)

  def _matrix(self, token_lists, grow=False):
    rows, cols = [], []
    for i, toks in enumerate(token_lists):
      for t in toks:
        j = self._vocab.setdefault(t, len(self._vocab)) if grow else self._vocab.get(t, -1)
        if j >= 0:
          rows.append(i)
          cols.append(j)
    shape = (len(token_lists), max(len(self._vocab), 1))
    data = np.ones(len(rows), np.float32)
    return self._sp.csr_matrix((data, (rows, cols)), shape=shape)  # duplicates summed

  def best(
    self, queries: Sequence[str], threshold: float = NEAR_DUPLICATE_RATIO, chunk: int = 64
  ) -> list[tuple[float, int]]:
    """Per query (ratio, index) of a reference text at or above `threshold`
    (the first found, best bound first), or (0.0, -1) if none is."""
    from difflib import SequenceMatcher  # pylint: disable=g-import-not-at-top

    out = []
    for lo in range(0, len(queries), chunk):
      qt = [code_tokens(q) for q in queries[lo : lo + chunk]]
      q = self._matrix(qt)
      ql = np.array([len(t) for t in qt], np.float32)
      via_q = (q @ self._binary).toarray()  # sum over shared types of the query's counts
      via_r = ((q > 0).astype(np.float32) @ self._counts_t).toarray()
      bound = np.minimum(np.minimum(via_q, via_r), np.minimum(ql[:, None], self._len[None]))
      bound = 2 * bound / np.maximum(ql[:, None] + self._len[None], 1)
      for i, toks in enumerate(qt):
        found = (0.0, -1)
        cand = np.flatnonzero(bound[i] >= threshold - 1e-6) if toks else []
        for j in cand[np.argsort(-bound[i][cand], kind="stable")] if len(cand) else []:
          sm = SequenceMatcher(None, toks, self._tokens[j], autojunk=False)
          if sm.real_quick_ratio() >= threshold and sm.quick_ratio() >= threshold:
            r = sm.ratio()
            if r >= threshold:
              found = (r, int(j))
              break
        out.append(found)
    return out


def pretraining_pieces(sources: Sequence[str]) -> dict[str, list[str]]:
  """Every function body (the statements after its docstring, as written; with
  or without a docstring) and every docstring (modules, classes, functions;
  cleaned) of the sources: what a held-out body or docstring is compared with."""
  bodies, docs = [], []
  for src in sources:
    try:
      tree = ast.parse(src)
    except (SyntaxError, ValueError):
      continue
    lines = src.split("\n")
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
          docs.append(doc.rstrip())
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        stmts = node.body[1:] if ast.get_docstring(node) is not None else node.body
        if stmts:
          bodies.append("\n".join(lines[stmts[0].lineno - 1 : node.end_lineno]))
  return {"body": bodies, "docstring": docs}


def contamination(
  heldout: Sequence[dict], pretraining: Sequence[str], threshold: float = NEAR_DUPLICATE_RATIO
) -> tuple[list[dict], dict]:
  """Flags per held-out example of the body and docstring tasks against the
  pretraining texts: "ngram" (a shared NGRAM-gram, the body task's check),
  "near_duplicate" (a pretraining function body, resp. docstring, at ratio >=
  threshold: NearDuplicateIndex) with its ratio, and "flagged" (either).
  Returns the flags (one dict per example of those tasks, in order, with its
  "module", "function", "task") and counts per task."""
  pieces = pretraining_pieces(pretraining)
  ngrams = NgramIndex(pretraining)
  flags, counts = [], {}
  for task in ("body", "docstring"):
    ex = [e for e in heldout if e["task"] == task]
    responses = [e["response"] for e in ex]
    near = NearDuplicateIndex(pieces[task]).best(responses, threshold)
    gram = ngrams.flags(responses)
    short = [len(r.split()) < ngrams.n for r in responses]
    for e, (ratio, _), g in zip(ex, near, gram):
      flags.append(
        {
          "module": e["module"],
          "function": e["function"],
          "task": task,
          "ngram": bool(g),
          "near_duplicate": ratio >= threshold,
          "ratio": round(ratio, 4),
          "flagged": bool(g) or ratio >= threshold,
        }
      )
    mine = flags[len(flags) - len(ex) :]
    counts[task] = {
      "examples": len(ex),
      "pretraining_pieces": len(pieces[task]),
      "ngram": int(gram.sum()),
      "near_duplicate": sum(f["near_duplicate"] for f in mine),
      "near_duplicate_shorter_than_ngram": sum(
        f["near_duplicate"] for f, s in zip(mine, short) if s
      ),
      "shorter_than_ngram": sum(short),
      "flagged": sum(f["flagged"] for f in mine),
    }
  return flags, {"threshold": threshold, "n": ngrams.n, **counts}


# ------------------------------------------------------------ dev / test and choices

DEV_PERCENT = 34  # of the held-out modules (by hash): the dev set; the rest: the test set
CHOICES = {"name": 4, "body": 3}  # choices per multiple-choice item (the true one included)
BODY_LENGTH_RATIO = 1.5  # a distractor body's length within this factor of the true one's


def heldout_part(module: str) -> str:
  """ "dev" (for choosing rates and horizons) or "test" (what is reported):
  a held-out module's part, by a hash of its relpath (another than the split's)."""
  return "dev" if zlib.crc32(f"dev:{module}".encode()) % 100 < DEV_PERCENT else "test"


def _order(key: str, k: int) -> np.ndarray:
  return np.random.default_rng(zlib.crc32(key.encode())).permutation(k)


def choice_items(examples: Sequence[dict]) -> list[dict]:
  """Multiple-choice items from one split's examples (instruction lines or not):
    * "name": a name-task prompt; the true name among CHOICES["name"] - 1 other
      names of functions of the same module (names that occur as a word in the
      prompt left out: the model could copy them);
    * "body": a body-task prompt; the true body among the CHOICES["body"] - 1
      other bodies of the same module closest to it in length (characters;
      each within BODY_LENGTH_RATIO of it, and distinct).
  Distractors are drawn by a hash of the function, and the true choice's place
  too; a function without enough distractors gives no item. Item: {"task",
  "prompt", "choices", "answer" (index), "module", "function"}."""
  by_module = collections.defaultdict(list)
  for e in examples:
    by_module[e["module"]].append(e)
  items = []
  for module in sorted(by_module):
    mod = by_module[module]
    names = sorted({e["function"].split(".")[-1] for e in mod})
    bodies = sorted({e["response"] for e in mod if e["task"] == "body"})
    for e in mod:
      key = f"{module}:{e['function']}:{e['task']}"
      if e["task"] == "name":
        words = set(_WORD.findall(e["prompt"]))
        pool = [n for n in names if n != e["response"] and n not in words]
        if len(pool) < CHOICES["name"] - 1:
          continue
        wrong = [pool[i] for i in _order(key, len(pool))[: CHOICES["name"] - 1]]
      elif e["task"] == "body":
        n = len(e["response"])
        near = lambda b: max(len(b), n) <= BODY_LENGTH_RATIO * max(min(len(b), n), 1)
        pool = [b for b in bodies if b != e["response"] and near(b)]
        if len(pool) < CHOICES["body"] - 1:
          continue
        wrong = sorted(pool, key=lambda b: (abs(len(b) - n), b))[: CHOICES["body"] - 1]
      else:
        continue
      choices = [e["response"], *wrong]
      order = _order(key + ":order", len(choices))
      items.append(
        {
          "task": e["task"],
          "prompt": e["prompt"],
          "choices": [choices[i] for i in order],
          "answer": int(np.flatnonzero(order == 0)[0]),
          "module": module,
          "function": e["function"],
        }
      )
  return items


# ------------------------------------------------------------------- metrics


def _parse_body(text: str) -> list[ast.stmt] | None:
  """Statements of a function body given at any indentation, or None."""
  code = [l for l in text.split("\n") if l.strip() and not l.lstrip().startswith("#")]
  if not code:
    return []
  try:
    if code[0][0] in " \t\f":
      return ast.parse("if 1:\n" + text).body[0].body
    return ast.parse(text).body
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None


def _dump(stmts: list[ast.stmt]) -> str:
  """AST dump without positions; strings that are statements (docstrings) cleaned."""
  for n in ast.walk(ast.Module(body=stmts, type_ignores=[])):
    if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant):
      if isinstance(n.value.value, str):
        n.value.value = inspect.cleandoc(n.value.value)
  return ast.dump(ast.Module(body=stmts, type_ignores=[]))


def normalized_equal(pred_body: str, ref_body: str) -> bool:
  """Exact match of two function bodies after AST normalisation (layout,
  indentation, comments, quotes, parentheses and docstring indentation are
  ignored); an unparsable body is never equal."""
  pred, ref = _parse_body(pred_body), _parse_body(ref_body)
  if pred is None or ref is None:
    return False
  return _dump(pred) == _dump(ref)


def module_name(relpath: str) -> str:
  """The dotted import name of a stdlib relpath ("json/__init__.py" -> "json")."""
  parts = relpath[: -len(".py")].split("/")
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


class DoctestResult(NamedTuple):
  """What run_doctests found; pass@1 counts status == "passed"."""

  status: str  # one of STATUSES
  attempted: int  # examples run
  failed: int  # examples that failed
  detail: str  # doctest's report or the error, shortened


# Runs in `python -I -B -X utf8 -c`, a request on stdin. Limits and guards come
# first, then the module import, the candidate's exec and the doctests.
_CHILD = r"""
import json, sys
req = json.loads(sys.stdin.read())
nonce, out = req.pop("nonce"), sys.stdout
def report(status, attempted=0, failed=0, detail=""):
  out.write("\n" + nonce + json.dumps(dict(status=status, attempted=attempted, failed=failed,
                                           detail=detail[-4000:])) + "\n")
  out.flush()
  sys.exit(0)

import resource
cpu, mem = req["cpu_s"], req["memory_bytes"]
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

import builtins, io, _io, os, posix, socket, _socket, _posixsubprocess
def deny(*a, **k):
  raise PermissionError("sandbox: not allowed")
WRITE = set("wax+")
real_open = builtins.open
def guarded_open(file, mode="r", *a, **k):
  if WRITE & set(str(mode)):
    raise PermissionError("sandbox: no file writes")
  return real_open(file, mode, *a, **k)
builtins.open = io.open = _io.open = guarded_open
class GuardedFileIO(_io.FileIO):
  def __init__(self, file, mode="r", *a, **k):
    if WRITE & set(str(mode)):
      raise PermissionError("sandbox: no file writes")
    super().__init__(file, mode, *a, **k)
io.FileIO = _io.FileIO = GuardedFileIO
real_os_open = os.open
WFLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def guarded_os_open(path, flags, *a, **k):
  if flags & WFLAGS:
    raise PermissionError("sandbox: no file writes")
  return real_os_open(path, flags, *a, **k)
os.open = posix.open = guarded_os_open
for name in ("remove unlink rmdir removedirs mkdir makedirs rename renames replace chmod "
             "fchmod lchmod chown fchown lchown link symlink truncate ftruncate utime mkfifo "
             "mknod system popen fork forkpty kill killpg execv execve execl execle execlp "
             "execlpe execvp execvpe spawnv spawnve spawnl spawnle spawnvp spawnvpe spawnlp "
             "spawnlpe posix_spawn posix_spawnp setuid setgid chroot").split():
  for m in (os, posix):
    if hasattr(m, name):
      setattr(m, name, deny)
_posixsubprocess.fork_exec = deny
class NoSocket(socket.socket):
  def __init__(self, *a, **k):
    raise PermissionError("sandbox: no network")
socket.socket = socket.SocketType = _socket.socket = NoSocket
for name in ("socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo"):
  setattr(socket, name, deny)
resource.setrlimit = deny

import __future__, ast, doctest, importlib
try:
  mod = importlib.import_module(req["module"])
except BaseException as e:
  report("error", detail=f"import {req['module']}: {type(e).__name__}: {e}")
ns = dict(vars(mod))
try:
  tree = ast.parse(req["source"])
  defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
  qualname = req["qualname"] or (defs[-1].name if defs else "")
  parts = qualname.split(".")
  name = parts[-1]
  if name not in [d.name for d in defs]:
    raise ValueError(f"the source defines no function {name!r}")
  owner = mod
  for p in parts[:-1]:
    owner = getattr(owner, p)
  flags = 0
  if getattr(mod, "annotations", None) is __future__.annotations:
    flags = __future__.annotations.compiler_flag
  if owner is mod:
    exec(compile(tree, req["file"], "exec", flags=flags, dont_inherit=True), ns)
    func = ns[name]
  else:  # compile it in a class of the owner's name: private names mangle alike
    kw = dict(type_params=[]) if sys.version_info >= (3, 12) else {}
    cls = ast.ClassDef(name=parts[-2], bases=[], keywords=[], body=tree.body,
                       decorator_list=[], **kw)
    tree = ast.fix_missing_locations(ast.Module(body=[cls], type_ignores=[]))
    saved = ns.get(parts[-2])
    exec(compile(tree, req["file"], "exec", flags=flags, dont_inherit=True), ns)
    func = ns.pop(parts[-2]).__dict__[name]
    if isinstance(func, (staticmethod, classmethod)):  # __new__, __init_subclass__
      func = func.__func__
    if saved is not None:
      ns[parts[-2]] = saved
    if "__class__" in func.__code__.co_freevars:  # zero-argument super()
      func.__closure__[func.__code__.co_freevars.index("__class__")].cell_contents = owner
    orig = owner.__dict__.get(name)
    kind = type(orig) if isinstance(orig, (staticmethod, classmethod)) else None
    setattr(owner, name, kind(func) if kind else func)
except BaseException as e:
  report("error", detail=f"{type(e).__name__}: {e}")
if not func.__doc__ or ">>>" not in func.__doc__:
  report("error", detail="no doctest examples in the docstring")
test = doctest.DocTestParser().get_doctest(func.__doc__, dict(ns), qualname, req["file"], 0)
buf = io.StringIO()
res = doctest.DocTestRunner(verbose=False).run(test, out=buf.write)
if res.attempted == 0:
  report("error", detail="no doctest example ran (all skipped)")
report("passed" if res.failed == 0 else "failed", res.attempted, res.failed, buf.getvalue())
"""


def run_doctests(
  function_source: str,
  module_relpath: str,
  timeout_s: float = 10.0,
  *,
  qualname: str | None = None,
  memory_mb: int = 1024,
) -> DoctestResult:
  """Run a (generated) function's docstring doctests in its stdlib module.

  A fresh `python -I` child in an empty temp cwd imports the module by its
  dotted name, execs `function_source` (a def at column 0, decorators left out)
  in a copy of the module's globals, or for `qualname` "Cls.meth" in the class
  (patched on it), and runs the doctests with those globals. Before importing,
  the child limits CPU time (~timeout_s), memory (memory_mb) and file size (0),
  and disables sockets, writing opens and mutating `os` calls / subprocesses.
  Status: "passed" (all examples), "failed" (any example), "timeout" (wall
  clock or CPU limit), "error" (import, compile or exec failed, no examples,
  the child died)."""
  nonce = secrets.token_hex(16)
  request = {
    "nonce": nonce,
    "source": function_source,
    "module": module_name(module_relpath),
    "file": module_relpath,
    "qualname": qualname,
    "cpu_s": max(1, math.ceil(timeout_s)),
    "memory_bytes": memory_mb << 20,
  }
  cwd = tempfile.mkdtemp(prefix="stdlib_doctest_")
  try:
    proc = subprocess.Popen(
      [sys.executable, "-I", "-B", "-X", "utf8", "-c", _CHILD],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      cwd=cwd,
      env={"PATH": os.defpath},
      start_new_session=True,
      text=True,
      encoding="utf-8",
      errors="replace",
    )
    try:
      out, err = proc.communicate(json.dumps(request), timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      return DoctestResult("timeout", 0, 0, f"no result in {timeout_s} s")
  finally:
    shutil.rmtree(cwd, ignore_errors=True)
  if proc.returncode == -signal.SIGXCPU:
    return DoctestResult("timeout", 0, 0, "CPU time limit")
  for line in reversed(out.split("\n")):
    if line.startswith(nonce):
      r = json.loads(line[len(nonce) :])
      return DoctestResult(r["status"], r["attempted"], r["failed"], r["detail"])
  return DoctestResult("error", 0, 0, f"exit {proc.returncode}: {err[-2000:]}")


# --------------------------------------------------------------------- build


def build_from_sources(
  sources: dict[str, str], max_chars: int = MAX_CHARS, pretraining: Sequence[str] | None = None
) -> tuple[dict[str, list[dict]], dict]:
  """Examples per split and stats from {relpath: source}. `pretraining`: the
  texts for the n-gram check (default: the train-split sources)."""
  counts = collections.Counter()
  fns = {s: [] for s in SPLITS}
  doctests = {s: 0 for s in SPLITS}
  for rel in sorted(sources):
    try:
      found = extract_functions(sources[rel], rel, counts)
    except (SyntaxError, ValueError):
      counts["unparsable_modules"] += 1
      continue
    for f in found:
      counts["with_docstring"] += 1
      counts["with_doctest"] += f.has_doctest
      if f.trivial:
        counts["trivial"] += 1
      elif any(len(e["prompt"]) + len(e["response"]) > max_chars for e in make_examples(f)):
        counts["too_long"] += 1
      else:
        fns[module_split(rel)].append(f)
  fns["train"], near = remove_near_duplicates(fns["train"], fns["eval"])
  splits = {}
  exact = {}
  for s in SPLITS:
    seen, examples, made = set(), [], 0
    for f in fns[s]:
      doctests[s] += f.has_doctest
      for e in make_examples(f):
        made += 1
        key = (e["prompt"], e["response"])
        if key not in seen:
          seen.add(key)
          examples.append(e)
    splits[s] = examples
    exact[s] = made - len(examples)
  if pretraining is None:
    pretraining = [sources[r] for r in sorted(sources) if module_split(r) == "train"]
  index = NgramIndex(pretraining)
  overlap = {}
  for task in TASKS:
    responses = [e["response"] for e in splits["eval"] if e["task"] == task]
    flags = index.flags(responses)
    eligible = sum(len(r.split()) >= index.n for r in responses)
    overlap[task] = {
      "responses": len(responses),
      "with_n_tokens": eligible,
      "overlapping": int(flags.sum()),
      "fraction": round(float(flags.mean()) if responses else 0.0, 4),
      "fraction_of_eligible": round(int(flags.sum()) / eligible if eligible else 0.0, 4),
    }
  modules = {s: sorted({f.module for f in fns[s]}) for s in SPLITS}
  stats = {
    "python": platform.python_version(),
    "max_chars": max_chars,
    "heldout_percent": HELDOUT_PERCENT,
    "modules": {
      "total": len(sources),
      "heldout": sum(module_split(r) == "eval" for r in sources),
      "unparsable": counts["unparsable_modules"],
      "with_examples": {s: len(modules[s]) for s in SPLITS},
    },
    "functions": {
      "with_docstring": counts["with_docstring"],
      "with_doctest": counts["with_doctest"],
      "skipped_layout": counts["layout"],
      "skipped_trivial": counts["trivial"],
      "skipped_too_long": counts["too_long"],
      "kept": {s: len(fns[s]) for s in SPLITS},
      "kept_with_doctest": doctests,
    },
    "dedup": {
      "near_duplicate_train_functions": near,
      "exact_duplicate_examples": exact,
    },
    "examples": {
      s: dict(collections.Counter(e["task"] for e in splits[s])) | {"total": len(splits[s])}
      for s in SPLITS
    },
    "ngram_overlap": {
      "n": NGRAM,
      "pretraining_files": len(pretraining),
      "heldout_task": HELDOUT_TASK,
      "body": overlap[HELDOUT_TASK]["fraction"],
      "per_task": overlap,
    },
  }
  return splits, stats


def build(
  root: str | None = None, max_chars: int = MAX_CHARS, include: Sequence[str] | None = None
) -> tuple[dict[str, list[dict]], dict]:
  """Examples per split and stats for the corpus files (`include`: only relpaths
  with one of these prefixes, for quick runs). The n-gram check's pretraining
  text is the corpus train split without the held-out modules."""
  root = root or stdlib_corpus.stdlib_dir()
  files = stdlib_corpus.list_files(root)
  keep = lambda p: not include or p.startswith(tuple(include))
  read = lambda p: stdlib_corpus.read_source(os.path.join(root, p))
  sources = {p: read(p) for s in files for p in files[s] if keep(p)}
  pretraining = [sources[p] for p in files["train"] if keep(p) and module_split(p) == "train"]
  return build_from_sources(sources, max_chars, pretraining)


# The instruction line each task's prompt starts with (for instruction tuning:
# one model must tell the tasks apart). The body task's prompt ends with a
# newline, so the response (the body) starts on its own line.
INSTRUCTIONS = {
  "body": "Write the body of this function.",
  "docstring": "Write the docstring of this function.",
  "name": "Name this function (the _ in its source).",
  "signature": "Write the def line of this function.",
}


def with_instruction(example: dict) -> dict:
  """The example with its task's instruction line on top of its prompt."""
  return {**example, "prompt": f"# {INSTRUCTIONS[example['task']]}\n{example['prompt']}\n"}


def prepare_sft(out: str, max_chars: int = MAX_CHARS) -> dict:
  """Instruction data for the sft: dataset, once per (Python, max_chars):
  out/train.jsonl (every task of the training modules), out/validation.jsonl
  (every task of the held-out modules), out/eval_<task>.jsonl, out/stats.json,
  prompts with their instruction line. Returns the stats; an existing
  stats.json means it is prepared already (the files are written first)."""
  path = os.path.join(out, "stats.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  os.makedirs(out, exist_ok=True)
  splits, stats = build(max_chars=max_chars)
  train = [with_instruction(e) for e in splits["train"]]
  held = [with_instruction(e) for e in splits["eval"]]
  files = {"train": train, "validation": held}
  files |= {f"eval_{t}": [e for e in held if e["task"] == t] for t in TASKS}
  for name, examples in files.items():
    _write_jsonl(os.path.join(out, f"{name}.jsonl.tmp"), examples)
    os.replace(os.path.join(out, f"{name}.jsonl.tmp"), os.path.join(out, f"{name}.jsonl"))
  stats["instructions"] = INSTRUCTIONS
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=1)
  os.replace(path + ".tmp", path)
  return stats


def _write_jsonl(path: str, examples: list[dict]):
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for e in examples:
      f.write(json.dumps(e, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> dict:
  """The CLI: writes the task files to --out and returns the stats."""
  p = argparse.ArgumentParser(
    prog="python -m sparse_lm.data.stdlib_tasks", description=__doc__.split("\n")[0]
  )
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--max_chars", type=int, default=MAX_CHARS, help="max prompt+response chars")
  p.add_argument("--include", default="", help="comma-separated relpath prefixes (quick runs)")
  args = p.parse_args(argv)
  t0 = time.time()
  include = [s for s in args.include.split(",") if s]
  splits, stats = build(max_chars=args.max_chars, include=include)
  files = stdlib_corpus.list_files()
  heldout = {
    "python": platform.python_version(),
    "heldout_percent": HELDOUT_PERCENT,
    "modules": heldout_modules(),
    "exclude_from_pretraining": heldout_modules(split="train"),
    "corpus_validation": [p for p in files["validation"] if module_split(p) == "eval"],
  }
  os.makedirs(args.out, exist_ok=True)
  for s in SPLITS:
    _write_jsonl(os.path.join(args.out, f"{s}.jsonl"), splits[s])
  for name, obj in (("heldout_modules.json", heldout), ("stats.json", stats)):
    with open(os.path.join(args.out, name), "w", encoding="utf-8", newline="\n") as f:
      f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
  fn, ex, ov = stats["functions"], stats["examples"], stats["ngram_overlap"]
  print(
    f"stdlib tasks (Python {stats['python']}): {fn['with_docstring']} functions with docstrings "
    f"({fn['with_doctest']} with doctests), kept {fn['kept']['train']} train / "
    f"{fn['kept']['eval']} eval from {len(heldout['modules'])} held-out modules\n"
    f"examples: train {ex['train']}\n          eval  {ex['eval']}\n"
    f"dedup: {stats['dedup']}\n"
    f"{ov['n']}-gram overlap of held-out bodies with pretraining text: {ov['body']:.2%}\n"
    f"wrote {args.out} in {time.time() - t0:.1f} s"
  )
  return stats


if __name__ == "__main__":
  main()
