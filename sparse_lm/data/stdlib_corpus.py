"""The embedded corpus: this Python's standard library source, as a TFDS dataset.

`python_stdlib` is a real `tfds.core.GeneratorBasedBuilder` over the `.py`
files under `sysconfig.get_paths()["stdlib"]`, so it needs no download and is
prepared on first use into the TFDS data dir like any other dataset.

What is in it: every `.py` file of the standard library except
  * site-packages (third-party code, differs per machine),
  * test suites (`test/`, `tests/`, `idle_test/`): a third of the bytes, full
    of deliberately broken or oddly encoded files,
  * build-specific files (`config-*/`, `_sysconfigdata_*.py`), whose text
    depends on where Python was built, not on its version.

Split: by file path, `zlib.crc32(relpath) % 100 < 5` -> validation (~5%), the
rest -> train. The builder config is named after the running Python version
("py3.11.7"), so another Python prepares its own copy instead of silently
reusing a stale one. Raw text bytes and file counts per split are recorded in
the dataset's metadata at preparation time; `fingerprint(builder)` reads them.
"""

from __future__ import annotations

import os
import platform
import sysconfig
import tokenize
import zlib

from etils import epath
import tensorflow_datasets as tfds

NAME = "python_stdlib"
VALIDATION_PERCENT = 5
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def config_name() -> str:
  return "py" + platform.python_version()


def split_of(relpath: str) -> str:
  """The split a file belongs to, from a stable hash of its relative path."""
  return "validation" if zlib.crc32(relpath.encode()) % 100 < VALIDATION_PERCENT else "train"


def list_files(root: str | None = None) -> dict[str, list[str]]:
  """Relative paths of the corpus files, sorted, per split."""
  root = root or stdlib_dir()
  out = {"train": [], "validation": []}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
    for f in sorted(filenames):
      if f.endswith(".py") and not f.startswith("_sysconfigdata_"):
        rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
        out[split_of(rel)].append(rel)
  return out


def read_source(path: str) -> str:
  """A source file as text, honouring its PEP 263 coding cookie."""
  with open(path, "rb") as f:
    encoding, _ = tokenize.detect_encoding(f.readline)
    f.seek(0)
    return f.read().decode(encoding, errors="replace")


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """Source files of the running Python's standard library."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Standard library .py files without test suites; 5% validation by path hash."
  }
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(
      name=config_name(), description=f"Python {platform.python_version()} standard library"
    )
  ]

  # TFDS 4.9's default code_path needs the `importlib_resources` backport,
  # which it declares only for Python < 3.9; the file path is all it wants.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "text": tfds.features.Text(),
          "path": tfds.features.Text(),  # relative to the stdlib dir
        }
      ),
      supervised_keys=None,
      homepage="https://docs.python.org/3/library/",
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    root = stdlib_dir()
    files = list_files(root)
    splits = {}
    for split, rels in files.items():
      texts = {rel: read_source(os.path.join(root, rel)) for rel in rels}
      self.info.metadata[split] = {
        "files": len(rels),
        "bytes": sum(len(t.encode()) for t in texts.values()),
      }
      splits[split] = self._generate_examples(texts)
    self.info.metadata["python"] = platform.python_version()
    return splits

  def _generate_examples(self, texts):
    for rel, text in texts.items():
      yield rel, {"text": text, "path": rel}


def fingerprint(builder: PythonStdlib) -> dict:
  """What was prepared: name, Python version, files and text bytes per split."""
  md = builder.info.metadata
  return {
    "dataset": f"{NAME}/{builder.builder_config.name}:{builder.version}",
    "python": md["python"],
    "splits": {s: dict(md[s]) for s in ("train", "validation")},
  }
