"""MeZO (Malladi et al., 2023): ZO-SGD with the seed trick, optional n-SPSA and weight decay."""

from __future__ import annotations

from zo_scale.optim.base import ZOOptimizer
from zo_scale.optim.updates import mezo_update_


class MeZO(ZOOptimizer):
    """θ ← θ − lr·(mean_j pg_j·z_j + wd·θ).

    Options: ``n_samples`` (n-SPSA: average n probes per step, 2n forwards), ``weight_decay``
    and ``decay_1d`` (also decay biases and norm weights; off by default).
    """

    def __init__(self, model, *, lr: float, eps: float = 1e-3, decay_1d: bool = False, **kwargs):
        super().__init__(model, lr=lr, eps=eps, decay_1d=decay_1d, **kwargs)

    def _update_chunk(self, view, lo, hi, theta, zs, pgs, scalars):
        group = self.param_groups[0]
        wd = group["weight_decay"] if self._decays(view) else 0.0
        mezo_update_(theta, self._grad_dir(zs, pgs, theta.dtype), lr=group["lr"], weight_decay=wd)

    def _fused_update(self, view, pgs, scalars, restore):
        from zo_scale import kernels

        group = self.param_groups[0]
        kernels.mezo_restore_update_(
            view.local,
            [self._stream(view, j) for j in range(self.n_samples)],
            view.start,
            pgs=pgs,
            restore=restore,
            lr=group["lr"],
            weight_decay=group["weight_decay"] if self._decays(view) else 0.0,
            master=self.shard_state[view.name].get("master"),
        )
