"""Step time with sequential against batched probes (``batched_probes=True``), on CPU.

    python bench/probes_bench.py                                   # one process (no gathers)
    torchrun --nproc_per_node 2 bench/probes_bench.py --backend fsdp2   # FSDP2 over gloo, one machine

A random-init OPT shape (fp32, batch × seq tokens per rank), each optimizer's ``opt.step`` timed with
both probe modes (median of ``--repeats`` after one warm-up step). Rank 0 prints one row per optimizer:
forwards per step, gathered bytes per step (FSDP2: the all-gathers the step issues), and the two times,
as wall time and as this process's CPU time (steadier on a machine other jobs share).

What it can and cannot show: on one machine gloo moves the "gathered" bytes through shared memory, so a
gather costs little next to the CPU matmuls and most of the batched path's gain on a cluster (one gather
per step instead of one per forward; see ``zo_scale.plan_time``) is hidden here. What remains visible is
the cost side: the batched path builds each module's perturbed weights per group from the whole gathered
tensor on every rank (a z over the full parameter, not only the shard).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zo_scale import FZOO, HELENE, HELENEFZOO, HELENEMuon, HiZOO, HiZOOL, MeZO, ZOMuon, probes  # noqa: E402
from zo_scale.memtrace import build_model  # noqa: E402
from zo_scale.plan import ModelShape  # noqa: E402

SHAPE = ModelShape("bench", "opt", hidden=256, layers=4, heads=4, ffn=1024, vocab=4000, max_positions=128)
OPTIMIZERS = {"mezo": (MeZO, {}), "helene": (HELENE, {}), "hizoo": (HiZOO, {}), "hizoo-l": (HiZOOL, {}),
              "fzoo": (FZOO, {"n_directions": 8}), "helene-fzoo": (HELENEFZOO, {"n_directions": 8}),
              "zo-muon": (ZOMuon, {"n_directions": 4}),
              "helene-muon": (HELENEMuon, {"n_directions": 4})}


def closure_for(model, ids):
    def closure(groups=None):
        rows = probes.replicate(ids, groups or 1)
        logits = model(input_ids=rows, use_cache=False).logits[:, :-1].float()
        per_token = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
        sums = probes.group_sums(per_token.double(), groups or 1)
        return (sums, ids[:, 1:].numel()) if groups else (sums[0], ids[:, 1:].numel())

    return closure


class GatherBytes:
    """Bytes of the all-gathers' outputs issued while active (every ProcessGroup all-gather method, so
    whatever Python API FSDP2 calls them through)."""

    METHODS = ("_allgather_base", "allgather_into_tensor_coalesced", "all_gather_single", "allgather")

    def __init__(self):
        from torch._C._distributed_c10d import ProcessGroup

        self.total, self.active = 0, False
        for name in self.METHODS:
            if hasattr(ProcessGroup, name):
                setattr(ProcessGroup, name, self._wrap(getattr(ProcessGroup, name)))

    def _wrap(self, orig):
        def method(pg, out, *args, **kwargs):
            if self.active:
                self.total += sum(t.numel() * t.element_size() for t in _tensors(out))
            return orig(pg, out, *args, **kwargs)

        return method


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for o in obj for t in _tensors(o)] if isinstance(obj, (list, tuple)) else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="plain", choices=["plain", "fsdp2"])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank, world, counter = 0, 1, None
    if args.backend == "fsdp2":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        counter = GatherBytes()
    ids = torch.randint(0, SHAPE.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(rank))
    rows = []
    for name in args.optimizers:
        cls, kw = OPTIMIZERS[name]
        if name == "hizoo" and args.backend != "plain":
            rows.append((name, None))  # HiZOO's batched probes need whole parameters (refused on shards)
            continue
        times, gathered = {}, {}
        for batched in (False, True):
            torch.manual_seed(0)
            model = build_model(SHAPE, torch.float32, torch.device("cpu"))
            if args.backend == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                for layer in model.model.decoder.layers:
                    fully_shard(layer)
                fully_shard(model)
            opt = cls(model, lr=1e-6, eps=1e-3, seed=1, batched_probes=batched, **kw)
            closure = closure_for(model, ids)
            opt.step(closure)  # warm-up
            samples = []
            for _ in range(args.repeats):
                if counter:
                    counter.total, counter.active = 0, True
                t0, c0 = time.perf_counter(), time.process_time()
                opt.step(closure)
                samples.append((time.perf_counter() - t0, time.process_time() - c0))
                if counter:
                    counter.active = False
            times[batched] = tuple(statistics.median(s[i] for s in samples) for i in (0, 1))
            gathered[batched] = counter.total if counter else 0
            forwards = opt.forward_passes // opt.step_count
        rows.append((name, (forwards, gathered, times)))
    if rank == 0:
        params = SHAPE.param_count()
        print(f"{SHAPE.name}: {params / 1e6:.1f}M params fp32, {args.backend} x{world}, batch {args.batch} x "
              f"seq {args.seq} per rank, {torch.get_num_threads()} thread(s)")
        print("| optimizer | forwards/step | gathered/step (x params) seq / batched | wall s seq / batched | "
              "CPU s seq / batched | batched / sequential (CPU) |")
        print("|---|---|---|---|---|---|")
        for name, r in rows:
            if r is None:
                print(f"| {name} | | | | refused on shards | |")
                continue
            forwards, gathered, times = r
            g = " / ".join(f"{gathered[b] / (4 * params):.2f}" for b in (False, True)) if counter else "-"
            (ws, cs), (wb, cb) = times[False], times[True]
            print(f"| {name} | {forwards} | {g} | {ws:.3f} / {wb:.3f} | {cs:.3f} / {cb:.3f} | {cb / cs:.2f} |")
    if args.backend == "fsdp2":
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
