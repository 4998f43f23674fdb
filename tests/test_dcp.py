"""zo_scale optimizers checkpointed through torch.distributed.checkpoint in a user's FSDP2 loop.

Three launches of ``dist_scripts/dcp_user_loop.py`` (gloo on CPU): 2 ranks train, checkpoint the
way torchtitan and pytorch/examples ``distributed/FSDP2`` do (DCP of get_*_state_dict, flattened or not, DCP of
``model.state_dict()`` / ``opt.state_dict()``, and the example's Checkpointer with full state dicts,
``dcp_api`` True and False) and run on uninterrupted; 3 ranks and 1 process resume each checkpoint
and must land on the uninterrupted trajectory bit for bit (one forward per sequence, fp64 loss sums).
Optimizers: HELENE on bf16 weights (fp32 master, momentum, Hessian), MeZO in fp32 (no state) and
HiZOO-L (factored Hessian, whole on every rank, plus a full one for 1-D tensors), HELENE-Muon on bf16
(subspace momentum whole on every rank per matrix, its epoch in param_groups, momentum of 1-D tensors),
HELENE-FZOO on bf16 (fp32 master and a momentum per coordinate, sharded like the weights).

Before the torch-layout state_dict (zo_scale/optim/state_dict.py) these failed: get_optimizer_state_dict
raised ``zo_scale: ZO optimizers need a closure`` from torch's _init_optim_state and left lr 0 and zero
grads; dcp.load of opt.state_dict() was refused with ``checkpoint covers 0 of ... local elements``; the
Checkpointer's ``opt.state_dict()["state"]`` raised ``KeyError: 'state'``.
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import REPO, VENV_BIN, free_port, run_multiproc

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

SCRIPT = REPO / "tests" / "dist_scripts" / "dcp_user_loop.py"
OPTIMIZERS = ("HELENE", "MeZO", "HiZOOL", "HELENEMuon", "HELENEFZOO")
TIMEOUT_S = 300  # ~35-45 s each on 2 loaded cores


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``results(phase, world)``: the records of that launch, launched once (resumes after the save)."""
    out = tmp_path_factory.mktemp("dcp")
    done = {}

    def get(phase: str, world: int) -> dict:
        if (phase, world) not in done:
            if phase == "resume":
                get("save", 2)
            run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), SCRIPT, "--phase", phase, "--out", out],
                          timeout=TIMEOUT_S)
            done[phase, world] = torch.load(out / f"results_{phase}_w{world}.pt", weights_only=False)
        return done[phase, world]

    return get


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_get_optimizer_state_dict_keeps_lr_and_allocates_no_grads(results, name):
    rec = results("save", 2)[("fresh", name)]
    assert rec["lr_after"] == rec["lr_before"]
    assert rec["grads"] == []
    assert "error" not in rec, rec.get("error")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_is_torch_layout_with_dtensors_placed_like_the_parameters(results, name):
    rec = results("save", 2)[("fresh", name)]
    assert "error" not in rec, rec.get("error")
    assert {"params", "zo_format", "zo_optimizer", "zo_seed", "zo_counters", "lr"} <= set(rec["group_keys"])
    assert ("momentum_epoch" in rec["group_keys"]) == (name == "HELENEMuon")
    expected = {"HELENE": {"master", "momentum", "hessian"}, "MeZO": set(), "HELENEFZOO": {"master", "momentum"}}
    for fqn, entry in rec["layout"].items():
        if name == "HiZOOL":  # matrices keep R, C (plain, whole); 1-D tensors HiZOO's full H
            assert set(entry) in ({"hessian_rows", "hessian_cols"}, {"hessian"}), (fqn, entry)
            per_element = {k: v for k, v in entry.items() if k == "hessian"}
        elif name == "HELENEMuon":  # matrices keep M (plain, whole); 1-D tensors a momentum; both a master
            assert set(entry) in ({"master", "subspace_momentum"}, {"master", "momentum"}), (fqn, entry)
            assert entry.get("subspace_momentum", ("Tensor", False)) == ("Tensor", False), (fqn, entry)
            per_element = {k: v for k, v in entry.items() if k != "subspace_momentum"}
        else:
            assert set(entry) == expected[name], (fqn, entry)
            per_element = entry
        assert all(v == ("DTensor", True) for v in per_element.values()), (fqn, entry)
    assert all(rec["shares_memory"].values())  # the optimizer's own tensors, not copies


def _assert_continues_reference(rec: dict, ref: dict):
    assert "error" not in rec, rec.get("error")
    assert rec["step"] == 2 and rec["lr"] == ref["lr"]  # both came back from the checkpoint (lr was 10x)
    assert rec["losses"] == ref["losses"][2:]
    assert set(rec["params"]) == set(ref["params"])
    for n, p in ref["params"].items():
        assert torch.equal(rec["params"][n], p), n
    assert any(not torch.equal(ref["mid"][n], p) for n, p in ref["params"].items())  # the last steps did move


def _reference(results, name: str, kind: str) -> dict:
    ref = results("save", 2)[("reference", name)]
    assert ref["saves"][kind] == "ok"
    return ref


@pytest.mark.parametrize("world", [3, 1])
@pytest.mark.parametrize("kind", ["dsd", "titan", "plain"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_dcp_save_on_2_ranks_resumes_exactly(results, name, kind, world):
    """dcp.save / dcp.load, resharded by DCP from 2 ranks to 3 and to 1: of get_*_state_dict (titan: with
    flatten_optimizer_state_dict=True) and of model.state_dict() / opt.state_dict()."""
    ref = _reference(results, name, kind)
    rec = results("resume", world)[("resume", name, kind)]
    _assert_continues_reference(rec, ref)


@pytest.mark.parametrize("world", [3, 1])
@pytest.mark.parametrize("kind", ["full_dcp", "full_dtensor"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_example_checkpointer_resumes_exactly(results, name, kind, world):
    """The example's Checkpointer: full state dicts on rank 0, loaded with set_optimizer_state_dict
    (full_state_dict, broadcast_from_rank0) or by hand with distribute_tensor and opt.load_state_dict."""
    ref = _reference(results, name, kind)
    rec = results("resume", world)[("resume", name, kind)]
    _assert_continues_reference(rec, ref)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_dcp_checkpoint_of_fsdp2_loads_into_a_plain_model(results, name):
    ref = _reference(results, name, "dsd")
    rec = results("resume", 1)[("resume_plain", name, "dsd")]
    _assert_continues_reference(rec, ref)


def test_flat_range_state_through_dcp_names_the_cause(results):
    """The flat-range format through dcp.save keeps one rank's copy of each plain tensor (which rank DCP's
    dedup picks depends on what else the state holds): a rank missing its range says so, in one line."""
    errors = [e for e in results("save", 2)["flat_through_dcp"] if e is not None]
    assert errors, "a flat-range state through DCP loaded on every rank: DCP kept every rank's copy?"
    for err in errors:
        assert "covers 0 of 128 local elements of" in err
        assert re.search(r"this rank needs \[(0|128), (128|256)\), the checkpoint holds \[(0|128), (128|256)\)", err)
        assert "pieces of other ranks are missing" in err and "keeps one rank's copy of plain tensors" in err
        assert "\n" not in err

