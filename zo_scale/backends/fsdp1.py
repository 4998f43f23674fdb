"""FSDP1 (``FullyShardedDataParallel(..., use_orig_params=True)``): edit the flat shard in place.

FSDP1 concatenates a unit's parameters into one ``FlatParameter`` and gives each rank one
contiguous slice of it (``flat_param._local_shard``, the tensor its all-gather reads, directly
or through the mixed-precision / CPU-offload copy made at every unshard). An original parameter
therefore owns at most one contiguous piece of this rank's slice, and
``flat_param._shard_param_infos[i]`` says where: ``offset_in_shard``/``numel_in_shard`` inside the
slice and ``intra_param_start_idx``, its global flat offset inside the parameter.

Like FSDP2, FSDP1 keeps the root unit gathered after a forward (and ``SHARD_GRAD_OP`` every unit),
so the next forward would not all-gather the edit: ``prepare_edit`` reshards every unit that is
unsharded (no communication).

``use_orig_params=False`` is refused: the optimizer needs one ``nn.Parameter`` per original
parameter. Prefer FSDP2 (``torch.distributed.fsdp.fully_shard``) for new code.
"""

from __future__ import annotations

import torch

from zo_scale.shards import Backend, ShardView, canonical_name


class FSDP1Backend(Backend):
    name = "fsdp1"

    def __init__(self, module: torch.nn.Module):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from torch.distributed.fsdp._runtime_utils import _lazy_init

        super().__init__(module)
        for root in FSDP.fsdp_modules(module, root_only=True):
            _lazy_init(root, root)  # what the first forward does (no communication): creates the local shards
        self._units = [m for m in FSDP.fsdp_modules(module) if getattr(m, "_handle", None) is not None]
        for m in self._units:
            if not m._handle._use_orig_params:
                raise NotImplementedError(
                    "zo_scale: FSDP1 with use_orig_params=False is not supported; wrap with "
                    "FullyShardedDataParallel(..., use_orig_params=True) or, better, use "
                    "torch.distributed.fsdp.fully_shard (FSDP2)"
                )

    def _reshard_all(self) -> None:
        from torch.distributed.fsdp._runtime_utils import _reshard

        for m in self._units:
            h = m._handle
            if h.uses_sharded_strategy and not h.needs_unshard():  # currently gathered
                _reshard(m, h, True)

    def shard_views(self) -> list[ShardView]:
        self._reshard_all()
        module_names = {id(mod): name for name, mod in self.module.named_modules(remove_duplicate=False)}
        by_param = {}
        for m in self._units:
            fp = m._handle.flat_param
            local_shard = fp._local_shard
            for i, (orig, info, pinfo) in enumerate(zip(fp._params, fp._shard_param_infos, fp._param_infos)):
                param_name, owner, _ = pinfo
                name = canonical_name(f"{module_names[id(owner)]}.{param_name}")
                if info.in_shard:
                    flat = local_shard.narrow(0, info.offset_in_shard, info.numel_in_shard)
                    start = info.intra_param_start_idx
                else:
                    flat, start = local_shard.narrow(0, 0, 0), 0
                by_param[id(orig)] = (name, flat.detach(), start, fp._shapes[i])
        views, seen = [], set()
        for _, p in self.module.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if id(p) not in by_param:  # a parameter no FSDP unit manages: replicated
                raise NotImplementedError(
                    "zo_scale: FSDP1 model with parameters outside every FSDP unit; wrap the root too"
                )
            name, flat, start, shape = by_param[id(p)]
            views.append(ShardView(name, p, flat, start, shape))
        return views

    def prepare_edit(self) -> None:
        self._reshard_all()
