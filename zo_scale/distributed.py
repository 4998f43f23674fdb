"""Find out how this process was launched and join the process group.

One entry point, :func:`init_distributed`, for every way a run is started:

- ``torchrun`` and the ``deepspeed`` launcher: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and
  ``MASTER_ADDR``/``MASTER_PORT`` are already in the environment (deepspeed also appends
  ``--local_rank=N`` to argv: drop it with :func:`strip_local_rank_arg`);
- Slurm ``srun``: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; rank 0 runs on the first host
  of the step's node list and the port is derived from the job id, so no extra setup is needed;
- ``mpirun``/``mpiexec``: Open MPI or MPICH/Intel MPI variables, with mpi4py filling whatever the
  environment lacks (local ranks, and the rendezvous address, which rank 0 broadcasts);
- plain ``python``: one process and, unless asked for, no process group at all.

Discovery (:func:`discover`) is a pure function of the environment apart from the mpi4py fallback,
so every mapping is unit-testable without launching anything.
"""

from __future__ import annotations

import atexit
import gc
import os
import re
import socket
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from itertools import product
from typing import Mapping, Sequence

import torch
import torch.distributed as dist

# Long enough for a slow first forward of a big sharded model, short enough that a stuck peer
# ends the job instead of burning an allocation. Override per call or with ZO_DIST_TIMEOUT_S.
DEFAULT_TIMEOUT_S = float(os.environ.get("ZO_DIST_TIMEOUT_S", 600))

# Variables that describe a launch; multi-process tests strip them so an outer launcher
# (e.g. pytest itself running inside an srun step) cannot leak into the processes they start.
LAUNCH_ENV_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_", "HYDI_")
LAUNCH_ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK",
                    "CROSS_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # torchrun | deepspeed | env | slurm | mpi | single
    master_addr: str | None = None
    master_port: int | None = None
    backend: str | None = None  # set once a process group exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Slurm helpers


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist (``node[01-03,07],gpu[1-2]-ib``) into host names, in order.

    Zero padding follows the width of each range's lower bound, as in Slurm; several bracket
    groups in one name expand as a product (``r[1-2]n[1-2]`` gives four hosts).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        # Alternate literal text and bracket bodies: "a[1-2]b[3]" -> ["a", "1-2", "b", "3", ""].
        parts = re.split(r"\[([^\]]*)\]", item)
        if any("[" in p or "]" in p for p in parts[::2]):
            raise ValueError(f"unbalanced brackets in node list {nodelist!r}")
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, nodelist) for i, p in enumerate(parts)]
        hosts.extend("".join(combo) for combo in product(*choices))
    return hosts


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in node list {s!r}")
        elif ch == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced brackets in node list {s!r}")
    items.append(s[start:])
    return [it.strip() for it in items if it.strip()]


def _expand_ranges(body: str, whole: str) -> list[str]:
    out = []
    for part in body.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"bad range {part!r} in node list {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in node list {whole!r}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's compressed per-node task counts: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def slurm_master_port(job_id: int | str, step_id: int | str = 0) -> int:
    """A rendezvous port every task of a step derives alike: in [12000, 32000), below Linux's
    ephemeral range; the step id keeps concurrent steps of one job apart."""
    step = int(step_id) if str(step_id).isdigit() else 0
    return 12000 + (int(job_id) % 1250) * 16 + step % 16


# ---------------------------------------------------------------------------------------------
# Discovery


def strip_local_rank_arg(argv: Sequence[str]) -> list[str]:
    """``argv`` without the ``--local_rank=N`` / ``--local-rank N`` the deepspeed launcher appends
    (``LOCAL_RANK`` in the environment carries the same value)."""
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip_next = True
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(arg)
    return out


def detect_launcher(env: Mapping[str, str] | None = None) -> str:
    """Which launcher started this process. Explicit torch variables win (torchrun inside an srun
    step is still torchrun), then MPI (mpirun inside an allocation), then an srun step."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env:
            return "torchrun"
        if "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            return "deepspeed"
        return "env"
    # Variables only an mpirun sets (Open MPI; MPICH hydra / Intel MPI). Under Slurm such an mpirun
    # starts its ranks through srun, so they must win over the SLURM_* of that step.
    if "OMPI_COMM_WORLD_SIZE" in env or "MPI_LOCALNRANKS" in env or "HYDI_CONTROL_FD" in env:
        return "mpi"
    # A batch script has SLURM_PROCID=0 and SLURM_NTASKS=N but is one process; only a task of an
    # srun step carries a numeric SLURM_STEP_ID. (srun --mpi=pmi2/pmix adds PMI_*/PMIX_* too.)
    if "SLURM_PROCID" in env and env.get("SLURM_STEP_ID", "").isdigit():
        return "slurm"
    if ("PMI_SIZE" in env and "PMI_RANK" in env) or "PMIX_RANK" in env:
        return "mpi"
    return "single"


def discover(env: Mapping[str, str] | None = None, launcher: str | None = None) -> DistInfo:
    """Rank, world and rendezvous address for this process, from the environment (and mpi4py for
    MPI launches that leave something out). ``launcher`` forces a mapping instead of detecting."""
    env = os.environ if env is None else env
    launcher = launcher or detect_launcher(env)
    if launcher in ("torchrun", "deepspeed", "env"):
        return _from_torch_env(env, launcher)
    if launcher == "slurm":
        return _from_slurm_env(env)
    if launcher == "mpi":
        return _from_mpi(env)
    if launcher == "single":
        return DistInfo(0, 1, 0, 1, "single", env.get("MASTER_ADDR"), _int_or_none(env.get("MASTER_PORT")))
    raise ValueError(f"unknown launcher {launcher!r}")


def _int_or_none(v: str | None) -> int | None:
    return int(v) if v not in (None, "") else None


def _from_torch_env(env: Mapping[str, str], launcher: str) -> DistInfo:
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", rank))
    # torchrun says LOCAL_WORLD_SIZE, deepspeed LOCAL_SIZE; without either assume one node.
    local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
    return DistInfo(rank, world, local_rank, local_world, launcher,
                    env.get("MASTER_ADDR"), _int_or_none(env.get("MASTER_PORT")))


def _from_slurm_env(env: Mapping[str, str]) -> DistInfo:
    rank = int(env["SLURM_PROCID"])
    # Step variables describe this srun; the job ones the whole allocation (which may be larger).
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env["SLURM_NPROCS"])
    local_rank = int(env.get("SLURM_LOCALID", 0))
    node_id = int(env.get("SLURM_NODEID", 0))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = parse_tasks_per_node(per_node)
        local_world = counts[node_id] if node_id < len(counts) else counts[-1]
    elif env.get("SLURM_NTASKS_PER_NODE"):
        local_world = int(env["SLURM_NTASKS_PER_NODE"])
    else:
        local_world = world
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1"
    port = _int_or_none(env.get("MASTER_PORT"))
    if port is None:
        port = slurm_master_port(env.get("SLURM_JOB_ID", "0"), env.get("SLURM_STEP_ID", "0"))
    return DistInfo(rank, world, local_rank, local_world, "slurm", addr, port)


def _from_mpi(env: Mapping[str, str]) -> DistInfo:
    rank = world = local_rank = local_world = None
    for r, w, lr, lw in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH hydra, Intel MPI
    ):
        if r in env and w in env:
            rank, world = int(env[r]), int(env[w])
            local_rank, local_world = _int_or_none(env.get(lr)), _int_or_none(env.get(lw))
            break
    addr, port = env.get("MASTER_ADDR"), _int_or_none(env.get("MASTER_PORT"))
    need_mpi = rank is None or local_rank is None or local_world is None
    need_rendezvous = (world is None or world > 1) and (not addr or port is None)
    if need_mpi or need_rendezvous:
        comm = _mpi_comm_world()
        rank, world = comm.Get_rank(), comm.Get_size()
        if local_rank is None or local_world is None:
            node = comm.Split_type(_mpi().COMM_TYPE_SHARED)
            local_rank, local_world = node.Get_rank(), node.Get_size()
            node.Free()
        if need_rendezvous:
            # Rank 0 picks where the process group meets and tells everyone.
            mine = (addr or socket.gethostname(), port or _free_port()) if rank == 0 else None
            addr, port = comm.bcast(mine, root=0)
    return DistInfo(rank, world, local_rank, local_world, "mpi", addr, port)


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - mpi4py is a dependency
        raise RuntimeError("launched by MPI but mpi4py is not importable") from e
    return MPI


def _mpi_comm_world():
    return _mpi().COMM_WORLD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Process group


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    launcher: str | None = None,
    force_group: bool = False,
) -> DistInfo:
    """Discover the launch, export the torch variables, and join the process group.

    ``timeout_s`` bounds rendezvous and every collective: a peer that dies or stops answering
    makes the others raise instead of hanging. A single process gets no group unless
    ``force_group`` (then a 1-rank group on an in-process store, no port needed). Calling it again
    once a group exists just describes that group.
    """
    if dist.is_available() and dist.is_initialized():
        info = discover(launcher=launcher)
        return replace(info, rank=dist.get_rank(), world_size=dist.get_world_size(), backend=dist.get_backend())

    info = discover(launcher=launcher)
    backend = backend or default_backend()
    if info.world_size == 1 and not force_group:
        return info
    _export_torch_env(info)

    if backend == "nccl":
        torch.cuda.set_device(info.device)
    _import_world_default_modules()
    timeout = timedelta(seconds=timeout_s)
    if info.world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if not info.master_addr or info.master_port is None:
            raise RuntimeError(f"{info.launcher} launch with {info.world_size} ranks but no MASTER_ADDR/MASTER_PORT")
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                                timeout=timeout)
    return replace(info, backend=backend)


def _import_world_default_modules() -> None:
    """Import, while no group exists, the modules that bind ``group.WORLD`` as a default argument when
    first imported: ``torch.distributed.nn.functional`` (pulled in by FSDP, hence transformers). Imported
    after ``init_process_group`` it holds the group forever, so ``destroy_process_group`` does not free it:
    gloo's worker threads live on into interpreter shutdown, and one still releasing the last collective's
    tensors then needs the GIL and aborts the process ("terminate called without an active exception")."""
    import torch.distributed.nn  # noqa: F401


def _export_torch_env(info: DistInfo) -> None:
    """Make the discovered values visible as torchrun would, for libraries that read the
    environment themselves (DeepSpeed asserts LOCAL_RANK is set, even for one process)."""
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      LOCAL_WORLD_SIZE=str(info.local_world_size))
    if info.master_addr:
        os.environ["MASTER_ADDR"] = info.master_addr
    if info.master_port is not None:
        os.environ["MASTER_PORT"] = str(info.master_port)


def destroy_distributed() -> None:
    """Destroy every process group and free it now, while the interpreter is fully alive.

    A group still referenced after ``destroy_process_group`` keeps gloo's worker threads running into
    interpreter shutdown, where one still releasing a collective's tensors needs the GIL and aborts the
    process. Besides the caller's own objects (drop sharded models first), the holders freed here are
    DeepSpeed's group registry and DTensor's sharding cache (its meshes keep their groups). Not freed:
    a ZeRO-3 engine's parameters, which DeepSpeed itself keeps for the life of the process."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also drops DeepSpeed's references to its groups
    else:
        dist.destroy_process_group()
    _free_destroyed_groups()


def _free_destroyed_groups() -> None:
    """Drop the references to destroyed groups that outlive their users: DTensor's sharding cache (its
    meshes keep their groups) and reference cycles (engines, sharded models)."""
    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()
    gc.collect()


_exit_teardown_installed = False


def install_exit_teardown() -> None:
    """Make process groups that the user's own script starts end safely; ``import zo_scale`` calls this.

    Scripts start their group themselves (``init_process_group`` ... ``destroy_process_group()`` with
    the sharded model still alive, as pytorch/examples' FSDP2 example does), so the group outlives its
    destroy and gloo's threads run into interpreter shutdown, where one can abort the finished process
    (issue #15's cause). From here, usually before the user's ``init_process_group``:
    - ``torch.distributed.nn`` is imported while no group exists, so it cannot hold one later;
    - an atexit hook (:func:`_teardown_at_exit`) frees the groups while the interpreter is fully alive.
    Not covered: a group still referenced by live objects at exit (a model or engine in a module-level
    variable, any DeepSpeed ZeRO-3 engine): drop them first, or end with :func:`destroy_distributed`."""
    global _exit_teardown_installed
    if _exit_teardown_installed or not dist.is_available():
        return
    _exit_teardown_installed = True
    if not dist.is_initialized():
        _import_world_default_modules()
    atexit.register(_teardown_at_exit)


def _teardown_at_exit() -> None:
    """atexit: destroy a group the script left alive, and free every destroyed group whose last holders
    are caches or garbage, so their threads are joined before interpreter shutdown begins. atexit runs
    last-registered first: registered at ``import zo_scale``, this runs after the hooks of whatever the
    script imported later, and before torch's own."""
    if dist.is_initialized():
        destroy_distributed()
    else:
        _free_destroyed_groups()


@contextmanager
def process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                  launcher: str | None = None, force_group: bool = False):
    """:func:`init_distributed` for the block, :func:`destroy_distributed` however it ends."""
    info = init_distributed(backend, timeout_s, launcher=launcher, force_group=force_group)
    try:
        yield info
    finally:
        destroy_distributed()


@contextmanager
def exit_on_error(code: int = 1):
    """Run a rank's main body so that an exception prints its traceback and ends the process at
    once: the failing rank's sockets close and its peers' collectives error out, instead of this
    rank lingering in interpreter shutdown (NCCL/DeepSpeed atexit hooks) while they wait. Its group
    is left as it is: no teardown runs, so no library thread can outlive one and abort the process."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException:
        rank = os.environ.get("RANK", "?")
        sys.stderr.write(f"[rank {rank}] fatal error:\n{traceback.format_exc()}")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)
