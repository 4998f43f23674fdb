"""Run checkpoints: everything needed to continue a run exactly, written so a torn one is never loaded.

``output_dir/checkpoints/step_00000040/`` holds

* ``params_rank00000.pt`` per rank: this rank's slice of every trainable parameter, keyed by
  (canonical name, global flat range) like the optimizer state, so a run resumes on another world
  size or backend (each rank copies its new range out of whichever saved slices overlap it);
  frozen parameters are not saved: they come from the model source again;
* ``optim/``: the optimizer state (``zo_scale.checkpoint``: momentum, Hessian, fp32 master, step);
* ``rng_rank00000.pt`` per rank: python and torch (CPU, CUDA) generator states;
* ``trainer.json``: step, data order position, metrics file offset, timers, best dev, the config;
* ``COMPLETE``: written last; lists every file with its size.

``output_dir/checkpoints/best/`` holds the trainable weights of the best dev evaluation so far
(``params_rank*.pt`` as above, ``best.json``, ``COMPLETE``): what the run is evaluated on and exported
from at the end besides its final weights.

Atomicity: all ranks write into ``.tmp-step_…``; after a barrier rank 0 fsyncs the files, writes
``COMPLETE``, renames the directory to its final name (atomic on POSIX) and fsyncs the parent. A
directory without a valid ``COMPLETE`` (killed mid-write) is never chosen and is swept away by the
next save or start. Multi-node runs need ``output_dir`` on a filesystem every node sees.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from zo_scale.checkpoint import load_optimizer_state, save_optimizer_state
from zo_scale.shards import fill_from_slices

FORMAT = "zo_scale.run_checkpoint.v1"
BEST_DIR = "best"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(ckpt: Path) -> bool:
    """COMPLETE exists and every file it lists is there with its recorded size."""
    marker = Path(ckpt) / "COMPLETE"
    try:
        info = json.loads(marker.read_text())
        return info.get("format") == FORMAT and all(
            (Path(ckpt) / name).is_file() and (Path(ckpt) / name).stat().st_size == size
            for name, size in info["files"].items()
        )
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def sweep_incomplete(root: Path) -> None:
    """Remove leftovers of interrupted saves (rank 0, while no save is in progress)."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".tmp-") or (_STEP_DIR.match(p.name) and not is_complete(p)):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Saving


def param_slices(opt) -> dict:
    """This rank's slice of every trainable parameter, in the optimizer's (name, global range) form."""
    return {
        v.name: {"start": v.start, "end": v.end, "global_numel": v.global_numel, "tensor": v.local.detach().clone()}
        for v in opt.views
    }


def save_checkpoint(root: Path, step: int, opt, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` under ``root`` (every rank calls this); returns its final path."""
    root = Path(root)
    rank, world = _rank_world()
    final = root / step_dir_name(step)
    if is_complete(final):  # the same step saved before (e.g. a resumed run): identical content
        return final
    tmp = _start_dir(root, f".tmp-{step_dir_name(step)}")

    opt.backend.prepare_edit()  # ZeRO-3: drop gathered copies so the partitions are current
    _save_file(param_slices(opt), tmp / f"params_rank{rank:05d}.pt")
    _save_file(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    save_optimizer_state(opt, tmp / "optim")  # ends with a barrier
    _barrier()

    if rank == 0:
        _write_json_synced(tmp / "trainer.json", {"format": FORMAT, "step": step, "world_size": world, **trainer_state})
        _fsync_path(tmp / "optim")
        _seal(tmp, step)
        os.rename(tmp, final)
        _fsync_path(root)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def save_best_weights(root: Path, opt, record: dict) -> Path:
    """Replace ``root/best`` with this rank's slices of the trainable parameters and ``record`` (the dev
    evaluation that made them the best so far). Every rank calls this. Only weights: the run does not
    continue from here, it is evaluated and exported from here."""
    root = Path(root)
    rank, _ = _rank_world()
    final, old = root / BEST_DIR, root / f".tmp-old-{BEST_DIR}"
    tmp = _start_dir(root, f".tmp-{BEST_DIR}")
    opt.backend.prepare_edit()
    _save_file(param_slices(opt), tmp / f"params_rank{rank:05d}.pt")
    _barrier()
    if rank == 0:
        _write_json_synced(tmp / "best.json", record)
        _seal(tmp, record["step"])
        # two renames: a kill in between leaves no complete best/, never a mixed one (both are swept)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_best_record(root: Path) -> dict | None:
    """The dev evaluation of the weights in ``root/best``, or None if there is no complete snapshot."""
    best = Path(root) / BEST_DIR
    return json.loads((best / "best.json").read_text()) if is_complete(best) else None


def _start_dir(root: Path, name: str) -> Path:
    """Rank 0 sweeps leftovers and makes the empty ``root/name`` that every rank then writes into."""
    tmp = Path(root) / name
    if _rank_world()[0] == 0:
        sweep_incomplete(root)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def _write_json_synced(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def _seal(tmp: Path, step: int) -> None:
    """fsync every file, then write COMPLETE listing them with their sizes (what ``is_complete`` checks)."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            _fsync_path(p)
            files[str(p.relative_to(tmp))] = p.stat().st_size
    _write_json_synced(tmp / "COMPLETE", {"format": FORMAT, "step": step, "files": files})
    _fsync_path(tmp)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Loading


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "trainer.json").read_text())


def load_checkpoint(ckpt: Path, opt) -> dict:
    """Restore parameters, optimizer state and RNG from ``ckpt`` (every rank calls this, with any world
    size); returns the trainer state."""
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint")
    rank, _ = _rank_world()
    state = read_trainer_state(ckpt)
    load_param_slices(ckpt, opt)
    load_optimizer_state(opt, ckpt / "optim")  # with an fp32 master this rewrites the weights from it
    if opt.step_count != state["step"]:
        raise ValueError(f"{ckpt}: optimizer state is at step {opt.step_count}, trainer at {state['step']}")
    rng_file = ckpt / f"rng_rank{rank:05d}.pt"
    if not rng_file.is_file():  # resumed on more ranks than saved: the extra ranks take rank 0's
        rng_file = ckpt / "rng_rank00000.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def load_param_slices(directory: Path, opt) -> None:
    """Write the trainable parameters saved in ``directory`` (a checkpoint or ``best/``, from any world size)
    into this rank's shards. Parameters only: an fp32 master or optimizer state is not touched."""
    pieces = [torch.load(p, map_location="cpu", mmap=True, weights_only=True)
              for p in sorted(Path(directory).glob("params_rank*.pt"))]
    opt.backend.prepare_edit()
    try:
        with torch.no_grad():
            for v in opt.views:
                _fill(v, pieces)
    finally:
        opt.backend.finish_edit()


def _fill(view, pieces: list[dict]) -> None:
    """Copy this view's global range out of the saved slices that overlap it."""
    slices = [(e["start"], e["global_numel"], e["tensor"]) for e in (piece.get(view.name) for piece in pieces) if e]
    fill_from_slices(view.local, view, slices, view.name)
