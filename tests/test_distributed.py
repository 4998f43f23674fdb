"""Launcher discovery (unit) and a real gloo all-reduce under every supported launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from conftest import HELPERS, PYTHON, VENV_BIN, free_port, launch_env, run_multiproc, sbatch_and_wait
from zo_scale import distributed as zd
from zo_scale.distributed import (detect_launcher, discover, expand_nodelist, init_distributed,
                                  parse_tasks_per_node, slurm_master_port, strip_local_rank_arg)

ALLREDUCE = str(HELPERS / "dist_allreduce.py")
DEAD_PEER = str(HELPERS / "dist_dead_peer.py")
TEARDOWN = str(HELPERS / "dist_teardown.py")


# ---------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("r[1-2]n[3-4]", ["r1n3", "r1n4", "r2n3", "r2n4"]),
    ("x[1],y-[05]", ["x1", "y-05"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-", "n1-2]", "n[a-b]", "n[3-1]", "n[]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("2") == [2]
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4,2(x2)") == [4, 2, 2]
    with pytest.raises(ValueError):
        parse_tasks_per_node("2(3)")


def test_slurm_master_port_is_derived_and_bounded():
    ports = {slurm_master_port(j, s) for j in range(0, 5000, 7) for s in range(3)}
    assert all(12000 <= p < 32000 for p in ports)
    assert slurm_master_port("4242", "0") == slurm_master_port(4242, 0)
    assert slurm_master_port(4242, 0) != slurm_master_port(4242, 1)
    assert slurm_master_port(4242, "batch") == slurm_master_port(4242, 0)


@pytest.mark.parametrize("argv, kept", [
    (["--local_rank=1", "--cfg", "a.json"], ["--cfg", "a.json"]),
    (["--cfg", "a.json", "--local_rank", "3"], ["--cfg", "a.json"]),
    (["--local-rank=0", "x"], ["x"]),
    (["--local_ranks", "x"], ["--local_ranks", "x"]),
    ([], []),
])
def test_strip_local_rank_arg(argv, kept):
    assert strip_local_rank_arg(argv) == kept


# ---------------------------------------------------------------------------------------------
# Environment -> DistInfo

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}
DEEPSPEED = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
             "CROSS_SIZE": "2", "MASTER_ADDR": "h1", "MASTER_PORT": "29500"}
HYDRA = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
         "HYDI_CONTROL_FD": "7", "PMI_FD": "9"}
OMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
SLURM_STEP = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
              "SLURM_TASKS_PER_NODE": "4,2(x2)", "SLURM_JOB_NODELIST": "node[01-03]", "SLURM_JOB_ID": "4242",
              "SLURM_STEP_ID": "0"}
SLURM_BATCH = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "4242",
               "SLURM_JOB_NODELIST": "node[01-03]", "SLURM_TASKS_PER_NODE": "4,2(x2)"}


@pytest.mark.parametrize("env, launcher", [
    ({}, "single"),
    (TORCHRUN, "torchrun"),
    (DEEPSPEED, "deepspeed"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "env"),
    (HYDRA, "mpi"),
    (OMPI, "mpi"),
    (SLURM_STEP, "slurm"),
    (SLURM_BATCH, "single"),  # a batch script is one process whatever SLURM_NTASKS says
    ({**SLURM_STEP, **TORCHRUN}, "torchrun"),  # torchrun inside an srun step
    ({**SLURM_STEP, **HYDRA}, "mpi"),  # mpirun inside an allocation starts ranks via srun
    ({**SLURM_STEP, "PMI_RANK": "5", "PMI_SIZE": "8"}, "slurm"),  # srun --mpi=pmi2
])
def test_detect_launcher(env, launcher):
    assert detect_launcher(env) == launcher


def test_discover_torchrun_and_deepspeed():
    for env, name in ((TORCHRUN, "torchrun"), (DEEPSPEED, "deepspeed")):
        assert discover(env) == zd.DistInfo(3, 4, 1, 2, name, "h1", 29500)


def test_discover_slurm_step():
    info = discover(SLURM_STEP)
    # node 1 of node[01-03] runs 2 tasks; rank 0 lives on the first host.
    assert info == zd.DistInfo(5, 8, 1, 2, "slurm", "node01", slurm_master_port(4242, 0))
    info = discover({**SLURM_STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 1234)


def test_discover_slurm_prefers_step_variables():
    # `srun -n2` inside a 4-task allocation: the step, not the job, is the world.
    env = {**SLURM_STEP, "SLURM_PROCID": "1", "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "node03", "SLURM_STEP_ID": "2"}
    assert discover(env) == zd.DistInfo(1, 2, 1, 2, "slurm", "node03", slurm_master_port(4242, 2))


def test_discover_slurm_ntasks_per_node_fallback():
    env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_TASKS_PER_NODE"}
    assert discover({**env, "SLURM_NTASKS_PER_NODE": "4"}).local_world_size == 4


def test_discover_mpi_from_env_only(monkeypatch):
    # Everything in the environment: mpi4py must not be touched.
    def no_mpi():
        raise AssertionError("mpi4py used although the environment had everything")

    monkeypatch.setattr(zd, "_mpi_comm_world", no_mpi)
    rdv = {"MASTER_ADDR": "h0", "MASTER_PORT": "2222"}
    assert discover({**OMPI, **rdv}) == zd.DistInfo(5, 8, 1, 4, "mpi", "h0", 2222)
    assert discover({**HYDRA, **rdv}) == zd.DistInfo(1, 2, 1, 2, "mpi", "h0", 2222)


def test_discover_mpi_fills_gaps_with_mpi4py(monkeypatch):
    class FakeComm:  # rank 1 of 2, one per node; rank 0 "broadcasts" its address
        def Get_rank(self):
            return 1

        def Get_size(self):
            return 2

        def Split_type(self, _kind):
            return FakeNode()

        def bcast(self, obj, root):
            assert obj is None and root == 0
            return ("rank0-host", 4321)

    class FakeNode:
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1

        def Free(self):
            pass

    class FakeMPI:
        COMM_TYPE_SHARED = 1

    monkeypatch.setattr(zd, "_mpi_comm_world", FakeComm)
    monkeypatch.setattr(zd, "_mpi", FakeMPI)
    assert discover({"PMI_RANK": "1", "PMI_SIZE": "2"}) == zd.DistInfo(1, 2, 0, 1, "mpi", "rank0-host", 4321)


def test_single_process_no_group_unless_asked(monkeypatch):
    for k in list(os.environ):
        if k.startswith(zd.LAUNCH_ENV_PREFIXES):
            monkeypatch.delenv(k)
    for k in zd.LAUNCH_ENV_NAMES:  # set-then-delete: monkeypatch then also undoes what the group exports
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    assert not dist.is_initialized()
    info = init_distributed()
    assert (info.rank, info.world_size, info.launcher, info.backend) == (0, 1, "single", None)
    assert not dist.is_initialized()
    try:
        info = init_distributed(force_group=True, timeout_s=30)
        assert info.backend == "gloo" and dist.get_world_size() == 1
        # DeepSpeed asserts LOCAL_RANK is set even for one process.
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
        t = torch.tensor([2.0])
        dist.all_reduce(t)
        assert t.item() == 2.0
        assert init_distributed().backend == "gloo"  # idempotent once a group exists
    finally:
        zd.destroy_distributed()
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------------
# Real launches (two ranks, gloo)


def _rank_lines(stdout: str) -> list[dict]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"rank"')]
    return sorted(rows, key=lambda r: r["rank"])


def _check_allreduce(stdout: str, launcher: str, world: int = 2) -> list[dict]:
    rows = _rank_lines(stdout)
    assert [r["rank"] for r in rows] == list(range(world)), stdout
    for r in rows:
        assert r["world_size"] == world and r["launcher"] == launcher and r["backend"] == "gloo"
        assert r["sum"] == world * (world + 1) / 2
        assert r["local_world_size"] == world  # one node
    assert sorted(r["local_rank"] for r in rows) == list(range(world))
    return rows


@pytest.mark.multiproc
def test_torchrun_allreduce():
    port = free_port()
    r = run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                       "--master_port", str(port), ALLREDUCE], timeout=90)
    rows = _check_allreduce(r.stdout, "torchrun")
    assert all(row["master_port"] == port for row in rows)


@pytest.mark.multiproc
def test_deepspeed_launcher_allreduce():
    port = free_port()
    r = run_multiproc([VENV_BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(port), ALLREDUCE,
                       "--cfg", "x.json"], timeout=90)
    rows = _check_allreduce(r.stdout, "deepspeed")
    assert all(row["args"] == ["--cfg", "x.json"] for row in rows)  # --local_rank=N stripped


@pytest.mark.multiproc
def test_mpirun_allreduce():
    # No MASTER_* given: rank 0 picks the rendezvous and broadcasts it over MPI.
    r = run_multiproc([VENV_BIN / "mpirun", "-n", "2", PYTHON, ALLREDUCE], timeout=90)
    rows = _check_allreduce(r.stdout, "mpi")
    assert len({(row["master_addr"], row["master_port"]) for row in rows}) == 1


@pytest.mark.multiproc
def test_srun_allreduce(slurm_cluster):
    port = free_port()
    r = run_multiproc(["srun", "-N1", "-n2", "--kill-on-bad-exit=1", PYTHON, ALLREDUCE],
                      env={**slurm_cluster, "MASTER_PORT": str(port)}, timeout=90)
    rows = _check_allreduce(r.stdout, "slurm")
    assert all(row["master_addr"] == socket.gethostname().split(".")[0] for row in rows)
    assert all(row["master_port"] == port for row in rows)


@pytest.mark.multiproc
def test_sbatch_script_with_srun_step(slurm_cluster, tmp_path):
    """The production path: a batch script is one process (no group), and the srun step inside it
    needs no MASTER_* at all (host from the node list, port from the job and step ids)."""
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
{PYTHON} -c 'from zo_scale.distributed import discover; print("BATCH", discover().launcher, discover().world_size)'
srun -n2 --kill-on-bad-exit=1 {PYTHON} {ALLREDUCE}
echo "IDS $SLURM_JOB_ID"
""")
    out = tmp_path / "job.out"
    _, state = sbatch_and_wait(["-n2", "-o", out, script], env=slurm_cluster, timeout=90)
    text = out.read_text()
    assert state == "COMPLETED", text
    assert "BATCH single 1" in text, text
    rows = _check_allreduce(text, "slurm")
    job_id = int(text.split("IDS ")[1].split()[0])
    assert all(row["master_port"] == slurm_master_port(job_id, 0) for row in rows), text


def test_expand_nodelist_matches_scontrol(slurm_cluster):
    # (Slurm 22.05 rejects a suffix after brackets, "gpu[1-2]-ib"; we accept it, so it is left out here.)
    nodelist = "node[01-03,07],login1,n[8-10],r[1-2]n[003-004]"
    r = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=slurm_cluster, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert expand_nodelist(nodelist) == r.stdout.split()


@pytest.mark.multiproc
@pytest.mark.parametrize("mode, timeout_s", [("exit", 20), ("hang", 5)])
def test_dead_peer_fails_fast(mode, timeout_s):
    """Rank 1 leaves (or stops answering) before the all-reduce: rank 0 must raise, not hang."""
    env = launch_env({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    procs = [subprocess.Popen([PYTHON, DEAD_PEER, mode, str(timeout_s)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for r in (0, 1)]
    t0 = time.monotonic()
    try:
        out, _ = procs[0].communicate(timeout=60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail(f"rank 0 still running 60 s after start ({mode})")
    finally:
        for p in procs[1:]:
            p.kill()
            p.communicate()
    elapsed = time.monotonic() - t0
    assert procs[0].returncode == 3 and "RAISED" in out, out
    assert elapsed < timeout_s + 30, (elapsed, out)


@pytest.mark.multiproc
def test_missing_peer_rendezvous_times_out():
    """Rank 1 never starts: rank 0's rendezvous must give up after timeout_s, not wait forever."""
    env = launch_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    t0 = time.monotonic()
    r = subprocess.run([PYTHON, DEAD_PEER, "exit", "5"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Timed out" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t0 < 35



@pytest.mark.multiproc
def test_teardown_frees_every_group():
    """Issue #15: a group that outlives destroy_distributed keeps gloo's threads running into interpreter
    shutdown, where one can abort a finished run. FSDP imported after the group exists used to keep it."""
    r = run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                       "--master_port", str(free_port()), TEARDOWN, "fsdp"], env={"DS_ACCELERATOR": "cpu"}, timeout=180)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"rank"')]
    assert len(rows) == 2, r.stdout + r.stderr
    for row in rows:
        assert "pt_gloo_runloop" in row["before"] and row["after"] == [], row


@pytest.mark.multiproc
def test_failing_rank_exits_with_its_own_code():
    """A rank whose body raises ends with exit_on_error's code and traceback, not SIGABRT at teardown."""
    env = launch_env({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    procs = [subprocess.Popen([PYTHON, TEARDOWN, "raise"], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 5 and f"rank {rank} fails on purpose" in out, out
        assert "terminate called" not in out, out

def test_run_multiproc_kills_whole_tree_on_timeout(tmp_path):
    pidfile = tmp_path / "child.pid"
    with pytest.raises(pytest.fail.Exception, match="timed out after 1"):
        run_multiproc(["bash", "-c", f"sleep 60 & echo $! > {pidfile}; echo started; wait"], timeout=1)
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]


def test_run_multiproc_reports_both_streams_on_failure():
    with pytest.raises(pytest.fail.Exception) as e:
        run_multiproc(["bash", "-c", "echo to-out; echo to-err >&2; exit 7"], timeout=30)
    assert "exit code 7" in str(e.value) and "to-out" in str(e.value) and "to-err" in str(e.value)
    r = run_multiproc(["bash", "-c", "exit 3"], check=False)
    assert r.returncode == 3
