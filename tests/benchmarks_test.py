"""benchmarks/gpu_check.sh's smoke mode (--cpu): the prepared GPU script's code
paths on tiny shapes, so that it does not rot between the runs on a GPU."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_mode_writes_one_table_of_every_check(tmp_path):
  out = tmp_path / "gpu_check.md"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as on a GPU
  r = subprocess.run(
    ["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(out)],
    cwd=ROOT,
    env=dict(env, PYTHON=sys.executable),
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  text = out.read_text()
  caption, *table = [l for l in text.splitlines() if l.strip()]
  assert caption.startswith("gpu_check (cpu mode): cpu, 1 device(s)"), caption
  assert table[0].startswith("| check | case | measured |"), table
  rows = [[c.strip() for c in l.strip()[1:-1].split("|")] for l in table[2:]]
  assert all(len(r) == 6 for r in rows), table
  checks = [r[0] for r in rows]
  assert checks.count("MoE layer fwd+bwd") == 2, checks  # capacity, dropless (E 8; GPU: 8, 64)
  assert checks.count("dropless -> grouped matmul?") == 1, checks
  assert checks.count("train step MFU") == 1, checks
  assert checks.count("decode tokens/s, batch 1") == 1, checks
  assert "FAILED" not in text, text
  for r in rows:
    if r[0] == "MoE layer fwd+bwd":
      assert "/ragged" in r[1] or "/batched" in r[1], r  # the GPU's implementation
      assert re.fullmatch(r"[\d.]+x", r[4]), r
    if r[0] == "dropless -> grouped matmul?":  # XLA:CPU rewrites ragged-dot into dots
      assert r[2].startswith("no:") and "ragged-dot 0" in r[5], r
    if r[0] == "train step MFU":
      assert "remat=" in r[1] and "step " in r[5], r
