"""The optimizer state in torch's layout: what torch.distributed.checkpoint (DCP) and torch-style
checkpoint code expect from an optimizer.

``opt.state_dict()`` on a plain module, DDP or FSDP2 (``fully_shard``) returns::

    {"state": {0: {"master": T, "momentum": T, "hessian": T}, 1: {...}, ...},  # index in param_groups
     "param_groups": [{"lr": ..., "eps": ..., <the optimizer's options>, "params": [0, 1, ...],
                       "zo_format": TORCH_FORMAT, "zo_optimizer": "HELENE", "zo_seed": 0,
                       "zo_counters": tensor([step, forward_passes])}]}

* each ``T`` is the optimizer's own state tensor (``opt.state[p][name]``: a view of its shard, not a
  copy, as torch optimizers return theirs), laid out like its parameter: on FSDP2 a DTensor with the
  parameter's mesh, placements, global shape and stride, so DCP saves each rank's rows and reshards
  them on load to any world size; where the parameter is replicated, a tensor of its shape. Which
  names a parameter has: ``master`` (fp32 copy of low-precision weights), then the optimizer's own
  (HELENE ``momentum``, ``hessian``; HiZOO ``hessian``; HiZOO-L ``hessian_rows``/``hessian_cols``,
  whole on every rank, for factored tensors, and ``hessian`` for the others — with batched probes on
  shards a plain tensor of the parameter's shape, whole on every rank; HELENE-Muon ``subspace_momentum``,
  whole on every rank, for matrices and ``momentum`` for 1-D tensors). MeZO, FZOO and ZO-Muon without a master keep none.
  State that is not a tensor (HELENE-Muon's ``momentum_epoch``) is an entry of the group: both
  layouts and torch's flattened state dict keep the group's entries.
* the ``zo_*`` entries are in the live ``opt.param_groups[0]`` too: torch rebuilds a flattened state
  dict (``StateDictOptions(flatten_optimizer_state_dict=True)``, as torchtitan saves) from the live
  group's keys. ``zo_counters`` there is None until ``state_dict()`` writes it: a 1-D tensor on the
  parameters' device, so every ZO optimizer's state dict carries a tensor, which torch's full-state
  load (``set_optimizer_state_dict(full_state_dict=True)``) takes its device from.
* ``opt.state`` is filled from construction on. torch's ``_init_optim_state`` (run by
  ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``) steps an optimizer whose state is empty
  with zero grads and lr 0; a ZO optimizer is never stepped that way.

The flat-range format (``opt.flat_state_dict()``: state keyed by parameter name and global flat range,
one piece per rank) serves ``zo_scale.checkpoint`` and run checkpoints on every backend, and is what
``opt.state_dict()`` returns on DeepSpeed ZeRO-3 and FSDP1, whose partitions have no parameter layout
for DCP to reshard. ``opt.load_state_dict`` takes either.
"""

from __future__ import annotations

import torch

from zo_scale.shards import ShardView, canonical_name

TORCH_FORMAT = "zo_scale.optimizer.torch_layout.v1"
GROUP_KEYS = ("zo_format", "zo_optimizer", "zo_seed", "zo_counters")  # zo_scale's entries in param_groups[0]


def is_torch_layout(state_dict) -> bool:
    # no "state" is possible: torch's full-state load drops it when no parameter has a tensor (MeZO)
    return isinstance(state_dict, dict) and "param_groups" in state_dict


def name_group(opt) -> None:
    """Give the live ``param_groups[0]`` zo_scale's entries (at construction): torch rebuilds a flattened
    optimizer state dict from the live group's keys. ``zo_counters`` stays None until ``state_dict()``
    writes the counts there (the live count is ``opt.step_count``): no tensor is allocated before."""
    opt.param_groups[0].update(zo_format=TORCH_FORMAT, zo_optimizer=type(opt).__name__, zo_seed=opt.seed,
                               zo_counters=None)


def torch_state_dict(opt) -> dict:
    """``opt.state_dict()`` in torch's layout (see the module docstring)."""
    device = opt.views[0].local.device
    opt.param_groups[0]["zo_counters"] = torch.tensor([opt.step_count, opt.forward_passes], dtype=torch.int64, device=device)
    sd = torch.optim.Optimizer.state_dict(opt)  # torch's packing of opt.state and param_groups, hooks included
    # callers replace entries of these dicts (the FSDP2 example's Checkpointer does): not opt.state's own
    sd["state"] = {key: dict(entry) for key, entry in sd["state"].items()}
    return sd


def load_torch_state_dict(opt, state_dict: dict) -> None:
    """Load a torch-layout state: keyed by parameter index (``opt.state_dict()``) or by FQN (what
    ``set_optimizer_state_dict`` passes on), each tensor a DTensor of this rank's layout or the whole
    parameter's state (a full state dict, or one saved by a plain model)."""
    groups = state_dict["param_groups"]
    if len(groups) != 1:
        raise ValueError(f"zo_scale: a ZO optimizer has one param group, the state_dict has {len(groups)}")
    group = {k: v for k, v in groups[0].items() if k not in GROUP_KEYS}
    saved_group = groups[0]
    keys = group.pop("params")
    fmt, name = saved_group.get("zo_format"), saved_group.get("zo_optimizer")
    if fmt != TORCH_FORMAT or name != type(opt).__name__:
        raise ValueError(f"zo_scale: cannot load a {name!r} state ({fmt!r}) into {type(opt).__name__}")
    seed = saved_group["zo_seed"]
    if seed != opt.seed:
        raise ValueError(f"zo_scale: checkpoint seed {seed} differs from optimizer seed {opt.seed}")
    if saved_group["zo_counters"] is None:
        raise ValueError("zo_scale: the state_dict has no step counters (zo_counters): not made by opt.state_dict()")
    step, forward_passes = (int(x) for x in torch.as_tensor(saved_group["zo_counters"]).tolist())
    if len(keys) != len(opt.views):
        raise ValueError(f"zo_scale: the checkpoint has state for {len(keys)} parameters, this optimizer {len(opt.views)}")
    entries = []
    for key, view in zip(keys, opt.views):
        if isinstance(key, str) and canonical_name(key) != view.name:
            raise ValueError(f"zo_scale: the checkpoint's parameter {key} stands where this model has {view.name}")
        saved, live = state_dict.get("state", {}).get(key, {}), opt.state[view.param]
        missing = sorted(set(live) - set(saved))
        if missing:
            raise ValueError(
                f"zo_scale: the checkpoint keeps {sorted(saved)} for {view.name}, this {type(opt).__name__} needs "
                f"{missing} too (saved with another {' or '.join(opt.layout_options)}?)"
            )
        entries.append((view, saved, live))
    for view, saved, live in entries:
        flat = opt.shard_state[view.name]
        for sname, dest in live.items():
            what = f"{view.name}/{sname}"
            if sname in flat and not _kept_whole(dest, view):
                copy_element_state(flat[sname], view, saved[sname], what)
            else:  # kept whole on every rank (HiZOO-L's factors; its batched H of vectors on shards)
                copy_whole_state(dest, saved[sname], what)
    opt.step_count, opt.forward_passes = step, forward_passes
    opt.param_groups[0].update(group)
    opt._after_state_load()


def _kept_whole(dest, view: ShardView) -> bool:
    """A state tensor every rank keeps whole while the parameter is sharded (HiZOO-L's batched H of vectors)."""
    from torch.distributed.tensor import DTensor

    return not isinstance(dest, DTensor) and dest.numel() == view.global_numel != view.numel


def copy_element_state(dest: torch.Tensor, view: ShardView, value: torch.Tensor, what: str) -> None:
    """Copy this rank's elements of a per-element state into ``dest`` (flat, like ``view.local``) from a
    DTensor laid out as this rank's parameter or from the whole parameter's state."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        local = value.to_local()
        same = (tuple(value.shape) == tuple(view.global_shape) and local.numel() == view.numel
                and value.placements == getattr(view.param, "placements", None))
        if not same:
            raise ValueError(
                f"zo_scale: {what} is a DTensor placed {value.placements} with {local.numel()} local elements, this "
                f"rank holds {view.numel} of {tuple(view.global_shape)}: load it through dcp.load into "
                "get_optimizer_state_dict(model, opt), which reshards, then set_optimizer_state_dict"
            )
        dest.copy_(local.reshape(-1))
    elif value.numel() == view.global_numel:
        dest.copy_(value.reshape(-1)[view.start : view.end])
    else:
        raise ValueError(f"zo_scale: {what} has {value.numel()} elements in the checkpoint, the parameter {view.global_numel}")


def copy_whole_state(dest: torch.Tensor, value: torch.Tensor, what: str) -> None:
    """Copy a state kept whole on every rank (HiZOO-L's factors; its H of vectors with batched probes on shards)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):  # a sharded state (HiZOO-L's H saved sequentially on FSDP2) handed over directly
        raise ValueError(
            f"zo_scale: {what} is a DTensor in this state dict and kept whole here: load it through dcp.load into "
            "get_optimizer_state_dict(model, opt), which reshards, then set_optimizer_state_dict"
        )
    if tuple(value.shape) != tuple(dest.shape):
        raise ValueError(f"zo_scale: {what} has shape {list(value.shape)} in the checkpoint, {list(dest.shape)} here")
    dest.copy_(value)
