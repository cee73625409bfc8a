"""The checkpoint families: every module of this folder that defines FAMILY
(a describe.Family). A new family is a new module here, plus its fixtures in
tests/fixtures/hf; nothing else lists them."""

from __future__ import annotations

import importlib
import pkgutil

from sparse_lm.convert.describe import Family
from sparse_lm.errors import ConvertError


def _discover() -> dict[str, Family]:
  out = {}
  for mod in pkgutil.iter_modules(__path__):  # sorted by name
    fam = getattr(importlib.import_module(f"{__name__}.{mod.name}"), "FAMILY", None)
    if fam is not None:
      if fam.name in out:
        raise ValueError(f"families/{mod.name}.py: a second family named {fam.name!r}")
      out[fam.name] = fam
  return out


FAMILIES = _discover()
FAMILIES_BY_ARCH = {f.architecture: f for f in FAMILIES.values()}


def family_of(hf: dict, path: str) -> Family:
  """The family of a config.json (its "architectures" entry)."""
  archs = hf.get("architectures") or []
  for arch in archs:
    if arch in FAMILIES_BY_ARCH:
      return FAMILIES_BY_ARCH[arch]
  known = ", ".join(FAMILIES_BY_ARCH)
  raise ConvertError(f"{path}: architectures {archs} is not one of {known}")
