"""One rank (under torchrun) that leaves its process group the way issue #15 needs; prints one JSON line.

mode "fsdp": the group is created, then FSDP2 is imported and a sharded model takes a MeZO step (what
    launch/train.py does); after destroy_distributed, no gloo or TCPStore thread may be left running.
mode "raise": the body raises after a collective, inside exit_on_error: the rank must end with its own
    exit code and traceback, not SIGABRT.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist_scripts"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from zo_scale.distributed import exit_on_error, process_group  # noqa: E402

GROUP_THREADS = ("pt_gloo", "gloo_", "pt_tcpstore")  # gloo workers and transport loop, TCPStore daemon


def group_threads() -> list[str]:
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if n.startswith(GROUP_THREADS))


def fsdp_step(rank: int, world: int) -> None:
    import common  # imports transformers, and FSDP only once the group exists

    model = common.wrap_fsdp2(common.build_model("llama"))
    common.make_optimizer("MeZO", model).step(common.make_closure(model, rank, world))


mode = sys.argv[1]
with process_group("gloo", timeout_s=60) as info, exit_on_error(code=5):
    dist.all_reduce(torch.ones(4))
    before = group_threads()
    if mode == "raise":
        raise RuntimeError(f"rank {info.rank} fails on purpose")
    fsdp_step(info.rank, info.world_size)
    dist.barrier()
os.write(1, (json.dumps({"rank": info.rank, "before": before, "after": group_threads()}) + "\n").encode())
