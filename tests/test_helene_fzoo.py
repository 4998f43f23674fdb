"""HELENE-FZOO: a float64 reference, skipped steps keep the momentum, checkpoints, errors (its bit-exact
low-precision restore runs with FZOO's in test_fzoo.py).

Batched probes (plain, resumed) and the sharded trajectories (1 process = FSDP2 = ZeRO-3 at 2 and 3 ranks,
resume across world sizes, batched probes on shards) run with the other optimizers in test_probes.py /
test_sharded.py."""

import copy

import pytest
import torch
from test_core_optim import EPS, SEED, TinyNet, _snapshot, assert_params_match, batch, run_steps
from test_fzoo import FZOOReference

import zo_scale
from zo_scale.optim.updates import helene_alpha

STEPS = 5


class HELENEFZOOReference(FZOOReference):
    """FZOO's float64 reference with HELENE's annealed momentum on its estimate."""

    def __init__(self, model, kind, beta1, anneal, horizon):
        super().__init__(model, kind)
        self.m = {k: torch.zeros_like(v) for k, v in self.theta.items()}
        self.beta1, self.anneal, self.horizon = beta1, anneal, horizon

    def step(self, t, x, y, lr, n, wd=0.0):
        us = [{k: self.u(k, t, i) for k in self.theta} for i in range(n)]
        l0 = self.loss(self.theta, x, y)
        probes = [self.loss({k: v + EPS * u[k] for k, v in self.theta.items()}, x, y) for u in us]
        sigma = torch.tensor(probes, dtype=torch.float64).std(unbiased=False).item()
        alpha = helene_alpha(t, beta1=self.beta1, anneal=self.anneal, horizon=self.horizon)
        for k, v in self.theta.items():
            g = sum((probes[i] - l0) / (n * sigma) * us[i][k] for i in range(n))
            self.m[k] = self.beta1 * self.m[k] + alpha * g
            decay = wd if v.dim() >= 2 else 0.0
            self.theta[k] = v * (1 - lr * decay) - lr * self.m[k]
        return l0


@pytest.mark.parametrize("direction, kind, n, wd, anneal", [("rademacher", "rademacher", 4, 0.0, "exp"),
                                                            ("rademacher", "rademacher", 3, 0.1, "exp_ema"),
                                                            ("gaussian", "normal", 2, 0.0, "none")])
def test_matches_float64_reference(direction, kind, n, wd, anneal):
    model, (x, y) = TinyNet(), batch()
    ref = HELENEFZOOReference(model, kind, beta1=0.8, anneal=anneal, horizon=3.0)
    opt = zo_scale.HELENEFZOO(model, lr=0.005, eps=EPS, seed=SEED, n_directions=n, direction=direction,
                              weight_decay=wd, beta1=0.8, anneal=anneal, anneal_horizon=3.0, chunk_size=1024,
                              state_dtype=torch.float64)
    losses = run_steps(opt, model, STEPS, x, y)
    ref_losses = [ref.step(t, x, y, 0.005, n, wd) for t in range(STEPS)]
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    assert_params_match(model, ref, 1e-9)
    for name, m in ref.m.items():  # the state is the momentum itself, by parameter
        torch.testing.assert_close(opt.state[dict(model.named_parameters())[name]]["momentum"].view_as(m), m,
                                   rtol=1e-9, atol=1e-12)
    assert opt.forward_passes == (n + 1) * STEPS
    assert opt.last_stats.extra["alpha"] == helene_alpha(STEPS - 1, beta1=0.8, anneal=anneal, horizon=3.0)
    assert opt.last_stats.extra["sigma"] > 0


def test_momentum_carries_the_past_directions():
    """With lr = 0 nothing moves, yet m accumulates: after two steps it is β1·α_0·ĝ_0 + α_1·ĝ_1 ≠ α_1·ĝ_1
    — it is the momentum, not FZOO's step with a different scale."""
    model, (x, y) = TinyNet(), batch()
    ref = HELENEFZOOReference(model, "rademacher", beta1=0.9, anneal="exp", horizon=100.0)
    opt = zo_scale.HELENEFZOO(model, lr=0.0, eps=EPS, seed=SEED, n_directions=3, state_dtype=torch.float64)
    run_steps(opt, model, 2, x, y)
    for t in range(2):
        ref.step(t, x, y, 0.0, 3)
    w = model.fc1.weight
    torch.testing.assert_close(opt.state[w]["momentum"].view_as(w), ref.m["fc1.weight"], rtol=1e-10, atol=1e-14)
    fresh = HELENEFZOOReference(model, "rademacher", beta1=0.9, anneal="exp", horizon=100.0)
    fresh.m = {k: torch.zeros_like(v) for k, v in fresh.m.items()}
    fresh.step(1, x, y, 0.0, 3)  # step 1's term alone
    assert not torch.allclose(ref.m["fc1.weight"], fresh.m["fc1.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bitwise(dtype):
    model, (x, y) = TinyNet(dtype), batch(dtype)
    closure = lambda m: (lambda: torch.nn.functional.mse_loss(m(x).float(), y.float()))  # noqa: E731
    opt = zo_scale.HELENEFZOO(model, lr=0.01, eps=EPS, seed=SEED, n_directions=3, anneal_horizon=2.0)
    for _ in range(2):
        opt.step(closure(model))
    saved_model, saved_state = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    assert any(st["momentum"].abs().sum() > 0 for st in saved_state["state"].values())  # a state worth saving
    for _ in range(2):
        opt.step(closure(model))
    opt2 = zo_scale.HELENEFZOO(saved_model, lr=0.5, eps=EPS, seed=SEED, n_directions=3, anneal_horizon=2.0)
    opt2.load_state_dict(saved_state)
    for _ in range(2):
        opt2.step(closure(saved_model))
    for (n, a), b in zip(model.named_parameters(), saved_model.parameters()):
        assert torch.equal(a, b), n
    assert opt2.last_stats.extra["alpha"] == opt.last_stats.extra["alpha"]  # the annealing resumes at its step


def test_skipped_steps_leave_momentum_and_weights():
    model = TinyNet(torch.float32)
    x, y = batch(torch.float32)
    opt = zo_scale.HELENEFZOO(model, lr=0.01, seed=SEED, n_directions=3, on_nonfinite="skip")
    run_steps(opt, model, 1, x, y)
    before, momentum = _snapshot(model), {k: v.clone() for k, v in opt.shard_state["fc1.weight"].items()}
    with pytest.warns(UserWarning, match="σ = 0"):
        opt.step(lambda: 1.0)  # equal probe losses: no step defined
    opt.step(lambda: float("nan"))
    assert opt.last_stats.skipped and "alpha" not in opt.last_stats.extra
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)
    assert torch.equal(opt.shard_state["fc1.weight"]["momentum"], momentum["momentum"])


@pytest.mark.parametrize("kw, match", [(dict(anneal="cosine"), "anneal must be one of"),
                                       (dict(beta1=1.0), "0 <= beta1 < 1"), (dict(anneal_horizon=0), "anneal_horizon"),
                                       (dict(n_directions=1), "n_directions"), (dict(direction="uniform"), "direction")])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        zo_scale.HELENEFZOO(TinyNet(torch.float32), lr=0.1, **kw)


def test_config_name_builds_it():
    from zo_scale.config import OPTIMIZERS

    assert getattr(zo_scale, OPTIMIZERS["helene-fzoo"]) is zo_scale.HELENEFZOO
