"""The perturb pass as one kernel per shard: z is generated in registers, never stored.

``perturb_``              local ← local + scale·d               (no master copy)
``perturb_from_master_``  local ← cast(master + scale·d)        (fp32 master; exact restore)
with d = z, or d = z/√H when the HiZOO Hessian slice ``hess`` is given. scale = offset·ε for
the master form (the absolute offset) and Δoffset·ε for the in-place form (the change).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zo_scale.kernels.philox import (
    BLOCK, LIBDEVICE, NUM_WARPS, check_flat, grid, stream_args, tile_offsets, tile_z,
)
from zo_scale.rng import ZStream


@triton.jit(do_not_specialize=["k0", "k1", "step", "stream", "blk_lo", "blk_hi", "scale"])
def _perturb_kernel(local_ptr, master_ptr, hess_ptr, n, k0, k1, step, stream, blk_lo, blk_hi, scale,
                    HAS_MASTER: tl.constexpr, HAS_HESS: tl.constexpr,
                    SHIFT: tl.constexpr, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    offs, mask, blk0 = tile_offsets(blk_lo, blk_hi, n, SHIFT, BLOCK)
    d = tile_z(blk0, k0, k1, step, stream, BLOCK, USE_LIBDEVICE)
    if HAS_HESS:
        h = tl.load(hess_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        d = tl.div_rn(d, tl.sqrt_rn(h))  # IEEE, as torch's z / hess.sqrt()
    if HAS_MASTER:
        base = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        base = tl.load(local_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = base + scale * d
    tl.store(local_ptr + offs, x.to(local_ptr.dtype.element_ty), mask=mask)


def _launch(local, master, hess, z: ZStream, start: int, scale: float) -> None:
    n = local.numel()
    check_flat("local", local)
    if master is not None:
        check_flat("master", master, n)
        if master.dtype != torch.float32:
            raise ValueError(f"zo_scale.kernels: master must be float32, got {master.dtype}")
    if hess is not None:
        check_flat("hess", hess, n)
    if n == 0:
        return
    _perturb_kernel[grid(n, start)](
        local, master if master is not None else local, hess if hess is not None else local, n,
        *stream_args(z, start), float(scale),
        HAS_MASTER=master is not None, HAS_HESS=hess is not None,
        SHIFT=start % 4, BLOCK=BLOCK, USE_LIBDEVICE=LIBDEVICE, num_warps=NUM_WARPS,
    )


def perturb_(local: torch.Tensor, z: ZStream, start: int, scale: float, hess: torch.Tensor | None = None) -> None:
    """local += scale·d in place (d = z, or z/√hess). Reads and writes ``local`` once."""
    if scale != 0.0:
        _launch(local, None, hess, z, start, scale)


def perturb_from_master_(
    local: torch.Tensor, master: torch.Tensor, z: ZStream, start: int, scale: float, hess: torch.Tensor | None = None
) -> None:
    """local = cast(master + scale·d). scale = 0 is the restore: a plain copy, no z needed."""
    if scale == 0.0:
        local.copy_(master)
    else:
        _launch(local, master, hess, z, start, scale)
