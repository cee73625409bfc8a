"""The notebooks run top to bottom on tiny settings (executed with nbclient)."""

import os

import helpers
from nbclient import NotebookClient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["quickstart", "analysis"])
def test_notebook_executes(name, tmp_path, monkeypatch, tfds_dir):
  monkeypatch.setenv("NOTEBOOK_STEPS", "8")
  monkeypatch.setenv("NOTEBOOK_EXPERTS", "1,4")  # dense and one MoE: every plot, two runs
  monkeypatch.setenv("NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("NOTEBOOK_SWEEP_DIR", str(tmp_path / "no_sweep_here"))
  # The session's TFDS dir: the corpus and the notebooks' tokenizer are prepared once.
  monkeypatch.setenv("NOTEBOOK_DATA_DIR", tfds_dir)
  monkeypatch.setenv("XLA_FLAGS", helpers.XLA_FLAGS)  # one device, like a laptop
  # The kernel and the sweep points it starts: the suite's compilation cache.
  for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    monkeypatch.setenv(k, helpers.ENV[k])
  nb = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  ).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  if name == "analysis":
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) == 3
  else:
    text = "".join(o.get("text", "") for o in outputs)
    assert "-> expert" in text and "active" in text
