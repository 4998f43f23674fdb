"""HELENE's options on a small problem whose two layers have very different curvature (100 and 1).

With a Gaussian probe the ZO estimate of g⊙g is ‖∇L‖² + 2(∂ᵢL)² per coordinate, so a diagonal
preconditioner carries per-coordinate curvature only in small dimensions: this problem has two
2-element "layers". Every variant gets the same forward budget and its best learning rate from one
grid; the score is the mean log10 final loss over seeds (lower is better; inf: diverged).

    python bench/helene_toy.py            # the README's table (about 3 minutes on one core)

tests/test_core_convergence.py uses the same problem and scoring.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zo_scale  # noqa: E402

FORWARDS = 1000
LR_GRID = [10 ** (k / 2) for k in range(-9, 0)]  # 3e-5 .. 0.3
SEEDS = range(6)

VARIANTS = {
    "MeZO": (zo_scale.MeZO, {}),
    "HELENE (defaults: ratio clip)": (zo_scale.HELENE, {}),
    "HELENE, hessian_bias_correction": (zo_scale.HELENE, {"hessian_bias_correction": True}),
    "HELENE, use_hessian=False": (zo_scale.HELENE, {"use_hessian": False}),
    "HELENE, clip_mode=none": (zo_scale.HELENE, {"clip_mode": "none"}),
    "HELENE, clip_mode=none + bias correction": (zo_scale.HELENE, {"clip_mode": "none", "hessian_bias_correction": True}),
    "HELENE, clip_mode=floor, λ=1e-3": (zo_scale.HELENE, {"clip_mode": "floor", "clip_lambda": 1e-3}),
    "HELENE, clip_mode=floor, λ=1e-3 + bias correction": (
        zo_scale.HELENE, {"clip_mode": "floor", "clip_lambda": 1e-3, "hessian_bias_correction": True}),
}


class LayeredQuadratic(torch.nn.Module):
    def __init__(self, curvatures=(100.0, 1.0), width=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(width, generator=g, dtype=torch.float64)) for _ in curvatures]
        )
        self.curvatures = curvatures

    def forward(self):
        return sum(0.5 * c * w.square().sum() for c, w in zip(self.curvatures, self.layers))


def final_log_loss(cls, lr, seed, forwards=FORWARDS, **kw) -> float:
    model = LayeredQuadratic()
    opt = cls(model, lr=lr, eps=1e-4, seed=seed, **kw)
    while opt.forward_passes < forwards:
        loss = opt.step(model)
        if not math.isfinite(loss) or loss > 1e8:
            return math.inf
    return math.log10(max(model().item(), 1e-30))


def scores_by_lr(cls, seeds=SEEDS, **kw) -> dict[float, float]:
    return {lr: statistics.mean(final_log_loss(cls, lr, s, **kw) for s in seeds) for lr in LR_GRID}


def best_score(cls, **kw) -> tuple[float, float]:
    """(best mean log10 loss, its lr); the best lr must lie inside the grid."""
    scores = scores_by_lr(cls, **kw)
    lr = min(scores, key=scores.get)
    if lr in (LR_GRID[0], LR_GRID[-1]):
        raise AssertionError(f"best lr {lr} at the edge of the grid: widen it")
    return scores[lr], lr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"| variant | mean log10 final loss ({FORWARDS} forwards, {len(SEEDS)} seeds) | best lr |")
    print("|---|---|---|")
    for name in args.variants:
        cls, kw = VARIANTS[name]
        score, lr = best_score(cls, **kw)
        print(f"| {name} | {score:.2f} | {lr:.2g} |", flush=True)


if __name__ == "__main__":
    main()
