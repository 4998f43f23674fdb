"""HELENE-FZOO: HELENE's annealed momentum on FZOO's σ-normalised multi-probe estimate.

The second HELENE variant of issue #24, for where the orthogonalised subspace step (HELENE-Muon)
loses: it keeps FZOO's probes and normalisation and adds only HELENE's momentum, the part its
reviews credit for its gain. Per step t, with FZOO's N + 1 forwards on one batch:
  c_i = (ℓ_i − ℓ₀)/(N·σ),  ĝ = Σ_i c_i·u_i        FZOO's estimate (σ the probe losses' population std)
  α_t = helene_alpha(t)                          HELENE's annealing law ('exp': 1 → β1)
  m   ← β1·m + α_t·ĝ
  θ   ← θ − lr·(m + wd·θ)
With 'exp', m settles near ḡ·α/(1 − β1) ≈ 9ḡ: at the same lr the step is about 9× FZOO's, so its lr
sits about a decade below FZOO's.

State: m, one number per coordinate in ``state_dtype``, sharded like the weights (HELENE's
``momentum``), kept by global flat range in checkpoints like every per-coordinate state. The only
collective is FZOO's all-reduce of the N + 1 losses. A step with no update (σ = 0, or a skipped
non-finite loss) leaves m as it was. On CUDA the probes move the weights (and build batched groups)
with FZOO's kernels; the update runs on the torch path (FZOO's fused update has no momentum).
"""

from __future__ import annotations

from typing import Callable

from zo_scale.optim.fzoo import FZOO
from zo_scale.optim.updates import check_momentum_options, combined_direction, helene_alpha, mezo_update_


class HELENEFZOO(FZOO):
    """Options: FZOO's (``n_directions`` [8], ``direction``, ``weight_decay``, ``decay_1d``) and
    HELENE's momentum: ``beta1`` [0.9], ``anneal`` ['exp' | 'exp_ema' | 'none'], ``anneal_horizon``
    T [100 steps] (see ``updates.helene_alpha``).

    ``last_stats.extra``: {sigma, alpha}.
    """

    state_names = ("momentum",)

    def __init__(
        self,
        model,
        *,
        lr: float,
        beta1: float = 0.9,
        anneal: str = "exp",
        anneal_horizon: float = 100.0,
        **kwargs,  # FZOO's options and the base optimizer's
    ):
        check_momentum_options("HELENEFZOO", beta1=beta1, anneal=anneal, anneal_horizon=anneal_horizon)
        super().__init__(model, lr=lr, beta1=beta1, anneal=anneal, anneal_horizon=anneal_horizon, **kwargs)

    def _fused_update(self, view, coefs, scalars, restore):
        # FZOO's kernels still move the weights to each probe (and build batched groups); its fused update
        # has no momentum, so the update pass is the torch one
        self._torch_update(view, coefs, scalars, restore)

    def _alpha(self, step: int) -> float:
        group = self.param_groups[0]
        return helene_alpha(step, beta1=group["beta1"], anneal=group["anneal"], horizon=group["anneal_horizon"])

    def step(self, closure: Callable) -> float:
        loss = super().step(closure)
        if not self.last_stats.skipped:
            self.last_stats.extra["alpha"] = self._alpha(self.last_stats.step)
        return loss

    def _update_chunk(self, view, lo, hi, theta, zs, coefs, scalars):
        group = self.param_groups[0]
        m = self.shard_state[view.name]["momentum"][lo:hi]
        m_work = m.to(theta.dtype)  # the same tensor when the state's dtype is the weights' working one
        m_work.mul_(group["beta1"]).add_(combined_direction(zs, coefs, theta.dtype), alpha=self._alpha(self.step_count))
        if m_work is not m:
            m.copy_(m_work)
        wd = group["weight_decay"] if self._decays(view) else 0.0
        mezo_update_(theta, m_work, lr=group["lr"], weight_decay=wd)
