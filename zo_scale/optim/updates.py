"""Pure per-shard update math: plain tensor ops on one local chunk, all in fp32.

Every function here sees only a slice of one parameter (``theta``), the matching slice of z
and of the optimizer state, and a few Python scalars that are identical on every rank. That is
what lets the sharded backends and the fused GPU kernels reuse it unchanged. Functions update
their tensors in place and return nothing unless stated.
"""

from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------- MeZO


def mezo_update_(theta: torch.Tensor, grad_dir: torch.Tensor, *, lr: float, weight_decay: float) -> None:
    """ZO-SGD: θ ← θ − lr·(g + wd·θ), where ``grad_dir`` is the ZO gradient g = pg·z."""
    if weight_decay:
        theta.mul_(1.0 - lr * weight_decay)
    theta.add_(grad_dir, alpha=-lr)


# ----------------------------------------------------------------------------- HiZOO


def hizoo_direction(z: torch.Tensor, hess: torch.Tensor) -> torch.Tensor:
    """HiZOO perturbs and steps along z/√H."""
    return z / hess.sqrt()


def hizoo_hessian_update_(
    hess: torch.Tensor, z: torch.Tensor, *, alpha: float, curvature: float, eps: float, floor: float
) -> None:
    """H ← (1−α)·H + α·|ℓ₊+ℓ₋−2ℓ₀|·H⊙z²/(2ε²), then H ← max(H, floor).

    ``curvature`` is |ℓ₊ + ℓ₋ − 2ℓ₀|, measured along z/√H (official HiZOO form).
    """
    gain = alpha * curvature / (2.0 * eps * eps)
    hess.mul_(z.square().mul_(gain).add_(1.0 - alpha))
    if floor > 0:
        hess.clamp_(min=floor)


def hizoo_update_(
    theta: torch.Tensor, z: torch.Tensor, hess: torch.Tensor, *, lr: float, proj_grad: float, weight_decay: float
) -> None:
    """θ ← θ − lr·(pg·z/√H + wd·θ), with the already-updated H."""
    if weight_decay:
        theta.mul_(1.0 - lr * weight_decay)
    theta.addcdiv_(z, hess.sqrt(), value=-lr * proj_grad)


# ----------------------------------------------------------------------------- HiZOO-L (factored H)
#
# A factored tensor is seen as a row-major matrix with ``ncols`` columns; H ≈ R·Cᵀ/ΣR (Adafactor form).
# A shard (or chunk of one) is a flat range [start, start + length) of that matrix: it may start and
# end mid-row (DeepSpeed ZeRO-3), so the helpers cut it into pieces that lie in one row or cover
# whole rows, and give the same per-element values whatever the cut.


def row_segments(start: int, length: int, ncols: int) -> list[tuple[int, int, int, int]]:
    """Pieces ``(offset, length, row, col)`` of the flat range [start, start + length): a partial
    first row, a block of whole rows (``col == 0`` and length a multiple of ``ncols``), a partial
    last row — each present only if non-empty. ``offset`` is relative to ``start``."""
    end, pos, out = start + length, start, []
    row, col = divmod(start, ncols)
    if col and pos < end:
        stop = min(end, (row + 1) * ncols)
        out.append((0, stop - pos, row, col))
        pos = stop
    whole = (end - pos) // ncols
    if whole:
        out.append((pos - start, whole * ncols, pos // ncols, 0))
        pos += whole * ncols
    if pos < end:
        out.append((pos - start, end - pos, pos // ncols, 0))
    return out


def factored_hessian(
    rows: torch.Tensor, cols: torch.Tensor, inv_total: torch.Tensor, start: int, length: int, *, floor: float = 0.0
) -> torch.Tensor:
    """H on the flat range [start, start + length) of the matrix: max(R_i·C_j·(1/ΣR), floor).

    Each element is computed as (R_i·C_j)·inv_total whatever the range, so every shard layout and
    chunking gives bit-identical values. The result has ``length`` elements (one chunk) and the
    dtype of the factors."""
    ncols = cols.numel()
    out = torch.empty(length, dtype=rows.dtype, device=rows.device)
    for off, n, r, c in row_segments(start, length, ncols):
        if c == 0 and n % ncols == 0:
            k = n // ncols
            torch.mul(rows[r : r + k, None], cols[None, :], out=out[off : off + n].view(k, ncols))
        else:
            torch.mul(rows[r : r + 1], cols[c : c + n], out=out[off : off + n])
    out.mul_(inv_total)
    if floor > 0:
        out.clamp_(min=floor)
    return out


def factored_sums_(row_acc: torch.Tensor, col_acc: torch.Tensor, values: torch.Tensor, start: int) -> None:
    """Add the row sums and column sums of ``values`` (the flat range [start, start + numel) of the
    matrix) into ``row_acc`` (m) and ``col_acc`` (n). A partial row adds to one row sum and to part
    of the column sums; the shards' partial sums, summed over ranks, are the full sums."""
    ncols = col_acc.numel()
    for off, n, r, c in row_segments(start, values.numel(), ncols):
        piece = values[off : off + n]
        if c == 0 and n % ncols == 0:
            block = piece.view(-1, ncols)
            row_acc[r : r + block.shape[0]] += block.sum(1)
            col_acc += block.sum(0)
        else:
            row_acc[r : r + 1] += piece.sum()
            col_acc[c : c + n] += piece


def factored_ema(
    factor: torch.Tensor, sums: torch.Tensor, *, alpha: float, curvature: float, eps: float
) -> torch.Tensor:
    """A factor's HiZOO update: F ← (1−α)·F + α·|ℓ₊+ℓ₋−2ℓ₀|/(2ε²)·sums, where ``sums`` are the row
    (or column) sums of H⊙z² over the whole matrix. Done in fp64 (the vectors are short; (1−α) with
    the official α = 1e-8 is 1 in fp32), returned in the factor's dtype as a new tensor."""
    gain = alpha * curvature / (2.0 * eps * eps)
    return (factor.double() * (1.0 - alpha) + sums.double() * gain).to(factor.dtype)


# ----------------------------------------------------------------------------- HELENE


ANNEAL_LAWS = ("exp", "exp_ema", "none")


def check_momentum_options(owner: str, *, beta1: float, anneal: str, anneal_horizon: float) -> None:
    """The annealed-momentum options of HELENE's variants (HELENE-Muon, HELENE-FZOO), refused in one line."""
    if anneal not in ANNEAL_LAWS:
        raise ValueError(f"zo_scale: {owner} anneal must be one of {ANNEAL_LAWS}, got {anneal!r}")
    if not 0 <= beta1 < 1 or not anneal_horizon > 0:
        raise ValueError(f"zo_scale: {owner} needs 0 <= beta1 < 1 and anneal_horizon > 0")


def helene_alpha(step: int, *, beta1: float, anneal: str, horizon: float) -> float:
    """Momentum weight of the current gradient at step t (0-based).

    ``exp``:     α_t = β1 + (1 − β1)·exp(−t/T)   (reconstruction; 1 → β1, so m settles near ḡ/(1−β1) ≈ 10ḡ)
    ``exp_ema``: α_t = (1 − β1) + β1·exp(−t/T)   (1 → 1 − β1: m settles near ḡ, on the scale of ``none``)
    ``none``:    α_t = 1 − β1                    (plain EMA)
    """
    if anneal == "exp":
        return beta1 + (1.0 - beta1) * math.exp(-step / horizon)
    if anneal == "exp_ema":
        return (1.0 - beta1) + beta1 * math.exp(-step / horizon)
    if anneal == "none":
        return 1.0 - beta1
    raise ValueError(f"unknown HELENE annealing law {anneal!r} (expected one of {ANNEAL_LAWS})")


def helene_update_(
    theta: torch.Tensor,
    grad_dir: torch.Tensor,
    momentum: torch.Tensor,
    hess: torch.Tensor,
    *,
    lr: float,
    alpha: float,
    beta1: float,
    beta2: float,
    refresh_hessian: bool,
    hessian_scale: float,
    use_hessian: bool,
    gamma: float,
    clip_mode: str,
    clip_lambda: float,
    stab_eps: float,
    weight_decay: float,
) -> torch.Tensor:
    """One HELENE step on a chunk. Returns the number of clipped coordinates (0-d int64 tensor).

    m ← β1·m + α_t·g
    every k-th step:  h ← β2·h + (1−β2)·c·g⊙g            (A-GNB from the same probe)
    ``floor``: θ ← θ − lr·m / (γ·max(h, λ) + ε_s)
    ``ratio``: θ ← θ − lr·clip(m / (γ·h + ε_s), −λ, λ)
    ``none``:  θ ← θ − lr·m / (γ·h + ε_s)
    With ``use_hessian=False`` the denominator's h is 1 (ablation: momentum SGD with clipping).
    Decoupled weight decay: θ ← θ·(1 − lr·wd) first.
    """
    momentum.mul_(beta1).add_(grad_dir, alpha=alpha)
    if refresh_hessian and use_hessian:
        hess.mul_(beta2).addcmul_(grad_dir, grad_dir, value=(1.0 - beta2) * hessian_scale)
    if weight_decay:
        theta.mul_(1.0 - lr * weight_decay)
    h = hess if use_hessian else torch.ones_like(momentum)
    if clip_mode == "floor":
        clipped = (h < clip_lambda).sum()
        step = momentum / h.clamp(min=clip_lambda).mul_(gamma).add_(stab_eps)
    elif clip_mode == "ratio":
        step = momentum / (gamma * h + stab_eps)
        clipped = (step.abs() > clip_lambda).sum()
        step.clamp_(-clip_lambda, clip_lambda)
    elif clip_mode == "none":
        step = momentum / (gamma * h + stab_eps)
        clipped = torch.zeros((), dtype=torch.int64, device=theta.device)
    else:
        raise ValueError(f"unknown HELENE clip mode {clip_mode!r} (expected 'floor', 'ratio' or 'none')")
    theta.add_(step, alpha=-lr)
    return clipped


# ----------------------------------------------------------------------------- FZOO


def fzoo_coefficients(loss_zero: float, probe_losses: list[float]) -> tuple[list[float], float]:
    """FZOO's step coefficients c_i = (ℓ_i − ℓ₀)/(N·σ), σ the population std of ℓ_1..ℓ_N.

    The step is then θ ← θ − lr·Σ_i c_i·u_i: a normalised-SGD step (σ ≈ ε·‖∇L‖ for small ε, so
    no division by ε). Returns ([], 0.0) when σ = 0 (all probe losses equal): no step is defined.
    """
    n = len(probe_losses)
    mean = math.fsum(probe_losses) / n
    sigma = math.sqrt(math.fsum((x - mean) ** 2 for x in probe_losses) / n)
    if sigma == 0.0:
        return [], 0.0
    return [(x - loss_zero) / (n * sigma) for x in probe_losses], sigma


def combined_direction(directions: list[torch.Tensor], coefs: list[float], dtype: torch.dtype) -> torch.Tensor:
    """Σ_i c_i·d_i on one chunk, in ``dtype`` (d_0·c_0 first, then += c_i·d_i: the kernels' order)."""
    g = directions[0].to(dtype) * coefs[0]
    for d, c in zip(directions[1:], coefs[1:]):
        g.add_(d, alpha=c)
    return g
