"""``transformers.Trainer`` with a zo_scale ZO optimizer: one process, DDP, FSDP (accelerate) or
DeepSpeed ZeRO-3 (``TrainingArguments(deepspeed=...)``), checkpoint/resume included.

``ZOTrainer(model=..., args=..., train_dataset=..., zo_optimizer=zo_scale.MeZO, zo_options={"eps": 1e-3})``

How it fits into Trainer (transformers 5.x, accelerate 1.x, read from their sources):

* Trainer, accelerate and DeepSpeed each need *an* optimizer before the model is wrapped, but a ZO
  optimizer needs the wrapped model (the DeepSpeed engine, the ``fully_shard`` module). So
  ``create_optimizer`` returns an :class:`LrHolder` — the trainable parameters and the lr that
  Trainer's scheduler drives, whose ``step`` changes no weight — and the ZO optimizer is built on
  the model Trainer wrapped: under DeepSpeed on the engine right after accelerate created it (before
  Trainer resumes it: see below), otherwise on the first ``training_step``. Its lr is the
  scheduler's at every step.
* ``training_step`` runs ``opt.step(closure)``: forwards only (eval mode, no grad), no backward, so
  Trainer's ``optimizer.step`` / ``zero_grad`` find no gradients and change nothing; gradient
  clipping is skipped and accelerate's fp16 GradScaler dropped. It returns the step's global loss,
  the loss Trainer logs.
* Checkpoints: ``save_steps`` writes Trainer's files as usual plus the ZO state; on
  ``resume_from_checkpoint`` Trainer loads its files and the ZO state follows, so the trajectory
  continues exactly. Under ZeRO-3 the engine itself carries the ZO state
  (``zo_scale/backends/zero3_checkpoint.py``): Trainer's ``engine.save_checkpoint`` writes it to
  ``checkpoint-N/global_stepN/zo_scale/`` and keeps DeepSpeed's fp32 partitions in step, and its
  ``engine.load_checkpoint`` restores both — which is why the ZO optimizer must exist before that
  load. Elsewhere ZOTrainer writes ``checkpoint-N/zo_scale_optimizer/`` (``zo_scale.checkpoint``,
  one file per rank) and loads it into the optimizer it builds on the resumed model.

Refused with a one-line error: ``optimizers=`` / ``optimizer_cls_and_kwargs`` (the ZO optimizer is
``zo_optimizer``), ``gradient_accumulation_steps > 1`` (a ZO step measures one batch: raise
``per_device_train_batch_size`` instead), a DeepSpeed config with ``optimizer`` or ``scheduler``
sections (DeepSpeed would step them only in ``engine.step()``, which a ZO run never calls, so the
lr would stay frozen; set ``learning_rate`` / ``lr_scheduler_type`` in TrainingArguments), and a
DeepSpeed ZeRO stage other than 3 (its fp32 copies would not follow the ZO steps).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer

from zo_scale.checkpoint import load_optimizer_state, save_optimizer_state
from zo_scale.optim import MeZO, ZOOptimizer

ZO_STATE_DIR = "zo_scale_optimizer"  # inside each checkpoint-N folder, next to Trainer's files


class LrHolder(torch.optim.Optimizer):
    """The optimizer Trainer, accelerate and DeepSpeed see: the trainable parameters and the lr that
    Trainer's scheduler drives. Its ``step`` changes no weight — the ZO step already happened in
    ``ZOTrainer.training_step`` — and only counts steps, in a one-element tensor per parameter, so
    that FSDP's ``FULL_STATE_DICT`` optimizer load finds a device to place state on (it looks for a
    state tensor of dim > 0; without one: "Expected device to be set").
    The count is created in ``step`` like any optimizer's state: accelerate (FSDP2) and DeepSpeed
    swap the parameters in the groups after construction, and state keyed by the old ones breaks
    ``state_dict``."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                count = self.state[p].setdefault("step", torch.zeros(1, dtype=torch.float32, device=p.device))
                count += 1
        return None


def _refuse_unsupported(args, ds_config: dict | None = None) -> None:
    if args.gradient_accumulation_steps != 1:
        raise ValueError(
            f"zo_scale: gradient_accumulation_steps={args.gradient_accumulation_steps}: a ZO step measures one "
            "batch; set it to 1 and raise per_device_train_batch_size instead"
        )
    if ds_config is None:
        ds_config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
    stage = ds_config.get("zero_optimization", {}).get("stage", 0) if ds_config else None
    if ds_config and stage != 3:
        raise ValueError(
            f"zo_scale: ZOTrainer runs DeepSpeed with ZeRO stage 3 only (got stage {stage}): the fp32 copies of "
            "stages 0-2 would not follow the ZO steps; set zero_optimization.stage to 3"
        )
    sections = [k for k in ("optimizer", "scheduler") if k in ds_config]
    if sections:
        raise ValueError(
            f"zo_scale: remove the {' and '.join(repr(s) for s in sections)} section(s) from the DeepSpeed config: "
            "DeepSpeed steps them only in engine.step(), which ZO training never calls; set learning_rate and "
            "lr_scheduler_type in TrainingArguments instead"
        )


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` whose steps are ZO steps of ``zo_optimizer`` (any zo_scale optimizer class).

    ``zo_options`` are its keyword arguments besides the model; ``lr`` (``args.learning_rate``, then
    the scheduler's), ``weight_decay`` (``args.weight_decay``) and ``seed`` (``args.seed``) default
    from TrainingArguments. The built optimizer is ``trainer.zo_optimizer`` (once ``train()`` has begun).
    """

    def __init__(self, *args, zo_optimizer: type[ZOOptimizer] = MeZO, zo_options: dict | None = None, **kwargs):
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers[0] is not None or kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("zo_scale: ZOTrainer builds its ZO optimizer from zo_optimizer=; do not pass optimizers= "
                             "or optimizer_cls_and_kwargs=")
        if not (isinstance(zo_optimizer, type) and issubclass(zo_optimizer, ZOOptimizer)):
            raise TypeError(
                f"zo_scale: zo_optimizer must be a zo_scale optimizer class (MeZO, HELENE, ...), got {zo_optimizer!r}"
            )
        if kwargs.get("args") is not None:
            _refuse_unsupported(kwargs["args"])  # before Trainer starts an accelerator for them
        super().__init__(*args, **kwargs)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)  # also from `accelerate launch`
        _refuse_unsupported(self.args, plugin.hf_ds_config.config if plugin is not None else None)
        self.zo_optimizer_cls = zo_optimizer
        self.zo_options = dict(zo_options or {})
        self.zo_optimizer: ZOOptimizer | None = None
        self._zo_model = None
        self._zo_resume_from: str | None = None

    # ------------------------------------------------------------------ what Trainer calls "the optimizer"

    def create_optimizer(self, model=None):
        # accelerate would wrap the holder with its fp16 GradScaler, whose step asserts that a loss
        # was scaled and gradients checked: a ZO step has neither (fp16 forwards still autocast)
        self.accelerator.scaler = None
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            params = [p for p in opt_model.parameters() if p.requires_grad]
            self.optimizer = LrHolder(params, lr=self.args.learning_rate)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        # Trainer calls this right after accelerate built the DeepSpeed engine and before it resumes
        # the engine: the ZO optimizer must be attached by then for load_checkpoint to restore its state
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is not None:
            self._zo_for(wrapped.engine)
        return scheduler

    def _clip_grad_norm(self, model):
        return None  # no gradients: a ZO step has no backward

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    # ------------------------------------------------------------------ the ZO step

    def _zo_for(self, model) -> ZOOptimizer:
        """The ZO optimizer over ``model`` as Trainer wrapped it (engine, FSDP module, DDP or plain),
        built on first use and loaded from the checkpoint being resumed, if any."""
        if self.zo_optimizer is None or self._zo_model is not model:
            options = {"lr": self.args.learning_rate, "weight_decay": self.args.weight_decay, "seed": self.args.seed}
            options.update(self.zo_options)
            self.zo_optimizer = self.zo_optimizer_cls(model, **options)
            self._zo_model = model
            if self._zo_resume_from is not None:
                state_dir = Path(self._zo_resume_from) / ZO_STATE_DIR
                if not state_dir.is_dir():
                    raise FileNotFoundError(
                        f"zo_scale: {self._zo_resume_from} has no {ZO_STATE_DIR}/ (not saved by ZOTrainer); "
                        "resume from a ZOTrainer checkpoint"
                    )
                load_optimizer_state(self.zo_optimizer, state_dir)
                self._zo_resume_from = None
        return self.zo_optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        opt = self._zo_for(model)
        inputs = self._prepare_inputs(inputs)
        opt.param_groups[0]["lr"] = self._get_learning_rate()

        def closure():
            # Trainer's own loss: with num_items_in_batch (the global token count) each rank returns
            # its token-loss sum × world / count, so the optimizer's mean over ranks is the global mean
            with self.compute_loss_context_manager():
                return self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)

        loss = opt.step(closure)
        return torch.tensor(loss, dtype=torch.float32, device=self.args.device)

    # ------------------------------------------------------------------ checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)  # DeepSpeed: engine.save_checkpoint saves the ZO state
        if self.zo_optimizer is not None and not self.is_deepspeed_enabled:
            save_optimizer_state(self.zo_optimizer, Path(output_dir) / ZO_STATE_DIR)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if not self.is_deepspeed_enabled:  # DeepSpeed: engine.load_checkpoint restored the ZO state
            self._zo_resume_from = checkpoint  # read when the ZO optimizer is built on the resumed model
