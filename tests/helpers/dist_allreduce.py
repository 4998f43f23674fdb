"""Run under any launcher: join the group, all-reduce each rank's (rank + 1), print one JSON line.

Extra args (e.g. the --local_rank=N the deepspeed launcher appends) are echoed after stripping,
so a test can check that only the launcher's argument was removed.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from zo_scale.distributed import exit_on_error, process_group, strip_local_rank_arg

args = strip_local_rank_arg(sys.argv[1:])
with process_group(timeout_s=60) as info, exit_on_error():
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t)
    line = json.dumps({
        "rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
        "local_world_size": info.local_world_size, "launcher": info.launcher, "backend": info.backend,
        "master_addr": info.master_addr, "master_port": info.master_port, "sum": t.item(), "args": args,
    })
    # One write per line: ranks share the launcher's pipe and print() may split text and newline.
    os.write(1, (line + "\n").encode())
