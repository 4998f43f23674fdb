"""FSDP2 (``torch.distributed.fsdp.fully_shard``): edit each rank's ``Shard(0)`` block in place.

What FSDP2 keeps (torch >= 2.6, read from ``_fully_shard/_fsdp_param.py``):

* every managed parameter is a ``DTensor`` placed ``Shard(0)`` on the FSDP mesh (HSDP:
  ``(Replicate(), Shard(0))``); its ``_local_tensor`` is ``padded.narrow(0, 0, rows)`` of a
  padded buffer whose flat view is ``FSDPParam._sharded_param_data`` — the very tensor the next
  all-gather reads. Editing ``_local_tensor`` in place therefore reaches the next forward; the
  padding rows after it are never read by us.
* rows are split with ``torch.chunk`` semantics: ``c = ceil(d0 / world)`` rows per rank, rank r
  holds rows ``[min(r*c, d0), min((r+1)*c, d0))`` — the last non-empty shard may be short and
  ranks past ``ceil(d0 / c)`` hold nothing (``d0 < world`` gives empty shards).
* after a forward without backward the root (and any module with ``reshard_after_forward=False``)
  stays *unsharded*: the module holds the gathered tensor and the next forward does not
  all-gather again, so an edit of the shard would be silently ignored. ``prepare_edit`` reshards
  every ``FSDPModule`` (no communication: it only frees the gathered copy) and finishes any
  explicitly prefetched all-gather first, since that one was issued before the edit.

Parameters of the model that no ``fully_shard`` call manages (plain tensors) are replicated:
every rank holds and updates the whole tensor, as in :class:`~zo_scale.shards.ReplicatedBackend`.

Optimizer state is kept flat like the local shard; ``state_layout`` shows each state tensor as a
DTensor placed like its parameter (same memory), which is what torch.distributed.checkpoint saves
and reshards (see zo_scale/optim/state_dict.py).
"""

from __future__ import annotations

import torch

from zo_scale.shards import Backend, ShardView, trainable_named_parameters


def dim0_chunk(d0: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a ``d0``-row tensor that ``torch.chunk(t, world)`` gives ``rank``
    (an empty range where ``torch.chunk`` returns fewer than ``world`` chunks)."""
    if d0 == 0:
        return 0, 0
    c = -(-d0 // world)
    lo = min(rank * c, d0)
    return lo, min(lo + c, d0)


def _param_groups(state):
    groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.7: a list per state
    if groups is None:
        one = getattr(state, "_fsdp_param_group", None)
        groups = [one] if one is not None else []
    return [g for g in groups if g is not None]


class FSDP2Backend(Backend):
    name = "fsdp2"

    def __init__(self, module: torch.nn.Module):
        from torch.distributed.fsdp import FSDPModule

        super().__init__(module)
        self._fsdp_modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
        self._checks: list[tuple[object, ShardView]] = []  # (FSDPParam, view): detect replaced params

    # ------------------------------------------------------------------ internals

    def _groups(self):
        seen, out = set(), []
        for m in self._fsdp_modules:
            for g in _param_groups(m._get_fsdp_state()):
                if id(g) not in seen:
                    seen.add(id(g))
                    out.append(g)
        return out

    def _reshard_all(self) -> None:
        for g in self._groups():
            if getattr(g, "_all_gather_result", None) is not None:
                # an all-gather (explicit prefetch / unshard(async_op=True)) still pending: it read
                # the shard before this edit; finish it so the reshard below drops its result
                g.wait_for_unshard()
        for m in self._fsdp_modules:
            m.reshard()

    # ------------------------------------------------------------------ Backend hooks

    def shard_views(self) -> list[ShardView]:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        self._reshard_all()  # so named_parameters() returns the sharded DTensors
        by_param = {}
        for g in self._groups():
            for fp in g.fsdp_params:
                by_param[id(fp.sharded_param)] = fp
        views, self._checks = [], []
        for name, p in trainable_named_parameters(self.module):
            if not isinstance(p, DTensor):
                if not p.is_contiguous():
                    raise ValueError(f"zo_scale: parameter {name} is not contiguous; call .contiguous() on it first")
                views.append(ShardView(name, p, p.data.view(-1), 0, p.shape))  # not sharded: replicated
                continue
            fp = by_param.get(id(p))
            if fp is None:
                raise TypeError(
                    f"zo_scale: parameter {name} is a DTensor that fully_shard does not manage "
                    "(tensor parallel?); only FSDP2 Shard(0) parameters are supported"
                )
            placements = tuple(p.placements)
            if placements not in ((Shard(0),), (Replicate(), Shard(0))):
                raise NotImplementedError(
                    f"zo_scale: parameter {name} is placed {placements}; only Shard(0) (FSDP) and "
                    "(Replicate(), Shard(0)) (HSDP) keep a contiguous flat range per rank"
                )
            local = p._local_tensor
            if not local.is_contiguous():
                raise RuntimeError(f"zo_scale: FSDP2 local shard of {name} is not contiguous")
            flat = local.detach().view(-1)
            storage = fp._sharded_param_data
            if flat.numel() and flat.untyped_storage().data_ptr() != storage.untyped_storage().data_ptr():
                raise RuntimeError(
                    f"zo_scale: the local tensor of {name} is not FSDP2's sharded storage, so edits would not "
                    "reach the all-gather (mixed-precision/offload subclass?)"
                )
            shape = p.shape
            rows = shape[0] if len(shape) else 1
            row_numel = p.numel() // rows if rows else 0
            lo, hi = dim0_chunk(rows, fp.mesh_info.shard_mesh_size, fp.mesh_info.shard_mesh_rank)
            if flat.numel() != (hi - lo) * row_numel:
                raise RuntimeError(
                    f"zo_scale: {name}: local shard has {flat.numel()} elements, expected rows [{lo}, {hi}) "
                    f"x {row_numel} (torch.chunk layout)"
                )
            view = ShardView(name, p, flat, lo * row_numel, shape)
            views.append(view)
            self._checks.append((fp, view))
        return views

    dcp_native = True

    def state_layout(self, view: ShardView, flat: torch.Tensor) -> torch.Tensor:
        """A DTensor placed like the parameter (same mesh, placements, global shape and stride) whose
        local tensor is ``flat`` in the shard's row shape; a parameter fully_shard does not manage
        is replicated, so its state is shaped like it."""
        from torch.distributed.tensor import DTensor

        p = view.param
        if not isinstance(p, DTensor):
            return flat.view(view.global_shape)
        local = flat.view(p._local_tensor.shape)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())

    def prepare_edit(self) -> None:
        self._reshard_all()
        for fp, view in self._checks:
            if view.numel and fp.sharded_param._local_tensor.data_ptr() != view.local.data_ptr():
                raise RuntimeError(
                    f"zo_scale: FSDP2 replaced the sharded parameter {view.name} after the optimizer was built "
                    "(model.to(), load_state_dict(assign=True)?); build the optimizer after such calls"
                )
