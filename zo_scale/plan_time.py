"""Seconds per ZO step on a GPU cluster, sequential against batched probes: a roofline model.

    python -m zo_scale.plan_time --config configs/opt66b.json --gpus 16
    python -m zo_scale.plan_time --model opt-13b --gpus 8 --batch 2 --markdown

Per GPU, with N parameters of ``wb`` bytes sharded over W GPUs (``gpus_per_node`` to a node), a
micro-batch of b × s tokens and a step of G probe groups (forwards), G_d of them perturbed:

* gather of the model, once per forward (sequential) or once per step (batched): every GPU receives
  N·wb·(W−1)/W bytes, N·wb·(n−1)/W from its own node over NVLink and N·wb·(W−n)/W from the other
  nodes over the inter-node fabric; the two run at once, so the slower sets the time;
* compute of one forward: the larger of 2·N·b·s + attention FLOPs at the achieved FLOP rate and one
  read of the weights from HBM (a micro-batch this small is close to memory-bound);
* the engine prefetches the next unit while computing this one, so a pass over the model costs
  max(compute, gather) plus one unit's gather that nothing hides;
* batched only: every GPU builds each perturbed group's weights from the gathered ones, over the whole
  model, not its shard: N·G_d·``build_bytes`` of HBM traffic. On CUDA a copy of the gathered module
  and ``kernels.perturb_`` on it (z made in the kernel) move 4·wb per parameter (the default); the
  chunked torch path, with z in fp32 and the sum through fp32, moves ~32 B (bf16), the default of
  ZO-Muon / HELENE-Muon, which have no fused kernel (their P·U_i products, 2r FLOPs per element on
  either path, are left out);
* the shard-local passes: sequential moves (perturb, 2 legs per move where a master is absent) and the
  restore+update, (4 + wb) and (8 + wb) + 2·state bytes per shard parameter, at HBM speed (on the torch
  path too: its z chunks, regenerated per chunk, are left out, as they are for ZO-Muon); the scalar
  all-reduce is a few microseconds and left out.

Estimates, not measurements: efficiencies are the stated fractions of peak, collectives are modelled
as bandwidth-bound rings. The default cluster is H100 SXM nodes of 8 (989 TFLOP/s dense bf16, 3.35 TB/s
HBM3, 450 GB/s NVLink per direction, 400 Gb/s = 50 GB/s InfiniBand per GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from zo_scale.plan import (
    DTYPE_ALIASES, DTYPE_BYTES, GROUPS, PROBE_SETS, STATE_TENSORS, ModelShape, PlanError, check_batched_on_shards,
    probe_groups, read_config, resolve_model,
)


@dataclass(frozen=True)
class Cluster:
    flops: float = 989e12  # dense bf16 FLOP/s per GPU
    flops_efficiency: float = 0.5
    hbm: float = 3.35e12  # B/s per GPU
    hbm_efficiency: float = 0.8
    intra: float = 450e9  # B/s per GPU within a node (NVLink, one direction)
    inter: float = 50e9  # B/s per GPU between nodes (one 400 Gb/s NIC per GPU)
    link_efficiency: float = 0.8
    gpus_per_node: int = 8


H100 = Cluster()
TORCH_BUILD_BYTES = 32  # per parameter and group: the chunked torch path (bf16)
# optimizers whose groups' weights are built by the torch path (HELENE-FZOO builds them with FZOO's kernel: only
# its update pass is the torch one)
TORCH_BUILD = ("zo-muon", "helene-muon", "hizoo-l")


@dataclass
class StepTime:
    optimizer: str
    batched: bool
    forwards: int
    gather_s: float  # one gather of the whole model
    compute_s: float  # one forward's compute
    build_s: float  # batched: forming every perturbed group's weights on this GPU
    shard_passes_s: float  # perturb moves and the restore+update on the shard
    total_s: float


def gather_seconds(params: int, wb: int, gpus: int, c: Cluster) -> float:
    if gpus == 1:
        return 0.0
    per_node = min(c.gpus_per_node, gpus)
    intra = params * wb * (per_node - 1) / gpus / (c.intra * c.link_efficiency)
    inter = params * wb * (gpus - per_node) / gpus / (c.inter * c.link_efficiency)
    return max(intra, inter)


def forward_seconds(shape: ModelShape, wb: int, tokens: int, seq: int, c: Cluster) -> float:
    n = shape.param_count()
    flops = 2 * n * tokens + 4 * tokens * seq * shape.hidden * shape.layers  # weights, then QKᵀ and AV
    return max(flops / (c.flops * c.flops_efficiency), n * wb / (c.hbm * c.hbm_efficiency))


def step_time(model, gpus: int, *, optimizer: str = "mezo", batched: bool = False, dtype: str = "bf16",
              batch: int = 1, seq: int = 256, master: bool | None = None, state_dtype: str = "fp32",
              build_bytes: float | None = None, n_directions: int | None = None, cluster: Cluster = H100) -> StepTime:
    """Seconds per step on ``gpus`` GPUs sharing the model (ZeRO-3 or FSDP2), ``batch`` × ``seq`` per GPU.
    ``n_directions``: N of FZOO, HELENE-FZOO, ZO-Muon, HELENE-Muon (None: their default, 8 or 4)."""
    shape = resolve_model(model)
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    state_dtype = DTYPE_ALIASES.get(state_dtype, state_dtype)
    if optimizer not in GROUPS:
        raise PlanError(f"unknown optimizer {optimizer!r}: expected one of {', '.join(GROUPS)}")
    if batched:
        check_batched_on_shards(optimizer, sharded=gpus > 1)
    wb, sb = DTYPE_BYTES[dtype], DTYPE_BYTES[state_dtype]
    master = dtype != "fp32" if master is None else master
    n = shape.param_count()
    shard = -(-n // gpus)
    groups = probe_groups(optimizer, n_directions)
    perturbed = groups - 1 if optimizer in PROBE_SETS else GROUPS[optimizer][1]
    units = shape.layers + 1
    gather = gather_seconds(n, wb, gpus, cluster)
    compute = forward_seconds(shape, wb, batch * seq, seq, cluster)
    hbm = cluster.hbm * cluster.hbm_efficiency
    # each per-coordinate state tensor read and written once (HELENE: m, h; HELENE-FZOO: m, on its torch path
    # as on HELENE's kernel: the bytes it must move, its regenerated z left out as in the docstring)
    update = shard * ((8 + wb) + 2 * STATE_TENSORS[optimizer] * sb) / hbm
    if batched:
        per_param = build_bytes if build_bytes is not None else TORCH_BUILD_BYTES if optimizer in TORCH_BUILD else 4 * wb
        build = n * perturbed * per_param / hbm
        moves = 0.0
        total = max(groups * compute + build, gather) + gather / units + update
    else:
        build = 0.0
        legs = perturbed + (perturbed if not master else 0)  # without a master a move is two legs
        moves = legs * shard * ((4 + wb) if master else 2 * wb) / hbm
        total = groups * (max(compute, gather) + gather / units) + moves + update
    return StepTime(optimizer, batched, groups, gather, compute, build, moves + update, total)


def table(configs: list[tuple[str, dict]], gpus_list: list[int], optimizers=tuple(GROUPS),
          cluster: Cluster = H100) -> str:
    """Markdown: seconds per step, sequential / batched, for each config and GPU count."""
    lines = ["| model | GPUs | micro-batch | one gather (s) | one forward's compute (s) | "
             + " | ".join(f"{o} seq / batched" for o in optimizers) + " |",
             "|---" * (5 + len(optimizers)) + "|"]
    for label, kw in configs:
        for gpus in gpus_list:
            global_batch = kw.get("global_batch")
            batch = max(1, global_batch // gpus) if global_batch else kw.get("batch", 1)
            common = dict(dtype=kw.get("dtype", "bf16"), batch=batch, seq=kw.get("seq", 256),
                          state_dtype=kw.get("state_dtype", "fp32"), cluster=cluster)
            cells, ref = [], None
            for opt in optimizers:
                seq = step_time(kw["model"], gpus, optimizer=opt, **common)
                ref = ref or seq
                try:
                    bat = f"{step_time(kw['model'], gpus, optimizer=opt, batched=True, **common).total_s:.2f}"
                except PlanError:
                    bat = "refused"
                cells.append(f"{seq.total_s:.2f} / {bat}")
            lines.append(f"| {label} | {gpus} | {batch} × {common['seq']} | {ref.gather_s:.2f} | {ref.compute_s:.3f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zo_scale.plan_time", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", default=[], help="zo_scale run config(s) (JSON)")
    ap.add_argument("--model", help="a zo_scale.plan model name or transformers config.json (instead of --config)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--batch", type=int, help="micro-batch per GPU (default: the config's global batch / GPUs)")
    ap.add_argument("--seq", type=int, help="sequence length (default: the config's, else 256)")
    ap.add_argument("--gpus-per-node", type=int, default=H100.gpus_per_node)
    ap.add_argument("--inter-gbps", type=float, default=H100.inter / 1e9, help="GB/s per GPU between nodes")
    ap.add_argument("--intra-gbps", type=float, default=H100.intra / 1e9, help="GB/s per GPU within a node")
    ap.add_argument("--tflops", type=float, default=H100.flops / 1e12, help="dense TFLOP/s per GPU")
    ap.add_argument("--hbm-tbps", type=float, default=H100.hbm / 1e12, help="HBM TB/s per GPU")
    ap.add_argument("--json", action="store_true", help="print every StepTime as JSON")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cluster = Cluster(flops=args.tflops * 1e12, hbm=args.hbm_tbps * 1e12, intra=args.intra_gbps * 1e9,
                      inter=args.inter_gbps * 1e9, gpus_per_node=args.gpus_per_node)
    try:
        configs = []
        for path in args.config:
            kw = read_config(path)
            configs.append((path, kw))
        if args.model:
            configs.append((args.model, {"model": args.model}))
        if not configs:
            raise PlanError("say which model: --config PATH or --model NAME")
        for _, kw in configs:
            if args.batch:
                kw.pop("global_batch", None)
                kw["batch"] = args.batch
            if args.seq:
                kw["seq"] = args.seq
        if args.json:
            out = []
            for label, kw in configs:
                for gpus in args.gpus:
                    batch = kw.get("batch") or max(1, kw.get("global_batch", gpus) // gpus)
                    for opt in GROUPS:
                        for batched in (False, True):
                            try:
                                t = step_time(kw["model"], gpus, optimizer=opt, batched=batched, batch=batch,
                                              seq=kw.get("seq", 256), dtype=kw.get("dtype", "bf16"), cluster=cluster)
                            except PlanError:
                                continue
                            out.append({"config": label, "gpus": gpus, **t.__dict__})
            print(json.dumps(out, indent=2))
        else:
            print(table(configs, args.gpus, cluster=cluster))
    except PlanError as err:
        print(f"zo_scale.plan_time: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
