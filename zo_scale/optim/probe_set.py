"""One-sided probe sets: ℓ₀ at θ and N probes ℓ_i at θ + ε·d_i, all on one batch (FZOO, ZO-Muon,
HELENE-Muon).

What these optimizers share, and only that: the option ``n_directions`` (N; the base class's samples
are the directions, streams 0..N−1), the N + 1 forwards and their order, the step statistics and
the restore of a step that gets no update. Each keeps its own step: what it makes of the losses,
when it skips and how it updates differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from zo_scale.optim.base import NonFiniteLossError, StepStats, ZOOptimizer, is_int_at_least
from zo_scale.probes import ProbeGroup


@dataclass(frozen=True)
class ProbeLosses:
    """A step's losses, global means over ranks."""

    zero: float  # ℓ₀ at θ
    probes: list[float]  # ℓ_i at θ + ε·d_i, i = 1..N

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in [self.zero, *self.probes])


class ProbeSetOptimizer(ZOOptimizer):
    """Base of the one-sided probe-set optimizers. A subclass declares ``n_directions`` with its
    default (``options()`` takes the subclass's) and may raise ``min_directions``."""

    probes_loss_zero = True
    min_directions = 1  # the fewest probes its estimate is defined with
    min_directions_reason = ""  # why, in the error when fewer are asked for

    def __init__(self, model, *, n_directions: int, **kwargs):
        name = type(self).__name__
        if not is_int_at_least(n_directions, self.min_directions):
            raise ValueError(
                f"zo_scale: {name} needs n_directions >= {self.min_directions}{self.min_directions_reason}, "
                f"got {n_directions!r}"
            )
        if "n_samples" in kwargs:  # the same number under two names: refuse the one not documented
            raise ValueError(f"zo_scale: {name} takes n_directions, not n_samples")
        super().__init__(model, n_samples=n_directions, n_directions=n_directions, **kwargs)

    def _probe_groups(self):
        return [ProbeGroup(0.0)] + [ProbeGroup(+1.0, i) for i in range(self.n_samples)]

    def _probe_losses(self, closure: Callable) -> ProbeLosses:
        """ℓ₀ and the N probes' losses. Sequential probes leave the weights at +εd_N; batched ones never
        move θ."""
        if closure is None:
            raise ValueError("zo_scale: ZO optimizers need a closure that runs a forward pass and returns the loss")
        if self.batched_probes:
            pairs = self._batched_forward(closure)
        else:
            pairs = [self._forward(closure)]  # ℓ₀ at θ
            for i in range(self.n_samples):
                self._move_to(+1, i)  # from +εd_{i-1} straight to +εd_i
                pairs.append(self._forward(closure))
        vals = self._reduce(pairs)
        return ProbeLosses(vals[0], vals[1:])

    def _step_stats(self, losses: ProbeLosses, proj_grad: float, extra: dict) -> StepStats:
        """``loss`` = ℓ₀ (the unperturbed loss), ``loss_plus`` = mean ℓ_i, no ``loss_minus``."""
        return StepStats(
            step=self.step_count,
            loss=losses.zero,
            loss_plus=sum(losses.probes) / self.n_samples,
            loss_minus=float("nan"),  # one-sided: no −ε probe
            proj_grad=proj_grad,
            lr=self.param_groups[0]["lr"],
            forward_passes=self.forward_passes,
            loss_zero=losses.zero,
            extra=extra,
        )

    def _skip_update(self, stats: StepStats, losses: ProbeLosses) -> None:
        """No update this step: θ restored; a non-finite loss raises unless ``on_nonfinite='skip'``."""
        self._move_to(0, self.n_samples - 1)
        if not losses.finite and self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"zo_scale: non-finite loss at step {self.step_count} (l0={losses.zero}, probes={losses.probes}); "
                "parameters restored"
            )
        stats.skipped = True
