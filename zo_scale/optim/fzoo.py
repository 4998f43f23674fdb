"""FZOO (Dang et al., ICLR 2026): batched one-sided probes, a step normalised by their losses' spread.

Per step, N + 1 forwards on one batch:
  ℓ₀ = L(θ);  ℓ_i = L(θ + ε·u_i), i = 1..N, u_i Rademacher (±1 per element)
  σ  = population std of ℓ_1..ℓ_N
  θ ← θ − lr·Σ_i (ℓ_i − ℓ₀)/(N·σ)·u_i
as in the authors' code (``zo_step`` / ``zo_update``). u_i is the i-th stream of the same
counter-based generator as z (one Philox bit per element, ``zo_scale.rng``), so every rank
regenerates its slice for any world size; only the N + 1 losses cross ranks. The update reads
and writes θ once: the restore of the last probe and all N directions go in one pass.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from zo_scale import rng
from zo_scale.optim.loss_precision import FIX
from zo_scale.optim.probe_set import ProbeSetOptimizer
from zo_scale.optim.updates import combined_direction, fzoo_coefficients, mezo_update_

DIRECTIONS = {"rademacher": "rademacher", "gaussian": "normal"}


class FZOO(ProbeSetOptimizer):
    """Options: ``n_directions`` N [8] (N + 1 forwards per step), ``direction`` ['rademacher' | 'gaussian'],
    ``weight_decay`` and ``decay_1d`` as in MeZO (decoupled, θ·(1 − lr·wd); FZOO's code has none).

    When all N probe losses are equal (σ = 0) no step is defined: the weights are restored, the step
    is reported as skipped (``last_stats.skipped``) and a warning says why once per optimizer (most
    often a loss computed in bf16/fp16, which cannot resolve a probe; else an eps too small).
    ``last_stats``: ``loss`` = ℓ₀ (the unperturbed loss, as FZOO's code reports it), ``loss_plus`` =
    mean ℓ_i, ``proj_grad`` = mean (ℓ_i − ℓ₀)/ε, ``extra`` = {sigma}.
    """

    min_directions = 2
    min_directions_reason = " (σ of one loss is 0)"

    def __init__(
        self,
        model,
        *,
        lr: float,
        eps: float = 1e-3,
        n_directions: int = 8,
        direction: str = "rademacher",
        decay_1d: bool = False,
        **kwargs,
    ):
        if direction not in DIRECTIONS:
            raise ValueError(f"zo_scale: FZOO direction must be one of {tuple(DIRECTIONS)}, got {direction!r}")
        super().__init__(
            model, lr=lr, eps=eps, n_directions=n_directions, direction=direction, decay_1d=decay_1d, **kwargs
        )
        self._kind = DIRECTIONS[direction]
        self._warned_flat = False

    def _kernel_takes_samples(self, kernels) -> bool:
        return True  # its fused update reads the N coefficients from a device tensor

    def _stream(self, view, sample):
        return rng.ZStream.make(self.seed, view.uid, self.step_count, sample, self._kind)

    @torch.no_grad()
    def step(self, closure: Callable) -> float:
        losses = self._probe_losses(closure)
        n = self.n_samples
        coefs, sigma = fzoo_coefficients(losses.zero, losses.probes) if losses.finite else ([], 0.0)
        proj_grad = (sum(losses.probes) / n - losses.zero) / self.param_groups[0]["eps"]
        stats = self._step_stats(losses, proj_grad, extra={"sigma": sigma})
        if not coefs:
            self._skip_update(stats, losses)
            if losses.finite and not self._warned_flat:  # σ = 0
                warnings.warn(
                    f"zo_scale: FZOO step {self.step_count} skipped: all {n} probe losses are equal (σ = 0), so "
                    f"the loss does not resolve the probes' change: {FIX}; else eps may be too small",
                    stacklevel=2,
                )
                self._warned_flat = True
        else:
            self._restore_and_update(coefs, {})  # _fused_update fills in the coefficient tensors
        self.step_count += 1
        self.last_stats = stats
        return stats.loss

    def _update_chunk(self, view, lo, hi, theta, zs, coefs, scalars):
        group = self.param_groups[0]
        wd = group["weight_decay"] if self._decays(view) else 0.0
        mezo_update_(theta, combined_direction(zs, coefs, theta.dtype), lr=group["lr"], weight_decay=wd)

    def _fused_update(self, view, coefs, scalars, restore):
        from zo_scale import kernels

        group = self.param_groups[0]
        device = view.local.device
        tensors = scalars.setdefault("coef_tensors", {})
        if device not in tensors:  # one small copy per step and device, not per shard
            tensors[device] = torch.tensor(coefs, dtype=torch.float32, device=device)
        kernels.fzoo_restore_update_(
            view.local,
            [self._stream(view, j) for j in range(self.n_samples)],
            view.start,
            coefs=tensors[device],
            restore=restore,
            lr=group["lr"],
            weight_decay=group["weight_decay"] if self._decays(view) else 0.0,
            master=self.shard_state[view.name].get("master"),
        )
