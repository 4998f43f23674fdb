"""ZO step benchmark: passes against their memory-bandwidth floor, whole steps, peak memory.

    python bench/step_bench.py --out bench.json                 # GPU: OPT-1.3B and OPT-6.7B shapes
    python bench/step_bench.py --tiny --out tiny.json           # CPU smoke test, < 60 s

For random-init OPT shapes (bf16, batch 16 × seq 256) it measures, in one run:
  copy bandwidth        dst.copy_(src) on a large bf16 buffer, bytes read + written per second
  forward               one no-grad forward + loss on a fixed batch
  passes                each ZO pass (perturb, fused restore+update) through the zo_scale optimizer
                        and, where Triton is available, through the fused kernels directly; each
                        against bytes-it-must-move / copy bandwidth
  steps                 opt.step(closure) for MeZO, HiZOO, HELENE, and the official-style MeZO
                        (torch.manual_seed + torch.normal per parameter, four passes)
  peak memory           torch.cuda.max_memory_allocated per step, against an inference-only forward
Timing: CUDA events (perf_counter on CPU), warm-up, median of repeats.
"""

from __future__ import annotations

import argparse
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

from zo_scale import HELENE, HiZOO, MeZO, kernels, rng  # noqa: E402
from zo_scale.plan import GIB, MODELS, ModelShape, plan  # noqa: E402

TINY = ModelShape("tiny", "opt", hidden=64, layers=2, heads=4, ffn=256, vocab=1000, max_positions=64)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTIMIZERS = {"mezo": MeZO, "hizoo": HiZOO, "helene": HELENE}
FORWARDS = {"mezo": 2, "hizoo": 3, "helene": 2}


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


def peak_bytes(device, fn) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- model


def build_model(shape: ModelShape, dtype: torch.dtype, device):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, ffn_dim=shape.ffn,
                    num_attention_heads=shape.heads, vocab_size=shape.vocab,
                    max_position_embeddings=shape.max_positions, word_embed_proj_dim=shape.proj_dim or shape.hidden,
                    dropout=0.0, attention_dropout=0.0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the weight dtype: no fp32 copy of 6.7B
    try:
        with torch.device(device):
            model = OPTForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_closure(model, shape: ModelShape, batch: int, seq: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=g).to(device)

    def closure():
        return model(input_ids=ids, labels=ids).loss

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


def fused_pass(opt, kind: str):
    """The same pass through zo_scale.kernels directly (before base.py is wired to them)."""
    g = opt.param_groups[0]
    eps, lr, step = g["eps"], g["lr"], opt.step_count

    def run():
        for v in opt.views:
            st = opt.shard_state[v.name]
            z = rng.ZStream.make(opt.seed, v.uid, step, 0)
            master, hess = st.get("master"), st.get("hessian")
            if kind == "perturb":
                h = hess if isinstance(opt, HiZOO) else None
                if master is not None:
                    kernels.perturb_from_master_(v.local, master, z, v.start, eps, hess=h)
                else:
                    kernels.perturb_(v.local, z, v.start, eps, hess=h)
            elif isinstance(opt, MeZO):
                kernels.mezo_restore_update_(v.local, [z], v.start, pgs=[0.5], restore=0.0, lr=lr,
                                             weight_decay=0.0, master=master)
            elif isinstance(opt, HiZOO):
                kernels.hizoo_restore_update_(v.local, hess, z, v.start, proj_grad=0.5, restore=0.0, lr=lr,
                                              alpha=g["hessian_smooth"], curvature=1e-6, eps=eps, floor=0.0,
                                              weight_decay=0.0, master=master)
            else:
                kernels.helene_restore_update_(
                    v.local, st["momentum"], hess, [z], v.start, pgs=[0.5], restore=0.0, lr=lr, alpha=0.5,
                    beta1=g["beta1"], beta2=g["beta2"], refresh_hessian=True, hessian_scale=g["hessian_scale"],
                    use_hessian=g["use_hessian"], gamma=g["gamma"], clip_mode=g["clip_mode"],
                    clip_lambda=g["clip_lambda"], stab_eps=g["stab_eps"], weight_decay=0.0, master=master)

    return run


def optimizer_pass(opt, kind: str):
    """The pass as the optimizer runs it now (base.py's _move_to / _restore_and_update)."""
    if kind == "perturb":
        sign = [1]

        def run():  # alternate +ε / −ε: each call is one full perturb pass
            opt._move_to(sign[0], 0)
            sign[0] = -sign[0]

        return run
    pgs = [0.5]
    losses = {"plus": [1.001], "minus": [0.999], "zero": 1.0, "proj_grads": pgs}
    scalars = opt._before_update(losses)
    return lambda: opt._restore_and_update(pgs, scalars)


# ---------------------------------------------------------------------------------- one model


def bench_model(name: str, shape: ModelShape, args, device, timer: Timer, bw: float) -> dict:
    dtype = DTYPES[args.dtype]
    model = build_model(shape, dtype, device)
    closure = make_closure(model, shape, args.batch, args.seq, device)
    res = {"model": name, "params": shape.param_count(), "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
           "attention": getattr(model.config, "_attn_implementation", None), "passes": [], "steps": {}}
    with torch.no_grad():
        res["forward_ms"] = timer(closure) * 1e3
        res["inference_peak_bytes"] = peak_bytes(device, closure)
    gpu_mem = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None

    for oname in args.optimizers:
        entry = res["steps"][oname] = {"forwards": FORWARDS[oname]}
        master = None if args.master == "auto" else args.master == "on"
        if gpu_mem:
            p = plan(shape, 1, dtype=args.dtype, optimizer=oname, batch=args.batch, seq=args.seq, backend="replicated",
                     master=master, state_dtype=args.state_dtype, gpu_mem_gib=gpu_mem, attention="sdpa")
            if not p.fits:
                entry["skipped"] = f"plan: {p.total_bytes / GIB:.1f} GiB > {gpu_mem:.1f} GiB (try --state-dtype bf16)"
                continue
        opt = None
        try:
            opt = OPTIMIZERS[oname](model, lr=args.lr, eps=1e-3, seed=1, master_weights=master,
                                    state_dtype=DTYPES[args.state_dtype])
            for kind in ("perturb", "update"):
                row = {"pass": f"{oname} {kind}", "bytes": pass_bytes(opt, kind)}
                row["floor_ms"] = row["bytes"] / bw * 1e3
                row["zo_scale_ms"] = timer(optimizer_pass(opt, kind)) * 1e3
                opt._move_to(0, 0)
                row["fused_ms"] = timer(fused_pass(opt, kind)) * 1e3 if kernels.available() else None
                opt._move_to(0, 0)
                res["passes"].append(row)
            entry["ms"] = timer(lambda: opt.step(closure)) * 1e3
            entry["overhead_ms"] = entry["ms"] - entry["forwards"] * res["forward_ms"]
            entry["peak_bytes"] = peak_bytes(device, lambda: opt.step(closure))
        except torch.OutOfMemoryError as err:
            entry["skipped"] = f"out of memory: {str(err).splitlines()[0][:120]}"
        finally:
            del opt
            free_memory(device)

    # The official-style baseline last: it rebinds param.data, which the optimizers above viewed.
    off = OfficialMeZO(model, lr=args.lr, eps=1e-3)
    res["passes"].append({"pass": "official torch.normal perturb", "bytes": None, "floor_ms": None,
                          "zo_scale_ms": None, "fused_ms": None,
                          "official_ms": timer(lambda: off.perturb(1.0)) * 1e3})
    entry = res["steps"]["official-mezo"] = {"forwards": 2}
    entry["ms"] = timer(lambda: off.step(closure)) * 1e3
    entry["overhead_ms"] = entry["ms"] - 2 * res["forward_ms"]
    entry["peak_bytes"] = peak_bytes(device, lambda: off.step(closure))
    del model, off, closure
    free_memory(device)
    return res


# ---------------------------------------------------------------------------------- report


def _fmt(x, spec=".2f", scale=1.0):
    return "-" if x is None else format(x / scale, spec)


def report(results: dict) -> str:
    out = [f"device: {results['device']}   copy bandwidth: {results['copy_bw'] / 1e9:.1f} GB/s "
           f"(bf16, read + write)   kernels: {'fused (Triton)' if results['kernels'] else 'torch path only'}"]
    for m in results["models"]:
        out += ["", f"{m['model']}: {m['params'] / 1e6:,.1f} M params, {m['dtype']}, batch {m['batch']} × seq {m['seq']}, "
                    f"attention {m['attention']}   forward {m['forward_ms']:.2f} ms",
                f"  {'pass':<32}{'GB moved':>9}{'floor ms':>10}{'zo_scale ms':>13}{'fused ms':>10}{'fused/floor':>12}"]
        for p in m["passes"]:
            ratio = p["fused_ms"] / p["floor_ms"] if p.get("fused_ms") and p["floor_ms"] else None
            zo = p["zo_scale_ms"] if p.get("official_ms") is None else p["official_ms"]
            out.append(f"  {p['pass']:<32}{_fmt(p['bytes'], '.3g', 1e9):>9}{_fmt(p['floor_ms']):>10}"
                       f"{_fmt(zo):>13}{_fmt(p['fused_ms']):>10}{_fmt(ratio, '.2f'):>12}")
        inf = m["inference_peak_bytes"]
        out += [f"  {'step':<16}{'ms':>10}{'forwards':>10}{'ms beyond fwd':>15}{'peak GiB':>10}{'+ vs inference':>16}"]
        for oname, s in m["steps"].items():
            if "skipped" in s:
                out.append(f"  {oname:<16}skipped: {s['skipped']}")
                continue
            extra = None if s["peak_bytes"] is None or inf is None else s["peak_bytes"] - inf
            out.append(f"  {oname:<16}{s['ms']:>10.2f}{s['forwards']:>10}{s['overhead_ms']:>15.2f}"
                       f"{_fmt(s['peak_bytes'], '.2f', GIB):>10}{_fmt(extra, '.2f', GIB):>16}")
        out.append(f"  {'inference only':<16}{'':>35}{_fmt(inf, '.2f', GIB):>10}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["opt-1.3b", "opt-6.7b"], help="OPT shapes from zo_scale.plan")
    ap.add_argument("--tiny", action="store_true", help="tiny OPT shape, batch 2, seq 32: a CPU smoke test")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
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
    args = ap.parse_args(argv)
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
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "kernels": kernels.available(), "args": {k: str(v) for k, v in vars(args).items()},
        "copy_bw": copy_bandwidth(timer, device, args.copy_numel), "models": [],
    }
    for name in args.models:
        results["models"].append(bench_model(name, shapes[name], args, device, timer, results["copy_bw"]))
        print(report({**results, "models": results["models"][-1:]}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
