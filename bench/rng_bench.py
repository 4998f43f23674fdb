"""z generation rate on this machine: zo_scale's counter-based z against torch's own normal_.

    python bench/rng_bench.py [--n 100000000] [--threads N]

Prints seconds for n float32 normals (median of --repeats) for the C kernel (CPU path), the torch
reference (the specification, slow) on a tenth of n, and torch.Tensor.normal_ as the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zo_scale import rng


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, kernel build
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    z = rng.ZStream.make(0, rng.param_uid("bench.weight"), 1)
    out = torch.empty(args.n)
    small = args.n // 10
    rows = [
        ("zo_scale C kernel", args.n, timed(lambda: rng.normal_range(z, 0, args.n, out=out), args.repeats)),
        ("zo_scale torch reference", small, timed(lambda: rng.normal_range_reference(z, 0, small), 1)),
        ("torch normal_ (baseline)", args.n, timed(lambda: out.normal_(), args.repeats)),
    ]
    print(f"threads={args.threads}  C kernel built: {rng.has_c_kernel()}")
    print(f"{'generator':28s} {'elements':>12s} {'seconds':>9s} {'M elem/s':>9s} {'s per 100M':>10s}")
    for name, n, sec in rows:
        print(f"{name:28s} {n:12,d} {sec:9.3f} {n / sec / 1e6:9.1f} {sec * 1e8 / n:10.3f}")


if __name__ == "__main__":
    main()
