"""ZO-Muon and HELENE-Muon: the low-rank math, independent float64 references, exact probes and
restores, checkpoints across a resample of P, non-finite losses, options.

The sharded trajectories (1 process = FSDP2 = ZeRO-3 at 2 and 3 ranks, ZeRO-3 partitions that cut
rows, resume across world sizes and backends) run with the other optimizers in test_sharded.py."""

import copy
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_core_optim import EPS, SEED, TinyNet, _snapshot, batch, loss_of, run_steps
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

import zo_scale
from zo_scale import rng
from zo_scale.checkpoint import load_optimizer_state, save_optimizer_state
from zo_scale.optim.lowrank import (
    change_of_basis,
    haar_basis,
    lowrank_range,
    matrix_shape,
    newton_schulz5,
    rows_of_range,
)
from zo_scale.optim.zo_muon import SUBSPACE_STREAM

STEPS = 5
P_STREAM = 2**32 - 1  # the stream index the docstring promises for P

# ---------------------------------------------------------------------------- the low-rank math


def test_haar_basis_is_orthonormal_with_positive_r_diagonal():
    a = torch.randn(37, 6, generator=torch.Generator().manual_seed(0))
    q = haar_basis(a)
    assert q.dtype == torch.float64 and q.shape == (37, 6)
    torch.testing.assert_close(q.mT @ q, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    r = q.mT @ a.double()  # A = Q·R with the sign fix: R upper triangular, positive diagonal
    assert (torch.diagonal(r) > 0).all()
    torch.testing.assert_close(torch.tril(r, -1), torch.zeros_like(r), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(8, 40), (40, 8), (5, 5)])
def test_newton_schulz_orthogonalises_either_orientation(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = newton_schulz5(g)
    s = torch.linalg.svdvals(x)
    assert x.shape == g.shape and s.min() > 0.6 and s.max() < 1.25  # Muon's quintic: near, not at, 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)  # same singular vectors as U·Vᵀ
    assert torch.nn.functional.cosine_similarity(x.flatten(), (u @ vh).flatten(), dim=0) > 0.98
    assert torch.equal(newton_schulz5(torch.zeros(*shape)), torch.zeros(*shape))


@pytest.mark.parametrize("start, length", [(0, 60), (3, 50), (13, 4), (24, 12), (59, 1), (7, 0)])
def test_lowrank_range_of_rows_cut_anywhere(start, length):
    """A ZeRO-3 partition [start, start + length) of a 5×12 P·X, from only the rows it touches."""
    g = torch.Generator().manual_seed(2)
    p, x = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(3, 12, generator=g, dtype=torch.float64)
    first, last = rows_of_range(start, start + length, 12)
    got = lowrank_range(p[first:last], x, first, start, length)
    torch.testing.assert_close(got, (p @ x).flatten()[start : start + length], rtol=0, atol=1e-14)


def test_change_of_basis_projects_onto_the_new_subspace():
    g = torch.Generator().manual_seed(3)
    old, new = haar_basis(torch.randn(20, 4, generator=g)), haar_basis(torch.randn(20, 4, generator=g))
    m = torch.randn(4, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(new @ (change_of_basis(new, old) @ m), new @ new.mT @ (old @ m))


def test_matrix_shape_is_dim0_against_the_rest():
    assert matrix_shape((7, 5)) == (7, 5) and matrix_shape((4, 3, 2, 2)) == (4, 12) and matrix_shape((9,)) is None
    assert SUBSPACE_STREAM == P_STREAM


# ---------------------------------------------------------------------------- float64 references


class Reference:
    """ZO-Muon / HELENE-Muon written out on whole float64 tensors, as in the authors' lowdim_zo_step /
    lowdim_zo_update (one P per epoch for all probes) and LOZO-M's momentum projection."""

    def __init__(self, model, rank, resample_every, lr_1d, n, momentum=None):
        self.model = copy.deepcopy(model).eval()
        self.theta = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        self.frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
        self.rank, self.every, self.lr_1d, self.n = rank, resample_every, lr_1d, n
        self.momentum = momentum  # None: ZO-Muon; else dict(beta1, horizon, mode)
        self.m = {k: 0.0 for k in self.theta}
        self.m_epoch = 0

    def loss(self, theta, x, y):
        with torch.no_grad():
            return loss_of(self.model, {**theta, **self.frozen}, x, y).item()

    def normals(self, name, step, stream, count):
        return rng.normal_range(rng.ZStream.make(SEED, rng.param_uid(name), step, stream), 0, count).double()

    def basis(self, name, epoch):
        m = self.theta[name].shape[0]
        r = min(self.rank, m)
        q, rr = torch.linalg.qr(self.normals(name, epoch, P_STREAM, m * r).view(m, r))
        return q * torch.sign(torch.diagonal(rr))

    def ns5(self, g):
        x = g.mT if g.shape[0] > g.shape[1] else g
        x = x / (torch.linalg.matrix_norm(x) + 1e-7)
        for _ in range(5):
            a = x @ x.mT
            x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
        return x.mT if g.shape[0] > g.shape[1] else x

    def direction(self, name, t, i):
        v = self.theta[name]
        if v.dim() < 2:
            return self.normals(name, t, i, v.numel()).view_as(v)
        p = self.basis(name, t // self.every)
        return p @ self.normals(name, t, i, p.shape[1] * v.shape[1]).view(p.shape[1], v.shape[1])

    def step(self, t, x, y, lr, wd=0.0):
        dirs = [{k: self.direction(k, t, i) for k in self.theta} for i in range(self.n)]
        l0 = self.loss(self.theta, x, y)
        c = [(self.loss({k: v + EPS * d[k] for k, v in self.theta.items()}, x, y) - l0) / EPS for d in dirs]
        epoch = t // self.every
        if self.momentum is not None:
            h = self.momentum
            alpha = h["beta1"] + (1 - h["beta1"]) * math.exp(-t / h["horizon"])
        for k, v in self.theta.items():
            if v.dim() < 2:
                g = sum(c[i] * dirs[i][k] for i in range(self.n)) / self.n
                if self.momentum is not None:
                    self.m[k] = h["beta1"] * self.m[k] + alpha * g
                    g = self.m[k]
                self.theta[k] = v - self.lr_1d * g
                continue
            p = self.basis(k, epoch)
            r, cols = p.shape[1], v.shape[1]
            us = [self.normals(k, t, i, r * cols).view(r, cols) for i in range(self.n)]
            g = sum(c[i] * us[i] for i in range(self.n)) / self.n
            if self.momentum is not None:
                mk = self.m[k] if torch.is_tensor(self.m[k]) else torch.zeros(r, cols, dtype=torch.float64)
                if epoch != self.m_epoch:
                    mk = p.mT @ self.basis(k, self.m_epoch) @ mk if h["mode"] == "project" else 0 * mk
                self.m[k] = h["beta1"] * mk + alpha * g
                g = self.m[k]
            self.theta[k] = v * (1 - lr * wd) - lr * p @ self.ns5(g)
        self.m_epoch = epoch
        return l0


def _muon(model, cls=zo_scale.ZOMuon, **kw):
    opts = dict(lr=0.05, eps=EPS, seed=SEED, rank=4, resample_every=2, lr_1d=0.02, n_directions=3, chunk_size=1024)
    opts.update(kw)
    return cls(model, **opts)


def _assert_theta(model, ref, tol):
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), ref.theta[k], rtol=0, atol=tol, msg=k)


@pytest.mark.parametrize("n, wd", [(3, 0.0), (4, 0.1), (1, 0.0)])
def test_zo_muon_matches_float64_reference(n, wd):
    """fc1 (7×5): r = 4 < m; fc2 (3×7): r capped at m = 3 (the authors' code breaks there); biases and
    ``scale``: one-sided ZO-SGD at lr_1d; P resampled at steps 2 and 4."""
    model, (x, y) = TinyNet(), batch()
    ref = Reference(model, rank=4, resample_every=2, lr_1d=0.02, n=n)
    opt = _muon(model, n_directions=n, weight_decay=wd)
    losses = run_steps(opt, model, STEPS, x, y)
    assert losses == pytest.approx([ref.step(t, x, y, 0.05, wd) for t in range(STEPS)], rel=1e-10)
    _assert_theta(model, ref, 1e-9)
    assert opt.forward_passes == (n + 1) * STEPS and opt.last_stats.extra["epoch"] == 2


@pytest.mark.parametrize("mode", ["project", "reset"])
def test_helene_muon_matches_float64_reference(mode):
    model, (x, y) = TinyNet(), batch()
    hp = dict(beta1=0.8, horizon=3.0, mode=mode)
    ref = Reference(model, rank=4, resample_every=2, lr_1d=0.02, n=3, momentum=hp)
    opt = _muon(model, zo_scale.HELENEMuon, beta1=0.8, anneal_horizon=3.0, resample_momentum=mode,
                state_dtype=torch.float64)
    losses = run_steps(opt, model, STEPS, x, y)
    assert losses == pytest.approx([ref.step(t, x, y, 0.05) for t in range(STEPS)], rel=1e-10)
    _assert_theta(model, ref, 1e-9)
    assert opt.last_stats.extra["alpha"] == pytest.approx(0.8 + 0.2 * math.exp(-4 / 3.0))


def test_project_and_reset_differ_only_after_a_resample():
    model, (x, y) = TinyNet(), batch()
    runs = {}
    for mode in ("project", "reset"):
        m = copy.deepcopy(model)
        opt = _muon(m, zo_scale.HELENEMuon, resample_momentum=mode, resample_every=3)
        runs[mode] = run_steps(opt, m, 5, x, y)  # step t returns ℓ₀ before its update: step 3's shows at 4
    assert runs["project"][:4] == runs["reset"][:4] and runs["project"][4] != runs["reset"][4]


# ---------------------------------------------------------------------------- probes and restores


def test_each_probe_sees_exactly_theta_plus_eps_p_u():
    model, (x, y) = TinyNet(), batch()
    theta0 = model.fc1.weight.detach().clone()
    seen = []

    def closure():
        seen.append(model.fc1.weight.detach().clone())
        return torch.nn.functional.mse_loss(model(x), y)

    opt = _muon(model, lr=0.0, n_directions=4)
    opt.step(closure)
    ref = Reference(model, rank=4, resample_every=2, lr_1d=0.0, n=4)
    assert torch.equal(seen[0], theta0) and len(seen) == 5
    for i, w in enumerate(seen[1:]):
        torch.testing.assert_close(w, theta0 + EPS * ref.direction("fc1.weight", 0, i), rtol=0, atol=1e-15)
    torch.testing.assert_close(model.fc1.weight.detach(), theta0, rtol=0, atol=1e-15)


@pytest.mark.parametrize("cls", [zo_scale.ZOMuon, zo_scale.HELENEMuon])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_restore_low_precision_bit_exactly(cls, dtype):
    model, (x, y) = TinyNet(dtype), batch(dtype)
    before = _snapshot(model)
    opt = _muon(model, cls, lr=0.0, lr_1d=0.0, eps=1e-2)
    assert opt.master_weights
    run_steps(opt, model, 3, x, y)  # across a resample
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), before[k]), k


def test_restore_within_rounding_without_master_and_frozen_untouched():
    model, (x, y) = TinyNet(torch.float32), batch(torch.float32)
    before = _snapshot(model)
    opt = _muon(model, lr=0.0, lr_1d=0.0, eps=1e-2)
    run_steps(opt, model, 3, x, y)
    for k, p in model.named_parameters():
        ulp = torch.finfo(torch.float32).eps * (before[k].abs() + 1e-2 * 8)
        assert ((p.detach() - before[k]).abs() <= 16 * ulp).all(), k
    assert torch.equal(model.frozen, before["frozen"])


# ---------------------------------------------------------------------------- checkpoints


CHECKPOINTS = ("state_dict", "zo_checkpoint", "dsd", "dsd_flat", "dcp")


def _checkpoint(how, model, opt, directory):
    """Save ``opt``'s state the way ``how`` does; returns ``load(model, opt)`` that restores it.
      state_dict     opt.state_dict() / load_state_dict (torch's layout on a plain model)
      zo_checkpoint  zo_scale.checkpoint.save_optimizer_state / load_optimizer_state (the flat-range
                     format of run checkpoints, ZeRO-3 and DeepSpeed engine checkpoints)
      dsd, dsd_flat  get_optimizer_state_dict / set_optimizer_state_dict (dsd_flat: torchtitan's
                     flatten_optimizer_state_dict=True, rebuilt from the live state names and group keys)
      dcp            dcp.save of get_optimizer_state_dict, dcp.load into the new optimizer's, set_..."""
    if how == "state_dict":
        sd = copy.deepcopy(opt.state_dict())  # torch's convention: the optimizer's own tensors
        return lambda m, o: o.load_state_dict(sd)
    if how == "zo_checkpoint":
        save_optimizer_state(opt, directory)
        return lambda m, o: load_optimizer_state(o, directory)
    if how == "dcp":
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=directory)

        def load(m, o):
            sd = {"optim": get_optimizer_state_dict(m, o)}
            dcp.load(sd, checkpoint_id=directory)
            set_optimizer_state_dict(m, o, sd["optim"])

        return load
    options = StateDictOptions(flatten_optimizer_state_dict=how == "dsd_flat")
    sd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    return lambda m, o: set_optimizer_state_dict(m, o, sd, options=options)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp on one process, as intended
@pytest.mark.parametrize("how", CHECKPOINTS)
@pytest.mark.parametrize("cls", [zo_scale.ZOMuon, zo_scale.HELENEMuon])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# P resampled every 3 steps: saved right before a resample (step 3 starts epoch 1: the resumed run projects M)
# and inside epoch 1 (M already in its coordinates: a momentum epoch that came back as 0 would project it again)
@pytest.mark.parametrize("save_at", [3, 4])
def test_checkpoint_round_trip_across_a_resample_continues_bitwise(cls, dtype, save_at, how, tmp_path):
    """Every way a checkpoint goes keeps HELENE-Muon's subspace momentum M and its epoch (before they
    were per-parameter state and a group entry, the flat-range format and torch's get/set dropped
    both, and the resumed run left the trajectory); ZO-Muon keeps no P: it is redrawn from the step."""
    model, (x, y) = TinyNet(dtype), batch(dtype)
    closure = lambda m: (lambda: torch.nn.functional.mse_loss(m(x).float(), y.float()))  # noqa: E731
    opt = _muon(model, cls, resample_every=3)
    for _ in range(save_at):
        opt.step(closure(model))
    saved_model, load = copy.deepcopy(model), _checkpoint(how, model, opt, tmp_path / how)
    for _ in range(6 - save_at):  # resamples at steps 3 (and 6)
        opt.step(closure(model))
    opt2 = _muon(saved_model, cls, resample_every=3, lr=0.5)  # lr comes from the checkpoint
    load(saved_model, opt2)
    assert opt2.step_count == save_at and opt2.param_groups[0]["lr"] == 0.05
    for _ in range(6 - save_at):
        opt2.step(closure(saved_model))
    for (k, a), b in zip(model.named_parameters(), saved_model.parameters()):
        assert torch.equal(a, b), k
    assert opt2.forward_passes == opt.forward_passes == 24
    if cls is zo_scale.HELENEMuon:
        assert opt2.momentum_epoch == opt.momentum_epoch == 1
        for name, m in opt.subspace_momentum.items():
            assert torch.equal(opt2.subspace_momentum[name], m), name


def test_helene_muon_state_is_m_per_matrix_and_the_epoch_in_the_group():
    model, (x, y) = TinyNet(torch.float32), batch(torch.float32)
    opt = _muon(model, zo_scale.HELENEMuon, resample_every=2)
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["momentum_epoch"] == 1
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for i, name in enumerate(names):
        entry = sd["state"][i]
        if name in ("fc1.weight", "fc2.weight"):  # M (r×n), the optimizer's own tensor, whole
            assert set(entry) == {"subspace_momentum"}
            assert entry["subspace_momentum"] is opt.subspace_momentum[name]
            assert entry["subspace_momentum"].abs().sum() > 0
        else:  # 1-D tensors: shard-shaped momentum
            assert set(entry) == {"momentum"}
    flat = opt.flat_state_dict()
    assert flat["hparams"]["momentum_epoch"] == 1
    assert all(torch.equal(flat["subspace_momentum"][n], m) for n, m in opt.subspace_momentum.items())


@pytest.mark.parametrize("layout, match", [
    ("torch", r"fc1.weight/subspace_momentum has shape \[2, 5\] in the checkpoint, \[4, 5\] here"),
    ("flat", r"fc1.weight's subspace momentum is \(4, 5\) here, \(2, 5\) in the checkpoint"),
])
def test_helene_muon_refuses_a_checkpoint_of_another_rank(layout, match):
    opt = _muon(TinyNet(torch.float32), zo_scale.HELENEMuon, rank=2)
    sd = opt.state_dict() if layout == "torch" else opt.flat_state_dict()
    with pytest.raises(ValueError, match=match):
        _muon(TinyNet(torch.float32), zo_scale.HELENEMuon, rank=4).load_state_dict(sd)


def test_helene_muon_refuses_a_flat_state_without_its_momentum():
    sd = _muon(TinyNet(torch.float32), zo_scale.ZOMuon).flat_state_dict()
    sd["optimizer"] = "HELENEMuon"
    with pytest.raises(ValueError, match="HELENEMuon state without its subspace momentum"):
        _muon(TinyNet(torch.float32), zo_scale.HELENEMuon).load_state_dict(sd)


# ---------------------------------------------------------------------------- errors and options


@pytest.mark.parametrize("cls", [zo_scale.ZOMuon, zo_scale.HELENEMuon])
def test_nonfinite_probe_raises_and_restores_or_skips(cls):
    model = TinyNet(torch.float32)
    before = _snapshot(model)
    calls = iter([1.0, 1.1, float("nan"), 0.9])
    opt = _muon(model, cls)
    with pytest.raises(zo_scale.NonFiniteLossError, match="non-finite loss at step 0"):
        opt.step(lambda: next(calls))
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[k], rtol=0, atol=1e-6)
    skip = _muon(model, cls, on_nonfinite="skip")
    skip.step(lambda: float("inf"))
    assert skip.last_stats.skipped and skip.step_count == 1
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls, kw, match", [
    (zo_scale.ZOMuon, dict(rank=0), "rank"),
    (zo_scale.ZOMuon, dict(n_directions=0), "n_directions"),
    (zo_scale.ZOMuon, dict(resample_every=0), "resample_every"),
    (zo_scale.ZOMuon, dict(lr_1d=float("nan")), "lr_1d"),
    (zo_scale.ZOMuon, dict(n_samples=2), "n_directions, not n_samples"),
    (zo_scale.HELENEMuon, dict(resample_momentum="keep"), "resample_momentum"),
    (zo_scale.HELENEMuon, dict(anneal="cos"), "anneal"),
    (zo_scale.HELENEMuon, dict(beta1=1.0), "beta1"),
])
def test_bad_options_are_refused(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(TinyNet(torch.float32), lr=0.1, **kw)
