"""Pure math of the low-rank, orthogonalised ZO step (ZO-Muon and HELENE-Muon).

A weight with two or more dims is seen as the row-major matrix W (m×n), m = shape[0]. Its probe
directions are P·U_i with P (m×r) orthonormal and U_i (r×n) Gaussian; its step is P·NS(G) with
G (r×n) in the subspace's coordinates. A shard holds a flat range of W that may start and end
mid-row (ZeRO-3), so ``lowrank_range`` computes only that range of P·X, from the rows of P the
shard touches. Every function here is deterministic: the same inputs on the same device kind
give the same bits on every rank, which is what lets each rank compute P, G and NS(G) alone.
"""

from __future__ import annotations

import math

import torch

from zo_scale.optim.updates import row_segments

# Newton–Schulz quintic coefficients of the Muon code the ZO-Muon authors use (a, b, c).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_NORM_EPS = 1e-7


def matrix_shape(global_shape) -> tuple[int, int] | None:
    """(m, n) of the matrix a tensor is seen as — dim 0 against the rest, so FSDP2's Shard(0) holds
    whole rows — or None for a tensor with fewer than 2 dims (it gets plain ZO-SGD)."""
    shape = tuple(global_shape)
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


def haar_basis(gaussian: torch.Tensor) -> torch.Tensor:
    """An orthonormal m×r basis, Haar-distributed, from an m×r standard Gaussian matrix (r ≤ m):
    Q of its reduced QR with each column's sign set so R's diagonal is positive. Computed in fp64
    whatever the input dtype."""
    q, r = torch.linalg.qr(gaussian.double(), mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def newton_schulz5(g: torch.Tensor) -> torch.Tensor:
    """Muon's approximate orthogonalisation U·Vᵀ of G = U·S·Vᵀ: 5 quintic Newton–Schulz iterations
    on G/(‖G‖_F + 1e-7), on the wide orientation (transposed when G has more rows than columns).
    Singular values land near [0.7, 1.2] rather than exactly 1; G = 0 gives 0."""
    a, b, c = NS_COEFFICIENTS
    tall = g.size(0) > g.size(1)
    x = g.mT if tall else g
    x = x / (x.norm() + NS_NORM_EPS)
    for _ in range(NS_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def probe_coefficients(loss_zero: float, probe_losses: list[float], eps: float) -> list[float]:
    """One-sided finite differences c_i = (ℓ_i − ℓ₀)/ε with one shared ℓ₀."""
    return [(x - loss_zero) / eps for x in probe_losses]


def subspace_estimate(factors: list[torch.Tensor], coefs: list[float]) -> torch.Tensor:
    """G = mean_i c_i·U_i: the ZO gradient in the subspace's coordinates (or on a 1-D chunk)."""
    n = len(factors)
    g = factors[0] * (coefs[0] / n)
    for u, c in zip(factors[1:], coefs[1:]):
        g.add_(u, alpha=c / n)
    return g


def lowrank_range(p_rows: torch.Tensor, x: torch.Tensor, first_row: int, start: int, length: int) -> torch.Tensor:
    """Elements [start, start + length) (flat, row-major) of P·X, where ``p_rows`` holds rows
    ``first_row ..`` of P (every row the range touches) and X is r×n. Whole rows are one matmul;
    a partial row (a ZeRO-3 partition that cuts it) is one row of P times the columns it needs."""
    n = x.size(1)
    out = torch.empty(length, dtype=x.dtype, device=x.device)
    for off, size, row, col in row_segments(start, length, n):
        i = row - first_row
        if col == 0 and size % n == 0:
            k = size // n
            torch.mm(p_rows[i : i + k], x, out=out[off : off + size].view(k, n))
        else:
            torch.mv(x[:, col : col + size].mT, p_rows[i], out=out[off : off + size])
    return out


def rows_of_range(start: int, end: int, n: int) -> tuple[int, int]:
    """The rows [first, last) of an n-column matrix that the flat range [start, end) touches."""
    if end <= start:
        return 0, 0
    return start // n, (end - 1) // n + 1


def change_of_basis(p_new: torch.Tensor, p_old: torch.Tensor) -> torch.Tensor:
    """P_newᵀ·P_old (r×r): maps subspace coordinates of P_old onto those of P_new (LOZO's momentum
    projection on resampling, here with orthonormal bases: P_new·(P_newᵀP_old·M) is the projection
    of P_old·M onto the new subspace)."""
    return p_new.mT @ p_old
