"""z inside Triton kernels: Philox4x32-10 + Box–Muller, tile by tile, as specified in zo_scale.rng.

A tile is BLOCK consecutive *global* elements starting on a Philox block boundary (a multiple
of 4), so one Philox evaluation feeds four elements and no lane computes a block twice. A shard
whose ``start`` is not a multiple of 4 is covered by tiles shifted back by ``start % 4`` (the
constexpr SHIFT); the lanes before the shard are masked off.

Everything here is a ``@triton.jit`` helper or a small kernel; the update kernels in
``perturb.py`` and ``update.py`` call ``tile_z`` and ``tile_offsets``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from zo_scale.rng import ZStream

# The interpreter has no libdevice; on a GPU we call libdevice's accurate logf/cosf/sinf
# explicitly instead of trusting whatever approximation tl.log/tl.cos lower to.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
LIBDEVICE = not INTERPRETED

BLOCK = 1024  # elements per program: 256 Philox blocks
NUM_WARPS = 4
INV_2_24 = tl.constexpr(1.0 / 16777216.0)  # 24-bit integer -> [0, 1), exact in fp32
TWO_PI = tl.constexpr(6.283185307179586)  # rounds to the same fp32 as rng.py's torch.tensor(2π)


# ---------------------------------------------------------------------------- scalar args


def i32(x: int) -> int:
    """A uint32 as the signed int32 with the same bits: Triton then types it i32 for every value,
    so keys >= 2**31 do not compile a second (i64) variant of each kernel."""
    return x - (1 << 32) if x >= (1 << 31) else x


def stream_args(z: ZStream, start: int) -> tuple:
    """(k0, k1, step, stream, blk_lo, blk_hi) for a shard starting at global element ``start``.

    The first Philox block index start // 4 can exceed 2**32 for huge tensors; it travels as
    two non-negative 31-bit words so its type is always i32 too.
    """
    if start < 0:
        raise ValueError(f"zo_scale.kernels: start must be >= 0, got {start}")
    blk = start // 4
    if blk >= 1 << 62:
        raise ValueError(f"zo_scale.kernels: start {start} is beyond the 2**64-element counter space")
    return i32(z.k0), i32(z.k1), i32(z.step), i32(z.stream), blk & 0x7FFFFFFF, blk >> 31


def grid(n: int, start: int):
    return (triton.cdiv(n + start % 4, BLOCK),)


# ---------------------------------------------------------------------------- jit helpers


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds on uint32 tensors (same constants and word order as rng.py)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi2 = tl.umulhi(c2, 0xCD9E8D57)
        lo2 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def block_words(blk0, k0, k1, step, stream, NB: tl.constexpr):
    """The four uint32 words of Philox blocks blk0 .. blk0+NB-1 (blk0: int64 scalar)."""
    b = blk0 + tl.arange(0, NB).to(tl.int64)
    zero = tl.zeros([NB], dtype=tl.uint32)
    kk0 = k0.to(tl.uint32, bitcast=True)
    kk1 = k1.to(tl.uint32, bitcast=True)
    c2 = zero + step.to(tl.uint32, bitcast=True)
    c3 = zero + stream.to(tl.uint32, bitcast=True)
    return philox4x32_10(b.to(tl.uint32), (b >> 32).to(tl.uint32), c2, c3, kk0, kk1)


@triton.jit
def _log(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _cos(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.cos(x)
    else:
        return tl.cos(x)


@triton.jit
def _sin(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.sin(x)
    else:
        return tl.sin(x)


@triton.jit
def tile_z(blk0, k0, k1, step, stream, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """z for the BLOCK global elements 4*blk0 .. 4*blk0+BLOCK-1, float32, in element order."""
    x0, x1, x2, x3 = block_words(blk0, k0, k1, step, stream, BLOCK // 4)
    ua = ((x0 >> 8) + 1).to(tl.float32) * INV_2_24  # (0, 1]: the log stays finite
    va = (x1 >> 8).to(tl.float32) * INV_2_24  # [0, 1)
    ub = ((x2 >> 8) + 1).to(tl.float32) * INV_2_24
    vb = (x3 >> 8).to(tl.float32) * INV_2_24
    ra = tl.sqrt_rn(-2.0 * _log(ua, USE_LIBDEVICE))
    rb = tl.sqrt_rn(-2.0 * _log(ub, USE_LIBDEVICE))
    ta = TWO_PI * va
    tb = TWO_PI * vb
    n0 = ra * _cos(ta, USE_LIBDEVICE)
    n1 = ra * _sin(ta, USE_LIBDEVICE)
    n2 = rb * _cos(tb, USE_LIBDEVICE)
    n3 = rb * _sin(tb, USE_LIBDEVICE)
    # [NB, 2, 2] with flat index 4b + 2p + q -> element 4b + {0, 1, 2, 3} = n0, n1, n2, n3
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])


@triton.jit
def tile_sign(blk0, k0, k1, step, stream, BLOCK: tl.constexpr):
    """Rademacher u (±1.0, float32) for the same BLOCK elements as tile_z: the top bit of each word."""
    x0, x1, x2, x3 = block_words(blk0, k0, k1, step, stream, BLOCK // 4)
    s0 = 1.0 - 2.0 * (x0 >> 31).to(tl.float32)
    s1 = 1.0 - 2.0 * (x1 >> 31).to(tl.float32)
    s2 = 1.0 - 2.0 * (x2 >> 31).to(tl.float32)
    s3 = 1.0 - 2.0 * (x3 >> 31).to(tl.float32)
    return tl.reshape(tl.join(tl.join(s0, s2), tl.join(s1, s3)), [BLOCK])


@triton.jit
def tile_d(blk0, k0, k1, step, stream, SIGN: tl.constexpr, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """The direction of a stream: Rademacher when SIGN (the stream's kind), else Gaussian."""
    if SIGN:
        return tile_sign(blk0, k0, k1, step, stream, BLOCK)
    else:
        return tile_z(blk0, k0, k1, step, stream, BLOCK, USE_LIBDEVICE)


@triton.jit
def tile_offsets(blk_lo, blk_hi, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """This program's local offsets, their mask, and the first Philox block of its tile."""
    pid = tl.program_id(0).to(tl.int64)
    blk0 = blk_lo.to(tl.int64) + (blk_hi.to(tl.int64) << 31) + pid * (BLOCK // 4)
    offs = pid * BLOCK + tl.arange(0, BLOCK) - SHIFT
    if SHIFT == 0:
        mask = offs < n
    else:
        mask = (offs >= 0) & (offs < n)
    return offs, mask, blk0


# ---------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["k0", "k1", "step", "stream", "blk_lo", "blk_hi"])
def _draw_kernel(out_ptr, n, k0, k1, step, stream, blk_lo, blk_hi,
                 SIGN: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    offs, mask, blk0 = tile_offsets(blk_lo, blk_hi, n, SHIFT, BLOCK)
    z = tile_d(blk0, k0, k1, step, stream, SIGN, BLOCK, USE_LIBDEVICE)
    tl.store(out_ptr + offs, z, mask=mask)


@triton.jit(do_not_specialize=["k0", "k1", "step", "stream", "blk_lo", "blk_hi"])
def _words_kernel(out_ptr, n_blocks, k0, k1, step, stream, blk_lo, blk_hi, NB: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blk0 = blk_lo.to(tl.int64) + (blk_hi.to(tl.int64) << 31) + pid * NB
    x0, x1, x2, x3 = block_words(blk0, k0, k1, step, stream, NB)
    rows = pid * NB + tl.arange(0, NB)
    mask = rows < n_blocks
    base = out_ptr + rows * 4
    tl.store(base + 0, x0.to(tl.int64), mask=mask)  # zero-extended: same values as rng.py's int64
    tl.store(base + 1, x1.to(tl.int64), mask=mask)
    tl.store(base + 2, x2.to(tl.int64), mask=mask)
    tl.store(base + 3, x3.to(tl.int64), mask=mask)


# ---------------------------------------------------------------------------- wrappers


# The kernels compute in fp32: fp64 weights or state (which the torch path updates in fp64) stay there.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_flat(name: str, t: torch.Tensor, n: int | None = None) -> None:
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"zo_scale.kernels: {name} must be a flat contiguous tensor, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"zo_scale.kernels: {name} is {t.dtype}; the fused kernels take fp32/bf16/fp16 "
                         "(use the torch path for others)")
    if n is not None and t.numel() != n:
        raise ValueError(f"zo_scale.kernels: {name} has {t.numel()} elements, expected {n}")


def is_sign(z: ZStream) -> bool:
    return z.kind == "rademacher"


def draw_range(z: ZStream, start: int, n: int, device="cuda", out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements [start, start + n) of one parameter's direction as float32 (contract of rng.draw_range)."""
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=device)
    check_flat("out", out, n)
    if out.dtype != torch.float32:
        raise ValueError(f"zo_scale.kernels: out must be float32, got {out.dtype}")
    if n:
        _draw_kernel[grid(n, start)](
            out, n, *stream_args(z, start), SIGN=is_sign(z), SHIFT=start % 4, BLOCK=BLOCK, USE_LIBDEVICE=LIBDEVICE,
            num_warps=NUM_WARPS,
        )
    return out


def normal_range(z: ZStream, start: int, n: int, device="cuda", out: torch.Tensor | None = None) -> torch.Tensor:
    """z[start : start + n] of one parameter as float32 (same contract as rng.normal_range)."""
    if z.kind != "normal":
        raise ValueError(f"normal_range needs a normal stream, got kind {z.kind!r}")
    return draw_range(z, start, n, device, out)


def philox_words(z: ZStream, first_block: int, n_blocks: int, device="cuda") -> torch.Tensor:
    """[n_blocks, 4] int64 tensor of the Philox words (uint32 values) — for tests against rng.py."""
    out = torch.empty(n_blocks, 4, dtype=torch.int64, device=device)
    if n_blocks:
        nb = 256
        args = stream_args(z, 4 * first_block)
        _words_kernel[(triton.cdiv(n_blocks, nb),)](out, n_blocks, *args, NB=nb)
    return out
