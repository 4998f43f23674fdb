"""One ZOTrainer run on a tiny random Llama: uninterrupted (saving every RESUME_AT steps) or resumed
from the checkpoint-RESUME_AT of an earlier run, under one process, DeepSpeed ZeRO-3 or FSDP2.

    torchrun --nproc_per_node 2 tests/dist_scripts/hf_trainer_worker.py --backend zero3 --optimizer HELENE \
        --out /tmp/o [--resume]

Writes ``{out}/{phase}.pt`` (rank 0): the full trained weights, Trainer's logged losses, the ZO lr of
each step and (first run) the results of the refusal and GradScaler checks.
FSDP on CPU: accelerate turns FSDP on only for accelerator backends and silently gives DDP on CPU,
so ``--backend fsdp`` sets the accelerator state to FSDP (with the plugin Trainer built from
``TrainingArguments(fsdp=...)``) right after Trainer created it — what it would be on GPUs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import import_deepspeed, quiet  # noqa: E402

MAX_STEPS = 4
RESUME_AT = 2
PER_DEVICE_BATCH = 2
OPTIONS = {  # eps/lr large enough that a few steps move a 1k-parameter model visibly
    "MeZO": dict(eps=1e-2, weight_decay=0.01),
    "HiZOO": dict(eps=1e-2, hessian_smooth=1e-6),
    "HiZOOL": dict(eps=1e-2, hessian_smooth=1e-3),
    "HELENE": dict(eps=1e-2, anneal_horizon=4.0, clip_lambda=0.5),
    "FZOO": dict(eps=1e-2, n_directions=3),
}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg)


def dataset(n: int = 32, seq: int = 8):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 32, (seq,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(1, 4, (1,), generator=g))] = -100  # unequal token counts per example
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels})
    return rows


def ds_config(**sections) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        **sections,
    }


def training_args(backend: str, out: Path, **overrides):
    from transformers import TrainingArguments

    kw = {}
    if backend == "zero3":
        kw["deepspeed"] = ds_config()
    elif backend == "fsdp":
        kw["fsdp"] = True
        kw["fsdp_config"] = {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
                             "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    kw = {
        "output_dir": str(out / "run"), "use_cpu": True, "max_steps": MAX_STEPS,
        "per_device_train_batch_size": PER_DEVICE_BATCH,
        "learning_rate": 5e-2, "lr_scheduler_type": "linear", "save_strategy": "steps", "save_steps": RESUME_AT,
        "logging_steps": 1, "report_to": [], "seed": 0, "disable_tqdm": True, "dataloader_drop_last": True,
        **kw, **overrides,
    }
    return TrainingArguments(**kw)


def trainer_class(backend: str):
    from zo_scale.integrations import ZOTrainer

    if backend != "fsdp":
        return ZOTrainer
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class CPUFSDPTrainer(ZOTrainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.accelerator.state.distributed_type = DistributedType.FSDP
            self.accelerator.state.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True

    return CPUFSDPTrainer


class RecordZOLr(TrainerCallback):
    def __init__(self, trainer, lrs: dict):
        self.trainer, self.lrs = trainer, lrs

    def on_step_end(self, args, state, control, **kwargs):
        self.lrs[state.global_step] = self.trainer.zo_optimizer.last_stats.lr


def refusals(backend: str, out: Path) -> dict[str, str]:
    """The one-line errors of what ZOTrainer refuses, by case (each refused before Trainer builds anything)."""
    from zo_scale.integrations import ZOTrainer

    cases = {}
    if backend == "single":
        cases["grad_accum"] = lambda: ZOTrainer(model=tiny_llama(),
                                                args=training_args(backend, out, gradient_accumulation_steps=2))
        cases["optimizers"] = lambda: ZOTrainer(model=tiny_llama(), args=training_args(backend, out),
                                                optimizers=(torch.optim.SGD(tiny_llama().parameters(), lr=0.1), None))
    if backend == "zero3":  # an "optimizer" section as most DeepSpeed configs have
        ds = ds_config(optimizer={"type": "AdamW", "params": {"lr": "auto"}})
        cases["ds_optimizer"] = lambda: ZOTrainer(model=tiny_llama(), args=training_args(backend, out, deepspeed=ds))
        stage2 = {**ds_config(), "zero_optimization": {"stage": 2}}
        cases["ds_stage2"] = lambda: ZOTrainer(model=tiny_llama(), args=training_args(backend, out, deepspeed=stage2))
    messages = {}
    for name, build in cases.items():
        try:
            build()
        except ValueError as e:
            messages[name] = str(e)
        else:
            messages[name] = "accepted"
    return messages


def train_with_grad_scaler(out: Path) -> str:
    """One step with the GradScaler accelerate attaches for fp16 on GPUs (emulated on CPU)."""
    from zo_scale.integrations import ZOTrainer

    args = training_args("single", out / "scaler", max_steps=1, save_strategy="no")
    trainer = ZOTrainer(model=tiny_llama(), args=args, train_dataset=dataset())
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    try:
        trainer.train()
    except Exception as e:  # what a user would see
        return f"{type(e).__name__}: {e}"
    return "trained"


def full_weights(trainer) -> dict[str, torch.Tensor]:
    sd = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return {k: v.detach().float().cpu().clone() for k, v in (sd or {}).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("single", "zero3", "fsdp"), required=True)
    ap.add_argument("--optimizer", default="MeZO", choices=tuple(OPTIONS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    quiet()
    if a.backend == "zero3":
        import_deepspeed()
    import zo_scale

    refused = {} if a.resume else refusals(a.backend, a.out)
    scaler_run = train_with_grad_scaler(a.out) if a.backend == "single" and not a.resume else None
    args = training_args(a.backend, a.out)
    trainer = trainer_class(a.backend)(
        model=tiny_llama(), args=args, train_dataset=dataset(),
        zo_optimizer=getattr(zo_scale, a.optimizer), zo_options=OPTIONS[a.optimizer],
    )
    zo_lrs = {}  # the lr of each ZO step, to check it follows Trainer's scheduler
    trainer.add_callback(RecordZOLr(trainer, zo_lrs))
    resume = str(a.out / "run" / f"checkpoint-{RESUME_AT}") if a.resume else None
    trainer.train(resume_from_checkpoint=resume)
    weights = full_weights(trainer)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    if trainer.is_world_process_zero():
        phase = "resumed" if a.resume else "full"
        torch.save({"weights": weights, "losses": losses, "initial": tiny_llama().state_dict(),
                    "zo_steps": trainer.zo_optimizer.step_count, "refusals": refused,
                    "zo_lrs": zo_lrs, "scaler_run": scaler_run, "backend": type(trainer.zo_optimizer.backend).__name__},
                   a.out / f"{phase}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
