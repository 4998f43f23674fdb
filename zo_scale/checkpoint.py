"""Optimizer-state checkpoints, one file per rank, loadable on any world size or backend.

``save_optimizer_state(opt, directory)`` writes, on every rank r,

* ``optim_rank{r:05d}.pt``   — ``opt.flat_state_dict()``: this rank's state tensors keyed by
  (canonical parameter name, global flat range), plus step, seed and hyper-parameters;
* ``optim_rank{r:05d}.json`` — the index: for every parameter the global range ``[start, end)``
  the file holds, and the world size / step / optimizer of the save.

Both files are written to a temporary name and renamed (atomic on POSIX), data first, so an
index always points at a complete data file. After a barrier rank 0 deletes files of ranks
``>= world_size`` left over from an earlier save with more ranks in the same directory.

``load_optimizer_state(opt, directory)`` reads every index, checks they describe one complete
save, opens (``torch.load(mmap=True)``: only the pages it copies are read) just the files whose
ranges overlap the state this rank keeps (``opt.checkpoint_ranges()``: its shard views; HiZOO-L with
batched probes on shards also the whole of its unfactored tensors), and hands them to ``opt.load_flat_state_dict`` which takes
each local range from the pieces that cover it. A run saved with FSDP2 on 2 ranks resumes with
ZeRO-3 on 3 ranks, or on one process, and vice versa: the layout is in global coordinates.
Model weights are not part of this file (save them the way your engine does); with an fp32
master the master is, and loading it overwrites the local weight shards with ``cast(master)``.
``save_optimizer_state(..., weights=True)`` also stores each local weight shard (tensor
``shard_weight``, same global-range layout) for engines that save no weights of their own (a
ZeRO-3 engine without a DeepSpeed optimizer); loading restores them wherever a file has them.

This format works on every backend, DeepSpeed ZeRO-3 included. On a plain model, DDP or FSDP2 the
state also has torch's layout (``opt.state_dict()``, DTensor state) for torch.distributed.checkpoint:
see zo_scale/optim/state_dict.py.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from zo_scale.shards import fill_from_slices

INDEX_FORMAT = "zo_scale.optim_index.v1"
_NAME = re.compile(r"^optim_rank(\d{5})\.(pt|json)$")
WEIGHT = "shard_weight"  # the local weight shard, in files saved with weights=True


def _rank_world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def data_file(rank: int) -> str:
    return f"optim_rank{rank:05d}.pt"


def index_file(rank: int) -> str:
    return f"optim_rank{rank:05d}.json"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_optimizer_state(opt, directory, *, barrier: bool = True, weights: bool = False) -> Path:
    """Write this rank's optimizer state and index into ``directory``; return the index path.
    ``weights``: also the local weight shards (see the module docstring).

    Every rank of the optimizer's process group must call it (it ends with a barrier unless
    ``barrier=False``; then the caller synchronises before anyone reads the directory)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    group = getattr(opt, "process_group", None)
    rank, world = _rank_world(group)
    sd = opt.flat_state_dict()
    if weights:
        for v in opt.views:
            sd["shards"][v.name]["tensors"][WEIGHT] = v.local.detach().clone()
    _atomic_write(directory / data_file(rank), lambda f: torch.save(sd, f))
    index = {
        "format": INDEX_FORMAT,
        "rank": rank,
        "world_size": world,
        "step": sd["step"],
        "optimizer": sd["optimizer"],
        "state_format": sd["format"],
        "backend": getattr(getattr(opt, "backend", None), "name", None),
        "file": data_file(rank),
        "shards": {name: [e["start"], e["end"], e["global_numel"]] for name, e in sd["shards"].items()},
    }
    path = directory / index_file(rank)
    _atomic_write(path, lambda f: f.write(json.dumps(index, indent=1, sort_keys=True).encode()))
    if world > 1 and barrier:
        dist.barrier(group)
        if rank == 0:  # leftovers of an earlier save with more ranks would look like part of this one
            for p in directory.iterdir():
                m = _NAME.match(p.name)
                if m and int(m.group(1)) >= world:
                    p.unlink(missing_ok=True)
        dist.barrier(group)
    return path


def read_index(directory) -> list[dict]:
    """The per-rank indices of the save in ``directory``, checked to form one complete save."""
    directory = Path(directory)
    indices = []
    for p in sorted(directory.glob("optim_rank*.json")):
        if _NAME.match(p.name):
            indices.append(json.loads(p.read_text()))
    if not indices:
        raise FileNotFoundError(f"zo_scale: no optimizer index (optim_rank*.json) in {directory}")
    head = indices[0]
    for idx in indices:
        if idx.get("format") != INDEX_FORMAT:
            raise ValueError(f"zo_scale: {directory}: unknown index format {idx.get('format')!r}")
        for key in ("world_size", "step", "optimizer"):
            if idx[key] != head[key]:
                raise ValueError(
                    f"zo_scale: {directory} mixes saves ({key} {head[key]!r} in rank {head['rank']}, "
                    f"{idx[key]!r} in rank {idx['rank']}): incomplete or interrupted checkpoint"
                )
    ranks = sorted(idx["rank"] for idx in indices)
    if ranks != list(range(head["world_size"])):
        raise ValueError(
            f"zo_scale: {directory} has indices for ranks {ranks} of a {head['world_size']}-rank save: incomplete checkpoint"
        )
    return sorted(indices, key=lambda i: i["rank"])


def _overlaps(index: dict, wanted: dict[str, tuple[int, int]]) -> bool:
    for name, (lo, hi) in wanted.items():
        entry = index["shards"].get(name)
        if entry is not None and entry[0] < hi and lo < entry[1]:
            return True
    return False


def load_optimizer_state(opt, directory) -> list[str]:
    """Load the optimizer state saved in ``directory`` into ``opt`` (any world size / backend).

    Returns the data files this rank opened (those overlapping its shards; the first file only
    for its header when none does)."""
    directory = Path(directory)
    indices = read_index(directory)
    if indices[0]["optimizer"] != type(opt).__name__:
        raise ValueError(
            f"zo_scale: {directory} holds {indices[0]['optimizer']} state, not {type(opt).__name__}"
        )
    wanted = opt.checkpoint_ranges()
    chosen = [idx for idx in indices if _overlaps(idx, wanted)] or indices[:1]
    pieces = [torch.load(directory / idx["file"], map_location="cpu", mmap=True, weights_only=True) for idx in chosen]
    backend = opt.backend
    backend.prepare_edit()  # loading a master rewrites the local shards: drop gathered copies first
    try:
        _load_weights(opt, pieces)
        opt.load_flat_state_dict(pieces)
    finally:
        backend.finish_edit()
    return [idx["file"] for idx in chosen]


def _load_weights(opt, pieces: list[dict]) -> None:
    """The local weight shards, from a save made with ``weights=True`` (nothing otherwise)."""
    if not any(WEIGHT in e["tensors"] for sd in pieces for e in sd["shards"].values()):
        return
    for v in opt.views:
        entries = (sd["shards"].get(v.name) for sd in pieces)
        slices = [(e["start"], e["global_numel"], e["tensors"][WEIGHT])
                  for e in entries if e and WEIGHT in e["tensors"]]
        fill_from_slices(v.local, v, slices, f"{v.name}/{WEIGHT}")
