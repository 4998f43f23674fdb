"""One logical perturbation z for the whole model, computable slice by slice.

Element ``i`` (flat, row-major) of parameter ``p`` at step ``t`` is a pure function of
``(run seed, t, stable id of p, i)`` — never of the shard layout, world size or device:

* key     ``(k0, k1)``  = splitmix64(run seed, stable id of p), split into two 32-bit words
* counter ``(lo32(i // 4), hi32(i // 4), t, stream)``
* Philox4x32-10 of that counter gives four 32-bit words; Box–Muller turns words (0, 1) into
  elements 4b, 4b+1 and words (2, 3) into 4b+2, 4b+3 (b = i // 4).

``stream`` separates independent draws within one step (n-SPSA samples use 0, 1, ...).

Rademacher directions (FZOO) come from the same words: element ``i`` is +1 where bit 31 of word
``i % 4`` of block ``i // 4`` is 0, else −1 — one Philox bit per element, the same tiling as the
Gaussian, so every kernel and shard split that serves z serves u unchanged. ``ZStream.kind`` says
which of the two a stream draws; ``draw_range`` dispatches on it.

Three implementations compute the same integers: ``philox4x32_reference`` (torch int64, any
device — the specification), the C kernel in ``csrc/philox_normal.c`` (fast CPU path, built on
first use with the system C compiler) and the Triton kernels in ``zo_scale.kernels`` (CUDA).
Floats agree to ~1e-6 between them; within one implementation they are bit-identical for
any split of a range.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10


def param_uid(name: str) -> int:
    """Stable 64-bit id of a parameter from its canonical name (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


KINDS = ("normal", "rademacher")


@dataclass(frozen=True)
class ZStream:
    """Everything that selects one parameter's z except the element index."""

    k0: int
    k1: int
    step: int
    stream: int = 0
    kind: str = "normal"  # "normal": Box–Muller Gaussians; "rademacher": ±1 from one bit per element

    @staticmethod
    def make(seed: int, uid: int, step: int, stream: int = 0, kind: str = "normal") -> "ZStream":
        if not 0 <= step <= MASK32 or not 0 <= stream <= MASK32:
            raise ValueError(f"step and stream must fit in 32 bits, got step={step} stream={stream}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        key = _splitmix64(_splitmix64(seed & MASK64) ^ uid)
        return ZStream(key & MASK32, key >> 32, step, stream, kind)


# ----------------------------------------------------------------------------------------
# Reference: Philox4x32-10 and Box-Muller in plain torch (int64 holds uint32 values).
# ----------------------------------------------------------------------------------------


def philox4x32_reference(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; returns four such tensors."""
    for _ in range(rounds):
        p0 = c0 * PHILOX_M0  # < 2**64: wraps in int64, low/high words still come out right
        p1 = c2 * PHILOX_M1
        n0 = ((p1 >> 32) & MASK32) ^ c1 ^ k0
        n2 = ((p0 >> 32) & MASK32) ^ c3 ^ k1
        c1, c3 = p1 & MASK32, p0 & MASK32
        c0, c2 = n0, n2
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox_words_reference(z: ZStream, first_block: int, n_blocks: int, device="cpu"):
    """The four uint32 words (as int64) of blocks [first_block, first_block + n_blocks)."""
    b = torch.arange(first_block, first_block + n_blocks, dtype=torch.int64, device=device)
    c2 = torch.full_like(b, z.step)
    c3 = torch.full_like(b, z.stream)
    return philox4x32_reference(b & MASK32, (b >> 32) & MASK32, c2, c3, z.k0, z.k1)


def words_to_normals(x0, x1, x2, x3) -> torch.Tensor:
    """Box-Muller in float32, interleaved so block b yields elements 4b .. 4b+3."""
    inv24 = 1.0 / 16777216.0
    ua = ((x0 >> 8) + 1).to(torch.float32) * inv24  # (0, 1]: log stays finite
    va = (x1 >> 8).to(torch.float32) * inv24  # [0, 1)
    ub = ((x2 >> 8) + 1).to(torch.float32) * inv24
    vb = (x3 >> 8).to(torch.float32) * inv24
    ra, rb = torch.sqrt(-2.0 * torch.log(ua)), torch.sqrt(-2.0 * torch.log(ub))
    two_pi = torch.tensor(2.0 * math.pi, dtype=torch.float32)
    ta, tb = two_pi * va, two_pi * vb
    return torch.stack([ra * torch.cos(ta), ra * torch.sin(ta), rb * torch.cos(tb), rb * torch.sin(tb)], 1).reshape(-1)


def words_to_signs(x0, x1, x2, x3) -> torch.Tensor:
    """±1.0 in float32 from the top bit of each word, interleaved as words_to_normals."""
    bits = torch.stack([x0, x1, x2, x3], 1).reshape(-1) >> 31
    return (1 - 2 * bits).to(torch.float32)


def _range_reference(z: ZStream, start: int, n: int, device, to_values) -> torch.Tensor:
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    first, last = start // 4, (start + n - 1) // 4
    full = to_values(*philox_words_reference(z, first, last - first + 1, device))
    off = start - 4 * first
    return full[off : off + n]


def sign_range_reference(z: ZStream, start: int, n: int, device="cpu") -> torch.Tensor:
    """u[start : start + n] of one parameter (±1, float32), computed by the torch reference."""
    return _range_reference(z, start, n, device, words_to_signs)


def normal_range_reference(z: ZStream, start: int, n: int, device="cpu") -> torch.Tensor:
    """z[start : start + n] of one parameter, float32, computed by the torch reference."""
    return _range_reference(z, start, n, device, words_to_normals)


# ----------------------------------------------------------------------------------------
# Fast CPU path: the C kernel, compiled once per machine into a cache directory.
# ----------------------------------------------------------------------------------------

_SRC = Path(__file__).parent / "csrc" / "philox_normal.c"
_lib = None
_lib_lock = threading.Lock()
_lib_failed = False


def _cache_dir() -> Path:
    root = os.environ.get("ZO_SCALE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "zo_scale"
    )
    return Path(root)


def _build_c_kernel() -> Path:
    src = _SRC.read_bytes()
    cc = os.environ.get("CC", "cc")
    flags = ["-O3", "-fopenmp", "-fPIC", "-shared"]  # no -ffast-math: same floats on every machine
    tag = hashlib.sha256(src + " ".join([cc, *flags, sys.platform]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"philox_normal_{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Several ranks may build at once: each builds to its own temp file, then renames atomically.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(_SRC), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _c_kernel():
    global _lib, _lib_failed
    if _lib is not None or _lib_failed or os.environ.get("ZO_SCALE_NO_C_KERNEL") == "1":
        return _lib
    with _lib_lock:
        if _lib is None and not _lib_failed:
            try:
                lib = ctypes.CDLL(str(_build_c_kernel()))
                for fn in (lib.zo_philox_normal, lib.zo_philox_sign):
                    fn.argtypes = [ctypes.c_uint64, ctypes.c_int64] + [ctypes.c_uint32] * 4 + [ctypes.c_void_p, ctypes.c_int]
                    fn.restype = None
                _lib = lib
            except (OSError, subprocess.CalledProcessError) as err:
                _lib_failed = True
                detail = getattr(err, "stderr", "") or str(err)
                warnings.warn(f"zo_scale: C kernel for z unavailable ({detail.strip()[:200]}); using the slower torch path")
    return _lib


def has_c_kernel() -> bool:
    return _c_kernel() is not None


def _is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (``zo_scale.dryrun``) has a size and no memory: the C kernel would write through a null
    pointer, and the dry run wants z's allocation, not its values."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


_REFERENCE = {"normal": normal_range_reference, "rademacher": sign_range_reference}


def draw_range(z: ZStream, start: int, n: int, device="cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements [start, start + n) of one parameter's direction (``z.kind``) as float32 on ``device``.

    CPU uses the C kernel (falls back to the torch reference); CUDA uses the Triton kernel
    when available, else the torch reference. ``out`` (float32, contiguous, n elements) is
    filled in place when given.
    """
    device = torch.device(device)
    if device.type == "cpu":
        lib = _c_kernel()
        if lib is not None:
            if out is None:
                out = torch.empty(n, dtype=torch.float32)
            if n and not _is_fake(out):
                assert out.dtype == torch.float32 and out.is_contiguous() and out.numel() == n
                fill = lib.zo_philox_sign if z.kind == "rademacher" else lib.zo_philox_normal
                fill(start, n, z.k0, z.k1, z.step, z.stream, out.data_ptr(), torch.get_num_threads())
            return out
    elif device.type == "cuda":
        from zo_scale import kernels

        if kernels.available():
            return kernels.draw_range(z, start, n, device=device, out=out)
    result = _REFERENCE[z.kind](z, start, n, device)
    if out is not None:
        out.copy_(result)
        return out
    return result


def normal_range(z: ZStream, start: int, n: int, device="cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """z[start : start + n] of one parameter, Gaussian (``draw_range`` for a normal stream)."""
    if z.kind != "normal":
        raise ValueError(f"normal_range needs a normal stream, got kind {z.kind!r}")
    return draw_range(z, start, n, device, out)


def sign_range(z: ZStream, start: int, n: int, device="cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """u[start : start + n] of one parameter, ±1 (``draw_range`` for a Rademacher stream)."""
    if z.kind != "rademacher":
        raise ValueError(f"sign_range needs a rademacher stream, got kind {z.kind!r}")
    return draw_range(z, start, n, device, out)
