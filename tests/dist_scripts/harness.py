"""Runs the worker launches once per pytest session and hands their results to the tests.

Three launches cover every multi-process check (test_sharded.py and test_collectives.py share
them): the single-process reference, torchrun with 2 ranks (which also saves the checkpoint)
and torchrun with 3 ranks (which resumes it). Each launch gets its own free port and a hard
wall-clock limit (``run_multiproc`` kills the whole process group on timeout), and the gloo
timeout inside is 90 s, so a stuck rendezvous or collective fails instead of hanging.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path

import torch

from conftest import PYTHON, VENV_BIN, free_port, run_multiproc

HERE = Path(__file__).resolve().parent
WORKER = HERE / "zo_worker.py"

LAUNCHES = {
    1: "ref,batched,probes,fused",
    2: "traj,probes,layout,negative,coll,bf16,reload,ckpt_save,refuse,fsdp1",
    3: "traj,batched,probes,layout,coll,bf16,ckpt_load,fused",
}
TIMEOUT_S = {1: 420, 2: 540, 3: 600}  # ZO-Muon/HELENE-Muon and the probes check joined; sized for a loaded 2-core machine

_root: Path | None = None
_results: dict[int, dict] = {}
_failed: dict[int, BaseException] = {}
timings: dict[int, float] = {}


def _workdir() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="zo_sharded_"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def results(world: int) -> dict:
    """The result dict of the launch with ``world`` ranks (running it, and what it needs, first)."""
    if world in _results:
        return _results[world]
    if world in _failed:  # report the launch's failure again instead of relaunching it per test
        raise _failed[world]
    try:
        _results[world] = _launch(world)
    except BaseException as e:  # pytest.fail raises an OutcomeException (a BaseException)
        _failed[world] = e
        raise
    return _results[world]


def _launch(world: int) -> dict:
    if world == 3:
        results(2)  # the 3-rank launch resumes the checkpoint the 2-rank launch saved
    root = _workdir()
    out, ckpt = root / "out", root / "ckpt"
    timings[world] = run_worker(world, ["--out", out, "--ckpt", ckpt, "--checks", LAUNCHES[world]])
    return torch.load(out / f"results_w{world}.pt")


# HiZOO-L's own launches (``--optimizers HiZOOL``): test_hizoo_l_sharded.py, and its batched-probes cases in
# test_probes.py / test_collectives.py; the 1-rank launch loads the 2-rank save too, so it runs after it
HIZOOL_LAUNCHES = {1: "ref,batched,probes,probes_load", 2: "traj,coll,bf16,reload,ckpt_save,probes,probes_save",
                   3: "traj,batched,coll,bf16,ckpt_load,probes,probes_load"}
_hizool: dict[int, dict] = {}
_hizool_failed: dict[int, BaseException] = {}


def hizool_results(world: int) -> dict:
    """The result dict of HiZOO-L's launch with ``world`` ranks (the 2-rank one, which saves, first)."""
    if world in _hizool:
        return _hizool[world]
    if world in _hizool_failed:
        raise _hizool_failed[world]
    try:
        if world != 2:
            hizool_results(2)
        root = _workdir() / "hizool"
        took = run_worker(world, ["--out", root / "out", "--ckpt", root / "ckpt", "--checks", HIZOOL_LAUNCHES[world],
                                  "--optimizers", "HiZOOL"])
        timings[("HiZOOL", world)] = took
        _hizool[world] = torch.load(root / "out" / f"results_w{world}.pt")
    except BaseException as e:
        _hizool_failed[world] = e
        raise
    return _hizool[world]


def run_worker(world: int, args: list) -> float:
    """zo_worker.py on ``world`` ranks (one process, or torchrun on a free port) within its time limit;
    returns the wall time."""
    args = [WORKER, *args]
    if world == 1:
        cmd = [PYTHON, *args]
    else:
        cmd = [VENV_BIN / "torchrun", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *args]
    t0 = time.perf_counter()
    run_multiproc(cmd, env={"ZO_TEST_DIST_TIMEOUT": "90", "DS_ACCELERATOR": "cpu"}, timeout=TIMEOUT_S[world])
    return time.perf_counter() - t0


def reference() -> dict:
    return results(1)
