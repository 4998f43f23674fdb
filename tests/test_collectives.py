"""What the optimizer sends over the network during ``opt.step``.

Every ProcessGroup collective method (allreduce, broadcast, all_gather_single, allgather,
reduce_scatter*, alltoall*, send/recv, barrier, ...) is wrapped inside the worker processes, so
calls are counted whatever Python API issued them (torch.distributed, FSDP2's
all_gather_single, deepspeed.comm). For each backend and optimizer the count during one step
(after 2 warm-up steps: ZeRO-3's trace is then complete) is compared with the same number of
bare forwards, each preceded by the backend's ``prepare_edit`` (which communicates nothing, but
makes the next forward gather again what it released):

* gathers / broadcasts / reduce-scatters / anything but all-reduce: exactly those of the forwards;
* all-reduce: at most a few hundred bytes beyond the forwards' (which issue none here). Measured:
  MeZO 32 B (one fp64 all-reduce of (sum, weight) for l+ and l-), HiZOO 48 B (l0 as well),
  HELENE 48 B (32 B of losses + 16 B for the clip fraction, a second all-reduce), FZOO 16·(N + 1) B
  (ℓ₀ and the N probes; 64 B at the tests' N = 3, 144 B at the default N = 8); HELENE-FZOO the same
  16·(N + 1) B (48 B at the tests' N = 2): its momentum is per-coordinate and local; ZO-Muon and
  HELENE-Muon 16·(N + 1) B likewise (48 B at the tests' N = 2, 80 B at the default N = 4): P, U_i,
  G and NS(G) are computed on every rank, nothing else is sent.

With ``batched_probes=True`` every probe group runs in one forward (zo_scale.probes): the step gathers
the model once, whatever the number of probes — measured 1.0x one bare forward's gather bytes for MeZO,
HELENE, FZOO (N = 3) and ZO-Muon / HELENE-Muon (N = 2) on FSDP2 and ZeRO-3 (both thresholds), against
2x / 2x / 4x / 3x sequentially, and for HiZOO-L (its own launches, harness.hizool_results) against 3x, with
its one all-reduce of losses and factor sums unchanged; HiZOO refuses batched probes on shards (its direction
needs its sharded H over each gathered layer).

Shared launches with test_sharded.py (dist_scripts/harness.py): 2 and 3 ranks, gloo on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import common  # noqa: E402

from dist_scripts import harness  # noqa: E402
from zo_scale.optim.hizoo_l import factored_shape  # noqa: E402

EXPECTED_ALLREDUCE = {"MeZO": (1, 32), "HiZOO": (1, 48), "HELENE": (2, 48), "FZOO": (1, 64), "ZOMuon": (1, 48),
                      "HELENEMuon": (1, 48), "HELENEFZOO": (1, 48)}  # (calls, bytes) per step
MAX_OPTIMIZER_ALLREDUCE_BYTES = 256

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["fsdp2", "zero3d", "zero3"])
@pytest.mark.parametrize("name", ["MeZO", "HiZOO", "HELENE", "FZOO", "ZOMuon", "HELENEMuon", "HELENEFZOO"])
def test_step_adds_only_a_few_allreduced_scalars(name, backend, world, record_property):
    rec = harness.results(world)[("coll", backend, name)]
    step, bare = dict(rec["step"]), dict(rec["bare"])
    step_ar, bare_ar = step.pop("allreduce", (0, 0)), bare.pop("allreduce", (0, 0))
    # no optimizer gathers: every non-all-reduce collective of the step is one the forwards issue
    assert step == bare, (step, bare)
    assert any(k in bare for k in ("all_gather_single", "_allgather_base", "allgather")), bare
    extra_calls, extra_bytes = step_ar[0] - bare_ar[0], step_ar[1] - bare_ar[1]
    record_property("optimizer_allreduce_bytes_per_step", extra_bytes)
    assert extra_bytes <= MAX_OPTIMIZER_ALLREDUCE_BYTES
    assert (extra_calls, extra_bytes) == EXPECTED_ALLREDUCE[name]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["fsdp2", "zero3d"])
def test_release_cost_is_only_regathering(backend, world, record_property):
    """What prepare_edit costs: the forwards gather again what was released (FSDP2: the root's
    parameters; ZeRO-3 default threshold: the persistent ones) — gathers only, never more than a
    full gather of the model per forward."""
    rec = harness.results(world)[("coll", backend, "MeZO")]
    bare, kept = dict(rec["bare"]), dict(rec["bare_no_release"])
    extra = sum(b for _, b in bare.values()) - sum(b for _, b in kept.values())
    record_property("regather_bytes_per_step", extra)
    assert extra >= 0
    assert set(bare) - {"all_gather_single", "_allgather_base", "allgather", "allgather_into_tensor_coalesced"} == set()


def _gather_bytes(summary) -> int:
    return sum(b for kind, (_, b) in summary.items() if kind != "allreduce")


MAX_BATCHED_GATHER_RATIO = 1.1  # gather bytes of a batched step / one forward's


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["fsdp2", "zero3d", "zero3"])
@pytest.mark.parametrize("name", ["MeZO", "HELENE", "FZOO", "ZOMuon", "HELENEMuon", "HELENEFZOO"])
def test_batched_probes_gather_the_model_once_per_step(name, backend, world, record_property):
    rec = harness.results(world)[("coll", backend, name)]
    one_forward = _gather_bytes(rec["bare"]) / rec["n_fwd"]
    sequential = _gather_bytes(rec["step"]) / one_forward
    batched = rec["batched"]
    ratio = _gather_bytes(batched) / one_forward
    record_property("gather_ratio_batched", ratio)
    record_property("gather_ratio_sequential", sequential)
    assert sequential == pytest.approx(rec["n_fwd"])
    assert ratio <= MAX_BATCHED_GATHER_RATIO
    # the optimizer's own traffic is unchanged: the same scalar all-reduces
    assert batched["allreduce"] == rec["step"]["allreduce"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["fsdp2", "zero3d", "zero3"])
def test_hizool_batched_probes_gather_the_model_once_per_step(backend, world, record_property):
    """HiZOO-L batched on shards (refused before): one gather of the model per step instead of three, and
    still ONE all-reduce of the losses and the factor sums (48 B + 8 B per R, C entry), nothing else."""
    rec = harness.hizool_results(world)[("coll", backend, "HiZOOL")]
    batched = rec["batched"]
    assert batched is not None  # None: refused
    one_forward = _gather_bytes(rec["bare"]) / rec["n_fwd"]
    ratio = _gather_bytes(batched) / one_forward
    record_property("gather_ratio_batched", ratio)
    assert _gather_bytes(rec["step"]) / one_forward == pytest.approx(3)
    assert ratio <= MAX_BATCHED_GATHER_RATIO
    assert batched["allreduce"] == rec["step"]["allreduce"]
    sums = sum(sum(factored_shape(p.shape)) for p in common.build_model("llama").parameters() if factored_shape(p.shape))
    bare_ar = rec["bare"].get("allreduce", (0, 0))
    assert (batched["allreduce"][0] - bare_ar[0], batched["allreduce"][1] - bare_ar[1]) == (1, 48 + 8 * sums)
