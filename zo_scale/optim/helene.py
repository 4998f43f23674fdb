"""HELENE (Zhao et al., EMNLP 2025), as reconstructed in DESIGN.md — every unconfirmed choice
is an option with a documented default.

Per step t, with pg = (ℓ₊ − ℓ₋)/(2ε) and g = pg·z (two forwards):
  α_t = β1 + (1 − β1)·exp(−t/T)                    annealing ('exp'; 'exp_ema': 1 → 1 − β1; 'none': α = 1 − β1)
  m   ← β1·m + α_t·g
  every k steps: h ← β2·h + (1 − β2)·c·g⊙g         A-GNB from the same probe, true labels
  floor: θ ← θ − η·m / (γ·max(h, λ_i) + ε_s)        layer-wise clipping, threshold λ_i per tensor
  ratio: θ ← θ − η·clip(m / (γ·h + ε_s), ±λ_i)       Sophia-style alternative
  plus decoupled weight decay θ ← θ·(1 − η·wd).
"""

from __future__ import annotations

import math

import torch

from zo_scale.optim.base import FULL_PRECISION, ZOOptimizer
from zo_scale.optim.updates import ANNEAL_LAWS, helene_alpha, helene_update_

CLIP_MODES = ("floor", "ratio", "none")
LAMBDA_RULES = ("uniform", "sqrt_numel")


class HELENE(ZOOptimizer):
    """HELENE with annealed momentum, A-GNB diagonal Hessian and layer-wise clipping.

    Options (defaults in brackets; none of them is confirmed by public code):
      beta1 [0.9], beta2 [0.99]         momentum and Hessian EMA factors
      anneal ['exp'|'exp_ema'|'none'], anneal_horizon T [100 steps]  (see updates.helene_alpha)
      hessian_interval k [1]            refresh h every k steps
      hessian_scale c ['loss' | float]  ĥ = c·g⊙g; 'loss': c = 1/(2(ℓ − ℓ*)), the Gauss–Newton scale for
                                        a loss ℓ = ℓ* + ½r² (g⊙g/(2(ℓ − ℓ*)) is exactly the curvature of
                                        one squared residual), which makes m/h a Newton-like step
      loss_floor ℓ* [0.0]               the lowest value the loss can take, for hessian_scale='loss':
                                        0 for cross-entropy and squared errors; for a loss of any sign,
                                        its own lower bound (−1 for minus an accuracy, −10 for a loss
                                        shifted by −10). A shifted loss with its shifted floor gives the
                                        same c, hence the same trajectory. ℓ ≤ ℓ* is an error.
      use_hessian [True]                False: h ≡ 1 in the denominator (ablation)
      hessian_bias_correction [False]   divide h by 1 − β2ⁿ after its n-th refresh (Adam-style): h starts
                                        at 0, so without it the first steps divide m by a tiny h
                                        (clip_mode 'none' then diverges at once; 'ratio' clips everything)
      gamma γ [1.0]
      clip_mode ['ratio'|'floor'|'none'], clip_lambda λ [1.0]
      lambda_rule ['uniform'|'sqrt_numel']  λ_i = λ, or λ·√(n_i / mean n) per tensor
      stab_eps ε_s [1e-8], weight_decay [0.0] (decoupled; skips 1-D tensors unless decay_1d)
      state_dtype [torch.float32]       dtype of m and h
    """

    state_names = ("momentum", "hessian")
    reports_clipping = True

    def __init__(
        self,
        model,
        *,
        lr: float,
        eps: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.99,
        anneal: str = "exp",
        anneal_horizon: float = 100.0,
        hessian_interval: int = 1,
        hessian_scale: float | str = "loss",
        loss_floor: float = 0.0,
        use_hessian: bool = True,
        hessian_bias_correction: bool = False,
        gamma: float = 1.0,
        clip_mode: str = "ratio",
        clip_lambda: float = 1.0,
        lambda_rule: str = "uniform",
        stab_eps: float = 1e-8,
        decay_1d: bool = False,
        **kwargs,
    ):
        if anneal not in ANNEAL_LAWS:
            raise ValueError(f"zo_scale: HELENE anneal must be one of {ANNEAL_LAWS}, got {anneal!r}")
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"zo_scale: HELENE clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
        if lambda_rule not in LAMBDA_RULES:
            raise ValueError(f"zo_scale: HELENE lambda_rule must be one of {LAMBDA_RULES}, got {lambda_rule!r}")
        if not (hessian_scale == "loss" or (isinstance(hessian_scale, (int, float)) and hessian_scale > 0)):
            raise ValueError(f"zo_scale: HELENE hessian_scale must be 'loss' or a positive number, got {hessian_scale!r}")
        if not math.isfinite(loss_floor):
            raise ValueError(f"zo_scale: HELENE loss_floor must be a finite number, got {loss_floor!r}")
        if hessian_interval < 1 or anneal_horizon <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ValueError("zo_scale: HELENE needs hessian_interval >= 1, anneal_horizon > 0, 0 <= beta1, beta2 < 1")
        super().__init__(
            model,
            lr=lr,
            eps=eps,
            beta1=beta1,
            beta2=beta2,
            anneal=anneal,
            anneal_horizon=anneal_horizon,
            hessian_interval=hessian_interval,
            hessian_scale=hessian_scale,
            loss_floor=loss_floor,
            use_hessian=use_hessian,
            hessian_bias_correction=hessian_bias_correction,
            gamma=gamma,
            clip_mode=clip_mode,
            clip_lambda=clip_lambda,
            lambda_rule=lambda_rule,
            stab_eps=stab_eps,
            decay_1d=decay_1d,
            **kwargs,
        )
        # λ_i from global shapes only: identical on every rank, no communication
        sizes = {v.name: v.global_numel for v in self.views}
        mean = sum(sizes.values()) / len(sizes)
        self.layer_lambda_scale = {
            name: (math.sqrt(n / mean) if lambda_rule == "sqrt_numel" else 1.0) for name, n in sizes.items()
        }

    def _before_update(self, losses):
        group = self.param_groups[0]
        scale = group["hessian_scale"]
        if scale == "loss":
            loss = (sum(losses["plus"]) + sum(losses["minus"])) / (2 * len(losses["plus"]))
            scale = 1.0 / (2.0 * self._excess_loss(loss, group["loss_floor"]))
        return {
            "hessian_scale": scale,
            "alpha": helene_alpha(
                self.step_count, beta1=group["beta1"], anneal=group["anneal"], horizon=group["anneal_horizon"]
            ),
            "refresh": self.step_count % group["hessian_interval"] == 0,
            "hessian_correction": self._hessian_correction(group),
        }

    def _excess_loss(self, loss: float, floor: float) -> float:
        """ℓ − ℓ* of hessian_scale='loss', which must be positive: else an error that says what to set."""
        if loss > floor:
            return loss - floor
        raise ValueError(
            f"zo_scale: HELENE hessian_scale='loss' (c = 1/(2(ℓ − loss_floor))) needs a positive loss above "
            f"loss_floor={floor:g}, got ℓ = {loss:g} at step {self.step_count}: set loss_floor to the lowest value "
            f"your loss can take (below {loss:g}; e.g. -1 for minus an accuracy, -10 for a loss shifted by -10), "
            f"or a fixed hessian_scale such as {1.0 / (2.0 * max(abs(loss), 1e-12)):.3g} (= 1/(2|ℓ|) here; retune lr)"
        )

    def _hessian_correction(self, group) -> float:
        """1 − β2ⁿ with n the refreshes of h so far, this step's included (1.0 when not corrected)."""
        if not (group["hessian_bias_correction"] and group["use_hessian"]):
            return 1.0
        refreshes = self.step_count // group["hessian_interval"] + 1
        return 1.0 - group["beta2"] ** refreshes

    def _step_options(self, view, scalars) -> dict:
        """The scalars of one HELENE update of ``view``: same for the torch math and the kernel.

        Bias correction needs no code of its own in either: dividing h by b is the same as dividing γ by
        b (and, for the floor, multiplying λ by b, since max(h/b, λ) = max(h, λ·b)/b)."""
        group = self.param_groups[0]
        correction = scalars["hessian_correction"]
        clip_lambda = group["clip_lambda"] * self.layer_lambda_scale[view.name]
        if group["clip_mode"] == "floor":
            clip_lambda *= correction
        return dict(
            lr=group["lr"],
            alpha=scalars["alpha"],
            beta1=group["beta1"],
            beta2=group["beta2"],
            refresh_hessian=scalars["refresh"],
            hessian_scale=scalars["hessian_scale"],
            use_hessian=group["use_hessian"],
            gamma=group["gamma"] / correction,
            clip_mode=group["clip_mode"],
            clip_lambda=clip_lambda,
            stab_eps=group["stab_eps"],
            weight_decay=group["weight_decay"] if self._decays(view) else 0.0,
        )

    def _update_chunk(self, view, lo, hi, theta, zs, pgs, scalars):
        st = self.shard_state[view.name]
        m, h = st["momentum"][lo:hi], st["hessian"][lo:hi]
        low_precision = m.dtype not in FULL_PRECISION
        m32, h32 = (m.float(), h.float()) if low_precision else (m, h)
        clipped = helene_update_(
            theta,
            self._grad_dir(zs, pgs, theta.dtype),
            m32,
            h32,
            **self._step_options(view, scalars),
        )
        if low_precision:
            m.copy_(m32)
            h.copy_(h32)
        return clipped

    def _fused_update(self, view, pgs, scalars, restore):
        from zo_scale import kernels

        st = self.shard_state[view.name]
        return kernels.helene_restore_update_(
            view.local,
            st["momentum"],
            st["hessian"],
            [self._stream(view, j) for j in range(self.n_samples)],
            view.start,
            pgs=pgs,
            restore=restore,
            master=st.get("master"),
            **self._step_options(view, scalars),
        )

    def _extra_stats(self, scalars, clipped, total):
        return {"alpha": scalars["alpha"], "clip_fraction": clipped / total if total else 0.0}
