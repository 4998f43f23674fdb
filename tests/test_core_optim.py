"""The optimizers against an independent float64 reference, restore exactness, checkpoints, errors."""

import copy
import math

import pytest
import torch
from torch.func import functional_call

import zo_scale
from zo_scale import rng

SEED, EPS = 7, 1e-3


class TinyNet(torch.nn.Module):
    """Two layers with a norm-like vector, uneven sizes, one frozen tensor."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(5, 7, dtype=dtype)
        self.scale = torch.nn.Parameter(torch.ones(7, dtype=dtype))
        self.fc2 = torch.nn.Linear(7, 3, dtype=dtype)
        self.frozen = torch.nn.Parameter(torch.randn(3, generator=g, dtype=dtype), requires_grad=False)
        self.drop = torch.nn.Dropout(0.5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x)) * self.scale)) + self.frozen


def batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(11, 5, generator=g, dtype=dtype), torch.randn(11, 3, generator=g, dtype=dtype)


def loss_of(model, params, x, y):
    return torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)


# ---------------------------------------------------------------------------- float64 reference


class Reference:
    """The three algorithms written out directly on whole float64 tensors (no chunks, no shards)."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval()
        self.theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def loss(self, theta, x, y):
        with torch.no_grad():
            return loss_of(self.model, {**theta, **self.frozen}, x, y).item()

    def z(self, name, t, j=0):
        n = self.theta[name].numel()
        return rng.normal_range(rng.ZStream.make(SEED, rng.param_uid(name), t, j), 0, n).double().view_as(self.theta[name])

    def shifted(self, scale, dirs):
        return {n: self.theta[n] + scale * dirs[n] for n in self.theta}

    def mezo(self, t, x, y, lr, wd=0.0, n_samples=1):
        g = {n: torch.zeros_like(v) for n, v in self.theta.items()}
        losses = []
        for j in range(n_samples):
            z = {n: self.z(n, t, j) for n in self.theta}
            lp, lm = self.loss(self.shifted(EPS, z), x, y), self.loss(self.shifted(-EPS, z), x, y)
            losses.append((lp + lm) / 2)
            for n in g:
                g[n] += (lp - lm) / (2 * EPS) * z[n] / n_samples
        for n, v in self.theta.items():
            decay = wd if v.dim() >= 2 else 0.0
            self.theta[n] = v - lr * (g[n] + decay * v)
        return sum(losses) / n_samples

    def hizoo(self, t, x, y, lr, alpha, H):
        z = {n: self.z(n, t) for n in self.theta}
        d = {n: z[n] / H[n].sqrt() for n in z}
        l0 = self.loss(self.theta, x, y)
        lp, lm = self.loss(self.shifted(EPS, d), x, y), self.loss(self.shifted(-EPS, d), x, y)
        pg = (lp - lm) / (2 * EPS)
        for n in self.theta:
            H[n] = (1 - alpha) * H[n] + alpha * abs(lp + lm - 2 * l0) * H[n] * z[n] ** 2 / (2 * EPS**2)
            self.theta[n] = self.theta[n] - lr * pg * z[n] / H[n].sqrt()
        return (lp + lm) / 2

    def helene(self, t, x, y, lr, m, h, *, beta1, beta2, T, k, c, gamma, mode, lam, eps_s, wd, bias_correction=False,
               anneal="exp"):
        z = {n: self.z(n, t) for n in self.theta}
        lp, lm = self.loss(self.shifted(EPS, z), x, y), self.loss(self.shifted(-EPS, z), x, y)
        pg = (lp - lm) / (2 * EPS)
        decay = math.exp(-t / T)
        alpha = beta1 + (1 - beta1) * decay if anneal == "exp" else (1 - beta1) + beta1 * decay
        for n, v in self.theta.items():
            g = pg * z[n]
            m[n] = beta1 * m[n] + alpha * g
            if t % k == 0:
                scale = 1.0 / (lp + lm) if c == "loss" else c  # 'loss': c = 1/(2ℓ), ℓ = (ℓ₊+ℓ₋)/2
                h[n] = beta2 * h[n] + (1 - beta2) * scale * g * g
            hn = h[n] / (1 - beta2 ** (t // k + 1)) if bias_correction else h[n]
            if mode == "floor":
                upd = m[n] / (gamma * torch.clamp(hn, min=lam) + eps_s)
            elif mode == "ratio":
                upd = torch.clamp(m[n] / (gamma * hn + eps_s), -lam, lam)
            else:
                upd = m[n] / (gamma * hn + eps_s)
            decay = wd if v.dim() >= 2 else 0.0
            self.theta[n] = v * (1 - lr * decay) - lr * upd
        return (lp + lm) / 2


def assert_params_match(model, ref, rtol):
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), ref.theta[n], rtol=rtol, atol=rtol * 1e-2, msg=n)


def run_steps(opt, model, steps, x, y):
    return [opt.step(lambda: torch.nn.functional.mse_loss(model(x), y)) for _ in range(steps)]


STEPS = 6


@pytest.mark.parametrize("n_samples, wd", [(1, 0.0), (3, 0.1)])
def test_mezo_matches_float64_reference(n_samples, wd):
    model, (x, y) = TinyNet(), batch()
    ref = Reference(model)
    opt = zo_scale.MeZO(model, lr=0.05, eps=EPS, seed=SEED, weight_decay=wd, n_samples=n_samples, chunk_size=1024)
    losses = run_steps(opt, model, STEPS, x, y)
    ref_losses = [ref.mezo(t, x, y, 0.05, wd, n_samples) for t in range(STEPS)]
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    assert_params_match(model, ref, 1e-9)
    assert opt.forward_passes == 2 * n_samples * STEPS


def test_hizoo_matches_float64_reference():
    model, (x, y) = TinyNet(), batch()
    ref = Reference(model)
    alpha = 1e-3  # large enough that H moves visibly within a few steps
    opt = zo_scale.HiZOO(model, lr=0.05, eps=EPS, seed=SEED, hessian_smooth=alpha, state_dtype=torch.float64)
    H = {n: torch.ones_like(v) for n, v in ref.theta.items()}
    losses = run_steps(opt, model, STEPS, x, y)
    ref_losses = [ref.hizoo(t, x, y, 0.05, alpha, H) for t in range(STEPS)]
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    assert_params_match(model, ref, 1e-9)
    for n, v in H.items():
        torch.testing.assert_close(opt.shard_state[n]["hessian"].view_as(v), v, rtol=1e-9, atol=0)
    assert max((v - 1).abs().max().item() for v in H.values()) > 1e-4
    assert opt.forward_passes == 3 * STEPS


@pytest.mark.parametrize(
    "opts",
    [
        dict(clip_mode="floor", clip_lambda=0.05, hessian_interval=1, weight_decay=0.0, hessian_scale=2.0),
        dict(clip_mode="ratio", clip_lambda=0.5, hessian_interval=2, weight_decay=0.1, hessian_scale=2.0),
        dict(clip_mode="ratio", clip_lambda=0.5, hessian_interval=1, weight_decay=0.0, hessian_scale="loss"),
        dict(clip_mode="floor", clip_lambda=0.05, hessian_interval=2, weight_decay=0.0, hessian_scale=2.0,
             hessian_bias_correction=True),
        dict(clip_mode="ratio", clip_lambda=0.5, hessian_interval=1, weight_decay=0.0, hessian_scale="loss",
             hessian_bias_correction=True),
        dict(clip_mode="none", clip_lambda=0.5, hessian_interval=1, weight_decay=0.0, hessian_scale="loss",
             hessian_bias_correction=True),
        dict(clip_mode="ratio", clip_lambda=0.5, hessian_interval=1, weight_decay=0.0, hessian_scale=2.0,
             anneal="exp_ema"),
    ],
    ids=["floor", "ratio-k2-wd", "ratio-loss-scale", "floor-k2-bias-corrected", "ratio-bias-corrected",
         "none-bias-corrected", "ratio-exp-ema"],
)
def test_helene_matches_float64_reference(opts):
    model, (x, y) = TinyNet(), batch()
    ref = Reference(model)
    hp = dict(beta1=0.8, beta2=0.9, anneal_horizon=3.0, gamma=0.5, stab_eps=1e-6)
    opt = zo_scale.HELENE(model, lr=0.02, eps=EPS, seed=SEED, state_dtype=torch.float64, **hp, **opts)
    m = {n: torch.zeros_like(v) for n, v in ref.theta.items()}
    h = {n: torch.zeros_like(v) for n, v in ref.theta.items()}
    losses = run_steps(opt, model, STEPS, x, y)
    ref_losses = [
        ref.helene(t, x, y, 0.02, m, h, beta1=0.8, beta2=0.9, T=3.0, k=opts["hessian_interval"], c=opts["hessian_scale"], gamma=0.5,
                   mode=opts["clip_mode"], lam=opts["clip_lambda"], eps_s=1e-6, wd=opts["weight_decay"],
                   bias_correction=opts.get("hessian_bias_correction", False), anneal=opts.get("anneal", "exp"))
        for t in range(STEPS)
    ]
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    assert_params_match(model, ref, 1e-9)
    stats = opt.last_stats.as_dict()
    assert 0.0 <= stats["clip_fraction"] <= 1.0
    decay = math.exp(-(STEPS - 1) / 3.0)
    expected_alpha = 0.2 + 0.8 * decay if opts.get("anneal") == "exp_ema" else 0.8 + 0.2 * decay
    assert stats["alpha"] == pytest.approx(expected_alpha)


def test_float32_model_tracks_float64_reference():
    model64, (x, y) = TinyNet(), batch()
    model32 = copy.deepcopy(model64).float()
    ref = Reference(model64)
    opt = zo_scale.MeZO(model32, lr=0.05, eps=EPS, seed=SEED)
    run_steps(opt, model32, STEPS, x.float(), y.float())
    for t in range(STEPS):
        ref.mezo(t, x, y, 0.05)
    for n, p in model32.named_parameters():
        if p.requires_grad:  # fp32 losses differ by ~1e-7, amplified by 1/(2ε) in pg
            torch.testing.assert_close(p.detach().double(), ref.theta[n], rtol=2e-3, atol=2e-4)


def test_chunking_does_not_change_the_trajectory():
    results = []
    for chunk in (1024, 1 << 22):
        model, (x, y) = TinyNet(torch.float32), batch(torch.float32)
        big = torch.nn.Linear(64, 40)  # 2560 elements: several 1024-chunks
        with torch.no_grad():
            big.weight.copy_(torch.linspace(-1, 1, 2560).view(40, 64))
            big.bias.zero_()
        model.add_module("big", big)
        opt = zo_scale.HELENE(model, lr=0.01, eps=EPS, seed=SEED, chunk_size=chunk)
        run_steps(opt, model, 3, x, y)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


# ---------------------------------------------------------------------------- restore and precision


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls", [zo_scale.MeZO, zo_scale.HiZOO, zo_scale.HELENE])
def test_fp32_restore_within_rounding_and_frozen_untouched(cls):
    model, (x, y) = TinyNet(torch.float32), batch(torch.float32)
    before = _snapshot(model)
    opt = cls(model, lr=0.0, eps=1e-2, seed=SEED)
    run_steps(opt, model, 3, x, y)
    for n, p in model.named_parameters():
        ulp = torch.finfo(torch.float32).eps * (before[n].abs() + 1e-2 * 4)
        assert ((p.detach() - before[n]).abs() <= 4 * ulp).all(), n
    assert torch.equal(model.frozen, before["frozen"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_restore_low_precision_bit_exactly(dtype):
    model, (x, y) = TinyNet(dtype), batch(dtype)
    before = _snapshot(model)
    seen = []

    def closure():
        seen.append(model.fc1.weight.detach().clone())
        return torch.nn.functional.mse_loss(model(x).float(), y.float())

    opt = zo_scale.HELENE(model, lr=0.0, eps=1e-2, seed=SEED)
    assert opt.master_weights
    for _ in range(3):
        opt.step(closure)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n  # bit-exact, not just close
    # during ℓ₊ the weights were cast(master + εz), not an accumulated bf16 sum
    z = rng.normal_range(rng.ZStream.make(SEED, rng.param_uid("fc1.weight"), 0), 0, 35).view(7, 5)
    assert torch.equal(seen[0], (before["fc1.weight"].float() + 1e-2 * z).to(dtype))


def test_master_weights_keep_small_updates_that_bf16_would_round_away():
    model, (x, y) = TinyNet(torch.bfloat16), batch(torch.bfloat16)
    opt = zo_scale.MeZO(model, lr=1e-5, eps=1e-2, seed=SEED)
    before = opt.shard_state["fc1.weight"]["master"].clone()
    run_steps(opt, model, 5, x, y)
    assert not torch.equal(opt.shard_state["fc1.weight"]["master"], before)
    assert torch.equal(model.fc1.weight.detach().view(-1), opt.shard_state["fc1.weight"]["master"].to(torch.bfloat16))


def test_forwards_run_in_eval_mode_without_autograd():
    model, (x, y) = TinyNet(), batch()
    model.train()
    flags = []

    def closure():
        flags.append((model.training, torch.is_grad_enabled()))
        return torch.nn.functional.mse_loss(model(x), y)

    zo_scale.MeZO(model, lr=0.01, seed=SEED).step(closure)
    assert flags == [(False, False), (False, False)]


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("cls, kw", [(zo_scale.MeZO, {}), (zo_scale.HiZOO, {"hessian_smooth": 1e-3}), (zo_scale.HELENE, {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bitwise(cls, kw, dtype):
    model, (x, y) = TinyNet(dtype), batch(dtype)
    closure = lambda m: (lambda: torch.nn.functional.mse_loss(m(x).float(), y.float()))  # noqa: E731
    opt = cls(model, lr=0.01, eps=EPS, seed=SEED, **kw)
    for _ in range(3):
        opt.step(closure(model))
    saved_model, saved_state = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(closure(model))

    resumed = saved_model
    opt2 = cls(resumed, lr=0.5, eps=EPS, seed=SEED, **kw)  # lr comes back from the checkpoint
    opt2.load_state_dict(saved_state)
    assert opt2.step_count == 3 and opt2.param_groups[0]["lr"] == 0.01
    for _ in range(3):
        opt2.step(closure(resumed))
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    assert opt2.forward_passes == opt.forward_passes


def split_into_two_ranks(full: dict) -> list[dict]:
    """A one-process state dict as two "ranks" would save it: every tensor's state cut at an uneven point."""
    pieces = [copy.deepcopy(full), copy.deepcopy(full)]
    for name, entry in full["shards"].items():
        cut = entry["end"] // 3
        for k, (lo, hi) in enumerate([(0, cut), (cut, entry["end"])]):
            e = pieces[k]["shards"][name]
            e["start"], e["end"] = lo, hi
            e["tensors"] = {s: t[lo:hi].clone() for s, t in entry["tensors"].items()}
    return pieces


def test_load_state_dict_assembles_ranges_from_pieces():
    model, (x, y) = TinyNet(torch.float32), batch(torch.float32)
    opt = zo_scale.HELENE(model, lr=0.01, seed=SEED)
    run_steps(opt, model, 2, x, y)
    full = opt.flat_state_dict()
    pieces = split_into_two_ranks(full)
    opt2 = zo_scale.HELENE(copy.deepcopy(model), lr=0.01, seed=SEED)
    opt2.load_state_dict(pieces)
    for name, st in opt.shard_state.items():
        for s, t in st.items():
            assert torch.equal(opt2.shard_state[name][s], t)
    del pieces[1]["shards"]["fc2.weight"]
    with pytest.raises(ValueError, match="covers"):
        zo_scale.HELENE(copy.deepcopy(model), lr=0.01, seed=SEED).load_state_dict(pieces)


def test_load_refuses_other_optimizer_or_seed():
    model = TinyNet(torch.float32)
    sd = zo_scale.MeZO(model, lr=0.01, seed=SEED).state_dict()
    with pytest.raises(ValueError, match="MeZO"):
        zo_scale.HELENE(model, lr=0.01, seed=SEED).load_state_dict(sd)
    with pytest.raises(ValueError, match="seed"):
        zo_scale.MeZO(model, lr=0.01, seed=SEED + 1).load_state_dict(sd)


# ---------------------------------------------------------------------------- errors


def test_nonfinite_loss_raises_and_restores():
    model, (x, y) = TinyNet(torch.float32), batch(torch.float32)
    before = _snapshot(model)
    calls = iter([1.0, float("nan")])
    opt = zo_scale.MeZO(model, lr=0.1, seed=SEED)
    with pytest.raises(zo_scale.NonFiniteLossError, match="non-finite loss at step 0"):
        opt.step(lambda: next(calls))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)


def test_nonfinite_loss_can_be_skipped():
    model = TinyNet(torch.float32)
    before = _snapshot(model)
    opt = zo_scale.HELENE(model, lr=0.1, seed=SEED, on_nonfinite="skip")
    opt.step(lambda: float("inf"))
    assert opt.last_stats.skipped and opt.step_count == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "cls, kw, match",
    [
        (zo_scale.MeZO, dict(lr=-1.0), "lr"),
        (zo_scale.MeZO, dict(lr=0.1, eps=0.0), "eps"),
        (zo_scale.HiZOO, dict(lr=0.1, n_samples=2), "n_samples"),
        (zo_scale.HELENE, dict(lr=0.1, clip_mode="sophia"), "clip_mode"),
        (zo_scale.HELENE, dict(lr=0.1, anneal="cosine"), "anneal"),
        (zo_scale.HELENE, dict(lr=0.1, lambda_rule="magic"), "lambda_rule"),
        (zo_scale.HELENE, dict(lr=0.1, hessian_scale="batch"), "hessian_scale"),
        (zo_scale.MeZO, dict(lr=0.1, on_nonfinite="ignore"), "on_nonfinite"),
    ],
)
def test_bad_options_are_refused(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(TinyNet(torch.float32), **kw)


def test_no_trainable_parameters_is_an_error():
    model = TinyNet(torch.float32).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        zo_scale.MeZO(model, lr=0.1)


def test_closure_is_required():
    with pytest.raises(ValueError, match="closure"):
        zo_scale.MeZO(TinyNet(torch.float32), lr=0.1).step(None)


def test_lr_scheduler_drives_the_learning_rate():
    model, (x, y) = TinyNet(torch.float32), batch(torch.float32)
    opt = zo_scale.MeZO(model, lr=0.1, seed=SEED)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    for _ in range(3):
        run_steps(opt, model, 1, x, y)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert opt.last_stats.lr == pytest.approx(0.1 * 0.5**2)


def test_helene_loss_scale_refuses_nonpositive_loss_and_restores():
    model = TinyNet(torch.float32)
    before = _snapshot(model)
    opt = zo_scale.HELENE(model, lr=0.1, seed=SEED)
    with pytest.raises(ValueError, match="positive loss"):
        opt.step(lambda: -1.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)
