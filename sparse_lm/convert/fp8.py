"""FP8 block-scaled tensors (DeepSeek-V3's release) read as the float tensors they encode.

The format as transformers reads it (integrations/finegrained_fp8.py,
_dequantize_fp8_weight; config.json's quantization_config quant_method
"fp8", weight_block_size [bn, bk], 128 x 128 in the release): a Linear's
weight `X` [N, K] is stored as float8 e4m3 (safetensors F8_E4M3) beside
`X_scale_inv` [ceil(N / bn), ceil(K / bk)] float32, and X[i, j] =
fp8(X)[i, j] * X_scale_inv[i // bn, j // bk] (the last row and column
blocks may be partial). `dequantized(t)` is a view of a checkpoint's tensors
where each such pair reads as `X` (float32, exact: an e4m3 value times a
float32 scale rounds once, as transformers' float32 product does), one
tensor at a time, so the importer converts it to the chosen dtype like any
other. Export writes the float tensors (bfloat16 or the run's dtype), never FP8.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from sparse_lm.errors import ConvertError

SUFFIX = "_scale_inv"


def dequantize(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """(w [N, K] float8_e4m3fn, scale_inv [ceil(N / bn), ceil(K / bk)]) -> float32 [N, K]."""
  (N, K), (bn, bk) = w.shape, block
  if scale_inv.shape != (-(-N // bn), -(-K // bk)):
    raise ConvertError(
      f"FP8 weight {list(w.shape)} and its weight_scale_inv {list(scale_inv.shape)} do not "
      f"match weight_block_size {[bn, bk]}"
    )
  s = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), bn, 0), bk, 1)[:N, :K]
  return np.asarray(w).astype(np.float32) * s


class Dequantized:
  """The tensors of a checkpoint (safetensors_io.Tensors or another view),
  each FP8 weight `X` with its `X_scale_inv` seen as the one float32 `X`."""

  def __init__(self, t, block: tuple[int, int]):
    self.t, self.dir, self.block = t, t.dir, tuple(block)
    self.pairs = {n.removesuffix(SUFFIX) for n in t.names() if n.endswith(SUFFIX)}
    self._names = sorted(set(t.names()) - {p + SUFFIX for p in self.pairs})

  def __contains__(self, name: str) -> bool:
    return name in self._names

  def names(self) -> list[str]:
    return list(self._names)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.t.shape(name)

  def _raw(self, name: str) -> np.ndarray:
    """An F8_E4M3 tensor (the reader takes wider types only)."""
    path, info, base = self.t._where[name]  # pylint: disable=protected-access
    if info["dtype"] != "F8_E4M3":
      raise ConvertError(f"{path}: FP8 tensor {name!r} has dtype {info['dtype']}, not F8_E4M3")
    dt = ml_dtypes.float8_e4m3fn
    return np.memmap(path, dt, "r", base + info["data_offsets"][0], tuple(info["shape"]))

  def get(self, name: str) -> np.ndarray:
    if name not in self.pairs:
      return self.t.get(name)
    return dequantize(self._raw(name), self.t.get(name + SUFFIX), self.block)

  def rows(self, name: str, start: int, stop: int) -> np.ndarray:
    return self.get(name)[start:stop] if name in self.pairs else self.t.rows(name, start, stop)


def dequantized(t):
  """`t`, or its Dequantized view where config.json's quantization_config
  is FP8 with block scales (its weight_block_size)."""
  path = os.path.join(t.dir, "config.json")
  q = {}
  if os.path.exists(path):
    with open(path) as f:
      q = json.load(f).get("quantization_config") or {}
  if q.get("quant_method") != "fp8":
    return t
  block = q.get("weight_block_size")
  if not block or len(block) != 2:
    raise ConvertError(f"{path}: quantization_config.weight_block_size {block!r} is not [bn, bk]")
  return Dequantized(t, block)
