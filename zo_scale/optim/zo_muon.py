"""ZO-Muon (arXiv 2602.17155): one-sided probes in a random low-rank subspace per weight matrix and
a Newton–Schulz-orthogonalised step, as in the authors' code (OPTML-Group/ZO-Muon,
``llm/LowDimTrainer.py``, ``muon`` with ``multiple_sample``).

Per step, N + 1 forwards on one batch; for each weight seen as a matrix W (m×n, m = shape[0]):
  P   (m×r)  orthonormal, Haar: Q of the QR of an m×r Gaussian with the sign fix; r = min(rank, m);
             redrawn every ``resample_every`` steps (step t uses epoch t // resample_every)
  U_i (r×n)  Gaussian, i = 1..N;   ℓ₀ = L(θ),  ℓ_i = L(θ + ε·P·U_i),  c_i = (ℓ_i − ℓ₀)/ε
  G = mean_i c_i·U_i (r×n);        W ← W − lr·(P·NS5(G) + wd·W)
and for each tensor with fewer than 2 dims: z_i Gaussian, θ ← θ − lr_1d·(mean_i c_i·z_i + wd·θ).

Where this follows the code rather than the paper, or departs from both (each on purpose):
  * one-sided probes with one shared ℓ₀, N = 4, NS5 with Muon's quintic coefficients
    (3.4445, −4.7750, 2.0315) on G/(‖G‖_F + 1e-7) — the code's choices;
  * 1-D tensors take plain one-sided ZO-SGD at a fixed rate: the code hard-codes 1e-7; here it is
    ``lr_1d`` [1e-7], not scaled by the lr schedule (as in the code);
  * embeddings are matrices like any other (the code's ``ndim >= 2``); a tensor with more than 2
    dims is flattened to (shape[0], rest) where the code would fail;
  * r = min(rank, m): the code draws U as rank×n even when m < rank, and P·U fails (LoRA's A, 8×576);
  * on a resample step the code redraws P inside every probe's perturbation (each probe its own P,
    the update with the last one); here one P per epoch serves every probe and the update;
  * weight decay skips 1-D tensors unless ``decay_1d`` (the code skips tensors by name: bias, layer norm);
  * the update is computed in fp32 (fp64 for fp64 weights), with an fp32 master for bf16/fp16.

On shards. P, U_i and z come from the counter-based stream of ``zo_scale.rng``: P's m·r Gaussians
are stream ``SUBSPACE_STREAM`` of step ``epoch``, U_i is stream i of step t (elements in row-major
order), so they are pure functions of (seed, epoch or step, parameter, index). Every rank draws P
whole and orthonormalises it the same way (an m×r fp64 QR, no collective), then keeps only the
rows its shard touches; it draws U_i whole (r×n) and computes G and NS(G) from the all-reduced
losses, redundantly. It writes only its flat range of P·U_i and of P·NS(G), chunk by chunk, a
ZeRO-3 partition's cut rows included (``lowrank.lowrank_range``). The only collective is the
fp64 all-reduce of the N + 1 losses (16·(N + 1) bytes). P is not saved in checkpoints: a resumed
run regenerates it from the keys, on any world size and across a resample.

Batched probes (``batched_probes=True``, ``zo_scale.probes``): ℓ₀ and the N probes run in one forward;
each gathered matrix gets θ + ε·P·U_i over all its rows, each 1-D tensor θ + ε·z_i, and θ itself is
never moved. A shard holding the whole matrix uses its cached P; a sharded one redraws the whole P
(one m×r fp64 QR per matrix per step, where the sequential path draws it once per resample) when its
module first runs in the pass, and holds it only until the next matrix's: one m×r transient at a time.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from zo_scale import rng
from zo_scale.optim.base import FULL_PRECISION, is_int_at_least
from zo_scale.optim.lowrank import (
    haar_basis,
    lowrank_range,
    matrix_shape,
    newton_schulz5,
    probe_coefficients,
    rows_of_range,
    subspace_estimate,
)
from zo_scale.optim.probe_set import ProbeSetOptimizer
from zo_scale.optim.updates import mezo_update_
from zo_scale.probes import add_direction_

SUBSPACE_STREAM = rng.MASK32  # P's stream index: never a probe index


class ZOMuon(ProbeSetOptimizer):
    """Options: ``n_directions`` N [4] (N + 1 forwards per step), ``rank`` r [64] (capped at m per
    matrix), ``resample_every`` [100 steps], ``lr_1d`` [1e-7] (fixed rate of 1-D tensors),
    ``weight_decay`` [0] and ``decay_1d`` [False] as in MeZO.

    ``last_stats``: ``loss`` = ℓ₀, ``loss_plus`` = mean ℓ_i, ``proj_grad`` = mean c_i,
    ``extra`` = {epoch} (the subspace epoch of the step).
    """

    def __init__(
        self,
        model,
        *,
        lr: float,
        eps: float = 1e-3,
        n_directions: int = 4,
        rank: int = 64,
        resample_every: int = 100,
        lr_1d: float = 1e-7,
        decay_1d: bool = False,
        **kwargs,
    ):
        name = type(self).__name__
        if not is_int_at_least(rank, 1):
            raise ValueError(f"zo_scale: {name} rank must be an integer >= 1, got {rank!r}")
        if not is_int_at_least(resample_every, 1):
            raise ValueError(f"zo_scale: {name} resample_every must be an integer >= 1, got {resample_every!r}")
        if not (math.isfinite(lr_1d) and lr_1d >= 0):
            raise ValueError(f"zo_scale: {name} lr_1d must be finite and >= 0, got {lr_1d}")
        super().__init__(
            model, lr=lr, eps=eps, n_directions=n_directions, rank=rank, resample_every=resample_every,
            lr_1d=lr_1d, decay_1d=decay_1d, **kwargs,
        )
        self._bases: dict[str, tuple[tuple, torch.Tensor, int]] = {}  # name -> (key, rows of P, first row)
        self._factor_cache: dict[tuple, torch.Tensor] = {}  # this view's U_i of this step
        self._gathered_p: tuple[tuple, torch.Tensor] | None = None  # one sharded matrix's whole P, this step

    # ------------------------------------------------------------------ P, U_i and the directions

    def _work_dtype(self, view) -> torch.dtype:
        return torch.float64 if view.local.dtype == torch.float64 else torch.float32

    def _rank_of(self, view) -> int:
        return min(self.param_groups[0]["rank"], matrix_shape(view.global_shape)[0])

    def _epoch(self, step: int | None = None) -> int:
        return (self.step_count if step is None else step) // self.param_groups[0]["resample_every"]

    def _full_basis(self, view, epoch: int) -> torch.Tensor:
        """The whole P (m×r, fp64) of ``view`` for ``epoch``: the same on every rank."""
        m, _ = matrix_shape(view.global_shape)
        r = self._rank_of(view)
        stream = rng.ZStream.make(self.seed, view.uid, epoch, SUBSPACE_STREAM)
        return haar_basis(rng.draw_range(stream, 0, m * r, device=view.local.device).view(m, r))

    def _basis(self, view) -> tuple[torch.Tensor, int]:
        """The rows of this epoch's P that the shard touches (work dtype) and the first one's index."""
        key = (self._epoch(), self._rank_of(view))
        cached = self._bases.get(view.name)
        if cached is None or cached[0] != key:
            _, n = matrix_shape(view.global_shape)
            lo, hi = rows_of_range(view.start, view.end, n)
            rows = self._full_basis(view, key[0])[lo:hi].to(self._work_dtype(view))
            cached = self._bases[view.name] = (key, rows, lo)
        return cached[1], cached[2]

    def _factor(self, view, sample: int) -> torch.Tensor:
        """U_sample (r×n) of this step, in the work dtype; the current view's are cached."""
        key = (view.name, self.step_count, sample, self._rank_of(view))
        if key not in self._factor_cache:
            if any(k[0] != view.name or k[1] != self.step_count for k in self._factor_cache):
                self._factor_cache.clear()  # only one view's factors are held at a time
            _, n = matrix_shape(view.global_shape)
            r = self._rank_of(view)
            u = rng.draw_range(self._stream(view, sample), 0, r * n, device=view.local.device)
            self._factor_cache[key] = u.view(r, n).to(self._work_dtype(view))
        return self._factor_cache[key]

    def _lowrank(self, view, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of this shard of P·X."""
        p_rows, first = self._basis(view)
        return lowrank_range(p_rows, x, first, view.start + lo, hi - lo)

    def _z(self, view, lo, hi, sample):
        if matrix_shape(view.global_shape) is None:
            return super()._z(view, lo, hi, sample)
        return self._lowrank(view, self._factor(view, sample), lo, hi)

    def _uses_kernels(self, view) -> bool:
        return False  # torch path only: the rank-r products are matmuls

    # ------------------------------------------------------------------ batched probes

    def _batched_forward(self, closure):
        """ℓ₀ and every θ + ε·P·U_i in one forward; θ is never moved."""
        try:
            return super()._batched_forward(closure)
        finally:
            self._gathered_p = None  # the transient whole P does not outlive the pass

    def _whole_basis(self, view) -> torch.Tensor:
        """All rows of this epoch's P (work dtype). A shard holding the whole matrix has them cached
        already; else they are redrawn (an m×r QR) at the matrix's first group of the step and held only
        while its module runs: one matrix's P at a time, never kept between steps."""
        if view.start == 0 and view.end == view.global_numel:
            return self._basis(view)[0]
        key = (view.name, self._epoch(), self._rank_of(view))
        if self._gathered_p is None or self._gathered_p[0] != key:
            self._gathered_p = None  # free the previous matrix's P before drawing this one
            self._gathered_p = (key, self._full_basis(view, self._epoch()).to(self._work_dtype(view)))
        return self._gathered_p[1]

    def _add_gathered_direction_(self, view, flat, group):
        """A matrix's group weights: flat += scale·ε·(P·U_sample) over the whole matrix, chunk by chunk."""
        if matrix_shape(view.global_shape) is None:
            return super()._add_gathered_direction_(view, flat, group)  # 1-D: its one-sided z
        p, u = self._whole_basis(view), self._factor(view, group.sample)
        chunks = (
            (lo, hi, lowrank_range(p, u, 0, lo, hi - lo))
            for lo in range(0, view.global_numel, self.chunk_size)
            for hi in [min(lo + self.chunk_size, view.global_numel)]
        )
        add_direction_(flat, group.scale * self.param_groups[0]["eps"], chunks)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable) -> float:
        losses = self._probe_losses(closure)
        coefs = probe_coefficients(losses.zero, losses.probes, self.param_groups[0]["eps"])
        stats = self._step_stats(losses, proj_grad=sum(coefs) / self.n_samples, extra={"epoch": self._epoch()})
        if losses.finite:
            self._restore_and_step(coefs)
        else:
            self._skip_update(stats, losses)
        self._factor_cache.clear()
        self.step_count += 1
        self.last_stats = stats
        return stats.loss

    def _restore_and_step(self, coefs: list[float]) -> None:
        """One pass per shard: restore θ from +εd_N (or take the master), then apply the update."""
        group = self.param_groups[0]
        restore = -self._offset * group["eps"]
        last = self.n_samples - 1
        self.backend.prepare_edit()
        for view in self.views:
            is_matrix = matrix_shape(view.global_shape) is not None
            direction = self._matrix_step(view, coefs) if is_matrix else None
            if view.numel == 0:
                continue
            master = self.shard_state[view.name].get("master")
            decay = group["weight_decay"] if self._decays(view) else 0.0
            for lo, hi in self._chunk_ranges(view):
                local = view.local[lo:hi]
                if master is not None:
                    theta = master[lo:hi]  # the master never saw the perturbation
                else:
                    theta = local if local.dtype in FULL_PRECISION else local.float()
                    if restore:  # 0 after batched probes: θ was never moved
                        theta.add_(self._z(view, lo, hi, last).to(theta.dtype), alpha=restore)
                if is_matrix:
                    mezo_update_(theta, self._lowrank(view, direction, lo, hi).to(theta.dtype),
                                 lr=group["lr"], weight_decay=decay)
                else:
                    zs = [self._z(view, lo, hi, j) for j in range(self.n_samples)]
                    grad = self._vector_step(view, lo, hi, subspace_estimate([z.to(theta.dtype) for z in zs], coefs))
                    mezo_update_(theta, grad, lr=group["lr_1d"], weight_decay=decay)
                if theta is not local:
                    local.copy_(theta)
        self.backend.finish_edit()
        self._offset = 0

    # ------------------------------------------------------------------ what HELENE-Muon changes

    def _matrix_step(self, view, coefs: list[float]) -> torch.Tensor | None:
        """X (r×n) such that the matrix moves by −lr·P·X: NS5(G), the same on every rank (None: empty shard)."""
        if view.numel == 0:
            return None  # nothing to write, and no state to keep
        g = subspace_estimate([self._factor(view, j) for j in range(self.n_samples)], coefs)
        return newton_schulz5(g)

    def _vector_step(self, view, lo: int, hi: int, grad: torch.Tensor) -> torch.Tensor:
        """The step direction of a 1-D chunk from its ZO gradient estimate."""
        return grad
