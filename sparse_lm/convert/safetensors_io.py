"""Safetensors checkpoint folders: read through memory maps, written in shards.

A safetensors file is an 8-byte header length, a JSON header ({name: dtype,
shape, data_offsets}) and the raw little-endian arrays: `Tensors.get` is a
numpy view of the file (no copy), so a reader holds what it slices, plus the
page cache. `write_shards` writes each shard's header from a plan of the
tensors, then the tensors one at a time as they come.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import ml_dtypes
import numpy as np

from sparse_lm.errors import ConvertError

INDEX = "model.safetensors.index.json"

_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class Tensors:
  """The tensors of a checkpoint folder, by name, as read-only memory maps.

  Reads model.safetensors.index.json's weight_map when there is one, else
  model.safetensors. `get(name)` is a numpy view of the file (no copy)."""

  def __init__(self, hf_dir: str):
    self.dir = hf_dir
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
      files = ["model.safetensors"]
    else:
      raise ConvertError(
        f"{hf_dir}: no model.safetensors and no {INDEX} (only safetensors checkpoints are read)"
      )
    self._where: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.exists(path):
        raise ConvertError(f"{path}: named in {INDEX} but missing")
      with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
          header = json.loads(f.read(n))
        except ValueError as e:
          raise ConvertError(f"{path}: not a safetensors file ({e})") from None
      header.pop("__metadata__", None)
      for k, info in header.items():
        self._where[k] = (path, info, 8 + n)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def names(self) -> list[str]:
    return sorted(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def _info(self, name: str):
    if name not in self._where:
      raise ConvertError(f"{self.dir}: the checkpoint has no tensor {name!r}")
    path, info, base = self._where[name]
    if info["dtype"] not in _DTYPES:
      raise ConvertError(f"{path}: tensor {name!r} has dtype {info['dtype']}, not a float type")
    return path, _DTYPES[info["dtype"]], base + info["data_offsets"][0], tuple(info["shape"])

  def get(self, name: str) -> np.ndarray:
    path, dtype, start, shape = self._info(name)
    if not np.prod(shape, dtype=np.int64):
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype, "r", start, shape)

  def rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop (the first axis) of a tensor, as a memory map of those
    rows only: its pages leave the process's memory when it is dropped."""
    path, dtype, offset, shape = self._info(name)
    shape = (stop - start, *shape[1:])
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    if not row * shape[0]:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype, "r", offset + start * row, shape)


CHUNK_BYTES = 16 * 2**20  # the block of rows read or written at a time


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """np.empty whose data starts on an `align`-byte boundary: XLA's CPU client
  then takes it without a copy (jax.device_put(a, may_alias=True))."""
  n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  buf = np.empty(n + align, np.uint8)
  skip = -buf.ctypes.data % align
  return buf[skip : skip + n].view(dtype).reshape(shape)


def read_rows(t: Tensors, name: str, how: str, shape, dtype) -> np.ndarray:
  """Tensor `name` as our array of `shape` and `dtype`, read a block of rows
  at a time into one aligned array: `how` "same" (ours is the tensor
  reshaped) or "t" (ours is its transpose [cols, rows], reshaped). The host
  holds the result and one block (about CHUNK_BYTES) of the file's pages."""
  src = t.shape(name)
  rows, cols = (src[0], int(np.prod(src[1:], dtype=np.int64))) if src else (1, 1)
  out = aligned_empty(shape, dtype)
  flat = out.reshape(cols, rows) if how == "t" else out.reshape(rows, cols)
  step = max(1, CHUNK_BYTES // max(1, cols * np.dtype(dtype).itemsize))
  for r in range(0, rows, step):
    block = (t.rows(name, r, min(rows, r + step)) if src else t.get(name)).reshape(-1, cols)
    if how == "t":
      flat[:, r : r + len(block)] = block.T
    else:
      flat[r : r + len(block)] = block
    del block
  return out


def _code(dtype) -> str:
  """The safetensors dtype code of a numpy dtype ("BF16" for bfloat16)."""
  for code, dt in _DTYPES.items():
    if np.dtype(dt) == np.dtype(dtype):
      return code
  raise ConvertError(f"dtype {np.dtype(dtype)} has no safetensors code")


def _write_rows(f, array: np.ndarray, dtype):
  """Writes `array` C-ordered as `dtype`, a block of rows at a time."""
  if array.ndim == 0 or array.size == 0:
    f.write(np.ascontiguousarray(array, dtype).tobytes())
    return
  row = max(1, array[0].size * np.dtype(dtype).itemsize)
  step = max(1, CHUNK_BYTES // row)
  for r in range(0, array.shape[0], step):
    f.write(np.ascontiguousarray(array[r : r + step], dtype).view(np.uint8).data)


def write_shards(
  plan: list[tuple[str, tuple, np.dtype]],
  tensors: Iterable[tuple[str, np.ndarray]],
  out_dir: str,
  shard_mb: float,
) -> dict:
  """Writes the tensors `plan` lists ((name, shape, dtype) in order), which
  `tensors` yields in that order, into shards of at most `shard_mb` MiB (a
  larger tensor alone): model.safetensors, or model-0000i-of-0000n.safetensors
  and the index. Each shard's header is written from the plan first, then
  each tensor's bytes as it comes, so the writer holds one tensor at a time
  (safetensors.numpy.save_file would hold the whole shard); a tensor may be
  a view (a transpose) in another dtype: it is made contiguous and cast a
  block of rows at a time. A tensor that is not the plan's next is an
  error. Shards get their final names at the end.
  Returns {"tensors", "shards", "bytes"}."""
  shards: list[list[tuple[str, tuple, np.dtype, int]]] = [[]]
  size = total = 0
  for name, shape, dtype in plan:
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if shards[-1] and size + n > shard_mb * 2**20:
      shards.append([])
      size = 0
    shards[-1].append((name, tuple(shape), np.dtype(dtype), n))
    size, total = size + n, total + n
  it = iter(tensors)
  written: list[tuple[str, list[str]]] = []  # (temporary file, its tensors' names)
  for i, shard in enumerate(shards):
    header, offset = {}, 0
    for name, shape, dtype, n in shard:
      header[name] = {
        "dtype": _code(dtype),
        "shape": list(shape),
        "data_offsets": [offset, offset + n],
      }
      offset += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    path = os.path.join(out_dir, f".shard-{i}.safetensors")
    with open(path, "wb") as f:
      f.write(len(text).to_bytes(8, "little"))
      f.write(text)
      for name, shape, dtype, _ in shard:
        got_name, array = next(it)
        if got_name != name or array.shape != shape:
          raise ConvertError(
            f"export: tensor {got_name!r} {array.shape} {array.dtype} is not the planned "
            f"{name!r} {shape} {dtype}"
          )
        _write_rows(f, array, dtype)
        del array
    written.append((path, [name for name, *_ in shard]))
  n, weight_map = len(written), {}
  for i, (path, names) in enumerate(written):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
    os.rename(path, os.path.join(out_dir, final))
    weight_map.update(dict.fromkeys(names, final))
  if n > 1:
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  return {"tensors": len(weight_map), "shards": n, "bytes": total}
