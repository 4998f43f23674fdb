"""The optimizers' fused-kernel path (Triton, run by its CPU interpreter) against the torch path.

fp16 weights go through the fp32 master in both paths, so the losses must agree to rounding."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import os, torch, zo_scale
    from zo_scale import kernels

    def run(cls, dtype, fused, **kw):
        os.environ["ZO_SCALE_NO_TRITON"] = "0" if fused else "1"
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(9, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)).to(dtype)
        x, y = torch.randn(8, 9).to(dtype), torch.randn(8, 3)
        opt = cls(model, eps=1e-3, seed=5, **kw)
        assert opt._uses_kernels(opt.views[0]) == fused
        losses = [opt.step(lambda: torch.nn.functional.mse_loss(model(x).float(), y)) for _ in range(4)]
        return losses, torch.cat([p.detach().float().flatten() for p in model.parameters()]), opt.last_stats

    for cls, kw in [(zo_scale.MeZO, dict(lr=1e-2, n_samples=2, weight_decay=0.1)),
                    (zo_scale.HiZOO, dict(lr=1e-2, hessian_smooth=1e-3)),
                    (zo_scale.HELENE, dict(lr=1e-3, weight_decay=0.1)),
                    (zo_scale.HELENE, dict(lr=1e-3, clip_mode="floor", clip_lambda=0.01, hessian_scale=1.0)),
                    (zo_scale.FZOO, dict(lr=1e-2, n_directions=5, weight_decay=0.1)),
                    (zo_scale.FZOO, dict(lr=1e-2, n_directions=3, direction="gaussian")),
                    # FZOO's kernels move the weights, the update (its momentum) is the torch path's
                    (zo_scale.HELENEFZOO, dict(lr=2e-3, n_directions=3, weight_decay=0.1, anneal_horizon=2.0))]:
        # bf16 is left out here: Triton's CPU interpreter casts fp32->bf16 by truncation (GPUs round
        # to nearest even like torch), so the two paths would differ by an ulp for that reason alone
        for dtype in (torch.float32, torch.float16):
            l_t, p_t, s_t = run(cls, dtype, False, **kw)
            l_f, p_f, s_f = run(cls, dtype, True, **kw)
            tol = 5e-5 if dtype == torch.float32 else 2e-3
            assert max(abs(a - b) for a, b in zip(l_t, l_f)) < tol, (cls.__name__, dtype, l_t, l_f)
            assert (p_t - p_f).abs().max().item() < tol, (cls.__name__, dtype, (p_t - p_f).abs().max().item(), l_t, l_f)
            if "clip_fraction" in s_t.extra:
                assert abs(s_t.extra["clip_fraction"] - s_f.extra["clip_fraction"]) < 0.05
            print("ok", cls.__name__, dtype, (p_t - p_f).abs().max().item())
    """
)


def test_fused_kernels_follow_the_torch_trajectory():
    env = dict(os.environ, TRITON_INTERPRET="1", ZO_SCALE_TRITON_CPU="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok") == 14
