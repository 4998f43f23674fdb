"""HELENE-Muon: HELENE's annealed momentum on ZO-Muon's low-rank, orthogonalised step.

Why a sibling of ZO-Muon and not an option of ``HELENE``: what is kept from HELENE is the one part
its reviews credit for its gain — the annealed momentum α_t — while the diagonal A-GNB Hessian and
its clipping (HELENE's state, options and fused kernels) are replaced by the per-matrix
orthogonalisation, which normalises each matrix's step without estimating curvature. Sharing
nothing of HELENE's update but ``updates.helene_alpha``, it reads better as ZO-Muon plus momentum.

Per step t, with ZO-Muon's probes (N + 1 forwards; P, U_i, c_i and G = mean_i c_i·U_i as there):
  α_t = helene_alpha(t)                       HELENE's annealing law ('exp': 1 → β1)
  M   ← β1·M + α_t·G                          M (r×n) in the subspace's coordinates, per matrix
  W   ← W − lr·(P·NS5(M) + wd·W)
  1-D tensors: m ← β1·m + α_t·ĝ,  θ ← θ − lr_1d·(m + wd·θ)   (m shaped like the shard)
When P is resampled (every ``resample_every`` steps), M is carried over as LOZO-M does
(``optsuite/LOZO``, ``lowrank_zo_update_momentum``): ``resample_momentum='project'`` maps it
onto the new subspace, M ← P_newᵀ·P_old·M (LOZO's V_oldᵀV_new/n for its Gaussian V), so P_new·M
is the projection of the old momentum P_old·M; ``'reset'`` starts it again from 0.

State. M is r·n numbers per matrix, identical on every rank (every rank computes G, and needs all
of M for NS5): it is replicated, not sharded — nothing to gather, and 4·Σ r·n bytes per rank
(fp32; fp64 if ``state_dtype`` is fp64). It is its matrix's per-parameter state
``subspace_momentum`` (as HiZOO-L's factors): a plain tensor, whole on every rank, in torch's
layout (``opt.state_dict()``, DCP) and in the flat-range one (``flat_state_dict()``, which
zo_scale.checkpoint writes); so any rank's copy resumes any world size. The epoch of its
coordinates is ``param_groups[0]["momentum_epoch"]``: group entries are saved by both layouts and
by torch's flattened state dict. A run resumed on the other side of a resample projects (or
resets) M at its first step, as an uninterrupted run does. The 1-D momentum is shard-shaped, like
HELENE's. The projection needs both bases whole: every rank redraws them (an m×r QR each, once
per resample) instead of communicating.
"""

from __future__ import annotations

import torch

from zo_scale.optim.lowrank import change_of_basis, matrix_shape, newton_schulz5, subspace_estimate
from zo_scale.optim.updates import check_momentum_options, helene_alpha
from zo_scale.optim.zo_muon import ZOMuon

RESAMPLE_MOMENTUM = ("project", "reset")


class HELENEMuon(ZOMuon):
    """Options: ZO-Muon's (``n_directions`` [4], ``rank`` [64], ``resample_every`` [100], ``lr_1d``
    [1e-7], ``weight_decay``, ``decay_1d``) and HELENE's momentum: ``beta1`` [0.9], ``anneal``
    ['exp' | 'exp_ema' | 'none'], ``anneal_horizon`` T [100 steps] (see ``updates.helene_alpha``),
    ``resample_momentum`` ['project' | 'reset'].

    ``last_stats.extra``: {epoch, alpha}.
    """

    state_names = ("momentum",)  # the 1-D tensors' momentum; matrices keep M (r×n) in subspace_momentum

    def __init__(
        self,
        model,
        *,
        lr: float,
        beta1: float = 0.9,
        anneal: str = "exp",
        anneal_horizon: float = 100.0,
        resample_momentum: str = "project",
        **kwargs,  # ZO-Muon's options and the base optimizer's
    ):
        check_momentum_options("HELENEMuon", beta1=beta1, anneal=anneal, anneal_horizon=anneal_horizon)
        if resample_momentum not in RESAMPLE_MOMENTUM:
            raise ValueError(
                f"zo_scale: HELENEMuon resample_momentum must be one of {RESAMPLE_MOMENTUM}, got {resample_momentum!r}"
            )
        # M per matrix (replicated; updated in place, opt.state shows it), filled below: the base
        # constructor's _param_state already reads it
        self.subspace_momentum: dict[str, torch.Tensor] = {}
        super().__init__(model, lr=lr, beta1=beta1, anneal=anneal, anneal_horizon=anneal_horizon,
                         resample_momentum=resample_momentum, **kwargs)
        for v in self.views:
            if matrix_shape(v.global_shape) is not None:
                _, n = matrix_shape(v.global_shape)
                self.subspace_momentum[v.name] = torch.zeros(self._rank_of(v), n, dtype=self._momentum_dtype(),
                                                             device=v.local.device)
        self.momentum_epoch = 0
        self._alpha = None
        self._expose_state()  # again, now with M

    @property
    def momentum_epoch(self) -> int:
        """The subspace epoch whose coordinates M is in: a ``param_groups[0]`` entry, so that every
        checkpoint layout keeps it with the options."""
        return int(self.param_groups[0]["momentum_epoch"])

    @momentum_epoch.setter
    def momentum_epoch(self, epoch: int) -> None:
        self.param_groups[0]["momentum_epoch"] = epoch

    def _momentum_dtype(self) -> torch.dtype:
        return torch.float64 if self.state_dtype == torch.float64 else torch.float32

    def _init_state(self, name, view):
        if matrix_shape(view.global_shape) is not None:
            return None  # kept as M (r×n) in self.subspace_momentum
        return super()._init_state(name, view)

    # ------------------------------------------------------------------ the step

    def _restore_and_step(self, coefs):
        group = self.param_groups[0]
        self._alpha = helene_alpha(self.step_count, beta1=group["beta1"], anneal=group["anneal"],
                                   horizon=group["anneal_horizon"])
        if self.momentum_epoch != self._epoch():
            self._carry_momentum_over()
        super()._restore_and_step(coefs)

    def _carry_momentum_over(self) -> None:
        """M into the current epoch's subspace: projected (LOZO-M) or reset."""
        new = self._epoch()
        for v in self.views:
            m = self.subspace_momentum.get(v.name)
            if m is None:
                continue
            if self.param_groups[0]["resample_momentum"] == "reset":
                m.zero_()
            else:
                c = change_of_basis(self._full_basis(v, new), self._full_basis(v, self.momentum_epoch))
                m.copy_(c.to(m.device) @ m.double())
        self.momentum_epoch = new

    def _matrix_step(self, view, coefs):
        group = self.param_groups[0]
        m = self.subspace_momentum[view.name]  # replicated: updated on every rank, even with an empty shard
        g = subspace_estimate([self._factor(view, j) for j in range(self.n_samples)], coefs)
        m.mul_(group["beta1"]).add_(g.to(m.dtype), alpha=self._alpha)
        if view.numel == 0:
            return None
        return newton_schulz5(m.to(self._work_dtype(view)))

    def _vector_step(self, view, lo, hi, grad):
        group = self.param_groups[0]
        m = self.shard_state[view.name]["momentum"][lo:hi]
        m32 = m.to(grad.dtype)
        m32.mul_(group["beta1"]).add_(grad, alpha=self._alpha)
        if m32 is not m:
            m.copy_(m32)
        return m32

    def step(self, closure):
        loss = super().step(closure)
        if not self.last_stats.skipped:
            self.last_stats.extra["alpha"] = self._alpha
        return loss

    # ------------------------------------------------------------------ checkpoints

    def _param_state(self, view):
        st = super()._param_state(view)
        m = self.subspace_momentum.get(view.name)
        if m is not None:  # whole on every rank: a plain tensor in either layout
            st["subspace_momentum"] = m
        return st

    def flat_state_dict(self) -> dict:
        """The base state (1-D momentum and master by global range; the momentum epoch among the
        group's entries) plus every matrix's M, whole and identical on every rank, so any rank's
        file resumes any world size."""
        sd = super().flat_state_dict()
        sd["subspace_momentum"] = {name: m.detach().clone() for name, m in self.subspace_momentum.items()}
        return sd

    def load_flat_state_dict(self, state_dict) -> None:
        pieces = state_dict if isinstance(state_dict, (list, tuple)) else [state_dict]
        saved = pieces[0].get("subspace_momentum")
        if saved is None:
            raise ValueError("zo_scale: HELENEMuon state without its subspace momentum "
                             f"(a {pieces[0].get('optimizer')!r} state, or one saved before it was kept)")
        if set(saved) != set(self.subspace_momentum):
            raise ValueError(f"zo_scale: the checkpoint has subspace momentum for {sorted(saved)}, "
                             f"this HELENEMuon for {sorted(self.subspace_momentum)}")
        for name, m in self.subspace_momentum.items():
            if tuple(saved[name].shape) != tuple(m.shape):
                raise ValueError(f"zo_scale: {name}'s subspace momentum is {tuple(m.shape)} here, "
                                 f"{tuple(saved[name].shape)} in the checkpoint (saved with another rank option?)")
        super().load_flat_state_dict(state_dict)  # the momentum epoch comes back with the group's entries
        for name, m in self.subspace_momentum.items():
            m.copy_(saved[name])
