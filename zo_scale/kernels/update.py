"""Fused restore + update, one kernel per shard and optimizer: z (every SPSA sample) is generated
in registers, θ is restored from −ε·d and updated, state is read and written once.

The arithmetic follows ``zo_scale/optim/updates.py`` operation by operation (same order, fp32,
scalars rounded to fp32 the way torch rounds a Python scalar), so results agree with the torch
path to within FMA contraction, i.e. an ulp or so per operation.

θ comes from, and goes back to:
  master given          θ = master (it never saw the perturbation); master ← θ, local ← cast(θ)
  no master             θ = float(local) + restore·d_last;          local ← cast(θ)
where ``restore`` = −offset·ε (the perturbation left on the weights, undone here) and d_last is
the direction of the last SPSA sample.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zo_scale.kernels.philox import (
    BLOCK, LIBDEVICE, NUM_WARPS, check_flat, grid, is_sign, stream_args, tile_d, tile_offsets, tile_z,
)
from zo_scale.rng import ZStream

MAX_SAMPLES = 4  # n-SPSA coefficients travel as scalar arguments
CLIP_MODES = {"floor": 0, "ratio": 1, "none": 2}
_SCALARS = ["k0", "k1", "step", "stream", "blk_lo", "blk_hi"]


@triton.jit
def _load_theta(local_ptr, master_ptr, offs, mask, HAS_MASTER: tl.constexpr):
    if HAS_MASTER:
        return tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        return tl.load(local_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_theta(local_ptr, master_ptr, offs, mask, theta, HAS_MASTER: tl.constexpr):
    if HAS_MASTER:
        tl.store(master_ptr + offs, theta, mask=mask)
    tl.store(local_ptr + offs, theta.to(local_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coef(j: tl.constexpr, c0, c1, c2, c3):
    if j == 0:
        return c0
    elif j == 1:
        return c1
    elif j == 2:
        return c2
    else:
        return c3


@triton.jit
def _grad_and_restore(theta, blk0, k0, k1, step, stream, c0, c1, c2, c3, restore,
                      N_SAMPLES: tl.constexpr, HAS_MASTER: tl.constexpr,
                      BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """g = Σ_j c_j·z_j (as base._grad_dir: z_0·c_0, then += c_j·z_j) and, without a master,
    θ += restore·z_last (streams stream .. stream+N_SAMPLES-1)."""
    g = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(N_SAMPLES):
        z = tile_z(blk0, k0, k1, step, stream + j, BLOCK, USE_LIBDEVICE)
        if j == 0:
            g = z * _coef(j, c0, c1, c2, c3)
        else:
            g = g + _coef(j, c0, c1, c2, c3) * z
        if j == N_SAMPLES - 1:
            if not HAS_MASTER:
                theta = theta + restore * z
    return g, theta


# ---------------------------------------------------------------------------- MeZO


@triton.jit(do_not_specialize=_SCALARS + ["c0", "c1", "c2", "c3", "restore", "decay", "neg_lr"])
def _mezo_kernel(local_ptr, master_ptr, n, k0, k1, step, stream, blk_lo, blk_hi,
                 c0, c1, c2, c3, restore, decay, neg_lr,
                 N_SAMPLES: tl.constexpr, HAS_MASTER: tl.constexpr,
                 SHIFT: tl.constexpr, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    offs, mask, blk0 = tile_offsets(blk_lo, blk_hi, n, SHIFT, BLOCK)
    theta = _load_theta(local_ptr, master_ptr, offs, mask, HAS_MASTER)
    g, theta = _grad_and_restore(theta, blk0, k0, k1, step, stream, c0, c1, c2, c3, restore,
                                 N_SAMPLES, HAS_MASTER, BLOCK, USE_LIBDEVICE)
    theta = theta * decay  # decay = 1 − lr·wd (exactly 1.0 when wd = 0)
    theta = theta + neg_lr * g
    _store_theta(local_ptr, master_ptr, offs, mask, theta, HAS_MASTER)


# ---------------------------------------------------------------------------- FZOO


@triton.jit(do_not_specialize=_SCALARS + ["n_dirs", "restore", "decay", "neg_lr"])
def _fzoo_kernel(local_ptr, master_ptr, coef_ptr, n, k0, k1, step, stream, blk_lo, blk_hi,
                 n_dirs, restore, decay, neg_lr,
                 HAS_MASTER: tl.constexpr, SIGN: tl.constexpr,
                 SHIFT: tl.constexpr, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """θ ← (θ + restore·u_last)·decay − lr·Σ_i c_i·u_i: N directions regenerated in registers, θ read
    and written once; the coefficients come from a device tensor, so N is not a compile-time choice."""
    offs, mask, blk0 = tile_offsets(blk_lo, blk_hi, n, SHIFT, BLOCK)
    theta = _load_theta(local_ptr, master_ptr, offs, mask, HAS_MASTER)
    u = tile_d(blk0, k0, k1, step, stream, SIGN, BLOCK, USE_LIBDEVICE)
    g = u * tl.load(coef_ptr)
    for j in range(1, n_dirs):
        u = tile_d(blk0, k0, k1, step, stream + j, SIGN, BLOCK, USE_LIBDEVICE)
        g = g + tl.load(coef_ptr + j) * u
    if not HAS_MASTER:  # the weights sit at +ε·u_last
        theta = theta + restore * u
    theta = theta * decay
    theta = theta + neg_lr * g
    _store_theta(local_ptr, master_ptr, offs, mask, theta, HAS_MASTER)


# ---------------------------------------------------------------------------- HiZOO


@triton.jit(do_not_specialize=_SCALARS + ["restore", "gain", "keep", "floor", "decay", "step_scale"])
def _hizoo_kernel(local_ptr, master_ptr, hess_ptr, n, k0, k1, step, stream, blk_lo, blk_hi,
                  restore, gain, keep, floor, decay, step_scale,
                  HAS_MASTER: tl.constexpr, HAS_FLOOR: tl.constexpr,
                  SHIFT: tl.constexpr, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    offs, mask, blk0 = tile_offsets(blk_lo, blk_hi, n, SHIFT, BLOCK)
    z = tile_z(blk0, k0, k1, step, stream, BLOCK, USE_LIBDEVICE)
    h = tl.load(hess_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    theta = _load_theta(local_ptr, master_ptr, offs, mask, HAS_MASTER)
    if not HAS_MASTER:  # the weights sit at −ε·z/√H_old
        theta = theta + restore * tl.div_rn(z, tl.sqrt_rn(h))
    h = h * ((z * z) * gain + keep)  # H·(z²·gain + (1−α)), as hizoo_hessian_update_
    if HAS_FLOOR:
        h = tl.maximum(h, floor, propagate_nan=tl.PropagateNan.ALL)  # torch.clamp keeps NaN
    theta = theta * decay
    theta = theta + tl.div_rn(step_scale * z, tl.sqrt_rn(h))  # addcdiv: θ + (v·z)/√H_new
    tl.store(hess_ptr + offs, h.to(hess_ptr.dtype.element_ty), mask=mask)
    _store_theta(local_ptr, master_ptr, offs, mask, theta, HAS_MASTER)


# ---------------------------------------------------------------------------- HELENE


@triton.jit(do_not_specialize=_SCALARS + ["c0", "c1", "c2", "c3", "restore", "alpha", "beta1", "beta2",
                                          "hscale", "decay", "gamma", "lam", "stab_eps", "neg_lr"])
def _helene_kernel(local_ptr, master_ptr, m_ptr, h_ptr, count_ptr, n, k0, k1, step, stream, blk_lo, blk_hi,
                   c0, c1, c2, c3, restore, alpha, beta1, beta2, hscale, decay, gamma, lam, stab_eps, neg_lr,
                   N_SAMPLES: tl.constexpr, HAS_MASTER: tl.constexpr, REFRESH: tl.constexpr,
                   USE_HESS: tl.constexpr, CLIP: tl.constexpr,
                   SHIFT: tl.constexpr, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    offs, mask, blk0 = tile_offsets(blk_lo, blk_hi, n, SHIFT, BLOCK)
    theta = _load_theta(local_ptr, master_ptr, offs, mask, HAS_MASTER)
    g, theta = _grad_and_restore(theta, blk0, k0, k1, step, stream, c0, c1, c2, c3, restore,
                                 N_SAMPLES, HAS_MASTER, BLOCK, USE_LIBDEVICE)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + alpha * g
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    if USE_HESS:
        h = tl.load(h_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        if REFRESH:
            h = h * beta2 + (hscale * g) * g  # addcmul: h + (v·g)·g
            tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    else:
        h = tl.full([BLOCK], 1.0, tl.float32)  # ablation: h ≡ 1 in the denominator
    theta = theta * decay
    # NaN propagates through max/min as through torch.clamp (fmaxf alone would drop it)
    if CLIP == 0:  # floor: m / (γ·max(h, λ) + ε_s)
        nclip = tl.sum(((h < lam) & mask).to(tl.int32), axis=0)
        upd = tl.div_rn(m, tl.maximum(h, lam, propagate_nan=tl.PropagateNan.ALL) * gamma + stab_eps)
    elif CLIP == 1:  # ratio: clip(m / (γ·h + ε_s), ±λ)
        upd = tl.div_rn(m, gamma * h + stab_eps)
        nclip = tl.sum(((tl.abs(upd) > lam) & mask).to(tl.int32), axis=0)
        upd = tl.minimum(tl.maximum(upd, -lam, propagate_nan=tl.PropagateNan.ALL), lam, propagate_nan=tl.PropagateNan.ALL)
    else:
        upd = tl.div_rn(m, gamma * h + stab_eps)
        nclip = 0
    theta = theta + neg_lr * upd
    _store_theta(local_ptr, master_ptr, offs, mask, theta, HAS_MASTER)
    # one partial count per program: no contended atomics; the wrapper sums them
    tl.store(count_ptr + tl.program_id(0), nclip)


# ---------------------------------------------------------------------------- wrappers


def _check(local, master, *state):
    check_flat("local", local)
    n = local.numel()
    if master is not None:
        check_flat("master", master, n)
        if master.dtype != torch.float32:
            raise ValueError(f"zo_scale.kernels: master must be float32, got {master.dtype}")
    for name, t in state:
        check_flat(name, t, n)
    return n


def _streams(zs, limit: int | None = MAX_SAMPLES, kinds=("normal",)) -> tuple[ZStream, int]:
    """One ZStream per sample, all of one parameter, step and kind, streams consecutive."""
    zs = list(zs) if isinstance(zs, (list, tuple)) else [zs]
    if not zs or (limit is not None and len(zs) > limit):
        raise ValueError(f"zo_scale.kernels: 1 to {limit} samples per fused update, got {len(zs)}")
    z0 = zs[0]
    if z0.kind not in kinds:
        raise ValueError(f"zo_scale.kernels: this update takes {' or '.join(kinds)} streams, got {z0.kind!r}")
    for j, z in enumerate(zs):
        if (z.k0, z.k1, z.step, z.stream, z.kind) != (z0.k0, z0.k1, z0.step, z0.stream + j, z0.kind):
            raise ValueError("zo_scale.kernels: samples must share key, step and kind and use consecutive streams")
    return z0, len(zs)


def _coefs(pgs, n_samples: int) -> list[float]:
    """pg_j / n, as base._grad_dir forms them (Python floats; the kernel rounds them to fp32)."""
    if len(pgs) != n_samples:
        raise ValueError(f"zo_scale.kernels: {n_samples} samples but {len(pgs)} projected gradients")
    return [pg / n_samples for pg in pgs] + [0.0] * (MAX_SAMPLES - n_samples)


def mezo_restore_update_(
    local: torch.Tensor, zs, start: int, *, pgs, restore: float, lr: float, weight_decay: float,
    master: torch.Tensor | None = None,
) -> None:
    """Restore and MeZO-update one shard: θ ← (θ + restore·z_last)·(1 − lr·wd) − lr·Σ_j (pg_j/n)·z_j."""
    n = _check(local, master)
    z0, ns = _streams(zs)
    if n == 0:
        return
    _mezo_kernel[grid(n, start)](
        local, master if master is not None else local, n, *stream_args(z0, start),
        *_coefs(pgs, ns), float(restore), 1.0 - lr * weight_decay, -lr,
        N_SAMPLES=ns, HAS_MASTER=master is not None,
        SHIFT=start % 4, BLOCK=BLOCK, USE_LIBDEVICE=LIBDEVICE, num_warps=NUM_WARPS,
    )


def fzoo_restore_update_(
    local: torch.Tensor, us, start: int, *, coefs, restore: float, lr: float, weight_decay: float,
    master: torch.Tensor | None = None,
) -> None:
    """Restore and FZOO-update one shard: θ ← (θ + restore·u_last)·(1 − lr·wd) − lr·Σ_i c_i·u_i, the u_i
    Rademacher or Gaussian streams (one per direction, consecutive). ``coefs``: a list, or a float32
    tensor on the shard's device (built once per step and shared by every shard: no copy per launch)."""
    n = _check(local, master)
    u0, nd = _streams(us, limit=None, kinds=("rademacher", "normal"))
    if len(coefs) != nd:
        raise ValueError(f"zo_scale.kernels: {nd} directions but {len(coefs)} coefficients")
    if n == 0:
        return
    coef = coefs if isinstance(coefs, torch.Tensor) else torch.tensor(coefs, dtype=torch.float32)
    if coef.dtype != torch.float32 or coef.device != local.device:
        coef = coef.to(local.device, torch.float32)
    _fzoo_kernel[grid(n, start)](
        local, master if master is not None else local, coef, n, *stream_args(u0, start),
        nd, float(restore), 1.0 - lr * weight_decay, -lr,
        HAS_MASTER=master is not None, SIGN=is_sign(u0),
        SHIFT=start % 4, BLOCK=BLOCK, USE_LIBDEVICE=LIBDEVICE, num_warps=NUM_WARPS,
    )


def hizoo_restore_update_(
    local: torch.Tensor, hess: torch.Tensor, z: ZStream, start: int, *, proj_grad: float, restore: float,
    lr: float, alpha: float, curvature: float, eps: float, floor: float, weight_decay: float,
    master: torch.Tensor | None = None,
) -> None:
    """Restore along z/√H_old, H ← max(H·(z²·α·curv/(2ε²) + 1 − α), floor), θ ← θ·(1 − lr·wd) − lr·pg·z/√H_new."""
    n = _check(local, master, ("hess", hess))
    if n == 0:
        return
    _hizoo_kernel[grid(n, start)](
        local, master if master is not None else local, hess, n, *stream_args(z, start),
        float(restore), alpha * curvature / (2.0 * eps * eps), 1.0 - alpha, float(floor),
        1.0 - lr * weight_decay, -lr * proj_grad,
        HAS_MASTER=master is not None, HAS_FLOOR=floor > 0,
        SHIFT=start % 4, BLOCK=BLOCK, USE_LIBDEVICE=LIBDEVICE, num_warps=NUM_WARPS,
    )


def helene_restore_update_(
    local: torch.Tensor, momentum: torch.Tensor, hess: torch.Tensor, zs, start: int, *, pgs, restore: float,
    lr: float, alpha: float, beta1: float, beta2: float, refresh_hessian: bool, hessian_scale: float,
    use_hessian: bool, gamma: float, clip_mode: str, clip_lambda: float, stab_eps: float, weight_decay: float,
    master: torch.Tensor | None = None,
) -> torch.Tensor:
    """Restore and HELENE-update one shard (updates.helene_update_ semantics). Returns the number
    of clipped coordinates as a 0-d int64 tensor on the shard's device."""
    n = _check(local, master, ("momentum", momentum), ("hess", hess))
    z0, ns = _streams(zs)
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"zo_scale.kernels: unknown HELENE clip mode {clip_mode!r}")
    if n == 0:
        return torch.zeros((), dtype=torch.int64, device=local.device)
    g = grid(n, start)
    counts = torch.empty(g[0], dtype=torch.int32, device=local.device)
    _helene_kernel[g](
        local, master if master is not None else local, momentum, hess, counts, n, *stream_args(z0, start),
        *_coefs(pgs, ns), float(restore), float(alpha), float(beta1), float(beta2),
        (1.0 - beta2) * hessian_scale, 1.0 - lr * weight_decay, float(gamma), float(clip_lambda),
        float(stab_eps), -lr,
        N_SAMPLES=ns, HAS_MASTER=master is not None, REFRESH=bool(refresh_hessian),
        USE_HESS=bool(use_hessian), CLIP=CLIP_MODES[clip_mode],
        SHIFT=start % 4, BLOCK=BLOCK, USE_LIBDEVICE=LIBDEVICE, num_warps=NUM_WARPS,
    )
    return counts.sum()
