"""batched_probes=True: every probe group of a step in one forward (zo_scale.probes).

Stated tolerance against the sequential probes: fp32 losses agree to 1e-6 relative (measured ~5e-8 over
4 steps: the batched path forms W + ε·d in one rounding where the sequential one moves W leg by leg);
bf16 models agree exactly on the first step and to ~1e-4 relative after a few steps (the batched path
perturbs the gathered bf16 weights, the sequential one the fp32 master). FZOO's σ is a spread of loss
differences of order ε, so it is compared in absolute terms. ZO-Muon / HELENE-Muon: the same loss tolerance;
their fp32 weights within 2e-6 (their step is set by c_i = (ℓ_i − ℓ₀)/ε, which turns the paths' ~1e-8 relative
loss rounding into ~1e-4 of c_i; measured ≤ 7e-7), in fp64 the same to 1e-12.

In-process tests: every architecture (OPT, Llama, Gemma, RoBERTa; tied embeddings), a container holding
its own parameter, the closure contract. The sharded ones (FSDP2 / ZeRO-3, 2 and 3 ranks, against the
single-process sequential reference) read the shared launches of dist_scripts/harness.py (HiZOO-L: its own,
harness.hizool_results, shared with test_hizoo_l_sharded.py); the gather count is in test_collectives.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import common  # noqa: E402
from dist_scripts import harness  # noqa: E402

from zo_scale import probes  # noqa: E402
from zo_scale.optim.base import NonFiniteLossError  # noqa: E402

LOSS_RTOL = 1e-6  # fp32, batched vs sequential probes
SIGMA_ATOL = 1e-6
BF16_RTOL = 1e-3
MUON_PARAM_ATOL = 2e-6  # fp32: c_i = (ℓ_i − ℓ₀)/ε turns ~1e-8 relative loss rounding into ~lr·1e-4 of a step


def _run(arch, name, batched, steps=2, dtype=torch.float32, **kw):
    model = common.build_model(arch, dtype)
    opt = common.make_optimizer(name, model, batched_probes=batched, **kw)
    closure = common.make_closure(model, 0, 1)
    recs = []
    for _ in range(steps):
        opt.step(closure)
        recs.append(common.step_record(opt))
    return recs, opt


def _assert_close(seq, bat, rtol=LOSS_RTOL):
    assert len(seq) == len(bat)
    for a, b in zip(seq, bat):
        for x, y in zip(a[:3], b[:3]):  # l+, l-, l0
            assert (x is None) == (y is None)
            if x is not None:
                assert math.isclose(x, y, rel_tol=rtol), (a, b)
        if a[3] is not None:  # FZOO's sigma
            assert abs(a[3] - b[3]) <= SIGMA_ATOL, (a, b)


@pytest.mark.parametrize("arch", ["opt", "llama", "gemma", "roberta"])
@pytest.mark.parametrize("name", ["MeZO", "FZOO"])
def test_batched_equals_sequential_every_architecture(arch, name):
    seq, _ = _run(arch, name, False)
    bat, opt = _run(arch, name, True)
    _assert_close(seq, bat)
    assert opt.forward_passes == 2 * len(opt._probe_groups())  # forwards still count probe evaluations


@pytest.mark.parametrize("name", ["HiZOOL", "HELENE", "HiZOO", "HELENEFZOO"])
def test_batched_equals_sequential_other_optimizers(name):
    _assert_close(_run("llama", name, False)[0], _run("llama", name, True)[0])


def test_bf16_batched_within_rounding():
    seq, _ = _run("opt", "MeZO", False, steps=3, dtype=torch.bfloat16)
    bat, _ = _run("opt", "MeZO", True, steps=3, dtype=torch.bfloat16)
    assert seq[0] == bat[0]  # weights are cast(master) at the start: same rounding
    _assert_close(seq, bat, rtol=BF16_RTOL)


@pytest.mark.parametrize("arch,tied", [("opt", ("lm.model.decoder.embed_tokens", "lm.lm_head")),
                                       ("gemma", ("lm.model.embed_tokens", "lm.lm_head")),
                                       ("roberta", ("lm.roberta.embeddings.word_embeddings", "lm.lm_head.decoder"))])
def test_tied_weight_is_one_view(arch, tied):
    """A tied weight is perturbed at every module that uses it, from one view (one z); RoBERTa's
    decoder bias is held by the container lm_head as well, which is not wrapped (its leaf is)."""
    model = common.build_model(arch)
    opt = common.make_optimizer("MeZO", model, batched_probes=True)
    holders, names = probes.ProbePass.plan(model, opt.views)
    by_module = {names[id(h.module)]: dict(h.params) for h in holders}
    assert by_module[tied[0]]["weight"] is by_module[tied[1]]["weight"]
    if arch == "roberta":
        assert "lm.lm_head" not in by_module
        assert by_module["lm.lm_head.decoder"]["bias"].name == "lm.lm_head.bias"


MUON_FP64_ATOL = 1e-12


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("name", ["ZOMuon", "HELENEMuon"])
def test_zo_muon_batched_equals_sequential(name, arch):
    """ℓ₀ and θ + ε·P·U_i (1-D tensors: θ + ε·z_i) in one forward: the sequential losses and weights.
    Three steps with resample_every=3 in common.OPT_HPARAMS: the update path and HELENE-Muon's momentum
    see the batched coefficients."""
    seq, opt_s = _run(arch, name, False, steps=3)
    bat, opt_b = _run(arch, name, True, steps=3)
    _assert_close(seq, bat)
    assert opt_b.forward_passes == opt_s.forward_passes == 3 * len(opt_b._probe_groups())
    want = _params(opt_s.backend.module)
    for n, p in _params(opt_b.backend.module).items():
        torch.testing.assert_close(p, want[n], rtol=0, atol=MUON_PARAM_ATOL, msg=n)


@pytest.mark.parametrize("name", ["ZOMuon", "HELENEMuon"])
def test_zo_muon_batched_is_one_forward(name):
    """batched_probes=True is honoured, not ignored: one closure(groups) call for ℓ₀ and the N probes."""
    model = common.build_model("llama")
    opt = common.make_optimizer(name, model, batched_probes=True)
    closure = common.make_closure(model, 0, 1)
    calls = []
    opt.step(lambda *groups: calls.append(groups) or closure(*groups))
    assert calls == [(1 + opt.n_samples,)]


def test_zo_muon_batched_non_finite_probe_leaves_weights():
    model = common.build_model("llama")
    opt = common.make_optimizer("ZOMuon", model, batched_probes=True)
    closure = common.make_closure(model, 0, 1)
    before = _params(model)

    def nan_probe(groups):
        sums, weight = closure(groups)
        return sums.index_fill(0, torch.tensor([2]), float("nan")), weight

    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 0"):
        opt.step(nan_probe)
    for n, p in _params(model).items():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("name", ["ZOMuon", "HELENEMuon"])
def test_zo_muon_batched_is_exact_in_fp64(name):
    """In fp64 the rounding that separates the two paths vanishes: same losses, same weights."""
    seq, opt_s = _run("llama", name, False, steps=3, dtype=torch.float64)
    bat, opt_b = _run("llama", name, True, steps=3, dtype=torch.float64)
    _assert_close(seq, bat, rtol=1e-13)
    want = _params(opt_s.backend.module)
    for n, p in _params(opt_b.backend.module).items():
        torch.testing.assert_close(p, want[n], rtol=0, atol=MUON_FP64_ATOL, msg=n)


@pytest.mark.parametrize("name", ["ZOMuon", "HELENEMuon"])
def test_zo_muon_bf16_batched_within_rounding(name):
    seq, _ = _run("opt", name, False, steps=3, dtype=torch.bfloat16)
    bat, _ = _run("opt", name, True, steps=3, dtype=torch.bfloat16)
    assert seq[0] == bat[0]
    _assert_close(seq, bat, rtol=BF16_RTOL)


class _Scaled(torch.nn.Module):
    """A container that uses a parameter of its own outside any leaf."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Linear(6, 5)
        self.shift = torch.nn.Parameter(torch.randn(5))

    def forward(self, x):
        return self.inner(x) * self.shift


def _toy_closure(model):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))

    def closure(groups=None):
        out = model(probes.replicate(x, groups or 1))
        per_row = out.double().square().sum(1)
        return (probes.group_sums(per_row, groups), 4) if groups else (per_row.sum(), 4)

    return closure


@pytest.mark.parametrize("name", ["MeZO", "FZOO"])
def test_container_parameter_runs_body_per_group(name):
    (lp_a, l0_a, *pa), _ = _toy_run(name, False)
    (lp_b, l0_b, *pb), _ = _toy_run(name, True)
    assert math.isclose(lp_a, lp_b, rel_tol=LOSS_RTOL)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_closure_without_group_argument_is_refused():
    model = common.build_model("llama")
    opt = common.make_optimizer("MeZO", model, batched_probes=True)
    closure = common.make_closure(model, 0, 1)
    with pytest.raises(TypeError, match="zo_scale: batched_probes=True calls closure\\(groups\\)"):
        opt.step(lambda: closure())


def test_wrong_number_of_group_losses_is_refused():
    model = common.build_model("llama")
    opt = common.make_optimizer("MeZO", model, batched_probes=True)
    closure = common.make_closure(model, 0, 1)
    with pytest.raises(ValueError, match="one loss per group \\(2\\), got 1 losses"):
        opt.step(lambda groups: (closure(groups)[0].sum(), 1))
    with pytest.raises(ValueError, match="got a tensor of 1 rows, not a multiple of the 2 probe groups"):
        opt.step(lambda groups: closure())  # the batch not repeated per group
    # the model is left unwrapped: a plain forward afterwards is an ordinary forward
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_batch_not_along_dim0_is_refused():
    model = common.build_model("llama")
    opt = common.make_optimizer("MeZO", model, batched_probes=True)
    ids = torch.randint(2, 100, (3, 5))

    def closure(groups):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).float().sum().expand(groups)

    with pytest.raises(ValueError, match="got a tensor of 3 rows, not a multiple of the 2 probe groups"):
        opt.step(closure)


def test_rows_not_in_group_blocks_are_refused():
    """Rows a multiple of the group count but not of groups × the first module's rows per group (a tensor
    whose dim 0 is not the batch, as T5's relative-position bias) are refused, not split."""

    class PositionBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 3)
            self.bias = torch.nn.Embedding(8, 1)

        def forward(self, ids):
            pos = torch.arange(4)
            return self.emb(ids) + self.bias(pos[:, None] - pos[None, :] + 4).squeeze(-1)[: ids.size(1), :3]

    model = PositionBias()
    opt = getattr(__import__("zo_scale.optim", fromlist=["MeZO"]), "MeZO")(model, lr=1e-3, batched_probes=True)
    ids = torch.randint(0, 10, (3, 3))

    def closure(groups):
        return probes.group_sums(model(probes.replicate(ids, groups)).double().flatten(1).sum(1), groups)

    with pytest.raises(ValueError, match="module 'bias' got a tensor of 4 rows, not a multiple of the 2 probe groups x 3"):
        opt.step(closure)


# ------------------------------------------------------------------ sharded (shared launches)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
@pytest.mark.parametrize("arch", common.ARCHS)
@pytest.mark.parametrize("name", common.OPTIMIZERS)
def test_sharded_batched_matches_sequential_reference(name, arch, backend, world):
    """World-size invariance with batched probes: FSDP2 / ZeRO-3 at 2 and 3 ranks reproduce the
    single-process *sequential* trajectory within the tolerance, and the single-process batched one exactly
    up to the fp64 loss reduction order."""
    ref = harness.reference()
    got = harness.results(world)[("probes", name, arch, backend)]
    if name == "HiZOO":  # z/√H over a gathered layer needs H of the whole layer: refused on shards
        assert "zo_scale: HiZOO with batched_probes needs whole parameters" in got["refused"]
        assert "use HiZOOL" in got["refused"]  # the alternative that runs batched on shards
        return
    _assert_close(ref[("traj", name, arch, "plain")]["losses"], got["losses"])
    # ZO-Muon's update writes a ZeRO-3 partition's cut rows by matrix-vector products, rounded unlike one
    # process's matmul (its sequential sharded run carries the same ~1e-8 in losses, ~4e-7 in weights)
    cut_rows = name.endswith("Muon") and backend == "zero3"
    _assert_close(ref[("probes", name, arch, "plain")]["losses"], got["losses"], rtol=LOSS_RTOL if cut_rows else 1e-12)
    want = ref[("probes", name, arch, "plain")]["params"]
    for n, p in got["params"].items():
        torch.testing.assert_close(p, want[n], rtol=0, atol=MUON_PARAM_ATOL if cut_rows else 1e-6, msg=n)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
@pytest.mark.parametrize("arch", common.MORE_ARCHS)
def test_sharded_batched_gemma_roberta(arch, backend, world):
    """Gemma (tied embeddings, (1 + w) norms) and RoBERTa (encoder, tied MLM decoder weight and bias)
    sharded with batched probes: the sequential run on the same shards and the single-process one."""
    ref = harness.reference()
    got = harness.results(world)
    _assert_close(got[("traj", "MeZO", arch, backend)]["losses"], got[("probes", "MeZO", arch, backend)]["losses"])
    _assert_close(ref[("traj", "MeZO", arch, "plain")]["losses"], got[("probes", "MeZO", arch, backend)]["losses"])


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("arch", common.ARCHS + common.MORE_ARCHS)
@pytest.mark.parametrize("name", common.OPTIMIZERS)
def test_plain_batched_matches_sequential(name, arch):
    if arch in common.MORE_ARCHS and name != "MeZO":
        pytest.skip("Gemma / RoBERTa run MeZO only in the shared launches (every optimizer: in-process tests)")
    ref = harness.reference()
    _assert_close(ref[("traj", name, arch, "plain")]["losses"], ref[("probes", name, arch, "plain")]["losses"])


# ------------------------------------------------------------------ HiZOO-L on shards (its own launches)
# d = z/√H over each gathered matrix from the replicated R, C, and over each vector from the whole H every rank
# keeps of it. Not bit-exact against the single-process batched run, unlike the other optimizers: the factor
# sums are all-reduced in another fp64 order, and HiZOO's curvature |ℓ₊+ℓ₋−2ℓ₀|/(2ε²) (×5e5 at ε = 1e-3, with
# α = 1e-3 here so H moves: the vectors' H by up to 3×) amplifies rounding into H, as between world sizes
# sequentially (test_hizoo_l_sharded.py). Measured over 4 steps, OPT and Llama, FSDP2 / ZeRO-3 at 2 and 3 ranks:
# losses ≤ 1.3e-7 relative against the batched and the sequential single-process runs (asserted LOSS_RTOL), weights
# ≤ 2.3e-6 (asserted 1e-5), the vectors' H ≤ 5e-4 relative (asserted 2e-3); resumed runs likewise (≤ 3.6e-8, 1.6e-6).

HIZOOL_PARAM_ATOL = 1e-5
HIZOOL_H_RTOL = 2e-3


def _hizool_close(ref: dict, got: dict, offset: int = 0) -> None:
    _assert_close(ref["losses"][offset:], got["losses"])
    for n, p in got["params"].items():
        torch.testing.assert_close(p, ref["params"][n], rtol=0, atol=HIZOOL_PARAM_ATOL, msg=n)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
@pytest.mark.parametrize("arch", common.ARCHS)
def test_sharded_batched_hizool(arch, backend, world):
    """HiZOO-L batched on FSDP2 / ZeRO-3 (uneven shards, partitions cut mid-row; refused before): the single-process
    batched run and the sequential one; the whole H of vectors the same on every rank and equal to one process's."""
    ref = harness.hizool_results(1)
    got = harness.hizool_results(world)[("probes", "HiZOOL", arch, backend)]
    assert "refused" not in got, got
    _hizool_close(ref[("probes", "HiZOOL", arch, "plain")], got)
    _hizool_close(ref[("traj", "HiZOOL", arch, "plain")], got)
    want = ref[("probes", "HiZOOL", arch, "plain")]["whole_hessian"]
    assert got["whole_hessian_same"] and set(got["whole_hessian"]) == set(want)
    moved = max((h - 1).abs().max().item() for h in want.values())
    assert moved > 1e-3  # the check has teeth: H of the vectors moved away from its start (1)
    for n, h in got["whole_hessian"].items():
        torch.testing.assert_close(h, want[n], rtol=HIZOOL_H_RTOL, atol=0, msg=n)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("src, dst, batched, world", [
    ("fsdp2-probes", "zero3", True, 3), ("zero3-probes", "fsdp2", True, 3),  # batched save, batched on 3 ranks
    ("fsdp2-probes", "ddp", False, 3), ("fsdp2-probes", "plain", False, 1),  # batched save, sequential resume
    ("zero3-probes", "plain", True, 1), ("zero3", "fsdp2", True, 3),  # a sequential save into batched mode
])
def test_hizool_batched_resume_continues_the_trajectory(src, dst, batched, world):
    """Saved after RESUME_AT batched steps on 2 ranks (or sequential ones: ``zero3``), resumed on another world
    size, backend or mode: the last steps of the uninterrupted single-process run of the resumed mode."""
    ref = harness.hizool_results(1)[("probes" if batched else "traj", "HiZOOL", "llama", "plain")]
    got = harness.hizool_results(world)[("probes_load", src, dst, batched, "HiZOOL")]
    assert got["step_count"] == common.K_STEPS
    _hizool_close(ref, got, offset=common.RESUME_AT)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_batched_refusals_on_shards_say_why(backend):
    """A factored_min_dim so large that matrices are not factored: their H is not replicated, one line says why;
    HiZOO's refusal (its sharded H) names the alternative, HiZOOL."""
    refused = harness.hizool_results(2)
    msg = refused[("refuse", "hizool_unfactored_matrix", backend)]
    assert msg is not None and "\n" not in msg
    assert "keeps each unfactored tensor's H whole on every rank" in msg and "factored_min_dim=1000000000" in msg
    msg = refused[("refuse", "hizoo_batched", backend)]
    assert msg is not None and "\n" not in msg
    assert msg.startswith("zo_scale: HiZOO with batched_probes needs whole parameters") and "use HiZOOL" in msg


@pytest.mark.multiproc
@pytest.mark.slow
def test_hizool_batched_torch_layout_keeps_the_whole_h():
    """FSDP2's torch layout (what DCP saves) holds the vectors' whole H as a plain tensor: it loads back whole;
    a sequential run's sharded DTensor H handed over directly is refused (DCP's load reshards it instead)."""
    rec = harness.hizool_results(2)[("probes_torch_layout", "HiZOOL")]
    assert rec["same"]
    assert rec["from_dtensor"] is not None and "load it through dcp.load" in rec["from_dtensor"]


def _toy_run(name, batched, steps=2):
    model = _Scaled()
    kw = {"n_directions": 3} if name == "FZOO" else {}
    opt = getattr(__import__("zo_scale.optim", fromlist=[name]), name)(
        model, lr=1e-2, eps=1e-3, seed=3, batched_probes=batched, **kw)
    closure = _toy_closure(model)
    for _ in range(steps):
        opt.step(closure)
    s = opt.last_stats
    return [s.loss_plus, s.loss_zero] + [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("name", ["FZOO", "HiZOO"])
def test_fused_kernel_builds_the_same_group_weights(name, monkeypatch):
    """Where the fused kernels run (CUDA; here Triton's CPU interpreter), a group's weights are built by
    kernels.perturb_ (z in the kernel), and agree with the torch path to the kernels' ~1e-6."""
    from zo_scale import kernels

    monkeypatch.setenv("ZO_SCALE_TRITON_CPU", "1")
    if not kernels.available():
        pytest.skip("Triton's CPU interpreter is not available (TRITON_INTERPRET=1 must be set before triton loads)")
    fused, opt = _toy_run(name, True, steps=1)
    assert all(opt._uses_kernels(v) for v in opt.views)
    monkeypatch.setenv("ZO_SCALE_NO_TRITON", "1")
    torch_path, opt = _toy_run(name, True, steps=1)
    assert not any(opt._uses_kernels(v) for v in opt.views)
    assert math.isclose(fused[0], torch_path[0], rel_tol=LOSS_RTOL)
    for a, b in zip(fused[2:], torch_path[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["HELENE", "FZOO", "HELENEFZOO"])
def test_batched_resume_replays_the_same_steps(name):
    """The state and the step path are the sequential ones: saving after 2 batched steps and loading into a
    fresh optimizer on the saved weights continues exactly as the uninterrupted run."""
    whole, opt = _run("llama", name, True, steps=4)
    model = common.build_model("llama")
    first = common.make_optimizer(name, model, batched_probes=True)
    closure = common.make_closure(model, 0, 1)
    for _ in range(2):
        first.step(closure)
    state, weights = first.state_dict(), {n: p.detach().clone() for n, p in model.named_parameters()}
    model = common.build_model("llama")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    resumed = common.make_optimizer(name, model, batched_probes=True)
    resumed.load_state_dict(state)
    closure = common.make_closure(model, 0, 1)
    tail = []
    for _ in range(2):
        resumed.step(closure)
        tail.append(common.step_record(resumed))
    assert tail == whole[2:]
