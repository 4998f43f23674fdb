"""What keeping DeepSpeed's fp32 partitions in step with the ZO updates costs (zo_scale/backends/zero3.py).

A ZeRO-3 engine with an optimizer section, so DeepSpeed keeps fp32 master partitions; after each
ZO update the backend copies the updated values into them (``sync_engine_master``). This times
``opt.step`` with the copy and with it switched off (alternating, median of --repeats each), and
the copy alone.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/zero3_sync_bench.py [--bf16]

(On a CPU-only machine where DeepSpeed would JIT-build its ops at start, launch it through
``tests/dist_scripts/run_recipe.py bench/zero3_sync_bench.py`` as the tests do.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    import deepspeed
    from transformers import AutoModelForCausalLM, OPTConfig

    from zo_scale.optim import MeZO

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    h = args.hidden
    model = AutoModelForCausalLM.from_config(OPTConfig(
        vocab_size=1024, hidden_size=h, word_embed_proj_dim=h, num_hidden_layers=args.layers,
        num_attention_heads=max(1, h // 64), ffn_dim=4 * h, max_position_embeddings=64))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    if args.bf16:
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    opt = MeZO(engine, lr=1e-5, eps=1e-3, seed=0)
    backend = opt.backend
    ids = torch.randint(2, 1024, (2, 32), generator=torch.Generator().manual_seed(rank)).to(engine.device)

    def closure():
        return engine(input_ids=ids, labels=ids).loss.float()

    slices, sync = backend._fp32_slices, backend.sync_engine_master

    def timed(fn) -> float:
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t

    def step_without_sync():
        backend._fp32_slices = None  # sync_engine_master is a no-op without them
        try:
            opt.step(closure)
        finally:
            backend._fp32_slices = slices

    for _ in range(2):  # warm-up
        opt.step(closure)
    with_sync, without, copy = [], [], []
    for _ in range(args.repeats):
        with_sync.append(timed(lambda: opt.step(closure)))
        without.append(timed(step_without_sync))
        copy.append(timed(sync))
    local = sum(v.numel for v in opt.views)
    synced = sum(t.numel() for t in slices.values())
    if rank == 0:
        ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
        print(f"world {world}, {sum(p.ds_numel for p in engine.module.parameters())} parameters, "
              f"{local} local elements, {synced} synced, weights {'bf16' if args.bf16 else 'fp32'}")
        print(f"step with sync    {ms(with_sync):8.2f} ms (median of {args.repeats})")
        print(f"step without sync {ms(without):8.2f} ms")
        print(f"sync alone        {ms(copy):8.3f} ms  = {100 * ms(copy) / ms(without):.2f} % of a step")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
