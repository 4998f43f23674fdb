"""One real optimizer step at W ranks, rank by rank in this process, checked against ``zo_scale.plan``.

    python -m zo_scale.dryrun --config configs/opt66b.json --gpus 64
    python -m zo_scale.dryrun --config configs/opt66b.json --gpus 64 --set backend=fsdp2 --ranks 0,63
    python -m zo_scale.dryrun --config configs/opt66b.json --gpus 64 --optimizer fzoo --set optimizer.batched_probes=true

For each chosen rank (default: 0 and W-1) the config's model is built on its backend (FSDP2 or ZeRO-3)
as that rank would hold it, with fake tensors (true sizes, no weights, no z values) and torch's fake
process group (collectives move nothing), runs one forward (a run's first: ZeRO-3 records the module
trace it prefetches by), and the config's optimizer takes one real step, the steady state of a run
(``zo_scale.fake_world`` lists the shims that need). Checked, with exit code 1 naming the first
disagreement:

* the shard views tile every parameter exactly once over all W ranks: the chosen ranks' views as
  built, every other rank's from the same layout rule, which must reproduce the built ranks' views;
* this rank's weight shard, optimizer state and fp32 master against the plan: to the byte;
* the collectives inside ``opt.step``: only the engine's all-gathers (their bytes per forward within
  TOLERANCE of the plan's; with ``optimizer.batched_probes`` the whole step's: one forward's) and
  all-reduces of at most MAX_SCALAR_BYTES (the optimizer's scalars);
* the step's traced peak beyond shards and state, counted as ``zo_scale.memtrace`` counts (live
  storages after each aten op, FSDP2's storage resizes followed) against the plan's gathered
  parameters + activations (batched: + the plan's ``batched:`` terms): within TOLERANCE.

Micro-batch: the config's global batch split over W (at least 1), sequence task.max_length, sdpa
attention (what GPUs run; the plan is told the same). With batched probes the closure runs it repeated
once per probe group (``zo_scale.probes.replicate``) and returns one loss sum per group. Exit 2: bad input
(config, flags, or an optimizer that refuses them, such as HiZOO with batched probes on shards).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass

import torch

from zo_scale.plan import GIB, PROBE_SETS, PlanError, plan, resolve_model, shape_from_hf_config, zero3_settings

TOLERANCE = 0.05  # plan vs trace, relative, for the step's peak and the gathered bytes
MAX_SCALAR_BYTES = 1024  # all-reduce bytes per step the optimizer may issue ("a handful of scalars")
EXIT_OK, EXIT_DISAGREE, EXIT_BAD_INPUT = 0, 1, 2
COLLECTIVE_KINDS = {"allreduce_": "all-reduce", "_allgather_base_": "all-gather", "allgather_": "all-gather",
                    "allgather_into_tensor_coalesced_": "all-gather"}


class DryRunError(ValueError):
    """Bad input: one line, exit code 2."""


# ---------------------------------------------------------------------------------- the traced step


def _make_step_trace():
    from zo_scale.memtrace import LiveTensorBytes

    class StepTrace(LiveTensorBytes):
        """Live bytes (memtrace's counter), the collectives by kind and bytes, and answers to loss reads:
        a fake loss has no value, so each ``.item()`` / ``.tolist()`` element reads 1 + k/1000 for the k-th
        read, distinct so that no optimizer sees equal losses and skips its update."""

        def __init__(self):
            super().__init__()
            self.collectives: dict[str, list[int]] = {}  # kind -> [calls, bytes]
            self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads += 1
                return 1.0 + self.reads / 1000
            if func.namespace == "c10d":
                op = func._opname
                kind = COLLECTIVE_KINDS.get(op, op)
                tensors = _collective_payload(op, args)
                entry = self.collectives.setdefault(kind, [0, 0])
                entry[0] += 1
                entry[1] += sum(t.numel() * t.element_size() for t in tensors)
            return super().__torch_dispatch__(func, types, args, kwargs)

    return StepTrace()


def _collective_payload(op: str, args) -> list[torch.Tensor]:
    """The tensors whose bytes a collective moves into this rank: an all-gather's output, else its inputs."""
    flat = []
    for a in args:
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, (list, tuple)):
            flat += [t for t in a if isinstance(t, torch.Tensor)]
            flat += [t for x in a if isinstance(x, (list, tuple)) for t in x if isinstance(t, torch.Tensor)]
    if "allgather" in op:
        return flat[:1] if op == "_allgather_base_" else flat[: len(flat) // 2 or 1]
    return flat


@dataclass
class RankResult:
    rank: int
    views: list[tuple[str, int, int, int]]  # (name, start, numel, global numel)
    layout: dict[str, tuple[int, int]]  # name -> (rows or ZeRO-3 partition size, elements per row)
    weight_bytes: int
    state_bytes: int
    peak_bytes: int
    forwards: int  # closure calls in opt.step
    groups: int  # probe groups those forwards carried (batched: all of the step's in one forward)
    collectives: dict[str, list[int]]
    seconds: float
    plan: object = None  # this rank's zo_scale.plan, set by compare()


def run_rank(spec, rank: int) -> RankResult:
    """Build rank ``rank``'s model and optimizer and take one step; everything measured on the way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zo_scale import fake_world
    from zo_scale.memtrace import following_fsdp2_resizes

    t0 = time.time()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_world.fake_process_group(rank, spec.world):
        extra = contextlib.nullcontext()
        if spec.backend == "fsdp2":
            model = fake_world.build_fsdp2(spec.shape, spec.dtype, fake_mode, spec.reshard_after_forward)
            module = model
        else:
            model = fake_world.build_zero3(spec.shape, spec.dtype, fake_mode, spec.ds_config)
            module = model.module
            extra = fake_world.skip_deepspeed_rank_agreement()
        with fake_mode, extra, fake_world.sharded_replication_degrees():
            ids = torch.zeros(spec.batch, spec.seq, dtype=torch.long)
            with torch.no_grad():  # a run's first forward: ZeRO-3 records its trace, to prefetch by from then on
                model(input_ids=ids, labels=ids, use_cache=False)
            trace = _make_step_trace()
            trace.ignore(_shard_tensors(module))  # the shards exist already: count what the optimizer adds
            with trace, following_fsdp2_resizes(trace):
                try:
                    opt = spec.optimizer_cls(model, **spec.optimizer_options)
                except ValueError as e:  # options the optimizer refuses on this backend: bad input
                    raise DryRunError(str(e).removeprefix("zo_scale: ")) from None
                state_bytes = trace.live
                before = trace.live
                trace.peak = before  # the step from here: construction's transient copies are not part of it
                trace.collectives.clear()
                calls = []  # the group count of each closure call

                def closure(groups=None):
                    calls.append(groups or 1)
                    if groups is None:  # sequential: one probe point per forward
                        return model(input_ids=ids, labels=ids, use_cache=False).loss
                    return _group_loss_sums(model, ids, groups)

                opt.step(closure)
            views = [(v.name, v.start, v.numel, v.global_numel) for v in opt.views]
            weight_bytes = sum(v.numel * v.local.element_size() for v in opt.views)
            layout = {v.name: _layout_of(v, spec.backend) for v in opt.views}
    return RankResult(rank, views, layout, weight_bytes, state_bytes, trace.peak - before, len(calls), sum(calls),
                      {k: list(v) for k, v in trace.collectives.items()}, time.time() - t0)


def _group_loss_sums(model, ids: torch.Tensor, groups: int):
    """The batched closure's result: the micro-batch ``ids`` repeated once per group in one forward, each
    group's summed next-token loss (fp32 logits, as the model's own loss) and its token count."""
    import torch.nn.functional as F

    from zo_scale import probes

    rows = probes.replicate(ids, groups)
    logits = model(input_ids=rows, use_cache=False).logits
    # shift the labels, not the logits, as transformers' loss does (no copy of the logits beside its fp32 one)
    labels = F.pad(rows[:, 1:], (0, 1), value=-100)
    per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return probes.group_sums(per_token, groups), rows[:, 1:].numel() // groups


def _shard_tensors(module) -> list[torch.Tensor]:
    """The tensors holding this rank's weights: FSDP2's local shards, ZeRO-3's partitions, buffers."""
    out = list(module.buffers())
    for p in module.parameters():
        out.append(getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else getattr(p, "_local_tensor", p))
    return [t for t in out if t is not None]


def _layout_of(view, backend: str) -> tuple[int, int]:
    shape = tuple(view.global_shape)
    if backend == "fsdp2":
        rows = shape[0] if shape else 1
        return rows, view.global_numel // rows if rows else 0
    return int(view.param.ds_tensor.ds_numel), 1  # ZeRO-3: every rank's partition has this many elements


def layout_range(layout: tuple[int, int], global_numel: int, backend: str, world: int, rank: int) -> tuple[int, int]:
    """[start, end) that ``rank`` holds under the backend's rule (FSDP2: torch.chunk rows; ZeRO-3: equal
    partitions, the tail padding)."""
    if backend == "fsdp2":
        from zo_scale.backends.fsdp2 import dim0_chunk

        rows, row = layout
        lo, hi = dim0_chunk(rows, world, rank)
        return lo * row, hi * row
    part = layout[0]
    lo = min(rank * part, global_numel)
    return lo, min(lo + part, global_numel)


def check_tiling(results: list[RankResult], backend: str, world: int) -> str | None:
    """None if every parameter is covered exactly once by the W ranks' views, else the first problem."""
    first = results[0]
    names = [n for n, *_ in first.views]
    for r in results:
        if [n for n, *_ in r.views] != names:
            return f"rank {r.rank} has views of other parameters than rank {first.rank}"
        for name, start, numel, global_numel in r.views:
            lo, hi = layout_range(first.layout[name], global_numel, backend, world, r.rank)
            if (start, start + numel) != (lo, hi) and numel:
                return f"{name}: rank {r.rank}'s view is [{start}, {start + numel}), its layout [{lo}, {hi})"
    for name, _, _, global_numel in first.views:
        spans = sorted(layout_range(first.layout[name], global_numel, backend, world, q) for q in range(world))
        reach = 0
        for lo, hi in spans:
            if hi <= lo:
                continue
            if lo != reach:
                return f"{name}: elements [{min(lo, reach)}, {max(lo, reach)}) are {'missed' if lo > reach else 'held twice'}"
            reach = hi
        if reach != global_numel:
            return f"{name}: ranks cover {reach} of {global_numel} elements"
    return None


# ---------------------------------------------------------------------------------- inputs


@dataclass
class Spec:
    shape: object
    world: int
    ranks: list[int]
    backend: str  # "fsdp2" | "zero3"
    dtype: torch.dtype
    optimizer_name: str
    optimizer_cls: type
    optimizer_options: dict
    batch: int
    seq: int
    ds_config: dict | None
    reshard_after_forward: bool
    plan_kwargs: dict
    batched: bool  # optimizer.batched_probes: every probe group of a step in one forward


def _shape_of(cfg):
    m = cfg.model
    if m.name_or_path is not None:
        return resolve_model(m.name_or_path)
    if m.arch in ("opt", "llama"):
        from transformers import AutoConfig

        from zo_scale.models import TINY_CONFIGS

        config = AutoConfig.for_model(m.arch, **{**TINY_CONFIGS[m.arch], **m.config})  # as build_random_model
        return shape_from_hf_config(config.to_dict(), name=f"{m.arch} (config)")
    raise DryRunError("the dry run models OPT and Llama-like models given by model.name_or_path or model.arch")


def make_spec(args) -> Spec:
    from zo_scale.config import ConfigError, load_config, optimizer_class

    overrides = list(args.set)
    if args.optimizer:
        overrides.append(f"optimizer.name={args.optimizer}")
    # --set backend=fsdp2 on a DeepSpeed config: its deepspeed section goes with the backend it configures
    if any(o.replace(" ", "").startswith("backend=") and not o.endswith("deepspeed") for o in overrides) and \
            not any(o.startswith("deepspeed") for o in overrides):
        overrides.append("deepspeed=null")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise DryRunError(str(e)) from None
    if cfg.backend not in ("fsdp2", "deepspeed"):
        raise DryRunError(f"backend {cfg.backend!r} is not sharded: the dry run needs fsdp2 or deepspeed (--set backend=fsdp2)")
    if cfg.backend == "deepspeed" and (cfg.deepspeed or {}).get("zero_optimization", {}).get("stage") != 3:
        raise DryRunError("backend deepspeed: the dry run needs zero_optimization.stage 3")
    if cfg.peft is not None or cfg.model.trainable is not None:
        raise DryRunError("the planner counts full-parameter runs: drop peft / model.trainable for the dry run")
    world = args.gpus
    if world < 2:
        raise DryRunError(f"--gpus must be at least 2, got {world}")
    ranks = [0, world - 1] if args.ranks is None else args.ranks
    bad = [r for r in ranks if not 0 <= r < world]
    if bad or not ranks:
        raise DryRunError(f"--ranks must name ranks in [0, {world}), got {args.ranks}")
    try:
        shape = _shape_of(cfg)
    except PlanError as e:
        raise DryRunError(str(e)) from None
    batch = max(1, cfg.train.batch_size // world)
    seq = cfg.task.max_length or 256
    dtype = getattr(torch, cfg.model.dtype)
    options = cfg.optimizer_options
    if "state_dtype" in options:
        options["state_dtype"] = getattr(torch, options["state_dtype"])
    backend = "fsdp2" if cfg.backend == "fsdp2" else "zero3"
    ds_config = None
    plan_kwargs = {}
    if backend == "zero3":
        ds_config = dict(cfg.deepspeed or {})
        ds_config.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1,
                         train_batch_size=batch * world, steps_per_print=1 << 30)
        if cfg.model.dtype == "bfloat16":
            ds_config.setdefault("bf16", {"enabled": True})
        elif cfg.model.dtype == "float16":
            ds_config.setdefault("fp16", {"enabled": True})
        plan_kwargs = zero3_settings(ds_config)
    name = cfg.optimizer["name"].lower()  # any of zo_scale.config.OPTIMIZERS: a new optimizer needs no change here
    state_dtype = options.get("state_dtype", torch.float32)
    batched = bool(options.get("batched_probes", False))
    plan_kwargs.update(dtype=cfg.model.dtype, optimizer=name, batch=batch, seq=seq, backend=backend,
                       master=options.get("master_weights"), attention="sdpa", reserve_gib=0.0, batched_probes=batched,
                       state_dtype={torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[state_dtype])
    if name in ("zo-muon", "helene-muon") and "rank" in options:  # the planner's name for their r
        plan_kwargs["subspace_rank"] = options["rank"]
    if name in PROBE_SETS and "n_directions" in options:
        plan_kwargs["n_directions"] = options["n_directions"]
    try:  # what the planner refuses (HiZOO's batched probes on shards) fails here, before minutes of building
        plan(shape, world, rank=ranks[0], **plan_kwargs)
    except PlanError as e:
        raise DryRunError(str(e)) from None
    return Spec(shape, world, ranks, backend, dtype, name, optimizer_class(name), dict(options, seed=cfg.seed),
                batch, seq, ds_config, cfg.fsdp2.reshard_after_forward if cfg.fsdp2 else True, plan_kwargs, batched)


# ---------------------------------------------------------------------------------- checks and report


def compare(spec: Spec, r: RankResult) -> list[str]:
    """This rank's disagreements with its plan, first the exact ones."""
    p = plan(spec.shape, spec.world, rank=r.rank, **spec.plan_kwargs)
    r.plan = p
    out = []
    if r.weight_bytes != p.parts["weight shard"]:
        out.append(f"rank {r.rank}: weight shard {r.weight_bytes} B traced, {p.parts['weight shard']} B planned")
    if r.state_bytes != p.state_bytes:
        out.append(f"rank {r.rank}: optimizer state + master {r.state_bytes} B traced, {p.state_bytes} B planned")
    kinds = set(r.collectives) - {"all-gather", "all-reduce"}
    if kinds:
        out.append(f"rank {r.rank}: collectives other than all-gather / all-reduce in opt.step: {sorted(kinds)}")
    reduce_bytes = r.collectives.get("all-reduce", [0, 0])[1]
    allowed = MAX_SCALAR_BYTES + p.parts.get("factor sums (fp64, per step)", 0)  # HiZOO-L also sums its R, C
    if reduce_bytes > allowed:
        out.append(f"rank {r.rank}: the step all-reduces {reduce_bytes} B, more than the {allowed} B planned")
    gathered, per = _gathered(spec, r)
    if not _close(gathered, p.gather_bytes_per_forward):
        out.append(f"rank {r.rank}: all-gathers {gathered / GIB:.3f} GiB per {per} traced, "
                   f"{p.gather_bytes_per_forward / GIB:.3f} GiB planned")
    planned_peak = _planned_peak(p)
    if not _close(r.peak_bytes, planned_peak):
        out.append(f"rank {r.rank}: step peak beyond shards and state {r.peak_bytes / GIB:.3f} GiB traced, "
                   f"{planned_peak / GIB:.3f} GiB planned (tolerance {TOLERANCE:.0%})")
    return out


def _gathered(spec: Spec, r: RankResult) -> tuple[float, str]:
    """The traced all-gather bytes to hold against the plan's one forward, and what they are per: with
    batched probes the whole step's (the step must gather the model once), else each forward's."""
    step = r.collectives.get("all-gather", [0, 0])[1]
    return (step, "step") if spec.batched else (step / max(r.forwards, 1), "forward")


def _planned_peak(p) -> int:
    """The plan's transient bytes of a step beyond shards and state: the forward's gathered parameters and
    activations, and what batched probes add to them."""
    batched = sum(v for k, v in p.parts.items() if k.startswith("batched:"))
    return p.parts["gathered parameters"] + p.parts["forward peak (activations)"] + batched


def _close(traced: float, planned: float) -> bool:
    return abs(planned - traced) <= TOLERANCE * max(traced, 1)


def report(spec: Spec, r: RankResult) -> str:
    p = r.plan
    gathered, per = _gathered(spec, r)
    rows = [("weight shard", r.weight_bytes, p.parts["weight shard"]),
            ("optimizer state + fp32 master", r.state_bytes, p.state_bytes),
            ("step peak beyond shards + state", r.peak_bytes, _planned_peak(p)),
            (f"all-gathered per {per}", gathered, p.gather_bytes_per_forward)]
    forwards = f"{r.forwards} forward{'s' if r.forwards != 1 else ''}"
    if spec.batched:
        forwards += f" carrying {r.groups} probe groups"
    step_gathered = r.collectives.get("all-gather", [0, 0])[1]
    param_bytes = spec.shape.param_count() * spec.dtype.itemsize
    lines = [f"rank {r.rank} of {spec.world}: {forwards}, {r.seconds:.0f} s",
             f"  {'GiB':<34}{'traced':>10}{'planned':>10}{'plan/trace':>12}"]
    lines += [f"  {n:<34}{t / GIB:>10.3f}{pl / GIB:>10.3f}{(pl / t if t else 1.0):>12.3f}" for n, t, pl in rows]
    colls = ", ".join(f"{k} ×{c} ({b / GIB:.2f} GiB)" if b >= 1 << 20 else f"{k} ×{c} ({b} B)"
                      for k, (c, b) in sorted(r.collectives.items()))
    lines.append(f"  collectives in opt.step: {colls}")
    lines.append(f"  gathered per step: {step_gathered / param_bytes:.3f}x the parameter bytes "
                 f"({param_bytes / GIB:.3f} GiB)")
    lines.append(f"  plan: {p.notes[-1] if p.notes else ''}")
    return "\n".join(lines)


def _parse_ranks(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks takes comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zo_scale.dryrun", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a zo_scale run config (JSON)")
    ap.add_argument("--gpus", type=int, required=True, help="world size W to build each rank for")
    ap.add_argument("--ranks", type=_parse_ranks, help="comma-separated ranks to run (default: 0 and W-1)")
    ap.add_argument("--optimizer", help="optimizer name (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set backend=fsdp2 (repeatable)")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = make_spec(args)
    except DryRunError as e:
        print(f"zo_scale: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"zo_scale dry run: {spec.shape.name} ({spec.shape.param_count() / 1e9:.2f} B params), {spec.backend} on "
          f"{spec.world} ranks, {spec.optimizer_name}{', batched probes' if spec.batched else ''}, micro-batch {spec.batch} × {spec.seq}, ranks "
          f"{','.join(map(str, spec.ranks))}; tolerance {TOLERANCE:.0%} on peaks and gathers, exact on shards and state",
          flush=True)
    results, failures = [], []
    for rank in spec.ranks:
        try:
            r = run_rank(spec, rank)
        except DryRunError as e:
            print(f"zo_scale: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        failures += compare(spec, r)
        results.append(r)
        print(report(spec, r), flush=True)
    tiling = check_tiling(results, spec.backend, spec.world)
    n_params = len(results[0].views)
    print(f"shard views: {n_params} parameters, "
          + (f"tiled exactly once by the {spec.world} ranks" if tiling is None else f"NOT tiled: {tiling}"))
    if tiling is not None:
        failures.insert(0, f"shard views: {tiling}")
    if failures:
        print(f"DISAGREE: {failures[0]}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
        return EXIT_DISAGREE
    print("AGREE: views tile, shards and state exact, peaks and gathers within tolerance")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
