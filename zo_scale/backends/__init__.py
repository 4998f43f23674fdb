"""Backend detection: which kind of model the optimizer was handed.

=====================================  ====================================================
what you pass                          backend
=====================================  ====================================================
DeepSpeed engine, ZeRO stage 3         :class:`~zo_scale.backends.zero3.ZeRO3Backend`
DeepSpeed engine, ZeRO stage 0/1/2     :class:`~zo_scale.shards.ReplicatedBackend` (``engine.module``)
module with ``fully_shard`` (FSDP2)    :class:`~zo_scale.backends.fsdp2.FSDP2Backend`
``FullyShardedDataParallel`` (FSDP1)   :class:`~zo_scale.backends.fsdp1.FSDP1Backend` (``use_orig_params=True``)
DDP or a plain module                  :class:`~zo_scale.shards.ReplicatedBackend`
=====================================  ====================================================

A module whose parameters are ZeRO-3 partitioned but that is not the engine (``engine.module``,
or a model built under ``deepspeed.zero.Init``) is refused: only the engine can drop the
gathered copies that would hide an edit.
"""

from __future__ import annotations

import sys

import torch

from zo_scale.shards import Backend, ReplicatedBackend


def _deepspeed_engine_cls():
    ds = sys.modules.get("deepspeed")  # never import DeepSpeed just to find out it is not used
    if ds is None:
        return None
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except Exception:  # a broken or partial install: nothing can be an engine then
        return None
    return DeepSpeedEngine


def is_deepspeed_engine(model) -> bool:
    cls = _deepspeed_engine_cls()
    return cls is not None and isinstance(model, cls)


def _is_dtensor(p) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


def _has_fsdp2(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _has_fsdp1(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def detect(model) -> Backend:
    """Pick the backend from what ``model`` is: DeepSpeed engine, FSDP2 module, FSDP1, or plain."""
    if is_deepspeed_engine(model):
        if model.zero_optimization_stage() == 3:
            from zo_scale.backends.zero3 import ZeRO3Backend

            return ZeRO3Backend(model)
        return ReplicatedBackend(model.module)  # ZeRO-0/1/2: every rank holds the whole weights
    if isinstance(model, torch.nn.Module):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        if _has_fsdp1(model):
            from zo_scale.backends.fsdp1 import FSDP1Backend

            return FSDP1Backend(model)
        if _has_fsdp2(model):
            from zo_scale.backends.fsdp2 import FSDP2Backend

            return FSDP2Backend(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if any(hasattr(p, "ds_tensor") for p in params):
            raise TypeError(
                "zo_scale: this module's parameters are DeepSpeed ZeRO-3 partitioned; pass the engine returned "
                "by deepspeed.initialize(...) instead of engine.module"
            )
        if any(_is_dtensor(p) for p in params):
            raise TypeError(
                "zo_scale: the model has DTensor parameters not managed by fully_shard (tensor parallel?); "
                "only FSDP2 Shard(0) parameters are supported"
            )
        return ReplicatedBackend(model)
    raise TypeError(f"zo_scale: cannot optimise a {type(model).__name__}; pass an nn.Module or a DeepSpeed engine")
