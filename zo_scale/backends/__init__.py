"""Backend detection: which kind of model the optimizer was handed."""

from __future__ import annotations

import torch

from zo_scale.shards import Backend, ReplicatedBackend


def detect(model) -> Backend:
    if isinstance(model, torch.nn.Module):
        return ReplicatedBackend(model)
    raise TypeError(f"zo_scale: cannot optimise a {type(model).__name__}; pass an nn.Module or a DeepSpeed engine")
