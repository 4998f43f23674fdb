"""Two ranks (RANK/WORLD_SIZE set by the test); rank 1 misbehaves before the all-reduce.

mode "exit": rank 1 leaves without a word; mode "hang": rank 1 sleeps past the timeout.
Rank 0 must see its all-reduce raise; it prints how long that took and exits 3 at once
(os._exit: a gloo group torn down with a timed-out op aborts the interpreter at shutdown).
"""

import os
import sys
import time

import torch
import torch.distributed as dist

from zo_scale.distributed import destroy_distributed, init_distributed

mode, timeout_s = sys.argv[1], float(sys.argv[2])
info = init_distributed(timeout_s=timeout_s)
if info.rank == 1:
    if mode == "hang":
        time.sleep(10 * timeout_s)
    destroy_distributed()  # leaving is the point, but not with gloo's threads running into shutdown
    sys.exit(0)

time.sleep(0.5)  # let rank 1 be gone (or asleep) first
t0 = time.monotonic()
try:
    dist.all_reduce(torch.ones(4))
except Exception as e:  # the point: an error, not a hang
    print(f"RAISED after {time.monotonic() - t0:.1f} s: {type(e).__name__}: {str(e)[:200]}", flush=True)
    os._exit(3)
print("all_reduce returned", flush=True)
destroy_distributed()
