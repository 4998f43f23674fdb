"""DeepSpeed ZeRO-3: edit each rank's ``param.ds_tensor`` partition in place.

What ZeRO-3 keeps (DeepSpeed >= 0.14, read from ``runtime/zero/partition_parameters.py`` and
``partitioned_param_coordinator.py``):

* ``param.ds_tensor`` is this rank's flat partition of the flattened parameter. With
  ``part = ds_tensor.ds_numel`` (the numel rounded up to the partition group size, divided by it)
  partition rank r holds global elements ``[r*part, min((r+1)*part, ds_numel))``; the tail of the
  last non-empty partition is padding (never initialised) and is never read here.
* Parameters at or below ``stage3_param_persistence_threshold`` (default 1e5 elements: every bias
  and norm weight) are partitioned too, but once the module trace is complete (3rd forward on)
  the coordinator keeps them gathered, so an edit of their ``ds_tensor`` would be silently
  ignored. Releasing does not copy the gathered tensor back into ``ds_tensor``, so
  ``prepare_edit`` releases every parameter — waiting for prefetches still in flight — through
  the coordinator's ``release_and_reset_all`` (what ``engine.empty_partition_cache()`` does,
  without its ``gc.collect()``), and checks that nothing stayed ``AVAILABLE``.
* bf16/fp16 engines keep bf16/fp16 partitions; the optimizer's fp32 master (on by default for
  low-precision shards) keeps the restore exact.

Refused, with a one-line error: hpZ (``zero_hpz_partition_size > 1``: a secondary partition copy
the optimizer would have to keep in sync), quantized weights (``zero_quantized_weights``: the
gather reads a quantized copy), MiCS (``mics_shard_size > 0``, removed from recent DeepSpeed) and
parameter offload (``offload_param.device`` cpu/nvme: the partition lives in swap buffers).

The optimizer never calls ``engine.step()`` (a forward-only engine has no DeepSpeed optimizer).
Instead, after every ZO update (``after_update``):

* an engine *with* a DeepSpeed optimizer (``DeepSpeedZeroOptimizer_Stage3``) gets its fp32 master
  partitions (``fp32_partitioned_groups_flat``) overwritten with the ZO-updated values (zo_scale's
  fp32 master where it keeps one, else the weight shard). Its own checkpoints, resume and
  ``zero_to_fp32`` export then carry the ZO training; without this they hold the initial weights.
* the engine's step counters advance as ``engine.step()`` would (``global_steps`` by one,
  ``global_samples`` by ``train_batch_size()``), so default checkpoint tags and monitors see steps.

``attach`` ties the engine's ``save_checkpoint`` / ``load_checkpoint`` to the ZO optimizer
(``zo_scale/backends/zero3_checkpoint.py``).
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.distributed as dist

from zo_scale.shards import Backend, ShardView, trainable_named_parameters


def _get(cfg, name, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def zero3_refusal(zero_config) -> str | None:
    """Why a ZeRO-3 configuration cannot be used (one line), or None. ``zero_config`` is the
    engine's ``_config.zero_config`` (or a plain dict of the ``zero_optimization`` block)."""
    hpz = _get(zero_config, "zero_hpz_partition_size", 1) or 1
    if int(hpz) > 1:
        return (
            f"zo_scale: ZeRO++ hpZ (zero_hpz_partition_size={hpz}) keeps a secondary weight partition that ZO "
            "edits would not reach; set zero_hpz_partition_size to 1"
        )
    if _get(zero_config, "zero_quantized_weights", False):
        return (
            "zo_scale: ZeRO++ quantized weights (zero_quantized_weights=true) gather a quantized copy of the "
            "partition, so ZO perturbations of size eps are lost; set zero_quantized_weights to false"
        )
    mics = _get(zero_config, "mics_shard_size", -1)
    if mics is not None and int(mics) > 0:
        return (
            f"zo_scale: MiCS (mics_shard_size={mics}) partitions weights over sub-groups with replicas; "
            "it is not supported, use plain ZeRO-3 (mics_shard_size -1)"
        )
    offload = _get(zero_config, "offload_param")
    device = _get(offload, "device", "none") if offload is not None else "none"
    device = str(getattr(device, "value", device)).lower()
    if device not in ("none", ""):
        return (
            f"zo_scale: ZeRO-3 parameter offload (offload_param.device={device}) keeps partitions in swap/pinned "
            "buffers the optimizer cannot edit; set offload_param.device to none"
        )
    return None


class ZeRO3Backend(Backend):
    name = "zero3"

    def __init__(self, engine):
        reason = zero3_refusal(getattr(engine._config, "zero_config", None))
        if reason is None and type(getattr(engine, "optimizer", None)).__name__.startswith("MiCS"):
            reason = "zo_scale: MiCS (MiCS_Init / MiCS optimizer) is not supported, use plain ZeRO-3"
        if reason:
            raise ValueError(reason)
        super().__init__(engine.module)
        self.engine = engine
        opt = engine.optimizer
        self._offload = opt if hasattr(opt, "get_param_coordinator") else getattr(opt, "parameter_offload", None)
        if self._offload is None:
            raise TypeError(
                f"zo_scale: cannot find the ZeRO-3 parameter coordinator of this engine (optimizer "
                f"{type(opt).__name__}); build it with deepspeed.initialize and zero_optimization.stage=3"
            )
        if type(opt).__name__ != "DeepSpeedZeRoOffload":
            warnings.warn(
                f"zo_scale: this ZeRO-3 engine has a DeepSpeed optimizer ({type(opt).__name__}); ZO steps edit the "
                "weight partitions directly, so never call engine.step() (it would write its own master back)",
                stacklevel=3,
            )
        self._optimizer = lambda: None  # weak reference to the ZO optimizer, once attached
        self._fp32_slices: dict[str, torch.Tensor] | None = None

    @property
    def has_engine_master(self) -> bool:
        """Whether DeepSpeed keeps its own fp32 copy of the partitions (an optimizer in the config)."""
        return hasattr(self.engine.optimizer, "fp32_partitioned_groups_flat")

    def attach(self, optimizer) -> None:
        from zo_scale.backends import zero3_checkpoint

        self._optimizer = weakref.ref(optimizer)
        if self.has_engine_master:
            self._fp32_slices = self._engine_master_slices()
        zero3_checkpoint.install(self.engine, self)

    def optimizer(self):
        """The ZO optimizer built on this engine, or None once it is gone."""
        return self._optimizer()

    def _engine_master_slices(self) -> dict[str, torch.Tensor]:
        """For each view, the slice of DeepSpeed's fp32 partition that holds its elements.

        ``fp32_partitioned_groups_flat[i]`` is sub-group ``i``'s partitions (``fp16_groups[i]``)
        flattened in order, each ``ds_tensor.ds_numel`` long (padding included), like the bit16
        buffer ``fp16_partitioned_groups_flat[i]``. Views whose slice *is* the weight partition (an
        fp32 engine where DeepSpeed reuses the buffer) need no copy and are left out."""
        opt = self.engine.optimizer
        where = {}
        for group, flat in zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat):
            offset = 0
            for p in group:
                where[id(p)] = (flat, offset)
                offset += int(p.ds_tensor.ds_numel)
            if flat.numel() != offset:  # NVMe-swapped sub-groups keep an empty placeholder here
                raise ValueError(
                    "zo_scale: DeepSpeed keeps this engine's fp32 master partitions swapped out (offload_optimizer "
                    "to nvme), where ZO updates cannot keep them in step; set offload_optimizer.device to cpu or "
                    "none, or drop the optimizer section"
                )
        slices = {}
        for v in self._views:
            if id(v.param) not in where:
                raise RuntimeError(f"zo_scale: {v.name} is not in the ZeRO-3 optimizer's parameter groups")
            flat, offset = where[id(v.param)]
            dest = flat.data.narrow(0, offset, v.numel)
            if dest.data_ptr() != v.local.data_ptr():
                slices[v.name] = dest
        return slices

    def sync_engine_master(self) -> None:
        """Copy the ZO weights into DeepSpeed's fp32 master partitions (no-op without them)."""
        opt = self.optimizer()
        if not self._fp32_slices or opt is None:
            return
        for v in self._views:
            dest = self._fp32_slices.get(v.name)
            if dest is not None:
                dest.copy_(opt.shard_state[v.name].get("master", v.local))

    def after_update(self) -> None:
        self.sync_engine_master()
        self.engine.global_steps += 1
        self.engine.global_samples += self.engine.train_batch_size()

    def _release_all(self) -> None:
        # release_and_reset_all waits for in-flight gathers and frees every gathered copy, persistent
        # parameters included; it never copies the gathered tensor back into ds_tensor
        self._offload.get_param_coordinator().release_and_reset_all(self.module)

    def shard_views(self) -> list[ShardView]:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self._release_all()
        views = []
        for name, p in trainable_named_parameters(self.module):
            if not hasattr(p, "ds_tensor"):
                raise TypeError(f"zo_scale: parameter {name} of the ZeRO-3 engine is not partitioned")
            if p.ds_status != ZeroParamStatus.NOT_AVAILABLE:
                raise RuntimeError(f"zo_scale: ZeRO-3 parameter {name} is still {p.ds_status} after release")
            part = int(p.ds_tensor.ds_numel)
            group = getattr(p, "ds_process_group", None)
            rank = dist.get_rank(group=group) if dist.is_initialized() else 0
            numel = int(p.ds_numel)
            lo = min(rank * part, numel)
            hi = min(lo + part, numel)
            flat = p.ds_tensor.data.view(-1)
            if flat.numel() < hi - lo:
                raise RuntimeError(f"zo_scale: ZeRO-3 partition of {name} has {flat.numel()} < {hi - lo} elements")
            views.append(ShardView(name, p, flat.narrow(0, 0, hi - lo), lo, torch.Size(p.ds_shape)))
        self._views = views
        return views

    def prepare_edit(self) -> None:
        self._release_all()

    def eval_module(self) -> torch.nn.Module:
        return self.engine

    def loss_device(self) -> torch.device:
        """CPU for gloo/mpi (and mixed "cpu:gloo,cuda:nccl" groups, which route CPU tensors to
        gloo); otherwise (nccl, hccl, xccl, ccl) the engine's device, where DeepSpeed set it."""
        if not (dist.is_available() and dist.is_initialized()):
            return torch.device("cpu")
        backend = str(dist.get_backend())
        if backend in ("gloo", "mpi") or "cpu:" in backend:
            return torch.device("cpu")
        return torch.device(self.engine.device)
