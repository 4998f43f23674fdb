"""Recipe: an existing ``transformers.Trainer`` script, fine-tuning with a zo_scale ZO optimizer.

What changes in your script: ``Trainer`` becomes ``ZOTrainer`` with ``zo_optimizer=`` / ``zo_options=``;
``gradient_accumulation_steps`` stays 1; a DeepSpeed config has no ``optimizer`` / ``scheduler``
section (the lr comes from ``--learning_rate`` / ``--lr_scheduler_type``). Launch it as before:

    python hf_trainer.py --output_dir out --max_steps 100 --learning_rate 1e-6           # one process
    torchrun --nproc_per_node 8 hf_trainer.py --deepspeed ds_zero3.json --output_dir out ...  # ZeRO-3
    accelerate launch --config_file fsdp2.yaml hf_trainer.py --output_dir out ...        # FSDP2
    ... --save_steps 50 --resume_from_checkpoint out/checkpoint-50                       # resume any of them

Without ``--model_name_or_path`` it trains a tiny random Llama on random tokens, so it runs anywhere
(CI runs it on 2 CPU ranks with ZeRO-3: add ``--use_cpu`` and set ``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaConfig, LlamaForCausalLM, TrainingArguments

import zo_scale
from zo_scale.integrations import ZOTrainer


@dataclass
class ZOArguments:
    optimizer: str = "MeZO"  # MeZO, HiZOO, HiZOOL, HELENE or FZOO
    eps: float = 1e-3
    model_name_or_path: str | None = None


def build_model(path: str | None):
    if path:
        return AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def toy_dataset(vocab_size: int, n: int = 64, seq: int = 16) -> list[dict]:
    """Stands in for your tokenised dataset: rows of input_ids / attention_mask / labels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (n, seq), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def main() -> None:
    zo_args, args = HfArgumentParser((ZOArguments, TrainingArguments)).parse_args_into_dataclasses()
    model = build_model(zo_args.model_name_or_path)
    trainer = ZOTrainer(
        model=model,
        args=args,
        train_dataset=toy_dataset(model.config.vocab_size),
        zo_optimizer=getattr(zo_scale, zo_args.optimizer),
        zo_options={"eps": zo_args.eps},  # lr, weight_decay and seed come from TrainingArguments
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()  # ZeRO-3: gathered when the config sets stage3_gather_16bit_weights_on_model_save


if __name__ == "__main__":
    main()
