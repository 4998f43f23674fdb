"""HiZOO (Zhao et al., 2025) in the form of its official code.

Keep a diagonal H (init 1); perturb along z/√H; three forwards ℓ₀, ℓ₊, ℓ₋; then
H ← (1−α)·H + α·|ℓ₊+ℓ₋−2ℓ₀|·H⊙z²/(2ε²), and step θ ← θ − lr·pg·z/√H with the updated H.
"""

from __future__ import annotations

import math

import torch

from zo_scale.optim.base import FULL_PRECISION, ZOOptimizer
from zo_scale.optim.updates import hizoo_direction, hizoo_hessian_update_, hizoo_update_


class HiZOO(ZOOptimizer):
    """Options: ``hessian_smooth`` α (official default 1e-8), ``alpha_schedule`` ('constant' or
    'cosine': α decays to 0 over ``total_steps``), ``hessian_floor`` (a lower bound on H; 0 = off),
    ``decay_1d`` as in MeZO."""

    state_names = ("hessian",)
    probes_loss_zero = True
    batched_on_shards = False  # its per-coordinate H is sharded like the weights (HiZOOL: True)
    supports_n_samples = False

    def __init__(
        self,
        model,
        *,
        lr: float,
        eps: float = 1e-3,
        hessian_smooth: float = 1e-8,
        alpha_schedule: str = "constant",
        total_steps: int | None = None,
        hessian_floor: float = 0.0,
        decay_1d: bool = False,
        **kwargs,
    ):
        if alpha_schedule not in ("constant", "cosine"):
            raise ValueError(f"zo_scale: HiZOO alpha_schedule must be 'constant' or 'cosine', got {alpha_schedule!r}")
        if alpha_schedule == "cosine" and not total_steps:
            raise ValueError("zo_scale: HiZOO alpha_schedule='cosine' needs total_steps")
        super().__init__(
            model,
            lr=lr,
            eps=eps,
            hessian_smooth=hessian_smooth,
            alpha_schedule=alpha_schedule,
            total_steps=total_steps,
            hessian_floor=hessian_floor,
            decay_1d=decay_1d,
            **kwargs,
        )
        if self.batched_probes and self.backend.name != "replicated" and not self.batched_on_shards:
            # the same verdict on every rank; building d on every rank would need an all-gather of H
            raise ValueError(
                f"zo_scale: {type(self).__name__} with batched_probes needs whole parameters on every rank: its "
                f"direction z/√H needs H over each gathered layer, and H is sharded here ({self.backend.name}); "
                "use HiZOOL (HiZOO's H in factored form, which runs batched on shards), batched_probes=False "
                "or a replicated model"
            )

    def _init_state(self, name, view):
        return torch.ones(view.numel, dtype=self.state_dtype, device=view.local.device)

    def _direction(self, view, lo, hi, z):
        hess = self.shard_state[view.name]["hessian"][lo:hi]
        hess = hess if hess.dtype in FULL_PRECISION else hess.float()
        return hizoo_direction(z.to(hess.dtype), hess)

    def _gathered_direction(self, view, lo, hi, z):
        return self._direction(view, lo, hi, z)  # the shard is the whole parameter (checked at construction)

    def _hessian_alpha(self) -> float:
        group = self.param_groups[0]
        if group["alpha_schedule"] == "cosine":
            frac = min(self.step_count / group["total_steps"], 1.0)
            return group["hessian_smooth"] * 0.5 * (1.0 + math.cos(math.pi * frac))
        return group["hessian_smooth"]

    def _before_update(self, losses):
        (plus,), (minus,) = losses["plus"], losses["minus"]
        return {"curvature": abs(plus + minus - 2.0 * losses["zero"]), "alpha": self._hessian_alpha()}

    def _update_chunk(self, view, lo, hi, theta, zs, pgs, scalars):
        group = self.param_groups[0]
        state = self.shard_state[view.name]["hessian"]
        hess = state[lo:hi] if state.dtype in FULL_PRECISION else state[lo:hi].float()
        hizoo_hessian_update_(
            hess, zs[0].to(hess.dtype), alpha=scalars["alpha"], curvature=scalars["curvature"], eps=group["eps"],
            floor=group["hessian_floor"],
        )
        wd = group["weight_decay"] if self._decays(view) else 0.0
        hizoo_update_(theta, zs[0].to(theta.dtype), hess, lr=group["lr"], proj_grad=pgs[0], weight_decay=wd)
        if hess.data_ptr() != state[lo:hi].data_ptr():
            state[lo:hi].copy_(hess)

    def _direction_hessian(self, view):
        return self.shard_state[view.name]["hessian"]

    def _fused_update(self, view, pgs, scalars, restore):
        from zo_scale import kernels

        group = self.param_groups[0]
        st = self.shard_state[view.name]
        kernels.hizoo_restore_update_(
            view.local,
            st["hessian"],
            self._stream(view, 0),
            view.start,
            proj_grad=pgs[0],
            restore=restore,
            lr=group["lr"],
            alpha=scalars["alpha"],
            curvature=scalars["curvature"],
            eps=group["eps"],
            floor=group["hessian_floor"],
            weight_decay=group["weight_decay"] if self._decays(view) else 0.0,
            master=st.get("master"),
        )

    def _extra_stats(self, scalars, clipped, total):
        return {"hessian_alpha": scalars["alpha"], "curvature": scalars["curvature"]}
