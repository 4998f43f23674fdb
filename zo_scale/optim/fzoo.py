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

import math
import warnings
from typing import Callable

import torch

from zo_scale import rng
from zo_scale.optim.base import NonFiniteLossError, StepStats, ZOOptimizer
from zo_scale.optim.loss_precision import FIX
from zo_scale.probes import ProbeGroup
from zo_scale.optim.updates import combined_direction, fzoo_coefficients, mezo_update_

DIRECTIONS = {"rademacher": "rademacher", "gaussian": "normal"}


class FZOO(ZOOptimizer):
    """Options: ``n_directions`` N [8] (N + 1 forwards per step), ``direction`` ['rademacher' | 'gaussian'],
    ``weight_decay`` and ``decay_1d`` as in MeZO (decoupled, θ·(1 − lr·wd); FZOO's code has none).

    When all N probe losses are equal (σ = 0) no step is defined: the weights are restored, the step
    is reported as skipped (``last_stats.skipped``) and a warning says why once per optimizer (most
    often a loss computed in bf16/fp16, which cannot resolve a probe; else an eps too small).
    ``last_stats``: ``loss`` = ℓ₀ (the unperturbed loss, as FZOO's code reports it), ``loss_plus`` =
    mean ℓ_i, ``proj_grad`` = mean (ℓ_i − ℓ₀)/ε, ``extra`` = {sigma}.
    """

    probes_loss_zero = True

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
        if not isinstance(n_directions, int) or n_directions < 2:
            raise ValueError(f"zo_scale: FZOO needs n_directions >= 2 (σ of one loss is 0), got {n_directions!r}")
        if "n_samples" in kwargs:
            raise ValueError("zo_scale: FZOO takes n_directions, not n_samples")
        super().__init__(
            model, lr=lr, eps=eps, n_samples=n_directions, n_directions=n_directions, direction=direction,
            decay_1d=decay_1d, **kwargs,
        )
        self._kind = DIRECTIONS[direction]
        self._warned_flat = False

    def _kernel_takes_samples(self, kernels) -> bool:
        return True  # its fused update reads the N coefficients from a device tensor

    def _stream(self, view, sample):
        return rng.ZStream.make(self.seed, view.uid, self.step_count, sample, self._kind)

    def _probe_groups(self):
        return [ProbeGroup(0.0)] + [ProbeGroup(+1.0, i) for i in range(self.n_samples)]

    @torch.no_grad()
    def step(self, closure: Callable) -> float:
        if closure is None:
            raise ValueError("zo_scale: ZO optimizers need a closure that runs a forward pass and returns the loss")
        group = self.param_groups[0]
        n = self.n_samples
        if self.batched_probes:
            pairs = self._batched_forward(closure)
        else:
            pairs = [self._forward(closure)]  # ℓ₀ at θ
            for i in range(n):
                self._move_to(+1, i)  # from +εu_{i-1} straight to +εu_i
                pairs.append(self._forward(closure))
        vals = self._reduce(pairs)
        loss_zero, probes = vals[0], vals[1:]
        stats = StepStats(
            step=self.step_count,
            loss=loss_zero,
            loss_plus=sum(probes) / n,
            loss_minus=float("nan"),  # one-sided: no −ε probe
            proj_grad=(sum(probes) / n - loss_zero) / group["eps"],
            lr=group["lr"],
            forward_passes=self.forward_passes,
            loss_zero=loss_zero,
        )
        finite = all(math.isfinite(x) for x in vals)
        coefs, sigma = fzoo_coefficients(loss_zero, probes) if finite else ([], 0.0)
        stats.extra = {"sigma": sigma}
        if not coefs:
            self._move_to(0, n - 1)
            if not finite:
                if self.on_nonfinite == "raise":
                    raise NonFiniteLossError(
                        f"zo_scale: non-finite loss at step {self.step_count} (l0={loss_zero}, "
                        f"probes={probes}); parameters restored"
                    )
            elif not self._warned_flat:
                warnings.warn(
                    f"zo_scale: FZOO step {self.step_count} skipped: all {n} probe losses are equal (σ = 0), so "
                    f"the loss does not resolve the probes' change: {FIX}; else eps may be too small",
                    stacklevel=2,
                )
                self._warned_flat = True
            stats.skipped = True
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
