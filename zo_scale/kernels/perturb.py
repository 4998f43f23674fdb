"""The perturb pass as one kernel per shard: z is generated in registers, never stored.

``perturb_``              local ← local + scale·d               (no master copy)
``perturb_from_master_``  local ← cast(master + scale·d)        (fp32 master; exact restore)
with d = z (Gaussian or, for a Rademacher stream, u = ±1), or d = z/√H when the HiZOO Hessian
slice ``hess`` is given. scale = offset·ε for
the master form (the absolute offset) and Δoffset·ε for the in-place form (the change).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zo_scale.kernels.philox import (
    BLOCK, LIBDEVICE, NUM_WARPS, check_flat, grid, i32, is_sign, stream_args, tile_d, tile_offsets,
)
from zo_scale.rng import ZStream


@triton.jit(do_not_specialize=["k0", "k1", "step", "stream", "blk_lo", "blk_hi", "scale"])
def _perturb_kernel(local_ptr, master_ptr, hess_ptr, n, k0, k1, step, stream, blk_lo, blk_hi, scale,
                    HAS_MASTER: tl.constexpr, HAS_HESS: tl.constexpr, SIGN: tl.constexpr,
                    SHIFT: tl.constexpr, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    offs, mask, blk0 = tile_offsets(blk_lo, blk_hi, n, SHIFT, BLOCK)
    d = tile_d(blk0, k0, k1, step, stream, SIGN, BLOCK, USE_LIBDEVICE)
    if HAS_HESS:
        h = tl.load(hess_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        d = tl.div_rn(d, tl.sqrt_rn(h))  # IEEE, as torch's z / hess.sqrt()
    if HAS_MASTER:
        base = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        base = tl.load(local_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = base + scale * d
    tl.store(local_ptr + offs, x.to(local_ptr.dtype.element_ty), mask=mask)


def _check(local, master, hess) -> None:
    n = local.numel()
    check_flat("local", local)
    if master is not None:
        check_flat("master", master, n)
        if master.dtype != torch.float32:
            raise ValueError(f"zo_scale.kernels: master must be float32, got {master.dtype}")
    if hess is not None:
        check_flat("hess", hess, n)


def _launch(local, master, hess, z: ZStream, start: int, scale: float) -> None:
    _check(local, master, hess)
    n = local.numel()
    if n == 0:
        return
    _perturb_kernel[grid(n, start)](
        local, master if master is not None else local, hess if hess is not None else local, n,
        *stream_args(z, start), float(scale),
        HAS_MASTER=master is not None, HAS_HESS=hess is not None, SIGN=is_sign(z),
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


# ---------------------------------------------------------------------------- many shards, one launch
# One launch per parameter tensor costs a model of ~400 tensors ~400 launches a pass, most of them
# biases and norms whose kernel is shorter than its launch. Shards below SMALL elements therefore
# share one launch per dtype group: a table row per shard (its pointers, size, Philox key and tile
# layout), and each program finds its row by binary search over the rows' first tiles. Large shards
# keep their own launch, where the known alignment of a kernel argument gives vectorised loads.

SMALL = 1 << 20  # elements
_COLS = tl.constexpr(9)
_LOCAL, _MASTER, _HESS, _N, _K0, _K1, _BLK, _SHIFT, _TILE0 = (tl.constexpr(i) for i in range(9))
_TABLES: dict[tuple, torch.Tensor] = {}  # device tables by shard layout: the layout rarely changes
_MAX_TABLES = 16


@triton.jit(do_not_specialize=["n_rows", "step", "stream", "scale"])
def _perturb_many_kernel(table_ptr, n_rows, step, stream, scale,
                         LOCAL_T: tl.constexpr, HESS_T: tl.constexpr, HAS_MASTER: tl.constexpr,
                         HAS_HESS: tl.constexpr, SIGN: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                         BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0  # the last row whose first tile is <= pid (rows are in tile order, row 0 starts at 0)
    hi = lo + n_rows
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go = tl.load(table_ptr + mid * _COLS + _TILE0) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    row = table_ptr + lo * _COLS
    tile = pid - tl.load(row + _TILE0)
    n = tl.load(row + _N)
    offs = tile * BLOCK + tl.arange(0, BLOCK) - tl.load(row + _SHIFT)
    mask = (offs >= 0) & (offs < n)
    blk0 = tl.load(row + _BLK) + tile * (BLOCK // 4)
    k0 = tl.load(row + _K0).to(tl.uint32)
    k1 = tl.load(row + _K1).to(tl.uint32)
    d = tile_d(blk0, k0, k1, step, stream, SIGN, BLOCK, USE_LIBDEVICE)
    local_ptr = tl.load(row + _LOCAL).to(tl.pointer_type(LOCAL_T), bitcast=True)
    if HAS_HESS:
        hess_ptr = tl.load(row + _HESS).to(tl.pointer_type(HESS_T), bitcast=True)
        h = tl.load(hess_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        d = tl.div_rn(d, tl.sqrt_rn(h))
    if HAS_MASTER:
        master_ptr = tl.load(row + _MASTER).to(tl.pointer_type(tl.float32), bitcast=True)
        base = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        base = tl.load(local_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = base + scale * d
    tl.store(local_ptr + offs, x.to(LOCAL_T), mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _table(rows: list[tuple], device) -> torch.Tensor:
    key = (str(device), tuple(rows))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = torch.tensor(rows, dtype=torch.int64).to(device)
    return table


def _launch_many(shards: list, scale: float) -> None:
    """One launch for shards sharing the local dtype and the presence (and dtype) of master and H."""
    local0, master0, hess0 = shards[0][0], shards[0][1], shards[0][2]
    rows, tiles = [], 0
    for local, master, hess, z, start in shards:
        n = local.numel()
        rows.append((local.data_ptr(), master.data_ptr() if master is not None else 0,
                     hess.data_ptr() if hess is not None else 0, n, z.k0, z.k1, start // 4, start % 4, tiles))
        tiles += triton.cdiv(n + start % 4, BLOCK)
    z0 = shards[0][3]
    _perturb_many_kernel[(tiles,)](
        _table(rows, local0.device), len(rows), i32(z0.step), i32(z0.stream), float(scale),
        LOCAL_T=_TL_DTYPES[local0.dtype], HESS_T=_TL_DTYPES[hess0.dtype] if hess0 is not None else tl.float32,
        HAS_MASTER=master0 is not None, HAS_HESS=hess0 is not None, SIGN=is_sign(z0),
        SEARCH_STEPS=max(1, len(rows).bit_length()), BLOCK=BLOCK, USE_LIBDEVICE=LIBDEVICE, num_warps=NUM_WARPS,
    )


def perturb_shards_(shards, scale: float, small: int = SMALL) -> None:
    """The perturb pass over many shards: ``perturb_from_master_`` for a shard with a master, else
    ``perturb_``. ``shards``: (local, master | None, hess | None, z, start) tuples whose z share the step,
    stream and kind. Shards below ``small`` elements go in one launch per dtype group, the rest one each."""
    groups: dict[tuple, list] = {}
    for shard in shards:
        local, master, hess, z, start = shard
        if scale == 0.0:  # the restore: a copy from the master, nothing without one
            if master is not None:
                local.copy_(master)
            continue
        _check(local, master, hess)
        if local.numel() >= small:
            _launch(local, master, hess, z, start, scale)
        elif local.numel():
            key = (local.device, local.dtype, master is not None, hess.dtype if hess is not None else None, z.kind)
            groups.setdefault(key, []).append(shard)
    steps = {(s[3].step, s[3].stream, s[3].kind) for g in groups.values() for s in g}
    if len(steps) > 1:
        raise ValueError(f"zo_scale.kernels: one perturb pass has one step, stream and kind, got {sorted(steps)}")
    for group in groups.values():
        _launch_many(group, scale)
