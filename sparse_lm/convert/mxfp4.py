"""MXFP4 tensors (GPT-OSS's released experts) read as the float tensors they encode.

The OCP Microscaling format as transformers reads it
(integrations/mxfp4.py, convert_moe_packed_tensors): a tensor `X` of
transformers' layout [E, in, out] is stored as `X_blocks` [E, out, in / 32,
16] uint8 and `X_scales` [E, out, in / 32] uint8. Each block holds 32
consecutive values along `in`, two FP4 (E2M1) codes to a byte (the even
element in the low nibble), all times 2^(scale - 127) (the scale an E8M0
exponent). `dequantized(tensors)` is a view of a checkpoint's tensors where
each such pair reads as `X` (float32, exact: every FP4 value times a power of
two is a float32), one tensor at a time; the importer then converts it to the
chosen dtype like any other tensor; the host holds that float32 tensor (2.1
GB for gpt-oss-20b's gate_up_proj [32, 2880, 5760]) and one expert's
temporaries. Export writes the float tensors (in the source's dtype,
bfloat16 for the released configs), never MXFP4.
"""

from __future__ import annotations

import numpy as np

from sparse_lm.errors import ConvertError

# E2M1 codes 0..15 (sign bit 3): transformers' FP4_VALUES.
FP4_VALUES = np.array(
  [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
  np.float32,
)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """(blocks [..., R, G, 16] uint8, scales [..., R, G] uint8) -> float32 [..., G * 32, R]."""
  blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
  if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
    raise ConvertError(
      f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match "
      "([..., rows, groups, 16] and [..., rows, groups])"
    )
  *lead, R, G, _ = blocks.shape
  out = np.empty((*lead, G * 32, R), np.float32)
  # One leading index (an expert) at a time: the host holds the output and
  # one expert's temporaries, not three copies of the whole tensor.
  for i in np.ndindex(*lead):
    b, s = blocks[i], scales[i]
    vals = np.empty((R, G, 32), np.float32)
    vals[..., 0::2] = FP4_VALUES[b & 0x0F]
    vals[..., 1::2] = FP4_VALUES[b >> 4]
    vals = np.ldexp(vals, s.astype(np.int32)[..., None] - 127)
    out[i] = vals.reshape(R, G * 32).T
  return out


class Dequantized:
  """The tensors of a checkpoint (safetensors_io.Tensors), each MXFP4 pair
  `X_blocks` / `X_scales` seen as the one float32 tensor `X`."""

  def __init__(self, t):
    self.t, self.dir = t, t.dir
    self.pairs = {
      n.removesuffix("_blocks")
      for n in t.names()
      if n.endswith("_blocks") and n.removesuffix("_blocks") + "_scales" in t
    }
    hidden = {f"{p}{s}" for p in self.pairs for s in ("_blocks", "_scales")}
    self._names = sorted((set(t.names()) - hidden) | self.pairs)

  def __contains__(self, name: str) -> bool:
    return name in self.pairs or (name in self.t and name in self._names)

  def names(self) -> list[str]:
    return list(self._names)

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self.pairs:
      return self.t.shape(name)
    *lead, R, G, _ = self.t.shape(name + "_blocks")
    return (*lead, G * 32, R)

  def _raw(self, name: str) -> np.ndarray:
    """A uint8 tensor's bytes (the reader takes float tensors only)."""
    path, info, base = self.t._where[name]  # pylint: disable=protected-access
    if info["dtype"] != "U8":
      raise ConvertError(f"{path}: MXFP4 tensor {name!r} has dtype {info['dtype']}, not U8")
    return np.memmap(path, np.uint8, "r", base + info["data_offsets"][0], tuple(info["shape"]))

  def get(self, name: str) -> np.ndarray:
    if name not in self.pairs:
      return self.t.get(name)
    return dequantize(self._raw(name + "_blocks"), self._raw(name + "_scales"))

  def rows(self, name: str, start: int, stop: int) -> np.ndarray:
    return self.get(name)[start:stop] if name in self.pairs else self.t.rows(name, start, stop)


def dequantized(t):
  """`t`, or its Dequantized view where it holds MXFP4 pairs."""
  view = Dequantized(t)
  return view if view.pairs else t
