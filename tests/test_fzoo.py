"""FZOO: the Rademacher stream, an independent float64 reference, restore, σ = 0, checkpoints, errors.

The sharded trajectories (1 process = FSDP2 = ZeRO-3 at 2 and 3 ranks, resume across world sizes)
and the fused kernel run with the other optimizers in test_sharded.py / test_core_fused.py."""

import copy
import math
import warnings

import pytest
import torch
from test_core_optim import EPS, SEED, TinyNet, _snapshot, assert_params_match, batch, loss_of, run_steps

import zo_scale
from zo_scale import rng
from zo_scale.optim.updates import fzoo_coefficients

STEPS = 5

# ---------------------------------------------------------------------------- the Rademacher stream


def test_signs_are_the_top_bits_of_the_philox_words():
    z = rng.ZStream.make(3, 99, 4, 1, "rademacher")
    words = torch.stack(rng.philox_words_reference(z, 0, 64), 1).reshape(-1)  # element 4b+k <- word k
    expected = torch.where(words >= 2**31, -1.0, 1.0)
    assert torch.equal(rng.sign_range_reference(z, 0, 256), expected)
    assert torch.equal(rng.sign_range(z, 0, 256), expected)


@pytest.mark.parametrize("start, n", [(0, 1), (3, 517), (1021, 3000), (2**33 + 2, 77)])
def test_c_kernel_signs_match_the_reference_for_any_range(start, n):
    z = rng.ZStream.make(11, 5, 2**31 + 3, 7, "rademacher")
    assert torch.equal(rng.sign_range(z, start, n), rng.sign_range_reference(z, start, n))
    # any split of a range gives the same elements: a shard boundary cannot change u
    cut = n // 3
    parts = torch.cat([rng.sign_range(z, start, cut), rng.sign_range(z, start + cut, n - cut)])
    assert torch.equal(parts, rng.sign_range(z, start, n))


def test_signs_are_balanced_and_independent_across_streams():
    a = rng.sign_range(rng.ZStream.make(1, 2, 0, 0, "rademacher"), 0, 1 << 20)
    b = rng.sign_range(rng.ZStream.make(1, 2, 0, 1, "rademacher"), 0, 1 << 20)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(a.mean().item()) < 5e-3 and abs((a * b).mean().item()) < 5e-3  # 5 σ at n = 2^20


def test_kind_is_checked():
    with pytest.raises(ValueError, match="kind"):
        rng.ZStream.make(1, 2, 0, 0, "uniform")
    with pytest.raises(ValueError, match="normal stream"):
        rng.normal_range(rng.ZStream.make(1, 2, 0, 0, "rademacher"), 0, 4)


# ---------------------------------------------------------------------------- the update


def test_coefficients_are_normalised_by_the_probe_spread():
    coefs, sigma = fzoo_coefficients(1.0, [1.5, 0.5, 1.0, 1.0])
    assert sigma == pytest.approx(math.sqrt(0.125))
    assert coefs == pytest.approx([0.5 / (4 * sigma), -0.5 / (4 * sigma), 0.0, 0.0])
    # scale-free in the loss differences: ε (or the loss scale) does not change the step
    assert fzoo_coefficients(10.0, [15.0, 5.0, 10.0, 10.0])[0] == pytest.approx(coefs)
    assert fzoo_coefficients(2.0, [2.0, 2.0, 2.0]) == ([], 0.0)


class FZOOReference:
    """FZOO written out on whole float64 tensors, as in the authors' zo_step / zo_update."""

    def __init__(self, model, kind):
        self.model = copy.deepcopy(model).eval()
        self.theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        self.kind = kind

    def loss(self, theta, x, y):
        with torch.no_grad():
            return loss_of(self.model, {**theta, **self.frozen}, x, y).item()

    def u(self, name, t, i):
        stream = rng.ZStream.make(SEED, rng.param_uid(name), t, i, self.kind)
        return rng.draw_range(stream, 0, self.theta[name].numel()).double().view_as(self.theta[name])

    def step(self, t, x, y, lr, n, wd=0.0):
        us = [{k: self.u(k, t, i) for k in self.theta} for i in range(n)]
        l0 = self.loss(self.theta, x, y)
        probes = torch.tensor([self.loss({k: v + EPS * u[k] for k, v in self.theta.items()}, x, y) for u in us],
                              dtype=torch.float64)
        sigma = probes.std(unbiased=False).item()
        for k, v in self.theta.items():
            g = sum((probes[i].item() - l0) / (n * sigma) * us[i][k] for i in range(n))
            decay = wd if v.dim() >= 2 else 0.0
            self.theta[k] = v * (1 - lr * decay) - lr * g
        return l0


@pytest.mark.parametrize("direction, kind, n, wd", [("rademacher", "rademacher", 8, 0.0),
                                                    ("rademacher", "rademacher", 3, 0.1),
                                                    ("gaussian", "normal", 4, 0.0)])
def test_fzoo_matches_float64_reference(direction, kind, n, wd):
    model, (x, y) = TinyNet(), batch()
    ref = FZOOReference(model, kind)
    opt = zo_scale.FZOO(model, lr=0.02, eps=EPS, seed=SEED, n_directions=n, direction=direction,
                        weight_decay=wd, chunk_size=1024)
    losses = run_steps(opt, model, STEPS, x, y)
    ref_losses = [ref.step(t, x, y, 0.02, n, wd) for t in range(STEPS)]
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    assert_params_match(model, ref, 1e-9)
    assert opt.forward_passes == (n + 1) * STEPS
    assert opt.last_stats.extra["sigma"] > 0 and opt.last_stats.loss_zero == losses[-1]


def test_restore_within_rounding_without_master_and_frozen_untouched():
    model, (x, y) = TinyNet(torch.float32), batch(torch.float32)
    before = _snapshot(model)
    opt = zo_scale.FZOO(model, lr=0.0, eps=1e-2, seed=SEED, n_directions=5)
    run_steps(opt, model, 3, x, y)
    for n, p in model.named_parameters():
        ulp = torch.finfo(torch.float32).eps * (before[n].abs() + 1e-2 * 2)
        assert ((p.detach() - before[n]).abs() <= 16 * ulp).all(), n
    assert torch.equal(model.frozen, before["frozen"])


def test_each_probe_sees_exactly_one_direction():
    """From +εu_i the weights move straight to +εu_{i+1}: every forward sees θ + εu_i, never a mix."""
    model, (x, y) = TinyNet(), batch()
    theta0 = model.fc1.weight.detach().clone()
    seen = []

    def closure():
        seen.append(model.fc1.weight.detach().clone())
        return torch.nn.functional.mse_loss(model(x), y)

    opt = zo_scale.FZOO(model, lr=0.0, eps=EPS, seed=SEED, n_directions=4)
    opt.step(closure)
    assert torch.equal(seen[0], theta0)
    for i, w in enumerate(seen[1:]):
        u = rng.sign_range(rng.ZStream.make(SEED, rng.param_uid("fc1.weight"), 0, i, "rademacher"), 0, 35)
        torch.testing.assert_close(w, theta0 + EPS * u.double().view(7, 5), rtol=0, atol=1e-15)


@pytest.mark.parametrize("cls", [zo_scale.FZOO, zo_scale.HELENEFZOO])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_restore_low_precision_bit_exactly(dtype, cls):
    model, (x, y) = TinyNet(dtype), batch(dtype)
    before = _snapshot(model)
    opt = cls(model, lr=0.0, eps=1e-2, seed=SEED, n_directions=3)
    assert opt.master_weights
    run_steps(opt, model, 2, x, y)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bitwise(dtype):
    model, (x, y) = TinyNet(dtype), batch(dtype)
    closure = lambda m: (lambda: torch.nn.functional.mse_loss(m(x).float(), y.float()))  # noqa: E731
    opt = zo_scale.FZOO(model, lr=0.01, eps=EPS, seed=SEED, n_directions=3)
    for _ in range(2):
        opt.step(closure(model))
    saved_model, saved_state = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    for _ in range(2):
        opt.step(closure(model))
    opt2 = zo_scale.FZOO(saved_model, lr=0.5, eps=EPS, seed=SEED, n_directions=3)
    opt2.load_state_dict(saved_state)
    for _ in range(2):
        opt2.step(closure(saved_model))
    for (n, a), b in zip(model.named_parameters(), saved_model.parameters()):
        assert torch.equal(a, b), n
    assert opt2.forward_passes == opt.forward_passes == 16


# ---------------------------------------------------------------------------- σ = 0 and errors


def test_equal_probe_losses_skip_the_step_with_a_warning_and_restore():
    model = TinyNet(torch.float32)
    before = _snapshot(model)
    opt = zo_scale.FZOO(model, lr=0.1, seed=SEED, n_directions=4)
    with pytest.warns(UserWarning, match="σ = 0"):
        opt.step(lambda: 1.0)
    assert opt.last_stats.skipped and opt.step_count == 1 and opt.forward_passes == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not every step
        opt.step(lambda: 1.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)


def test_nonfinite_probe_raises_and_restores():
    model = TinyNet(torch.float32)
    before = _snapshot(model)
    calls = iter([1.0, 1.1, float("nan"), 0.9])
    opt = zo_scale.FZOO(model, lr=0.1, seed=SEED, n_directions=3)
    with pytest.raises(zo_scale.NonFiniteLossError, match="non-finite loss at step 0"):
        opt.step(lambda: next(calls))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)
    skip = zo_scale.FZOO(model, lr=0.1, seed=SEED, n_directions=3, on_nonfinite="skip")
    skip.step(lambda: float("inf"))
    assert skip.last_stats.skipped


@pytest.mark.parametrize("kw, match", [(dict(n_directions=1), "n_directions"), (dict(direction="uniform"), "direction"),
                                       (dict(n_samples=2), "n_directions, not n_samples")])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        zo_scale.FZOO(TinyNet(torch.float32), lr=0.1, **kw)
