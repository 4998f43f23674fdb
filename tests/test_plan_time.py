"""zo_scale.plan_time: the cluster step-time model (sequential against batched probes) and what batched
probes add to the memory plan."""

from __future__ import annotations

import pytest

from conftest import REPO
from zo_scale import plan_time
from zo_scale.plan import GROUPS, MODELS, PlanError, plan
from zo_scale.plan_time import H100, gather_seconds, step_time

OPT66B = MODELS["opt-66b"]


def test_gather_splits_intra_and_inter_node_traffic():
    n = OPT66B.param_count()
    assert gather_seconds(n, 2, 1, H100) == 0.0
    one_node = n * 2 * 7 / 8 / (H100.intra * H100.link_efficiency)
    assert gather_seconds(n, 2, 8, H100) == pytest.approx(one_node)
    # two nodes: half of each GPU's gather crosses the 50 GB/s fabric, which sets the time
    assert gather_seconds(n, 2, 16, H100) == pytest.approx(n * 2 * 8 / 16 / (H100.inter * H100.link_efficiency))


def test_sequential_step_by_hand():
    t = step_time("opt-66b", 16, optimizer="mezo", batch=1, seq=256)
    n, shard = OPT66B.param_count(), -(-OPT66B.param_count() // 16)
    hbm = H100.hbm * H100.hbm_efficiency
    per_forward = max(t.compute_s, t.gather_s) + t.gather_s / (OPT66B.layers + 1)
    moves = 2 * shard * 6 / hbm  # two moves (+ε, −2ε) from the fp32 master: read 4 B, write 2 B
    update = shard * 10 / hbm  # master read + write, weight write
    assert t.total_s == pytest.approx(2 * per_forward + moves + update)
    assert t.forwards == 2 and n > 6e10


def test_batched_pays_one_gather_and_builds_every_group():
    seq = step_time("opt-66b", 16, optimizer="fzoo", batch=1)
    bat = step_time("opt-66b", 16, optimizer="fzoo", batch=1, batched=True)
    assert bat.gather_s == seq.gather_s and bat.forwards == seq.forwards == 9
    assert bat.build_s == pytest.approx(OPT66B.param_count() * 8 * 4 * 2 / (H100.hbm * H100.hbm_efficiency))
    assert bat.total_s < seq.total_s / 5  # 9 gathers over the fabric become one
    # on one node NVLink is fast enough that building the groups' weights costs about what it saves
    one_node = [step_time("opt-66b", 8, optimizer="mezo", batch=2, batched=b).total_s for b in (False, True)]
    assert one_node[1] == pytest.approx(one_node[0], rel=0.1)


def test_zo_muon_batched_builds_by_the_torch_path():
    """ZO-Muon / HELENE-Muon: N = 4 (5 groups, 4 perturbed), allowed on shards, no fused kernel."""
    for name in ("zo-muon", "helene-muon"):
        bat = step_time("opt-66b", 16, optimizer=name, batch=1, batched=True)
        assert bat.forwards == 5
        assert bat.build_s == pytest.approx(OPT66B.param_count() * 4 * 32 / (H100.hbm * H100.hbm_efficiency))
        assert bat.total_s < step_time("opt-66b", 16, optimizer=name, batch=1).total_s
    kw = dict(optimizer="zo-muon", batch=1, seq=256, backend="fsdp2", n_directions=2)
    seq, bat = plan("opt-13b", 8, **kw), plan("opt-13b", 8, batched_probes=True, **kw)
    assert "(3 probe groups in it)" in bat.notes[0]  # N + 1 groups


def test_helene_fzoo_is_fzoo_with_a_momentum():
    """HELENE-FZOO: FZOO's N + 1 forwards (N an option), batched on shards; its groups' weights are built by
    FZOO's kernel (4·wb), and its update also reads and writes m."""
    hbm = H100.hbm * H100.hbm_efficiency
    n, shard = OPT66B.param_count(), -(-OPT66B.param_count() // 16)
    fz, hf = (step_time("opt-66b", 16, optimizer=o, batch=1, batched=True) for o in ("fzoo", "helene-fzoo"))
    assert hf.forwards == fz.forwards == 9 and hf.gather_s == fz.gather_s
    assert hf.build_s == fz.build_s == pytest.approx(n * 8 * 4 * 2 / hbm)
    assert hf.shard_passes_s - fz.shard_passes_s == pytest.approx(shard * 2 * 4 / hbm)  # m (fp32) read + write
    seq = [step_time("opt-66b", 16, optimizer=o, batch=1) for o in ("fzoo", "helene-fzoo")]
    assert seq[1].total_s - seq[0].total_s == pytest.approx(shard * 2 * 4 / hbm)
    assert hf.total_s < seq[1].total_s
    assert step_time("opt-13b", 16, optimizer="helene-fzoo", n_directions=3).forwards == 4


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_torch_build_is_where_the_optimizer_takes_no_kernel(name, monkeypatch):
    """TORCH_BUILD names exactly the optimizers whose shards never take the fused kernels where kernels run
    (CUDA; here Triton's CPU interpreter), so the batched build is costed by the path that really runs
    (HELENE-FZOO takes them: only its update is the torch path)."""
    import torch

    from zo_scale import kernels
    from zo_scale.config import optimizer_class

    monkeypatch.setenv("ZO_SCALE_TRITON_CPU", "1")
    if not kernels.available():
        pytest.skip("Triton's CPU interpreter is not available (TRITON_INTERPRET=1 must be set before triton loads)")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = optimizer_class(name)(model, lr=1e-3, eps=1e-3, **({"rank": 2} if "muon" in name else {}))
    assert (not any(opt._uses_kernels(v) for v in opt.views)) == (name in plan_time.TORCH_BUILD)


def test_hizoo_batched_on_shards_is_refused():
    with pytest.raises(PlanError, match="hizoo refuses batched probes on sharded parameters"):
        step_time("opt-13b", 8, optimizer="hizoo", batched=True)
    assert step_time("opt-13b", 1, optimizer="hizoo", batched=True).gather_s == 0.0
    with pytest.raises(PlanError, match="hizoo refuses batched probes on sharded parameters"):  # the memory plan too
        plan("opt-13b", 8, optimizer="hizoo", batched_probes=True)
    assert plan("opt-13b", 8, optimizer="hizoo", batched_probes=True, backend="replicated").parts["gathered parameters"] == 0


def test_hizool_batched_on_shards_keeps_the_vectors_h_whole():
    """HiZOO-L runs batched on shards: every rank then keeps the whole H of the 1-D tensors, as one GPU does."""
    assert step_time("opt-13b", 8, optimizer="hizoo-l", batched=True).gather_s > 0
    kw = dict(optimizer="hizoo-l", batch=1, seq=256, backend="fsdp2")
    seq, bat, one = plan("opt-13b", 8, **kw), plan("opt-13b", 8, batched_probes=True, **kw), plan("opt-13b", 1, **kw)
    state = "optimizer state (fp32)"
    assert bat.parts[state] == one.parts[state] > seq.parts[state]


def test_memory_plan_replays_the_groups_activations_and_the_running_module_copy():
    """Batched probes at 66B × 16 with FZOO: ZeRO-3's peak moves to fc1, its perturbed copy (and the z chunk
    perturbing it, with its fp32 view of the bf16 copy) beside 9 groups' MLP activations; FSDP2's stays at a
    layer's copy-out, where no module runs, so only the 9 groups' residual stream is added there (the dry
    run traces both: docs/dryrun)."""
    kw = dict(optimizer="fzoo", batch=1, seq=256, attention="sdpa")
    seq, bat = plan("opt-66b", 16, backend="zero3", **kw), plan("opt-66b", 16, backend="zero3", batched_probes=True, **kw)
    fc1 = 36864 * 9216 + 36864
    assert bat.parts["batched: perturbed module copy"] == fc1 * 2 + 4 * (1 << 22) * 2
    assert "layers.63.fc1" in bat.notes[0] and bat.parts["forward peak (activations)"] == 256 * 9 * (2 * 9216 + 2 * 36864) * 2
    seq, bat = plan("opt-66b", 16, backend="fsdp2", **kw), plan("opt-66b", 16, backend="fsdp2", batched_probes=True, **kw)
    assert bat.parts["gathered parameters"] == seq.parts["gathered parameters"] and "copy-out" in bat.notes[0]
    assert bat.parts["batched: perturbed module copy"] == 0
    assert bat.parts["forward peak (activations)"] == 9 * seq.parts["forward peak (activations)"]  # the residual stream


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_batched_loss_is_summed_after_the_forward(backend):
    """A batched closure sums each group's loss itself, after the forward, when the engine has released its
    gathers: OPT-1.3B × 16, FZOO, micro-batch 4 × 256 traced 4.315 GiB on both backends, all of it the 9 groups'
    logits and the loss's fp32 copies. Planned as transformers' loss inside the forward (FSDP2's root and
    last flat buffer and the residual stream beside it), micro-batch 1 was over-planned by 29 %."""
    p = plan("opt-1.3b", 16, backend=backend, optimizer="fzoo", batch=4, seq=256, attention="sdpa", batched_probes=True)
    assert "the loss, after the forward" in p.notes[0]
    # ZeRO-3 keeps its persistent parameters (biases and norms, <= stage3_param_persistence_threshold) gathered
    assert p.parts["gathered parameters"] == (0 if backend == "fsdp2" else 1286144)
    assert p.parts["forward peak (activations)"] == 9 * 4 * 256 * 50272 * (2 + 4 + 4)


def test_cli_table_for_the_configs(capsys):
    configs = [str(REPO / "configs" / c) for c in ("opt13b.json", "opt66b.json")]
    assert plan_time.main(["--config", configs[0], "--config", configs[1], "--gpus", "8", "16"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "opt" in r]
    assert len(rows) == 4 and all("refused" in r for r in rows)  # HiZOO on shards
    assert plan_time.main(["--model", "no-such-model"]) == 2


def test_fzoo_batched_groups_follow_its_n_directions():
    """FZOO's N is an option: N = 3 carries 4 groups, not its default 9 (the planner assumed 9 for every N)."""
    kw = dict(optimizer="fzoo", batch=1, seq=256, backend="fsdp2", attention="sdpa", batched_probes=True)
    default, three = plan("opt-13b", 8, **kw), plan("opt-13b", 8, n_directions=3, **kw)
    assert "(9 probe groups in it)" in default.notes[0] and "(4 probe groups in it)" in three.notes[0]
    assert 4 * default.parts["forward peak (activations)"] == 9 * three.parts["forward peak (activations)"]


def test_step_time_follows_fzoo_n_directions():
    """FZOO with N = 3 runs 4 forwards a step (sequential: 4 gathers), not its default 9."""
    default = step_time("opt-13b", 16, optimizer="fzoo")
    three = step_time("opt-13b", 16, optimizer="fzoo", n_directions=3)
    assert (default.forwards, three.forwards) == (9, 4) and three.total_s < default.total_s / 2
    assert step_time("opt-13b", 16, optimizer="mezo", n_directions=3).forwards == 2  # not a probe-set optimizer
