"""The training loop: ZO steps on the global batch, evaluation and checkpoints at their cadence, then
the final evaluation, export, summary and plot. Read :meth:`Trainer.fit` top to bottom.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from zo_scale import evaluate as ev
from zo_scale import metrics, run_checkpoint
from zo_scale.config import RunConfig
from zo_scale.distributed import DistInfo
from zo_scale.export import export_model
from zo_scale.trainer.build import Built
from zo_scale.trainer.data import BatchOrder, local_batch
from zo_scale.trainer.objectives import make_closure
from zo_scale.trainer.schedule import lr_factor

# Config keys a resumed run may change; anything else must match the checkpoint's config.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.on_nonfinite", "train.progress", "eval.", "checkpoint.",
                     "output_dir", "backend", "deepspeed", "fsdp2", "distributed.")


@dataclass
class RunState:
    """What the loop carries from step to step (and through a checkpoint)."""

    step: int = 0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    wall_time_s: float = 0.0  # of earlier segments of this run (before resumes)
    initial_dev: dict | None = None
    last_dev: dict | None = None
    best_dev: dict | None = None  # {"step", "forward_passes", "metrics"}
    recent_losses: list = field(default_factory=list)
    resumed_from: list = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: RunConfig, info: DistInfo, built: Built, opt, splits: dict, out_dir: Path):
        self.cfg, self.info, self.built, self.opt, self.splits = cfg, info, built, opt, splits
        self.out = Path(out_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.main = info.rank == 0
        self.world = info.world_size if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.order = BatchOrder(len(splits["train"]), cfg.train.batch_size, cfg.seed)
        self.state = RunState()
        self.eval_options = dict(batch_size=cfg.eval.batch_size, max_length=cfg.task.max_length,
                                 length_normalize=cfg.eval.length_normalize, max_new_tokens=cfg.eval.max_new_tokens)
        from zo_scale.data.tasks import TASKS

        self.primary_metric = TASKS[cfg.task.name.strip().lower()].metric  # what "best dev" compares
        self.log: metrics.MetricsLog | None = None
        self.bar = None

    # ------------------------------------------------------------------ the run

    def fit(self, resume_from: Path | None) -> dict:
        cfg, opt = self.cfg, self.opt
        t_start = time.perf_counter()
        offset = self._resume(resume_from) if resume_from else None
        self.log = metrics.MetricsLog(self.out / "metrics.jsonl", self.main, resume_offset=offset)
        if resume_from is not None:
            self.log.write({"type": "event", "event": "resumed", **self.state.resumed_from[-1]})
        else:
            self._write_config()
            if cfg.eval.at_start and self.splits["dev"]:
                self._say(f"evaluating dev before training ({len(self.splits['dev'])} examples) ...")
                self.evaluate("dev")
        self._open_progress()

        for step in range(self.state.step, cfg.train.steps):
            batch = local_batch(cfg, self.built.tokenizer, self._global_examples(step), self.rank, self.world)
            before = opt.forward_passes
            self._set_lr(step)
            t0 = time.perf_counter()
            opt.step(self._closure(batch))
            dt = time.perf_counter() - t0
            self.state.step = step + 1
            self.state.train_time_s += dt
            self._log_step(dt, batch.global_tokens * (opt.forward_passes - before))

            done = self.state.step
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps:
                self.evaluate("dev")
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.train.steps:
                self.save_checkpoint(time.perf_counter() - t_start)

        self._close_progress()
        if cfg.eval.at_end and (self.state.last_dev is None or self.state.last_dev["step"] != self.state.step):
            self.evaluate("dev")
        test = self.evaluate("test") if cfg.eval.test_at_end and self.splits["test"] else None
        if cfg.checkpoint.at_end:
            self.save_checkpoint(time.perf_counter() - t_start)
        self._say("exporting the model ...")
        export_model(self.built.model, self.built.module, self.built.tokenizer, self.out / "final_model", self.main)
        best_test = self._finish_with_best()  # last: it overwrites the final weights with the best ones
        summary = self._summary(time.perf_counter() - t_start, test, best_test)
        if self.main:
            metrics.write_json_atomic(self.out / "summary.json", summary)
            metrics.plot(self.out / "metrics.jsonl", self.out / "plot.png", title=self._title())
        self.log.close()
        return summary

    # ------------------------------------------------------------------ one step

    def _global_examples(self, step: int) -> list:
        train = self.splits["train"]
        return [train[i] for i in self.order.indices(step)]

    def _set_lr(self, step: int) -> None:
        t = self.cfg.train
        factor = lr_factor(step, steps=t.steps, schedule=t.lr_schedule, warmup_steps=t.warmup_steps,
                           min_lr_ratio=t.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.optimizer["lr"] * factor

    def _closure(self, batch):
        return make_closure(self.cfg.task.objective, self.built.model, self.built.tokenizer, batch, self.eval_options)

    def _log_step(self, dt: float, tokens: int) -> None:
        s = self.opt.last_stats
        if not s.skipped:
            self.state.recent_losses = (self.state.recent_losses + [s.loss])[-20:]
        record = {"type": "step", "step": self.state.step, "loss": metrics.finite_or_none(s.loss),
                  "loss_plus": metrics.finite_or_none(s.loss_plus), "loss_minus": metrics.finite_or_none(s.loss_minus),
                  "proj_grad": metrics.finite_or_none(s.proj_grad), "lr": s.lr, "forward_passes": s.forward_passes,
                  "tokens_per_s": tokens / dt if dt > 0 else None, "step_time_s": dt, **metrics.memory_mb()}
        if s.skipped:
            record["skipped"] = True
        record.update({k: metrics.finite_or_none(v) for k, v in s.extra.items()})
        if s.loss_zero is not None:
            record["loss_zero"] = metrics.finite_or_none(s.loss_zero)
        self.log.write(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self._postfix(), refresh=False)
        elif self.main and (self.state.step % self.cfg.train.log_every == 0 or self.state.step == self.cfg.train.steps):
            self._say(f"step {self.state.step}/{self.cfg.train.steps} | {self._postfix()} | {dt:.2f} s/step "
                      f"| fwd {s.forward_passes}")

    def _postfix(self) -> str:
        losses = self.state.recent_losses
        text = f"loss {sum(losses) / len(losses):.4f}" if losses else "loss n/a"
        if self.state.last_dev is not None:
            text += " | dev " + " ".join(f"{k} {v:.4f}" for k, v in self.state.last_dev["metrics"].items())
        return text

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str, weights: str = "current") -> dict | None:
        """Evaluate ``split`` with the model's current weights; ``weights`` labels them in the log
        ("best": the best dev snapshot, restored at the end)."""
        examples = self.splits[split]
        if not examples:
            return None
        t0 = time.perf_counter()
        result = ev.evaluate(self.built.model, self.built.tokenizer, examples, **self.eval_options)
        dt = time.perf_counter() - t0
        self.state.eval_time_s += dt
        record = {"step": self.state.step, "forward_passes": self.opt.forward_passes, "metrics": result}
        if weights == "best":
            record.update(step=self.state.best_dev["step"], forward_passes=self.state.best_dev["forward_passes"])
        extra = {"weights": weights} if weights != "current" else {}
        self.log.write({"type": "eval", "split": split, **record, **extra, "examples": len(examples), "eval_time_s": dt})
        self._say(f"eval {split}{' (best dev weights)' if weights == 'best' else ''} @ step {record['step']} "
                  f"(fwd {record['forward_passes']}, {len(examples)} examples, {dt:.0f} s): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if split == "dev":
            self._track_dev(record)
        return record

    def _track_dev(self, record: dict) -> None:
        """Remember the first, last and best dev evaluation; snapshot the weights of a new best."""
        self.state.last_dev = record
        if self.state.initial_dev is None:
            self.state.initial_dev = record
        key = self.primary_metric  # every task's evaluation reports its primary metric
        best = self.state.best_dev
        if best is None or record["metrics"][key] > best["metrics"][key]:  # ties keep the earlier one
            self.state.best_dev = record
            if self.cfg.eval.keep_best:
                run_checkpoint.save_best_weights(self.ckpt_root, self.opt, record)

    def _finish_with_best(self) -> dict | None:
        """If the best dev evaluation was not the last one: load its weights, evaluate test on them and
        export them to best_model/. Returns that test record (None when there is nothing to do)."""
        best = self.state.best_dev
        if not (self.cfg.eval.keep_best and best is not None and best["step"] != self.state.step):
            self._drop_stale_best_model()
            return None
        saved = run_checkpoint.read_best_record(self.ckpt_root)
        if saved is None or saved["step"] != best["step"]:  # e.g. resumed with fewer train.steps than it had
            self._say(f"no snapshot of the best dev weights (step {best['step']}) in {self.ckpt_root}: "
                      "best_model/ not written")
            self._drop_stale_best_model()
            return None
        run_checkpoint.load_param_slices(self.ckpt_root / run_checkpoint.BEST_DIR, self.opt)
        test = self.evaluate("test", weights="best") if self.cfg.eval.test_at_end and self.splits["test"] else None
        self._say(f"exporting the best dev weights (step {best['step']}) ...")
        export_model(self.built.model, self.built.module, self.built.tokenizer, self.out / "best_model", self.main)
        return test

    def _drop_stale_best_model(self) -> None:
        """This run exports no best_model/; one left by an earlier segment would contradict its summary."""
        stale = self.out / "best_model"
        if self.main and stale.is_dir():
            self._say("removing best_model/ from an earlier segment: it does not hold this run's best dev weights")
            shutil.rmtree(stale)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, segment_wall_s: float) -> None:
        state = dataclasses.asdict(self.state)
        state["wall_time_s"] += segment_wall_s
        trainer_state = {"run": state, "data": self.order.position(self.state.step),
                         "metrics_offset": self.log.offset(), "config": self.cfg.to_dict()}
        path = run_checkpoint.save_checkpoint(self.ckpt_root, self.state.step, self.opt, trainer_state,
                                              keep=self.cfg.checkpoint.keep)
        self.log.write({"type": "event", "event": "checkpoint", "step": self.state.step, "path": str(path)})

    def _resume(self, ckpt: Path) -> int:
        saved = run_checkpoint.read_trainer_state(ckpt)
        check_resumable(saved["config"], self.cfg.to_dict(), ckpt)  # cli checked it already; library callers too
        state = run_checkpoint.load_checkpoint(ckpt, self.opt)
        self.state = RunState(**state["run"])
        self.state.resumed_from.append({"checkpoint": str(ckpt), "step": self.state.step, "world_size": self.world})
        self._say(f"resumed from {ckpt} at step {self.state.step} (saved on {saved['world_size']} ranks, now {self.world})")
        return state["metrics_offset"]

    # ------------------------------------------------------------------ output

    def _write_config(self) -> None:
        if self.main:
            metrics.write_json_atomic(self.out / "config.json", self.cfg.to_dict())

    def _say(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _open_progress(self) -> None:
        mode = self.cfg.train.progress
        if self.main and (mode == "bar" or (mode == "auto" and sys.stderr.isatty())):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.cfg.train.steps, initial=self.state.step, desc="ZO steps", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def _close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _title(self) -> str:
        c = self.cfg
        src = c.model.name_or_path or c.model.gguf or c.model.package or f"random {c.model.arch}"
        peft = f" + {c.peft['method']}" if c.peft else ""
        return f"{c.optimizer_name} on {c.task.name}: {src}{peft}, batch {c.train.batch_size}"

    def _summary(self, segment_wall_s: float, test: dict | None, best_test: dict | None) -> dict:
        s = self.state
        peak = metrics.memory_mb()
        peak.pop("rss_mb")
        if dist.is_initialized() and self.world > 1:  # the largest footprint of any rank
            keys = sorted(peak)
            t = torch.tensor([peak[k] for k in keys], dtype=torch.float64, device=self.opt.backend.loss_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # NCCL needs a GPU tensor, gloo a CPU one
            peak = dict(zip(keys, t.tolist()))
        losses = s.recent_losses
        return {
            "status": "completed",
            "steps": s.step,
            "forward_passes": self.opt.forward_passes,
            "wall_time_s": s.wall_time_s + segment_wall_s,
            "train_time_s": s.train_time_s,
            "eval_time_s": s.eval_time_s,
            "final_train_loss": sum(losses) / len(losses) if losses else None,
            "initial": {"dev": s.initial_dev},
            "final": {"dev": s.last_dev, "test": test},
            # the best dev evaluation; "test": the test split on its weights (best_model/), when they are
            # not the final ones (then final.test is theirs)
            "best_dev": None if s.best_dev is None else {**s.best_dev, "test": test if s.best_dev["step"] == s.step else best_test},
            "primary_metric": self.primary_metric,
            "peak_memory_mb": peak,
            "world_size": self.world,
            "backend": self.cfg.backend,
            "trainable_params": sum(v.global_numel for v in self.opt.views),
            "resumed_from": s.resumed_from,
            "config": self.cfg.to_dict(),
            "versions": metrics.versions(),
        }


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _section_defaults() -> dict:
    """Flattened defaults of the config sections that have them all (task.name, train.lr_schedule, ...)."""
    from zo_scale import config as c

    sections = {"model": c.ModelConfig, "task": c.TaskConfig, "train": c.TrainConfig, "eval": c.EvalConfig,
                "checkpoint": c.CheckpointConfig, "distributed": c.DistributedConfig}
    return _flatten({name: dataclasses.asdict(cls()) for name, cls in sections.items()})


def check_resumable(saved: dict, current: dict, ckpt: Path) -> None:
    """A checkpoint continues only the run that wrote it: same model, data, optimizer and seed."""
    from zo_scale.config import ConfigError

    a, b = _flatten(saved), _flatten(current)
    defaults = _section_defaults()  # a key added since the checkpoint was written matches at its default
    differ = sorted(k for k in set(a) | set(b)
                    if a.get(k, defaults.get(k)) != b.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if differ:
        k = differ[0]
        raise ConfigError(f"cannot resume from {ckpt}: the config differs in {', '.join(differ)} "
                          f"(checkpoint {json.dumps(a.get(k))}, now {json.dumps(b.get(k))}); use another output_dir")
