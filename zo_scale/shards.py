"""One view per trainable parameter: the local elements this rank edits and their global range.

A ZO step only ever touches ``ShardView.local`` — a flat, contiguous tensor holding the global
flat elements ``[start, start + local.numel())`` of one parameter — so the optimizer is the same
code for a plain module, FSDP2 and DeepSpeed ZeRO-3. A backend knows how to find those views
and what must happen around an edit (e.g. dropping gathered copies that would hide it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from zo_scale.rng import param_uid

# Wrapper prefixes that FSDP1/DDP/DeepSpeed/torch.compile insert into parameter names.
_WRAPPER_PARTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|module)(?=\.|$)")


def canonical_name(name: str) -> str:
    """The parameter name without wrapper components, so every backend keys z alike."""
    return _WRAPPER_PARTS.sub("", name).lstrip(".")


@dataclass
class ShardView:
    name: str  # canonical parameter name: the key of its z and its state
    param: torch.nn.Parameter  # the module's parameter object
    local: torch.Tensor  # flat contiguous view of this rank's elements; edited in place
    start: int  # global flat index of local[0]
    global_shape: torch.Size
    uid: int = field(init=False)

    def __post_init__(self):
        self.uid = param_uid(self.name)
        assert self.local.dim() == 1 and self.local.is_contiguous(), self.name

    @property
    def numel(self) -> int:
        return self.local.numel()

    @property
    def end(self) -> int:
        return self.start + self.local.numel()

    @property
    def global_numel(self) -> int:
        return int(torch.Size(self.global_shape).numel())


class Backend:
    """How to reach a model's local shards. Subclasses override the hooks they need."""

    name = "base"

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def shard_views(self) -> list[ShardView]:
        raise NotImplementedError

    def prepare_edit(self) -> None:
        """Called before the optimizer edits ``local`` tensors (after a forward)."""

    def finish_edit(self) -> None:
        """Called after the optimizer edited ``local`` tensors (before the next forward)."""

    def attach(self, optimizer) -> None:
        """Called once the optimizer built on this backend is ready (its state exists)."""

    def after_update(self) -> None:
        """Called once a step's update is written (not after a skipped step)."""

    def eval_module(self) -> torch.nn.Module:
        return self.module

    def loss_device(self) -> torch.device:
        """Where the scalar all-reduce tensor lives (gloo: CPU; nccl: the current GPU)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def trainable_named_parameters(module: torch.nn.Module):
    """Named trainable parameters, each once (tied weights share one z), in a stable order."""
    seen, out = set(), []
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((canonical_name(name), p))
    return out


class ReplicatedBackend(Backend):
    """Plain module or DDP: every rank holds the whole tensor and applies the same update."""

    name = "replicated"

    def __init__(self, module: torch.nn.Module):
        inner = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
        super().__init__(inner)

    def shard_views(self) -> list[ShardView]:
        views = []
        for name, p in trainable_named_parameters(self.module):
            if not p.is_contiguous():
                raise ValueError(f"zo_scale: parameter {name} is not contiguous; call .contiguous() on it first")
            views.append(ShardView(name, p, p.data.view(-1), 0, p.shape))
        return views


def detect_backend(model) -> Backend:
    """Pick the backend from what ``model`` is: DeepSpeed engine, FSDP2 module, FSDP1, or plain."""
    from zo_scale import backends

    return backends.detect(model)


def fill_from_slices(dest: torch.Tensor, view: ShardView, slices, what: str) -> None:
    """Copy ``view``'s global range into ``dest`` (shaped like ``view.local``) out of saved slices
    ``(start, global_numel, tensor)`` of the same parameter, saved on any world size or backend.

    Replicated parameters (a plain module on several ranks, the prefix encoder FSDP2 leaves unsharded)
    are saved whole by every rank: overlapping slices hold the same values, so coverage is their union.
    """
    spans = []
    for start, global_numel, tensor in slices:
        if global_numel != view.global_numel:
            raise ValueError(f"zo_scale: {what} has {view.global_numel} elements but the checkpoint has {global_numel}")
        lo, hi = max(start, view.start), min(start + tensor.numel(), view.end)
        if lo < hi:
            dest[lo - view.start : hi - view.start].copy_(tensor[lo - start : hi - start])
            spans.append((lo, hi))
    covered, reach = 0, view.start
    for lo, hi in sorted(spans):
        covered += max(0, hi - max(lo, reach))
        reach = max(reach, hi)
    if covered != view.numel:
        raise ValueError(f"zo_scale: checkpoint covers {covered} of {view.numel} local elements of {what}")
