"""Compile every kernel variant for a CUDA architecture without a GPU (Triton's bundled ptxas).

    python -m zo_scale.kernels.compile_check --arch 90 [--dump DIR]

The CPU interpreter runs the kernels' arithmetic but not Triton's type checking and lowering;
this catches what only the compiler sees. ``--dump`` writes each variant's PTX for inspection
(e.g. to confirm vectorised ld.global.v4 and libdevice calls).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

KEYS = dict(k0="i32", k1="i32", step="i32", stream="i32", blk_lo="i32", blk_hi="i32")
ALIGNED = ("local_ptr", "master_ptr", "hess_ptr", "m_ptr", "h_ptr", "out_ptr", "table_ptr", "n")  # as a real launch specialises


def _variants():
    """(name, kernel, signature, constexprs) for the variants a training run launches."""
    from zo_scale.kernels import perturb, philox, update

    base = dict(BLOCK=philox.BLOCK, USE_LIBDEVICE=True)
    for sign in (False, True):
        yield f"draw-sign{int(sign)}", philox._draw_kernel, dict(out_ptr="*fp32", n="i32", **KEYS), dict(
            SIGN=sign, SHIFT=0, **base)
    yield "words", philox._words_kernel, dict(out_ptr="*i64", n_blocks="i32", **KEYS), dict(NB=256)
    for dt, master, hess, shift in itertools.product(("bf16", "fp32"), (True, False), (True, False), (0, 1)):
        sig = dict(local_ptr=f"*{dt}", master_ptr="*fp32", hess_ptr="*fp32", n="i32", **KEYS, scale="fp32")
        const = dict(HAS_MASTER=master, HAS_HESS=hess, SIGN=False, SHIFT=shift, **base)
        yield f"perturb-{dt}-m{int(master)}-h{int(hess)}-s{shift}", perturb._perturb_kernel, sig, const
    for dt, master in itertools.product(("bf16", "fp32"), (True, False)):  # FZOO's Rademacher probes
        sig = dict(local_ptr=f"*{dt}", master_ptr="*fp32", hess_ptr="*fp32", n="i32", **KEYS, scale="fp32")
        const = dict(HAS_MASTER=master, HAS_HESS=False, SIGN=True, SHIFT=0, **base)
        yield f"perturb-sign-{dt}-m{int(master)}", perturb._perturb_kernel, sig, const
    import triton.language as tl

    for dt, master, hess, sign in itertools.product(("bf16", "fp32"), (True, False), (True, False), (False, True)):
        if hess and sign:
            continue
        sig = dict(table_ptr="*i64", n_rows="i32", step="i32", stream="i32", scale="fp32")
        const = dict(LOCAL_T=tl.bfloat16 if dt == "bf16" else tl.float32, HESS_T=tl.float32, HAS_MASTER=master,
                     HAS_HESS=hess, SIGN=sign, SEARCH_STEPS=9, **base)
        yield f"perturb-many-{dt}-m{int(master)}-h{int(hess)}-sign{int(sign)}", perturb._perturb_many_kernel, sig, const
    scal = {k: "fp32" for k in ("c0", "c1", "c2", "c3", "restore")}
    for dt, master, ns in itertools.product(("bf16", "fp32"), (True, False), (1, 2)):
        sig = dict(local_ptr=f"*{dt}", master_ptr="*fp32", n="i32", **KEYS, **scal, decay="fp32", neg_lr="fp32")
        yield f"mezo-{dt}-m{int(master)}-n{ns}", update._mezo_kernel, sig, dict(
            N_SAMPLES=ns, HAS_MASTER=master, SHIFT=0, **base)
    for dt, master, sign in itertools.product(("bf16", "fp32"), (True, False), (True, False)):
        sig = dict(local_ptr=f"*{dt}", master_ptr="*fp32", coef_ptr="*fp32", n="i32", **KEYS, n_dirs="i32",
                   restore="fp32", decay="fp32", neg_lr="fp32")
        yield f"fzoo-{dt}-m{int(master)}-sign{int(sign)}", update._fzoo_kernel, sig, dict(
            HAS_MASTER=master, SIGN=sign, SHIFT=0, **base)
    for dt, sdt, floor in itertools.product(("bf16", "fp32"), ("bf16", "fp32"), (True, False)):
        sig = dict(local_ptr=f"*{dt}", master_ptr="*fp32", hess_ptr=f"*{sdt}", n="i32", **KEYS,
                   **{k: "fp32" for k in ("restore", "gain", "keep", "floor", "decay", "step_scale")})
        yield f"hizoo-{dt}-{sdt}-f{int(floor)}", update._hizoo_kernel, sig, dict(
            HAS_MASTER=dt != "fp32", HAS_FLOOR=floor, SHIFT=0, **base)
    hel = ("alpha", "beta1", "beta2", "hscale", "decay", "gamma", "lam", "stab_eps", "neg_lr")
    for sdt, clip, use_h, refresh in itertools.product(("bf16", "fp32"), (0, 1, 2), (True, False), (True, False)):
        if not use_h and refresh:
            continue
        sig = dict(local_ptr="*bf16", master_ptr="*fp32", m_ptr=f"*{sdt}", h_ptr=f"*{sdt}", count_ptr="*i32",
                   n="i32", **KEYS, **scal, **{k: "fp32" for k in hel})
        yield f"helene-{sdt}-c{clip}-h{int(use_h)}-r{int(refresh)}", update._helene_kernel, sig, dict(
            N_SAMPLES=1, HAS_MASTER=True, REFRESH=refresh, USE_HESS=use_h, CLIP=clip, SHIFT=0, **base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--dump", type=Path, help="write each variant's PTX here")
    ap.add_argument("--only", help="compile only variants whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter has nothing to compile)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    count, t0 = 0, time.time()
    for name, fn, sig, const in _variants():
        if args.only and args.only not in name:
            continue
        full = {**sig, **{k: "constexpr" for k in const}}
        idx = fn.arg_names.index
        src = ASTSource(
            fn=fn, signature=full, constexprs={(idx(k),): v for k, v in const.items()},
            attrs={(idx(a),): [["tt.divisibility", 16]] for a in ALIGNED if a in sig},
        )
        compiled = triton.compile(src, target=target, options={"num_warps": 4})
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name}.ptx").write_text(compiled.asm["ptx"])
        count += 1
    print(f"compiled {count} kernel variants for sm_{args.arch} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
