"""A ZeRO-3 engine's own ``save_checkpoint`` / ``load_checkpoint`` carry the ZO optimizer.

Building a ZO optimizer on a ZeRO-3 engine wraps these two methods *of that engine instance*
(the latest ZO optimizer built on it is the one saved):

* ``engine.save_checkpoint(d, tag)`` writes the ZO state into ``d/<tag>/zo_scale/`` (zo_scale's
  per-rank format, :mod:`zo_scale.checkpoint`), then the engine's checkpoint as usual;
* ``engine.load_checkpoint(d, tag)`` loads the engine's checkpoint, then the ZO state (step,
  master, momentum, Hessian), and puts DeepSpeed's fp32 partitions in step with it.

Build the ZO optimizer *before* ``engine.load_checkpoint``; building it on an engine that already
loaded a checkpoint is refused, since the ZO state of that checkpoint would be lost.

**With an optimizer section** DeepSpeed saves the weights itself, as its fp32 master partitions,
which the backend keeps in step with the ZO updates (``ZeRO3Backend.after_update``).

**Without one** (a forward-only engine) DeepSpeed cannot checkpoint: ZeRO-3's module state dict
holds empty placeholders, the weight partitions are saved only by a DeepSpeed optimizer, and
``deepspeed.initialize`` gives such an engine no checkpoint engine (``save_checkpoint`` raises
``AttributeError: 'NoneType' object has no attribute 'makedirs'``). zo_scale writes its
checkpoint in DeepSpeed's folder layout instead: ``d/<tag>/zo_scale/`` with the weight shards
too (unless the fp32 master already holds them), ``d/<tag>/zo_scale/engine_rank{r:05d}.pt`` (the
engine's step counters and this rank's ``client_state``) and ``d/latest``. Frozen parameters are
not saved: build them again as before (e.g. ``from_pretrained``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from zo_scale.checkpoint import _atomic_write, load_optimizer_state, save_optimizer_state

ZO_DIR = "zo_scale"  # the ZO state's folder inside a checkpoint tag
_LATEST = "latest"


def install(engine, backend) -> None:
    """Wrap ``engine.save_checkpoint`` / ``load_checkpoint`` (once) for the optimizer on ``backend``."""
    if getattr(engine, "loaded_checkpoint_dp_world_size", None) is not None:
        raise RuntimeError(
            "zo_scale: this engine already ran engine.load_checkpoint, before the ZO optimizer existed, so the ZO "
            "state saved with that checkpoint (step, master, momentum) was not restored; build the ZO optimizer "
            "first, then call engine.load_checkpoint (it restores both)"
        )
    first = "_zo_scale_backend" not in vars(engine)
    engine._zo_scale_backend = backend
    if first:
        engine.save_checkpoint = _saver(engine, engine.save_checkpoint)
        engine.load_checkpoint = _loader(engine, engine.load_checkpoint)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _engine_file(rank: int) -> str:
    return f"engine_rank{rank:05d}.pt"


def _saver(engine, save_checkpoint):
    def save(save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=False):  # noqa: B006 (DeepSpeed's signature)
        backend = engine._zo_scale_backend
        opt = backend.optimizer()
        if opt is None:
            return save_checkpoint(save_dir, tag, client_state, save_latest, exclude_frozen_parameters)
        tag = str(tag if tag is not None else f"global_step{engine.global_steps}")
        zo_dir = Path(save_dir) / tag / ZO_DIR
        if backend.has_engine_master:
            backend.sync_engine_master()
            save_optimizer_state(opt, zo_dir)
            return save_checkpoint(save_dir, tag, client_state, save_latest, exclude_frozen_parameters)
        _save_forward_only(engine, opt, Path(save_dir), tag, zo_dir, client_state, save_latest)

    save.__doc__ = save_checkpoint.__doc__
    return save


def _save_forward_only(engine, opt, save_dir: Path, tag: str, zo_dir: Path, client_state, save_latest) -> None:
    save_optimizer_state(opt, zo_dir, weights=not opt.master_weights)  # the master holds them otherwise
    counters = {
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "client_state": dict(client_state),
    }
    _atomic_write(zo_dir / _engine_file(_rank()), lambda f: torch.save(counters, f))
    _barrier()  # every rank's files are complete before `latest` names the tag
    if save_latest and _rank() == 0:
        _atomic_write(save_dir / _LATEST, lambda f: f.write(tag.encode()))
    _barrier()


def _loader(engine, load_checkpoint):
    def load(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=True,
             load_module_only=False, custom_load_fn=None):
        backend = engine._zo_scale_backend
        opt = backend.optimizer()
        args = (load_module_strict, load_optimizer_states, load_lr_scheduler_states, load_module_only, custom_load_fn)
        if opt is None:
            return load_checkpoint(load_dir, tag, *args)
        if load_module_only or not load_optimizer_states or engine.load_universal_checkpoint():
            raise ValueError(
                "zo_scale: a ZeRO-3 engine with a ZO optimizer resumes only from a full checkpoint "
                "(load_module_only=False, load_optimizer_states=True, no universal checkpoint); to start ZO from "
                "other weights, load them into the model before deepspeed.initialize"
            )
        if tag is None:
            latest = Path(load_dir) / _LATEST
            if not latest.is_file():
                return load_checkpoint(load_dir, tag, *args)  # DeepSpeed warns and returns (None, None)
            tag = latest.read_text().strip()
        zo_dir = Path(load_dir) / str(tag) / ZO_DIR
        if not backend.has_engine_master:
            return _load_forward_only(engine, opt, zo_dir)
        path, client_state = load_checkpoint(load_dir, tag, *args)
        if path is None:
            return path, client_state
        if zo_dir.is_dir():
            load_optimizer_state(opt, zo_dir)
        else:
            _start_from_loaded_weights(opt, zo_dir.parent)
        backend.sync_engine_master()
        return path, client_state

    load.__doc__ = load_checkpoint.__doc__
    return load


def _load_forward_only(engine, opt, zo_dir: Path):
    if not zo_dir.is_dir():
        raise FileNotFoundError(
            f"zo_scale: {zo_dir.parent} has no {ZO_DIR}/ folder: a ZeRO-3 engine without a DeepSpeed optimizer resumes "
            "only from checkpoints its own save_checkpoint wrote with a ZO optimizer attached (DeepSpeed's files hold "
            "no weights of such an engine); to start from another DeepSpeed checkpoint, give the engine the "
            "optimizer section it was saved with"
        )
    load_optimizer_state(opt, zo_dir)
    own = zo_dir / _engine_file(_rank())
    path = own if own.is_file() else zo_dir / _engine_file(0)  # saved on fewer ranks: rank 0's counters
    counters = torch.load(path, map_location="cpu", weights_only=False)  # client_state: any picklable object
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
    return os.fspath(path), counters["client_state"]


def _start_from_loaded_weights(opt, tag_dir: Path) -> None:
    """A DeepSpeed checkpoint saved without a ZO optimizer (e.g. a first-order run): its weights are
    loaded, ZO starts afresh from them — the fp32 master too, which would otherwise write the
    weights of before the load back at the next step."""
    warnings.warn(
        f"zo_scale: {tag_dir} holds no ZO optimizer state ({ZO_DIR}/); the ZO optimizer starts afresh from its weights",
        stacklevel=3,
    )
    for v in opt.views:
        master = opt.shard_state[v.name].get("master")
        if master is not None:
            master.copy_(v.local)
