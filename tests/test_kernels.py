"""Triton kernels against the torch reference (zo_scale.rng, zo_scale.optim.updates).

On a machine without CUDA the kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be
set before the kernel modules are decorated, so this module sets it while importing them and
restores the environment afterwards. Sizes stay at a few thousand elements (the interpreter is
slow). With CUDA the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zo_scale import rng
from zo_scale.optim import updates

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
CHILD = os.environ.get("ZO_SCALE_KERNEL_TESTS_CHILD") == "1"
# Triton decorates its own helpers (tl.zeros, ...) when first imported: the interpreter only works
# if TRITON_INTERPRET was set by then. If something (transformers' OPT import does) got there
# first, these tests rerun themselves in a fresh process.
FRESH_PROCESS = not ON_GPU and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
_SAVED = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "ZO_SCALE_TRITON_CPU")}


def _set_mode():
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["ZO_SCALE_TRITON_CPU"] = "1"


def _restore_env():
    for k, v in _SAVED.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _import_kernels():
    """Import triton and the kernel modules, in interpreter mode when there is no GPU."""
    if FRESH_PROCESS:
        return None, None, None
    _set_mode()
    try:
        pytest.importorskip("triton", reason="triton is not installed: the fused kernels are optional")
        from zo_scale.kernels import perturb, philox, update
    finally:
        _restore_env()
    if philox.INTERPRETED == ON_GPU:
        pytest.skip("zo_scale.kernels was imported earlier in the other Triton mode", allow_module_level=True)
    return philox, perturb, update


philox, perturb, update = _import_kernels()
OUT_OF_PROCESS = ("test_kernels_in_fresh_process", "test_kernels_compile_for_h100")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    """The interpreter also reads TRITON_INTERPRET while kernels run; keep it set for this module only."""
    _set_mode()
    yield
    _restore_env()


@pytest.fixture(autouse=True)
def _in_fresh_process_only(request):
    if FRESH_PROCESS and request.node.originalname not in OUT_OF_PROCESS:
        pytest.skip("triton was imported before this module: run by test_kernels_in_fresh_process")


def test_kernels_in_fresh_process():
    """Reruns this module in a process where TRITON_INTERPRET is set before triton is imported."""
    if not FRESH_PROCESS:
        pytest.skip("kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", ZO_SCALE_TRITON_CPU="1", ZO_SCALE_KERNEL_TESTS_CHILD="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


# Streams with small and large (>= 2**31) key words, so both i32 reinterpretations are exercised.
STREAMS = [
    rng.ZStream.make(0, rng.param_uid("model.decoder.layers.0.fc1.weight"), 3, 0),
    rng.ZStream(0xFFFFFFFF, 0x80000001, 0xFFFFFFFE, 7),
    rng.ZStream(1, 0, 0, 0),
]
# (start, n): aligned and unaligned starts, odd lengths, tails, starts past 2**32 elements.
RANGES = [(0, 1), (0, 1024), (1, 1023), (2, 1029), (3, 2051), (4, 7), ((1 << 32) - 6, 3001), ((1 << 34) + 1, 777)]


def _ref_z(z, start, n):
    return rng.normal_range_reference(z, start, n).to(DEV)


# ---------------------------------------------------------------------------- z itself


@pytest.mark.parametrize("z", STREAMS, ids=["uid", "max-keys", "ones"])
@pytest.mark.parametrize("first", [0, 5, (1 << 32) - 70, (1 << 45) + 3])
def test_words_identical(z, first):
    got = philox.philox_words(z, first, 300, device=DEV).cpu()
    ref = torch.stack(rng.philox_words_reference(z, first, 300), 1)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("z", STREAMS[:2], ids=["uid", "max-keys"])
@pytest.mark.parametrize("start,n", RANGES)
def test_normal_range_matches_reference(z, start, n):
    got = philox.normal_range(z, start, n, device=DEV)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert (got - _ref_z(z, start, n)).abs().max().item() <= 1e-6


def test_normal_range_split_invariant_and_out():
    z = STREAMS[0]
    whole = philox.normal_range(z, 9, 3000, device=DEV)
    out = torch.empty(1234, device=DEV)
    a = philox.normal_range(z, 9, 1234, device=DEV, out=out)
    b = philox.normal_range(z, 9 + 1234, 3000 - 1234, device=DEV)
    assert a is out
    assert torch.equal(torch.cat([a, b]), whole)  # bitwise: any split gives the same floats
    assert philox.normal_range(z, 5, 0, device=DEV).numel() == 0
    with pytest.raises(ValueError):
        philox.normal_range(z, 0, 10, device=DEV, out=torch.empty(10, dtype=torch.float64, device=DEV))


def test_available_modes(monkeypatch):
    from zo_scale import kernels

    monkeypatch.setenv("ZO_SCALE_NO_TRITON", "1")
    assert not kernels.available()
    monkeypatch.delenv("ZO_SCALE_NO_TRITON")
    monkeypatch.delenv("ZO_SCALE_TRITON_CPU", raising=False)
    assert kernels.available() == ON_GPU
    monkeypatch.setenv("ZO_SCALE_TRITON_CPU", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.available()
    assert kernels.perturb_ is perturb.perturb_  # lazy attributes resolve to the kernel modules


# ---------------------------------------------------------------------------- perturb pass


def _rand(n, dtype, seed, lo=None):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g)
    if lo is not None:  # positive state such as a Hessian
        t = t.abs() + lo
    return t.to(dtype).to(DEV)


def _close(got, want, dtype=torch.float32):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # one rounding of the low-precision type apart at most
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("start,n", [(3, 2051), ((1 << 32) - 6, 1030)])
@pytest.mark.parametrize("hizoo", [False, True])
def test_perturb_in_place(dtype, start, n, hizoo):
    z = STREAMS[0]
    local = _rand(n, dtype, 1)
    hess = _rand(n, torch.float32, 2, lo=0.5) if hizoo else None
    d = _ref_z(z, start, n)
    if hizoo:
        d = updates.hizoo_direction(d, hess)
    want = (local.float() + (-2e-3) * d).to(dtype)
    perturb.perturb_(local, z, start, -2e-3, hess=hess)
    _close(local, want, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hizoo", [False, True])
def test_perturb_from_master(dtype, hizoo):
    z, start, n = STREAMS[1], 2, 2050
    master = _rand(n, torch.float32, 3)
    local = master.to(dtype).clone()
    hess = _rand(n, torch.bfloat16, 4, lo=0.5) if hizoo else None
    d = _ref_z(z, start, n)
    if hizoo:
        d = updates.hizoo_direction(d, hess.float())
    perturb.perturb_from_master_(local, master, z, start, 1e-3, hess=hess)
    _close(local, (master + 1e-3 * d).to(dtype), dtype)
    perturb.perturb_from_master_(local, master, z, start, 0.0)  # the restore: exact
    assert torch.equal(local, master.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_master", [False, True])
@pytest.mark.parametrize("hess_dtype", [None, torch.float32, torch.bfloat16])
def test_perturb_shards_batches_small_shards_bit_identically(dtype, with_master, hess_dtype):
    """Small shards share one launch (a table row each); large ones keep their own. Either way every
    shard ends bit-identical to its own perturb_ / perturb_from_master_ call: sizes below and above a
    tile, shifted starts, one element, a shard beyond 2**32."""
    layout = [(5, 0), (2051, 3), (1, 7), (4096, 1024), (3000, 2), (700, (1 << 32) + 1), (2500, 0)]
    one_by_one, batched = [], []
    for i, (n, start) in enumerate(layout):
        local = _rand(n, dtype, 10 + i)
        master = _rand(n, torch.float32, 30 + i) if with_master else None
        hess = _rand(n, hess_dtype, 50 + i, lo=0.5) if hess_dtype is not None else None
        z = rng.ZStream.make(5, 1000 + i, 4, 1)
        one_by_one.append((local.clone(), master, hess, z, start))
        batched.append((local.clone(), master, hess, z, start))
    for local, master, hess, z, start in one_by_one:
        if master is not None:
            perturb.perturb_from_master_(local, master, z, start, -2e-3, hess=hess)
        else:
            perturb.perturb_(local, z, start, -2e-3, hess=hess)
    perturb.perturb_shards_(batched, -2e-3, small=2500)  # the last shard is launched on its own
    for (want, *_), (got, *_) in zip(one_by_one, batched):
        assert torch.equal(got, want)
    if with_master:  # scale 0 is the restore: every shard copied from its master
        perturb.perturb_shards_(batched, 0.0)
        assert all(torch.equal(local, master.to(dtype)) for local, master, *_ in batched)


def test_perturb_shards_refuses_mixed_steps():
    a, b = torch.zeros(8, device=DEV), torch.zeros(8, device=DEV)
    shards = [(a, None, None, rng.ZStream.make(1, 1, 0), 0), (b, None, None, rng.ZStream.make(1, 2, 1), 0)]
    with pytest.raises(ValueError, match="one step, stream and kind"):
        perturb.perturb_shards_(shards, 1e-3)


def test_perturb_rejects_bad_shapes():
    z = STREAMS[0]
    with pytest.raises(ValueError):
        perturb.perturb_(torch.zeros(4, 4, device=DEV), z, 0, 1.0)
    with pytest.raises(ValueError):
        perturb.perturb_from_master_(torch.zeros(8, device=DEV), torch.zeros(7, device=DEV), z, 0, 1.0)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):  # fp64 stays on the (fp64) torch path
        perturb.perturb_(torch.zeros(8, dtype=torch.float64, device=DEV), z, 0, 1.0)


@pytest.mark.parametrize("start,n", [(0, 4), (3, 2051), ((1 << 32) - 6, 1030)])
def test_draw_range_signs_match_reference(start, n):
    z = rng.ZStream.make(4, 21, 9, 3, "rademacher")
    got = philox.draw_range(z, start, n, device=DEV)
    assert torch.equal(got.cpu(), rng.sign_range_reference(z, start, n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_master", [False, True])
def test_perturb_with_signs(dtype, with_master):
    """FZOO's probes: the perturb kernels (one shard, and small shards batched) move along u = ±1."""
    layout = [(2051, 3), (5, 0), (700, (1 << 32) + 1)]
    shards, want = [], []
    for i, (n, start) in enumerate(layout):
        master = _rand(n, torch.float32, 60 + i) if with_master else None
        local = master.to(dtype).clone() if with_master else _rand(n, dtype, 60 + i)
        z = rng.ZStream.make(5, 500 + i, 2, 1, "rademacher")
        u = rng.sign_range_reference(z, start, n).to(DEV)
        want.append(((master if with_master else local.float()) + 1e-3 * u).to(dtype))
        shards.append((local, master, None, z, start))
    perturb.perturb_shards_(shards, 1e-3, small=1024)  # the first shard alone, the rest batched
    for (got, *_), w in zip(shards, want):
        _close(got, w, dtype)
    mixed = [shards[0], (shards[1][0], None, None, rng.ZStream.make(5, 501, 2, 1), 0)]
    with pytest.raises(ValueError, match="kind"):
        perturb.perturb_shards_(mixed, 1e-3, small=1 << 20)


# ---------------------------------------------------------------------------- fused restore + update
# The reference is base._restore_and_update + updates.py, written out for one chunk.


def _ref_theta(local, master, d_last, restore):
    if master is not None:
        return master.clone()
    theta = local.float().clone()
    return theta.add_(d_last, alpha=restore)


def _setup(dtype, with_master, seed=10, n=2051):
    master = _rand(n, torch.float32, seed) if with_master else None
    local = master.to(dtype).clone() if with_master else _rand(n, dtype, seed)
    return local, master


def _check_theta(local, master, theta, dtype):
    if master is not None:
        _close(master, theta)
    _close(local, theta.to(dtype), dtype)


CASES = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)]
CASE_IDS = ["fp32", "bf16-lossy", "bf16-master", "fp16-master"]


@pytest.mark.parametrize("dtype,with_master", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("n_samples,wd", [(1, 0.0), (3, 0.1)])
def test_mezo_restore_update(dtype, with_master, n_samples, wd):
    start, lr, eps = (1 << 32) + 3, 1e-2, 1e-3
    local, master = _setup(dtype, with_master)
    n = local.numel()
    zs = [rng.ZStream.make(1, 77, 5, j) for j in range(n_samples)]
    pgs = [0.7, -1.3, 2.0][:n_samples]
    zr = [_ref_z(z, start, n) for z in zs]
    theta = _ref_theta(local, master, zr[-1], eps)
    g = zr[0] * (pgs[0] / n_samples)
    for zj, pg in zip(zr[1:], pgs[1:]):
        g.add_(zj, alpha=pg / n_samples)
    updates.mezo_update_(theta, g, lr=lr, weight_decay=wd)
    update.mezo_restore_update_(local, zs, start, pgs=pgs, restore=eps, lr=lr, weight_decay=wd, master=master)
    _check_theta(local, master, theta, dtype)


@pytest.mark.parametrize("dtype,with_master", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("floor,wd", [(0.0, 0.0), (0.9, 0.05)])
def test_hizoo_restore_update(dtype, with_master, state_dtype, floor, wd):
    start, lr, eps, pg, alpha, curv = 6, 1e-2, 1e-3, 0.4, 0.3, 2e-6
    local, master = _setup(dtype, with_master)
    n = local.numel()
    hess = _rand(n, state_dtype, 11, lo=0.5)
    z = rng.ZStream.make(2, 99, 1, 0)
    zr = _ref_z(z, start, n)
    h32 = hess.float().clone()  # .float() of fp32 state is the state itself
    theta = _ref_theta(local, master, updates.hizoo_direction(zr, h32), eps)
    updates.hizoo_hessian_update_(h32, zr, alpha=alpha, curvature=curv, eps=eps, floor=floor)
    updates.hizoo_update_(theta, zr, h32, lr=lr, proj_grad=pg, weight_decay=wd)
    update.hizoo_restore_update_(local, hess, z, start, proj_grad=pg, restore=eps, lr=lr, alpha=alpha,
                                 curvature=curv, eps=eps, floor=floor, weight_decay=wd, master=master)
    _close(hess, h32.to(state_dtype), state_dtype)
    _check_theta(local, master, theta, dtype)


HELENE_OPTS = [
    dict(clip_mode="floor", use_hessian=True, refresh_hessian=True),
    dict(clip_mode="floor", use_hessian=True, refresh_hessian=False),
    dict(clip_mode="ratio", use_hessian=True, refresh_hessian=True),
    dict(clip_mode="none", use_hessian=True, refresh_hessian=True),
    dict(clip_mode="floor", use_hessian=False, refresh_hessian=True),
]


@pytest.mark.parametrize("dtype,with_master", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("opts", HELENE_OPTS, ids=lambda o: f"{o['clip_mode']}-h{int(o['use_hessian'])}-r{int(o['refresh_hessian'])}")
def test_helene_restore_update(dtype, with_master, opts):
    _helene_case(dtype, with_master, opts, torch.float32, n_samples=1, wd=0.0)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_samples", [1, 2])
def test_helene_state_dtypes_and_samples(state_dtype, n_samples):
    _helene_case(torch.float32, False, HELENE_OPTS[2], state_dtype, n_samples=n_samples, wd=0.1)
    _helene_case(torch.bfloat16, True, HELENE_OPTS[0], state_dtype, n_samples=n_samples, wd=0.1)


def _helene_case(dtype, with_master, opts, state_dtype, *, n_samples, wd):
    start, lr, eps = 1, 1e-2, 1e-3
    local, master = _setup(dtype, with_master)
    n = local.numel()
    m = (_rand(n, torch.float32, 12) * 0.5).to(state_dtype)
    h = _rand(n, state_dtype, 13, lo=0.05)  # straddles λ: some coordinates clip
    zs = [rng.ZStream.make(3, 55, 4, j) for j in range(n_samples)]
    pgs = [0.9, -0.4][:n_samples]
    hp = dict(lr=lr, alpha=0.6, beta1=0.9, beta2=0.99, hessian_scale=1.5, gamma=1.2, clip_lambda=0.8,
              stab_eps=1e-8, weight_decay=wd, **opts)
    zr = [_ref_z(z, start, n) for z in zs]
    theta = _ref_theta(local, master, zr[-1], eps)
    g = zr[0] * (pgs[0] / n_samples)
    for zj, pg in zip(zr[1:], pgs[1:]):
        g.add_(zj, alpha=pg / n_samples)
    m32, h32 = m.float().clone(), h.float().clone()
    want_clipped = updates.helene_update_(theta, g, m32, h32, **hp)
    got_clipped = update.helene_restore_update_(local, m, h, zs, start, pgs=pgs, restore=eps, master=master, **hp)
    assert got_clipped.dtype == torch.int64 and got_clipped.dim() == 0
    assert got_clipped.item() == want_clipped.item()
    if opts["clip_mode"] != "none" and opts["use_hessian"]:
        assert 0 < got_clipped.item() < n
    _close(m, m32.to(state_dtype), state_dtype)
    _close(h, h32.to(state_dtype), state_dtype)
    _check_theta(local, master, theta, dtype)


@pytest.mark.parametrize("dtype,with_master", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind,n_dirs,wd", [("rademacher", 8, 0.0), ("rademacher", 3, 0.1), ("normal", 2, 0.0)])
def test_fzoo_restore_update(dtype, with_master, kind, n_dirs, wd):
    start, lr, eps = (1 << 32) + 3, 1e-2, 1e-3
    local, master = _setup(dtype, with_master)
    n = local.numel()
    us = [rng.ZStream.make(1, 78, 5, j, kind) for j in range(n_dirs)]
    coefs = [0.3, -1.1, 0.05, 0.7, -0.2, 0.9, -0.6, 0.1][:n_dirs]
    ur = [(rng.sign_range_reference if kind == "rademacher" else rng.normal_range_reference)(u, start, n).to(DEV)
          for u in us]
    theta = _ref_theta(local, master, ur[-1], -eps)  # the weights sit at +εu_last
    updates.mezo_update_(theta, updates.combined_direction(ur, coefs, torch.float32), lr=lr, weight_decay=wd)
    coef_t = torch.tensor(coefs, dtype=torch.float32, device=DEV) if n_dirs == 3 else coefs  # both forms
    update.fzoo_restore_update_(local, us, start, coefs=coef_t, restore=-eps, lr=lr, weight_decay=wd, master=master)
    _check_theta(local, master, theta, dtype)


def test_update_argument_checks():
    local = torch.zeros(16, device=DEV)
    zs = [rng.ZStream.make(0, 1, 0, j) for j in (0, 2)]  # streams not consecutive
    with pytest.raises(ValueError):
        update.mezo_restore_update_(local, zs, 0, pgs=[1.0, 1.0], restore=0.0, lr=1.0, weight_decay=0.0)
    with pytest.raises(ValueError):  # too many samples for the fused kernel
        zs5 = [rng.ZStream.make(0, 1, 0, j) for j in range(5)]
        update.mezo_restore_update_(local, zs5, 0, pgs=[1.0] * 5, restore=0.0, lr=1.0, weight_decay=0.0)
    with pytest.raises(ValueError):
        update.helene_restore_update_(
            local, local.clone(), local.clone(), rng.ZStream.make(0, 1, 0), 0, pgs=[1.0], restore=0.0, lr=1.0,
            alpha=1.0, beta1=0.9, beta2=0.9, refresh_hessian=True, hessian_scale=1.0, use_hessian=True, gamma=1.0,
            clip_mode="bogus", clip_lambda=1.0, stab_eps=1e-8, weight_decay=0.0,
        )
    signs = [rng.ZStream.make(0, 1, 0, j, "rademacher") for j in range(2)]
    with pytest.raises(ValueError, match="normal"):  # MeZO's kernel draws Gaussians only
        update.mezo_restore_update_(local, signs, 0, pgs=[1.0, 1.0], restore=0.0, lr=1.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="coefficients"):
        update.fzoo_restore_update_(local, signs, 0, coefs=[1.0], restore=0.0, lr=1.0, weight_decay=0.0)


# ---------------------------------------------------------------------------- compiled form


def test_kernels_compile_for_h100():
    """Every kernel variant lowers to PTX and a cubin for sm_90 — no GPU needed, only Triton's
    NVIDIA backend (catches typing errors the interpreter lets through)."""
    if CHILD or ON_GPU:
        pytest.skip("compiled once by the parent process" if CHILD else "the compiled kernels run on this GPU")
    pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "zo_scale.kernels.compile_check", "--arch", "90"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "compiled" in proc.stdout


@pytest.mark.parametrize("clip_mode", ["floor", "ratio"])
def test_helene_nan_propagates_like_torch_clamp(clip_mode):
    """A NaN in h must reach θ (torch.clamp keeps NaN; a bare fmaxf would hide it)."""
    n, lr = 64, 1e-2
    local = torch.zeros(n, device=DEV)
    m = torch.ones(n, device=DEV)
    h = torch.ones(n, device=DEV)
    h[5] = float("nan")
    hp = dict(lr=lr, alpha=0.0, beta1=1.0, beta2=1.0, refresh_hessian=False, hessian_scale=1.0, use_hessian=True,
              gamma=1.0, clip_mode=clip_mode, clip_lambda=2.0, stab_eps=0.0, weight_decay=0.0)
    update.helene_restore_update_(local, m, h, rng.ZStream.make(0, 1, 0), 0, pgs=[0.0], restore=0.0, **hp)
    want = torch.zeros(n, device=DEV)
    updates.helene_update_(want, torch.zeros(n, device=DEV), torch.ones(n, device=DEV), h.clone(), **hp)
    assert torch.isnan(local[5]) and torch.isnan(want[5])
    torch.testing.assert_close(local, want, equal_nan=True)
