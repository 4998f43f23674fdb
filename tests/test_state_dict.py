"""The optimizer state in torch's layout on one process (zo_scale/optim/state_dict.py), and the
flat-range format beside it. The FSDP2 / DCP checks with several ranks are in test_dcp.py."""

import copy

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

import zo_scale
from zo_scale.optim.base import STATE_FORMAT
from zo_scale.optim.state_dict import TORCH_FORMAT

SEED = 7


def tiny(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def closure_for(model, dtype=torch.float32):
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    return lambda: model(x).float().square().mean()


@pytest.mark.parametrize("cls", [zo_scale.MeZO, zo_scale.HELENE, zo_scale.HiZOOL])
def test_get_optimizer_state_dict_never_steps_the_optimizer(cls):
    """torch's _init_optim_state steps an optimizer whose state is empty with zero grads and lr 0;
    a ZO optimizer's state is filled from construction, so nothing of that happens."""
    model = tiny()
    opt = cls(model, lr=0.01, seed=SEED)
    before = copy.deepcopy(model.state_dict())
    sd = get_optimizer_state_dict(model, opt)
    assert opt.param_groups[0]["lr"] == 0.01
    assert all(p.grad is None for p in model.parameters())
    assert opt.step_count == 0 and opt.forward_passes == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sd["param_groups"][0]["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    set_optimizer_state_dict(model, opt, sd)
    assert opt.param_groups[0]["lr"] == 0.01 and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cls", [zo_scale.MeZO, zo_scale.HELENE, zo_scale.HiZOOL])
def test_flattened_optimizer_state_dict_round_trip(cls):
    """torchtitan's StateDictOptions(flatten_optimizer_state_dict=True): torch rebuilds the state from the
    live optimizer's state names and param_groups keys, zo_scale's step and seed included."""
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model = tiny(torch.bfloat16)
    opt = cls(model, lr=0.01, seed=SEED)
    opt.step(closure_for(model, torch.bfloat16))
    flat = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    assert flat["param_groups.0.weight.zo_counters"].tolist() == [1, opt.forward_passes]
    saved_model = copy.deepcopy(model)
    opt.step(closure_for(model, torch.bfloat16))
    opt2 = cls(saved_model, lr=0.5, seed=SEED)
    set_optimizer_state_dict(saved_model, opt2, flat, options=options)
    assert opt2.step_count == 1 and opt2.param_groups[0]["lr"] == 0.01
    opt2.step(closure_for(saved_model, torch.bfloat16))
    for a, b in zip(model.parameters(), saved_model.parameters()):
        assert torch.equal(a, b)


def test_state_dict_keys_and_shared_tensors():
    model = tiny(torch.bfloat16)
    opt = zo_scale.HELENE(model, lr=0.01, seed=SEED)
    opt.step(closure_for(model, torch.bfloat16))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    group = sd["param_groups"][0]
    assert group["params"] == [0, 1, 2, 3]
    assert group["zo_format"] == TORCH_FORMAT and group["zo_optimizer"] == "HELENE" and group["zo_seed"] == SEED
    assert group["zo_counters"].tolist() == [1, 2]  # [step, forward_passes]
    for i, p in enumerate(model.parameters()):
        entry = sd["state"][i]
        assert set(entry) == {"master", "momentum", "hessian"}
        assert all(t.shape == p.shape for t in entry.values())
        # the optimizer's own tensors (torch's convention): no copy of the whole state per save
        assert all(t.data_ptr() == opt.state[p][k].data_ptr() for k, t in entry.items())
    entry = sd["state"][0]
    entry["master"] = torch.zeros(7, 5)  # replacing an entry of the returned dict leaves opt.state alone
    assert opt.state[model[0].weight]["master"].abs().sum() > 0


def test_flat_range_format_still_loads():
    """Checkpoints written before the torch layout (zo_scale.checkpoint, run checkpoints) keep loading."""
    model = tiny(torch.bfloat16)
    opt = zo_scale.HiZOOL(model, lr=0.01, seed=SEED, hessian_smooth=1e-2)
    for _ in range(2):
        opt.step(closure_for(model, torch.bfloat16))
    flat = opt.flat_state_dict()
    assert flat["format"] == STATE_FORMAT and set(flat["shards"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    saved_model = copy.deepcopy(model)
    opt.step(closure_for(model, torch.bfloat16))
    opt2 = zo_scale.HiZOOL(saved_model, lr=0.5, seed=SEED, hessian_smooth=1e-2)
    opt2.load_state_dict(flat)
    opt2.step(closure_for(saved_model, torch.bfloat16))
    assert opt2.step_count == 3 and opt2.param_groups[0]["lr"] == 0.01
    for a, b in zip(model.parameters(), saved_model.parameters()):
        assert torch.equal(a, b)


def test_torch_layout_refusals_name_the_cause():
    model = tiny()
    sd = zo_scale.MeZO(model, lr=0.01, seed=SEED).state_dict()  # fp32: no master
    with pytest.raises(ValueError, match=r"keeps \[\] for 0.weight.*needs \['master'\].*master_weights"):
        zo_scale.MeZO(model, lr=0.01, seed=SEED, master_weights=True).load_state_dict(sd)
    with pytest.raises(ValueError, match="cannot load a 'MeZO' state"):
        zo_scale.HELENE(model, lr=0.01, seed=SEED).load_state_dict(sd)
    other = zo_scale.HELENE(model, lr=0.01, seed=SEED).state_dict()
    other["state"][0]["momentum"] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="0.weight/momentum has 15 elements in the checkpoint, the parameter 35"):
        zo_scale.HELENE(model, lr=0.01, seed=SEED).load_state_dict(other)
