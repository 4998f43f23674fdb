"""One rank of a W-rank world inside this process: fake tensors, torch's fake process group, real engines.

``python -m zo_scale.dryrun`` builds a model exactly as FSDP2 or DeepSpeed ZeRO-3 shard it for rank r
of W, with ``FakeTensorMode`` (every tensor has its true size and no data) and the ``"fake"``
process group (collectives return at once and move nothing), then runs a real optimizer step on it.
The engines and the optimizer are the real code; what this module adds are shims, each for one place
where a real engine assumes real data or real peers:

* :func:`fake_process_group`: rank, world size and the launcher variables DeepSpeed reads.
* :func:`skip_deepspeed_rank_agreement`: DeepSpeed's trace check broadcasts rank 0's module order
  and compares it with this rank's; a fake broadcast leaves this rank's list in place but the
  comparison reads it back through ``.item()``, which fake tensors cannot answer.
* :func:`build_fsdp2` calls the root state's ``_lazy_init()``: the first forward would do it, and it
  re-pads uneven shards into new storage, which the optimizer (built before) rightly refuses.
* :func:`_without_shm_comm`: DeepSpeed's CPU backend would build and start a shared-memory all-reduce
  kernel that waits for the node's other processes.
* :func:`sharded_replication_degrees`: HiZOO-L sums element counts over ranks when it is built.
* :func:`build_zero3` ties the weights again after ``zero.Init``: transformers ties them after its
  weight init, which the dry run skips (there are no weights to initialise).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from zo_scale.plan import ModelShape

# what the launchers export and DeepSpeed reads (deepspeed.comm, zero.utils.get_lst_from_rank0)
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def fake_process_group(rank: int, world: int):
    """The default process group as rank ``rank`` of ``world``, collectives faked, for the block."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("zo_scale: a process group already exists; the dry run needs its own fake one")
    saved = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _transformers_model(shape: ModelShape, dtype: torch.dtype, device):
    from zo_scale.memtrace import build_model

    # sdpa: what a GPU run uses (no B·heads·S² scores); the planner is told the same
    return build_model(shape, dtype, device=device, attention="sdpa")


def build_fsdp2(shape: ModelShape, dtype: torch.dtype, fake_mode, reshard_after_forward: bool = True):
    """The model sharded by ``fully_shard`` as ``zo_scale.trainer.build.wrap_fsdp2`` shards it, its shards fake."""
    from zo_scale.trainer.build import apply_fully_shard

    model = _transformers_model(shape, dtype, "meta")
    apply_fully_shard(model, reshard_after_forward=reshard_after_forward)
    with fake_mode:
        model.to_empty(device="cpu")
    # the first forward's lazy init re-pads uneven shards into new storage: do it before the optimizer
    # takes its views, as a real run's first forward would have before a second optimizer saw the model
    model._get_fsdp_state()._lazy_init()
    return model


def build_zero3(shape: ModelShape, dtype: torch.dtype, fake_mode, ds_config: dict):
    """A DeepSpeed ZeRO-3 engine around the model, partitioned as ``zero.Init`` partitions it, partitions fake."""
    import deepspeed
    from transformers.initialization import no_init_weights

    with _without_shm_comm():
        deepspeed.init_distributed(dist_backend="fake")
    with fake_mode, no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = _transformers_model(shape, dtype, "cpu")
    # transformers ties input and output embeddings after initialising weights, which no_init_weights skips
    model.tie_weights()
    with fake_mode:
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


@contextlib.contextmanager
def _without_shm_comm():
    """DeepSpeed's CPU backend builds and starts a shared-memory all-reduce kernel for the node's ranks: a JIT
    build behind a file lock other processes share, then a wait for peers that a fake world does not have."""
    import importlib

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # deepspeed.comm's `torch` is torch itself
    saved = ds_torch_comm.build_shm_op
    ds_torch_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch_comm.build_shm_op = saved


@contextlib.contextmanager
def skip_deepspeed_rank_agreement():
    """DeepSpeed checks, after the first forward, that every rank recorded the same module order: it
    broadcasts rank 0's list and reads it with ``.item()``. Fake tensors have no values to read and a
    fake broadcast moves nothing, so in a single-process dry run (one rank at a time, all ranks built
    the same way) the check is skipped."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    saved = coordinator.assert_ints_same_as_other_ranks
    coordinator.assert_ints_same_as_other_ranks = lambda ints: None
    try:
        yield
    finally:
        coordinator.assert_ints_same_as_other_ranks = saved


@contextlib.contextmanager
def sharded_replication_degrees():
    """HiZOO-L learns at construction how many ranks hold each element of its factored tensors, from one
    all-reduce of element counts, which a fake group cannot sum. Under FSDP2 and ZeRO-3 every parameter of
    the models the dry run builds is sharded: each element is held once."""
    from zo_scale.optim.hizoo_l import HiZOOL

    saved = HiZOOL._replication_degrees
    HiZOOL._replication_degrees = lambda self: {name: 1.0 for name in self._layout}
    try:
        yield
    finally:
        HiZOOL._replication_degrees = saved

