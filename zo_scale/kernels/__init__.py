"""Fused Triton kernels (CUDA) that generate z in registers; see zo_scale.rng for the specification.

Importing this package does not import Triton: the kernels load on first use, so CPU-only
installs and ``rng.draw_range``'s dispatch stay cheap. Call ``available()`` before using them.

Public API (all take flat contiguous shards; ``start`` is the global flat index of element 0):
  normal_range(z, start, n, device, out=None)                      z as float32
  draw_range(z, start, n, device, out=None)                        z or Rademacher u, by z.kind
  philox_words(z, first_block, n_blocks, device)                   raw Philox words (tests)
  perturb_(local, z, start, scale, hess=None)                      local += scale·d
  perturb_from_master_(local, master, z, start, scale, hess=None)  local = cast(master + scale·d)
  perturb_shards_(shards, scale)                                   either, for many shards, small ones batched
  mezo_restore_update_(local, zs, start, ...)                      fused restore + MeZO step
  fzoo_restore_update_(local, us, start, ...)                      fused restore + FZOO step (N directions)
  hizoo_restore_update_(local, hess, z, start, ...)                fused restore + HiZOO step
  helene_restore_update_(local, m, h, zs, start, ...)              fused restore + HELENE step
"""

from __future__ import annotations

import importlib
import os

_API = {
    "normal_range": "philox",
    "draw_range": "philox",
    "philox_words": "philox",
    "perturb_": "perturb",
    "perturb_from_master_": "perturb",
    "perturb_shards_": "perturb",
    "mezo_restore_update_": "update",
    "fzoo_restore_update_": "update",
    "hizoo_restore_update_": "update",
    "helene_restore_update_": "update",
    "MAX_SAMPLES": "update",
    "DTYPES": "philox",
}
_triton_ok: bool | None = None


def _triton_importable() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_ok = True
        except Exception:  # ImportError, or a broken install raising at import
            _triton_ok = False
    return _triton_ok


def interpreter_enabled() -> bool:
    """Tests on CPU: Triton's interpreter runs the kernels on CPU tensors."""
    return os.environ.get("ZO_SCALE_TRITON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """True when the kernels can run: Triton imports and CUDA is there (or the CPU interpreter
    was asked for with ZO_SCALE_TRITON_CPU=1 and TRITON_INTERPRET=1)."""
    if os.environ.get("ZO_SCALE_NO_TRITON") == "1":  # escape hatch: force the torch path
        return False
    if not _triton_importable():
        return False
    if interpreter_enabled():
        return True
    import torch

    return torch.cuda.is_available()


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["available", "interpreter_enabled", *_API]
