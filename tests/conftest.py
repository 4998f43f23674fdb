"""Shared test fixtures: free ports, a bounded multi-process runner, and a real one-node Slurm.

Markers ``multiproc`` and ``slow`` are declared in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from zo_scale.distributed import LAUNCH_ENV_NAMES, LAUNCH_ENV_PREFIXES

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "tests" / "helpers"
PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent

# The venv's tools first, in this process too: torch JIT extensions (DeepSpeed's CPU shm op) are
# built with whichever `ninja` is on PATH, and the venv's ninja 1.13 and a system ninja 1.11 disagree
# on the build log's command hashes, so mixing them rebuilds the op (~30 s) on every switch.
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton
# is first imported (transformers imports it early); set here, the kernel tests run in-process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it, so parallel runs do not clash)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(extra: dict | None = None) -> dict:
    """os.environ without any launcher variables (an outer srun/torchrun/mpirun must not leak into
    the processes a test starts), one thread per process (2 cores, 2+ ranks), and ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not (k in LAUNCH_ENV_NAMES or k.startswith(LAUNCH_ENV_PREFIXES))}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def run_multiproc(cmd: list[str], env: dict | None = None, timeout: float = 120, cwd: str | Path = REPO,
                  check: bool = True) -> subprocess.CompletedProcess:
    """Run a launcher command (torchrun, deepspeed, mpirun, srun ...) with a hard wall-clock limit.

    ``env`` is merged over a cleaned os.environ (see :func:`launch_env`). The command gets its own
    process group, so on timeout every process it spawned is killed, not just the launcher. The test
    fails with both output streams on timeout, and on a non-zero exit when ``check``.
    """
    full_env = launch_env(env)
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a process that left our group still holds the pipes
            out, err = "(output lost)", "(output lost)"
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n"
                    f"--- stdout ---\n{out}\n--- stderr ---\n{err}", pytrace=False)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        pytest.fail(f"exit code {proc.returncode}: {' '.join(map(str, cmd))}\n"
                    f"--- stdout ---\n{out}\n--- stderr ---\n{err}", pytrace=False)
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def port() -> int:
    return free_port()


# ---------------------------------------------------------------------------------------------
# A real one-node Slurm (see .ci/slurm.sh), started once per session.

SLURM_SH = REPO / ".ci" / "slurm.sh"
_SLURM_BINARIES = ("slurmctld", "slurmd", "srun", "sinfo", "munged")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start a private Slurm cluster (own munged, free ports, conf in a temp dir) and yield an env
    dict for subprocesses: the cleaned environment plus SLURM_CONF. Daemons stop at session end.

    Skips only where it cannot work here: not root, or packages missing and apt-get unable to
    install them. Any other failure to start fails the tests that use it.
    """
    if os.geteuid() != 0:
        pytest.skip("slurm_cluster needs root (slurmd launches tasks; packages come from apt)")
    if not all(shutil.which(b) for b in _SLURM_BINARIES):
        if not shutil.which("apt-get"):
            pytest.skip("slurm packages missing and apt-get unavailable")
        r = subprocess.run(["bash", str(SLURM_SH), "install"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.skip(f"apt-get could not install slurm packages:\n{r.stderr[-2000:]}")

    # Short path: munged's socket path must stay under the 108-byte unix socket limit.
    cluster_dir = tempfile.mkdtemp(prefix="zo_slurm_")
    r = subprocess.run(["bash", str(SLURM_SH), "start", cluster_dir], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        subprocess.run(["bash", str(SLURM_SH), "stop", cluster_dir], capture_output=True, timeout=60)
        pytest.fail(f"could not start slurm:\n{r.stdout}\n{r.stderr}", pytrace=False)
    conf = r.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    try:
        yield launch_env({"SLURM_CONF": conf})
    finally:
        subprocess.run(["bash", str(SLURM_SH), "stop", cluster_dir], capture_output=True, timeout=60)
        shutil.rmtree(cluster_dir, ignore_errors=True)


_SLURM_DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE")


def sbatch_and_wait(args: list[str], env: dict, timeout: float = 120) -> tuple[int, str]:
    """Submit with ``sbatch args...`` and poll until the job ends; returns (job id, final state).

    Polls every 0.2 s instead of ``sbatch --wait``, whose back-off adds up to ~8 s per job. On
    timeout the job is cancelled and the test fails.
    """
    r = run_multiproc(["sbatch", "--parsable", *map(str, args)], env=env, timeout=30)
    job_id = int(r.stdout.strip().split(";")[0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=env, capture_output=True,
                           text=True, timeout=30)
        state = next((f.split("=", 1)[1] for f in q.stdout.split() if f.startswith("JobState=")), "")
        if state in _SLURM_DONE:
            return job_id, state
        time.sleep(0.2)
    subprocess.run(["scancel", str(job_id)], env=env, capture_output=True, timeout=30)
    pytest.fail(f"slurm job {job_id} not finished after {timeout} s", pytrace=False)


# Offline tokenizers (deterministic byte-level BPE on the bundled text) shared by the task tests.
@pytest.fixture(scope="module")
def tokenizer():
    from zo_scale.data.tokenizer_tools import build_offline_tokenizer

    return build_offline_tokenizer()


@pytest.fixture(scope="module")
def mlm_tokenizer():
    from zo_scale.data.tokenizer_tools import build_offline_tokenizer

    return build_offline_tokenizer(style="mlm")


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny models on a shared CPU: extra intra-op threads only add contention (10x slower under load).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
