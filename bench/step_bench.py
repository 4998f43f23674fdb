"""ZO step benchmark: passes against their memory-bandwidth floor, whole steps, peak memory, targets.

    python bench/step_bench.py --out bench/results/h200.json --readme README.md   # GPU: OPT-1.3B, OPT-6.7B
    python bench/step_bench.py --from-json bench/results/h200.json --readme README.md   # re-render
    python bench/step_bench.py --tiny --out tiny.json           # CPU smoke test, < 60 s

For random-init OPT shapes (bf16, batch 16 × seq 256) it measures, in one run:
  copy bandwidth        dst.copy_(src) on a large bf16 buffer, bytes read + written per second
  forward               one no-grad forward + loss on a fixed batch
  passes                each ZO pass (perturb, fused restore+update) as the optimizer runs it (the
                        fused kernels on CUDA) and through its chunked torch path, against
                        bytes-it-must-move / copy bandwidth
  steps                 opt.step(closure) for MeZO, HiZOO, HELENE, FZOO (N = 8), HELENE-FZOO (N = 8, FZOO's
                        kernels for the probes, its update on the torch path), ZO-Muon and HELENE-Muon (N = 4,
                        r = 64: torch path, rank-r matmuls), HELENE's lightest configuration
                        (helene-lean: bf16 state, no master), and the official-style MeZO
                        (torch.manual_seed + torch.normal per parameter, four passes)
  peak memory           torch.cuda.max_memory_allocated per step, against inference-only and the planner
and judges the issue's targets (step ≤ 1.15 × its forwards, pass ≤ 1.5 × floor, peak ≤ inference +
state + one chunk, planner within 10 %). Timing: CUDA events (perf_counter on CPU), warm-up, median.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # official_mezo.py next to this file

from official_mezo import OfficialMeZO  # noqa: E402

from zo_scale import FZOO, HELENE, HELENEFZOO, HELENEMuon, HiZOO, MeZO, ZOMuon, kernels  # noqa: E402
from zo_scale.memtrace import LiveTensorBytes, build_model, planned_total  # noqa: E402
from zo_scale.plan import GIB, MODELS, ModelShape, plan  # noqa: E402

TINY = ModelShape("tiny", "opt", hidden=64, layers=2, heads=4, ffn=256, vocab=1000, max_positions=64)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTIMIZERS = {"mezo": MeZO, "hizoo": HiZOO, "helene": HELENE, "fzoo": FZOO, "helene-fzoo": HELENEFZOO,
              "zo-muon": ZOMuon, "helene-muon": HELENEMuon}
# FZOO, HELENE-FZOO: ℓ₀ + N = 8 one-sided probes; ZO-Muon, HELENE-Muon: ℓ₀ + N = 4
FORWARDS = {"mezo": 2, "hizoo": 3, "helene": 2, "fzoo": 9, "helene-fzoo": 9, "zo-muon": 5, "helene-muon": 5}
# perturb passes a step makes besides its update
PERTURBS = {"mezo": 2, "hizoo": 2, "helene": 2, "fzoo": 8, "helene-fzoo": 8, "zo-muon": 4, "helene-muon": 4}
# Variants with their own state dtype and master: "helene-lean" is HELENE's lightest configuration
# (bf16 momentum and Hessian, updates applied to the bf16 weights in place), 20 B per parameter a step.
VARIANTS = {"helene-lean": ("helene", {"state_dtype": "bf16", "master": False})}


# ---------------------------------------------------------------------------------- timing


class Timer:
    """Median wall time of fn() over repeats after warm-up; CUDA events on a GPU."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.repeats = warmup, repeats

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def copy_bandwidth(timer: Timer, device, numel: int) -> float:
    """Bytes read + written per second by a plain bf16 copy: the floor every pass is held to."""
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * numel * 2 / t


def peak_bytes(device, fn, held=()) -> int:
    """Peak bytes allocated while fn runs: the CUDA allocator's count on a GPU; on CPU the storages
    alive after each aten op (zo_scale.memtrace), ``held`` (weights, state) counted from the start."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    counter = LiveTensorBytes()
    counter.hold(held)
    with counter:
        fn()
    return counter.peak


def held_tensors(model, opt=None) -> list[torch.Tensor]:
    state = [t for st in opt.shard_state.values() for t in st.values()] if opt is not None else []
    state += list(getattr(opt, "subspace_momentum", {}).values())  # HELENE-Muon's M, kept apart from the shards
    return [*model.parameters(), *model.buffers(), *state]


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- model


def make_closure(model, shape: ModelShape, batch: int, seq: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=g).to(device)

    def closure():
        return model(input_ids=ids, labels=ids, use_cache=False).loss  # no KV cache: a ZO forward never reads it

    return closure


# ---------------------------------------------------------------------------------- passes


def pass_bytes(opt, kind: str) -> int:
    """Bytes a pass must move at least: every tensor it reads once and writes once."""
    total = 0
    for v in opt.views:
        n, lb = v.numel, v.local.element_size()
        st = opt.shard_state[v.name]
        master = "master" in st
        states = [t.element_size() for k, t in st.items() if k != "master"]
        if kind == "perturb":
            total += n * ((4 + lb) if master else 2 * lb)  # read master (or local), write local
            if isinstance(opt, HiZOO):
                total += n * states[0]  # read H for z/√H
        else:  # restore + update: master read + write (or local read + write), then local write
            total += n * ((8 + lb) if master else 2 * lb) + n * 2 * sum(states)  # state read + write
    return total


def optimizer_pass(opt, kind: str):
    """The pass as the optimizer runs it now (base.py's _move_to / _restore_and_update)."""
    if kind == "perturb":
        sign = [1]

        def run():  # alternate +ε / −ε: each call is one full perturb pass
            opt._move_to(sign[0], 0)
            sign[0] = -sign[0]

        return run
    if isinstance(opt, FZOO):  # its step computes N coefficients itself
        coefs = [0.1] * opt.n_samples
        return lambda: opt._restore_and_update(coefs, {})
    if isinstance(opt, ZOMuon):  # restore + P·NS(G) per matrix, the N one-sided coefficients given
        coefs = [0.1] * opt.n_samples
        return lambda: opt._restore_and_step(coefs)
    pgs = [0.5]
    losses = {"plus": [1.001], "minus": [0.999], "zero": 1.0, "proj_grads": pgs}
    scalars = opt._before_update(losses)
    return lambda: opt._restore_and_update(pgs, scalars)


def fused_path(opt, kind: str = "perturb") -> bool:
    """Whether the optimizer's ``kind`` pass runs the fused kernels: its own dispatch, so that ZO-Muon and
    HELENE-Muon (no kernel takes them) are reported as the torch path they run on CUDA too, and HELENE-FZOO's
    update (FZOO's kernel has no momentum) as the torch path, its perturb pass as fused."""
    if kind == "update" and isinstance(opt, HELENEFZOO):
        return False
    return all(opt._uses_kernels(v) for v in opt.views)


@contextlib.contextmanager
def torch_path(opt):
    """The optimizer's chunked torch path where it would take the fused kernels (its cached dispatch)."""
    saved, opt._kernels_ok = opt._kernels_ok, False
    try:
        yield
    finally:
        opt._kernels_ok = saved


# ---------------------------------------------------------------------------------- one model


def bench_model(name: str, shape: ModelShape, args, device, timer: Timer, bw: float) -> dict:
    dtype = DTYPES[args.dtype]
    model = build_model(shape, dtype, device)
    closure = make_closure(model, shape, args.batch, args.seq, device)
    res = {"model": name, "params": shape.param_count(), "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
           "attention": getattr(model.config, "_attn_implementation", None), "passes": [], "steps": {}}
    gpu_mem = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    plan_kw = dict(dtype=args.dtype, batch=args.batch, seq=args.seq, backend="replicated", attention="sdpa",
                   gpu_mem_gib=gpu_mem or 80.0, reserve_gib=0.0)
    with torch.no_grad():
        res["forward_ms"] = timer(closure) * 1e3
        res["inference_peak_bytes"] = peak_bytes(device, closure, held_tensors(model))
    res["inference_planned_bytes"] = planned_total(plan(shape, 1, optimizer="mezo", master=False, **plan_kw))

    for oname in args.optimizers:
        base, overrides = VARIANTS.get(oname, (oname, {}))
        entry = res["steps"][oname] = {"forwards": FORWARDS[base], "perturbs": PERTURBS[base]}
        master = overrides.get("master", None if args.master == "auto" else args.master == "on")
        state_dtype = overrides.get("state_dtype", args.state_dtype)
        p = plan(shape, 1, optimizer=base, master=master, state_dtype=state_dtype, **plan_kw)
        if gpu_mem and not p.fits:
            entry["skipped"] = f"plan: {p.total_bytes / GIB:.1f} GiB > {gpu_mem:.1f} GiB (try --state-dtype bf16)"
            continue
        entry["state_bytes"] = p.state_bytes
        opt = None
        try:
            opt = OPTIMIZERS[base](model, lr=args.lr, eps=1e-3, seed=1, master_weights=master,
                                   state_dtype=DTYPES[state_dtype])
            entry["path"] = "fused" if fused_path(opt) else "torch"
            entry["chunk_bytes"] = p.parts["z chunk (fp32)"]  # 4 B × min(chunk_size, shard)
            # the torch update holds z chunks the fused one makes in registers
            entry["planned_bytes"] = planned_total(p) + (0 if fused_path(opt, "update") else entry["chunk_bytes"])
            for kind in ("perturb", "update"):
                fused = fused_path(opt, kind)
                row = {"pass": f"{oname} {kind}", "bytes": pass_bytes(opt, kind), "path": "fused" if fused else "torch"}
                row["floor_ms"] = row["bytes"] / bw * 1e3
                row["ms"] = timer(optimizer_pass(opt, kind)) * 1e3
                opt._move_to(0, 0)
                row["torch_ms"] = None
                if fused:
                    with torch_path(opt):
                        row["torch_ms"] = timer(optimizer_pass(opt, kind)) * 1e3
                        opt._move_to(0, 0)
                res["passes"].append(row)
            entry["ms"] = timer(lambda: opt.step(closure)) * 1e3
            entry["overhead_ms"] = entry["ms"] - entry["forwards"] * res["forward_ms"]
            entry["peak_bytes"] = peak_bytes(device, lambda: opt.step(closure), held_tensors(model, opt))
        except torch.OutOfMemoryError as err:
            entry["skipped"] = f"out of memory: {str(err).splitlines()[0][:120]}"
        finally:
            del opt
            free_memory(device)

    # The official-style baseline last: it rebinds param.data, which the optimizers above viewed.
    off = OfficialMeZO(model, lr=args.lr, eps=1e-3)
    res["passes"].append({"pass": "official torch.normal perturb", "bytes": None, "floor_ms": None, "path": "torch",
                          "ms": timer(lambda: off.perturb(1.0)) * 1e3, "torch_ms": None})
    entry = res["steps"]["official-mezo"] = {"forwards": 2, "path": "torch"}
    entry["ms"] = timer(lambda: off.step(closure)) * 1e3
    entry["overhead_ms"] = entry["ms"] - 2 * res["forward_ms"]
    entry["peak_bytes"] = peak_bytes(device, lambda: off.step(closure), held_tensors(model))
    del model, off, closure
    free_memory(device)
    return res


# ---------------------------------------------------------------------------------- targets


STEP_TARGET, PASS_TARGET, PLAN_TOLERANCE = 1.15, 1.5, 0.10


def targets(m: dict) -> list[dict]:
    """The issue's targets for one model's results: step ≤ 1.15 × its forwards, every pass ≤ 1.5 × its
    floor, peak ≤ inference + state + one chunk, planner within 10 % of the measured peak. Each row
    says what was measured, its limit, and whether it holds (None where nothing was measured)."""
    rows = []
    fwd = m["forward_ms"]
    floors = {p["pass"]: p["floor_ms"] for p in m["passes"]}
    for oname, s in m["steps"].items():
        if "ms" not in s:
            continue
        ratio = s["ms"] / (s["forwards"] * fwd)
        rows.append({"what": f"{oname} step / {s['forwards']} forwards", "value": ratio, "limit": STEP_TARGET,
                     "ok": ratio <= STEP_TARGET})
        if f"{oname} update" in floors:  # what the step could be with every pass at its floor
            perturbs = s.get("perturbs", 2)
            best = (s["forwards"] * fwd + perturbs * floors[f"{oname} perturb"] + floors[f"{oname} update"]) / (s["forwards"] * fwd)
            rows.append({"what": f"{oname} step / forwards, passes at their floor", "value": best,
                         "limit": STEP_TARGET, "ok": best <= STEP_TARGET})
    for p in m["passes"]:
        if p["floor_ms"]:
            r = p["ms"] / p["floor_ms"]
            rows.append({"what": f"{p['pass']} / floor", "value": r, "limit": PASS_TARGET, "ok": r <= PASS_TARGET})
    inf = m["inference_peak_bytes"]
    for oname, s in m["steps"].items():
        if s.get("peak_bytes") is None or inf is None or "state_bytes" not in s:
            continue
        extra = (s["peak_bytes"] - inf - s["state_bytes"]) / 2**20
        rows.append({"what": f"{oname} peak − inference − state (MiB)", "value": extra,
                     "limit": s["chunk_bytes"] / 2**20, "ok": extra <= s["chunk_bytes"] / 2**20})
    pairs = [("inference", inf, m["inference_planned_bytes"])]
    pairs += [(o, s.get("peak_bytes"), s.get("planned_bytes")) for o, s in m["steps"].items()]
    for what, measured, planned in pairs:
        if measured and planned:
            r = planned / measured
            rows.append({"what": f"planner / measured peak, {what}", "value": r, "limit": 1 + PLAN_TOLERANCE,
                         "ok": abs(r - 1) <= PLAN_TOLERANCE})
    return rows


# ---------------------------------------------------------------------------------- report


def _fmt(x, spec=".2f", scale=1.0):
    return "-" if x is None else format(x / scale, spec)


def _verdict(ok) -> str:
    return "-" if ok is None else ("ok" if ok else "MISS")


def tables(m: dict) -> list[tuple[list[str], list[list[str]]]]:
    """One model's results as (header, rows) tables: passes, steps, targets. Printed and written alike."""
    passes = []
    for p in m["passes"]:
        ratio = p["ms"] / p["floor_ms"] if p["floor_ms"] else None
        passes.append([p["pass"], _fmt(p["bytes"], ".3g", 1e9), _fmt(p["floor_ms"]), f"{p['ms']:.2f}", p["path"],
                       _fmt(ratio), _fmt(p["torch_ms"])])
    steps = []
    for oname, s in m["steps"].items():
        if "skipped" in s:
            steps.append([oname, f"skipped: {s['skipped']}"] + [""] * 5)
            continue
        steps.append([oname, f"{s['ms']:.1f}", str(s["forwards"]), f"{s['ms'] / (s['forwards'] * m['forward_ms']):.2f}",
                      f"{s['overhead_ms']:.1f}", _fmt(s["peak_bytes"], ".2f", GIB), _fmt(s.get("planned_bytes"), ".2f", GIB)])
    steps.append(["inference only", f"{m['forward_ms']:.1f}", "1", "", "", _fmt(m["inference_peak_bytes"], ".2f", GIB),
                  _fmt(m["inference_planned_bytes"], ".2f", GIB)])
    judged = [[t["what"], f"{t['value']:.2f}", f"{t['limit']:.2f}", _verdict(t["ok"])] for t in targets(m)]
    return [(["pass", "GB moved", "floor ms", "ms", "path", "ms / floor", "torch path ms"], passes),
            (["step", "ms", "forwards", "step / forwards", "ms beyond fwd", "peak GiB", "planned GiB"], steps),
            (["target", "value", "limit", ""], judged)]


def _columns(header, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in [header, *rows]]


def _model_title(m: dict) -> str:
    return (f"{m['model']}: {m['params'] / 1e6:,.1f} M params, {m['dtype']}, batch {m['batch']} × seq {m['seq']}, "
            f"attention {m['attention']}, forward {m['forward_ms']:.2f} ms")


def report(results: dict) -> str:
    out = [f"device: {results['device']}   copy bandwidth: {results['copy_bw'] / 1e9:.1f} GB/s "
           f"(bf16, read + write)   kernels: {'fused (Triton)' if results['kernels'] else 'torch path only'}"]
    for m in results["models"]:
        out += ["", _model_title(m)]
        for header, rows in tables(m):
            out += _columns(header, rows)
    return "\n".join(out)


def markdown(results: dict) -> str:
    """The README's section: the passes, steps and targets of each model as markdown tables."""
    out = [f"Measured {results['date']} on **{results['device']}** (torch {results['torch']}, copy bandwidth "
           f"{results['copy_bw'] / 1e9:.0f} GB/s, kernels: {'fused Triton' if results['kernels'] else 'torch path'}) "
           f"with `{results['command']}`.", ""]
    for m in results["models"]:
        out += [f"**{_model_title(m)}**", ""]
        for header, rows in tables(m):
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(r) + " |" for r in rows]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


BEGIN, END = "<!-- step-bench:begin -->", "<!-- step-bench:end -->"


def write_readme_section(path: Path, section: str) -> None:
    """Replace what lies between the step-bench markers in ``path`` with ``section``."""
    text = path.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"step_bench: {path} needs one '{BEGIN}' line before one '{END}' line")
    head, rest = text.split(BEGIN)
    path.write_text(head + BEGIN + "\n" + section + END + rest.split(END, 1)[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["opt-1.3b", "opt-6.7b"], help="OPT shapes from zo_scale.plan")
    ap.add_argument("--tiny", action="store_true", help="tiny OPT shape, batch 2, seq 32: a CPU smoke test")
    ap.add_argument("--optimizers", nargs="+", default=[*OPTIMIZERS, *VARIANTS], choices=[*OPTIMIZERS, *VARIANTS])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--state-dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--master", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-7, help="tiny: random weights must stay finite over the repeats")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--copy-numel", type=int, default=1 << 28, help="elements of the bandwidth probe buffer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="CPU threads (--tiny: 1, so a shared CI box does not spin)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--readme", type=Path, help=f"write the markdown tables between {BEGIN} and {END} here")
    ap.add_argument("--from-json", type=Path, help="report (and --readme) a saved --out file instead of measuring")
    args = ap.parse_args(argv)
    if args.from_json:
        try:
            results = json.loads(args.from_json.read_text())
        except (OSError, json.JSONDecodeError) as err:
            ap.error(f"--from-json {args.from_json}: {err}")
        return finish(results, args)
    if args.tiny:
        args.models, args.batch, args.seq = ["tiny"], 2, 32
        args.warmup, args.repeats, args.copy_numel = 1, min(args.repeats, 3), min(args.copy_numel, 1 << 22)
    device = torch.device(args.device)
    if args.threads or (args.tiny and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    shapes = {"tiny": TINY, **{k: v for k, v in MODELS.items() if v.family == "opt"}}
    unknown = [m for m in args.models if m not in shapes]
    if unknown:
        ap.error(f"unknown model {unknown}: choose from {', '.join(shapes)}")
    timer = Timer(device, args.warmup, args.repeats)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "date": datetime.date.today().isoformat(), "command": " ".join(["python bench/step_bench.py", *sys.argv[1:]]),
        "torch": torch.__version__, "kernels": kernels.available(), "args": {k: str(v) for k, v in vars(args).items()},
        "copy_bw": copy_bandwidth(timer, device, args.copy_numel), "models": [],
    }
    for name in args.models:
        results["models"].append(bench_model(name, shapes[name], args, device, timer, results["copy_bw"]))
        print(report({**results, "models": results["models"][-1:]}), flush=True)
        if args.out:  # after each model: a later one running out of time loses nothing
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    return finish(results, args, printed=True)


def finish(results: dict, args, printed: bool = False) -> int:
    if not printed:
        print(report(results))
    if args.out and not printed:
        args.out.write_text(json.dumps(results, indent=2))
    if args.out:
        print(f"wrote {args.out}")
    if args.readme:
        write_readme_section(args.readme, markdown(results))
        print(f"wrote the tables into {args.readme}")
    return 0


def cpu_name() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "CPU"
    return f"{model}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    sys.exit(main())
