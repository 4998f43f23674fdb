"""``launch/train.py``: the command line of a run, the same under python, torchrun, deepspeed, srun and mpirun.

Everything that can be checked without a process group is checked before one is created, and the
output directory is created only once the model and optimizer are built: a bad config leaves nothing
behind. Exit codes: 0 done, 2 bad input (one line on stderr, no traceback), 3 non-finite loss,
1 anything else (with its traceback; the process ends at once so its peers fail fast).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

EXIT_BAD_INPUT, EXIT_NONFINITE = 2, 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    from zo_scale.distributed import strip_local_rank_arg

    ap = argparse.ArgumentParser(prog="launch/train.py", description="Zeroth-order fine-tuning run (see docs/config.md)")
    ap.add_argument("--config", required=True, help="run config (JSON)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.steps=20 --set optimizer.lr=1e-4 (repeatable)")
    ap.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                    help="continue from the latest complete checkpoint in output_dir (or from CHECKPOINT)")
    return ap.parse_args(strip_local_rank_arg(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from zo_scale.config import ConfigError
    from zo_scale.distributed import discover

    try:
        info = discover()
    except Exception as e:  # noqa: BLE001 - a broken launcher environment is bad input too
        return _bad_input(f"cannot tell how this process was launched: {e}")
    try:
        args = parse_args(argv)
        return _run(args, info)
    except ConfigError as e:
        return _bad_input(str(e), info)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """launch/train.py: :func:`main`, then end the process without the interpreter's teardown. Every output
    is written and the group destroyed by then; but DeepSpeed keeps a ZeRO-3 engine's parameters, hence its
    groups and gloo's threads, for the life of the process, and a gloo thread still finishing a collective
    during teardown aborts a finished run ("terminate called without an active exception", issue #15)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _bad_input(message: str, info=None) -> int:
    """One line from the first rank of each node: nodes can disagree (a file present on one node only),
    the ranks of one node see the same files and config. Other nodes' lines carry their rank."""
    rank, local_rank = (info.rank, info.local_rank) if info is not None else (0, 0)
    if local_rank == 0 or os.environ.get("ZO_SCALE_ALL_RANKS_LOG"):
        where = f"[rank {rank}] " if rank else ""
        print(f"zo_scale: error: {where}{message}", file=sys.stderr, flush=True)
    _leave_group()
    return EXIT_BAD_INPUT


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_BAD_INPUT)  # peers may be inside a collective: do not wait for them


def _run(args, info) -> int:
    from zo_scale.config import ConfigError, load_config
    from zo_scale.data.sources import DataNotFoundError
    from zo_scale.trainer.data import load_splits

    cfg = load_config(args.config, args.set)
    if args.resume is not None:
        cfg.checkpoint.resume = "auto" if args.resume == "latest" else args.resume
    if cfg.train.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} (global) does not split evenly over "
                          f"{info.world_size} ranks")
    out = Path(cfg.output_dir)
    resume_from = _resume_point(cfg, out, required=args.resume is not None)
    _check_resumable(cfg, resume_from)
    try:
        splits = load_splits(cfg)
    except (DataNotFoundError, FileNotFoundError, KeyError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"task {cfg.task.name!r}: {str(e).strip(chr(39))}") from None

    _quiet_libraries()
    import torch

    if not torch.cuda.is_available():  # DeepSpeed would otherwise warn that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    torch.manual_seed(cfg.seed)
    from zo_scale.distributed import exit_on_error, process_group

    # _train's model and optimizer hold the group: it is destroyed once they are gone
    with process_group(timeout_s=cfg.distributed.timeout_s, force_group=cfg.backend != "none"), exit_on_error():
        return _train(cfg, info, splits, out, resume_from)


def _train(cfg, info, splits, out: Path, resume_from) -> int:
    from zo_scale import NonFiniteLossError
    from zo_scale.config import ConfigError
    from zo_scale.trainer.build import build, build_optimizer
    from zo_scale.trainer.loop import Trainer

    if info.rank == 0:
        print(f"zo_scale: loading {_model_name(cfg)} ({cfg.backend} backend, {info.world_size} rank"
              f"{'s' if info.world_size > 1 else ''}) ...", file=sys.stderr, flush=True)
    try:
        built = build(cfg, info)
        opt = build_optimizer(cfg, built)
    except ConfigError as e:
        return _bad_input(str(e), info)
    if info.rank == 0:
        trainable = sum(v.global_numel for v in opt.views)
        print(f"zo_scale: {cfg.optimizer_name} on {cfg.task.name} ({len(splits['train'])} train / "
              f"{len(splits['dev'])} dev / {len(splits['test'])} test examples), {trainable:,} trainable "
              f"parameters, {cfg.train.steps} steps of {cfg.train.batch_size}, output in {out}/",
              file=sys.stderr, flush=True)
    import torch.distributed as dist

    if info.rank == 0:
        if resume_from is None and out.exists():  # a fresh start replaces what an earlier attempt left
            for name in ("metrics.jsonl", "summary.json", "plot.png", "config.json", "final_model", "best_model",
                         "checkpoints"):
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    trainer = Trainer(cfg, info, built, opt, splits, out)
    try:
        summary = trainer.fit(resume_from)
    except NonFiniteLossError as e:
        trainer._close_progress()
        if trainer.log is not None:
            trainer.log.write({"type": "event", "event": "nonfinite_loss", "step": trainer.state.step + 1,
                               "message": str(e)})
        if info.rank == 0:
            print(f"zo_scale: error: {str(e).removeprefix('zo_scale: ')} -- stopping the run; set train.on_nonfinite=skip to skip such steps, or "
                  "lower optimizer.lr / optimizer.eps", file=sys.stderr, flush=True)
        if dist.is_initialized():  # every rank saw the same reduced loss; none waits for another
            sys.stderr.flush()
            os._exit(EXIT_NONFINITE)
        return EXIT_NONFINITE
    except ConfigError as e:  # found once the model is known (e.g. resuming a different run)
        return _bad_input(str(e), info)
    if info.rank == 0:
        _print_result(summary, out)
    if dist.is_initialized():
        dist.barrier()  # leave together: a rank tearing down while rank 0 still writes outputs can abort
    return 0


def _resume_point(cfg, out: Path, required: bool):
    from zo_scale.config import ConfigError
    from zo_scale.run_checkpoint import latest_checkpoint

    mode = cfg.checkpoint.resume
    if mode not in ("auto", "never"):
        return Path(mode)
    latest = latest_checkpoint(out / "checkpoints")
    if mode == "never":
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"output_dir {out} is not empty and checkpoint.resume is 'never': "
                              "choose another output_dir or resume with --resume")
        return None
    if required and latest is None:
        raise ConfigError(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
    if latest is None and (out / "summary.json").exists():
        raise ConfigError(f"output_dir {out} holds a finished run without a checkpoint to continue from: "
                          "choose another output_dir")
    return latest


def _check_resumable(cfg, ckpt: Path | None) -> None:
    """Before anything is loaded: the checkpoint must come from this run (same model, data, optimizer, seed)."""
    if ckpt is None:
        return
    from zo_scale.run_checkpoint import read_trainer_state
    from zo_scale.trainer.loop import check_resumable

    check_resumable(read_trainer_state(ckpt)["config"], cfg.to_dict(), ckpt)


def _model_name(cfg) -> str:
    m = cfg.model
    return m.name_or_path or m.gguf or (f"the {m.package} package" if m.package else f"a random-init {m.arch}")


def _quiet_libraries() -> None:
    """Library chatter to errors only: the run prints its own progress (rank 0)."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def _print_result(summary: dict, out: Path) -> None:
    def fmt(rec):
        return ", ".join(f"{k} {v:.4f}" for k, v in rec["metrics"].items()) if rec else "n/a"

    lines = [f"done: {summary['steps']} steps, {summary['forward_passes']} forward passes, "
             f"{summary['wall_time_s']:.0f} s",
             f"  dev  before: {fmt(summary['initial']['dev'])}   after: {fmt(summary['final']['dev'])}"]
    if summary["final"]["test"]:
        lines.append(f"  test after: {fmt(summary['final']['test'])}")
    best = summary["best_dev"]
    has_best_model = (out / "best_model").is_dir() and best is not None and best["step"] != summary["steps"]
    if has_best_model:
        lines.append(f"  best dev at step {best['step']}: {fmt(best)}   test there: {fmt(best['test'])}")
    lines.append(f"  outputs in {out}/ (metrics.jsonl, summary.json, plot.png, final_model/"
                 f"{', best_model/' if has_best_model else ''})")
    print("\n".join(lines), flush=True)
