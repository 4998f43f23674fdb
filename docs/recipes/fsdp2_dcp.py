"""FSDP2 with DCP: a zo_scale optimizer in your own fully_shard loop, checkpointed with
torch.distributed.checkpoint the way torchtitan does, resumable on any number of ranks.

    torchrun --nproc_per_node 2 docs/recipes/fsdp2_dcp.py --ckpt ckpt --steps 4
    torchrun --nproc_per_node 3 docs/recipes/fsdp2_dcp.py --ckpt ckpt --steps 8   # resumes at step 4

Each checkpoint is a DCP folder ``ckpt/step_N``: every rank writes its own rows of the weights and of
the optimizer state (DTensors), and DCP reshards them on load when the world size changed. Run it
again with the same --ckpt and it resumes from the latest complete checkpoint.
tests/test_recipe_fsdp2_dcp.py runs this file.
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig

from zo_scale.distributed import destroy_distributed
from zo_scale.optim import HELENE


class TrainState(Stateful):
    """What dcp.save / dcp.load see: model and optimizer through torch's state_dict helpers. A zo_scale
    optimizer's state (fp32 master, HELENE's momentum and Hessian, step, seed) comes out as DTensors
    placed like the parameters, exactly as AdamW's would."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict):  # dcp.load calls this once the tensors are read
        set_state_dict(self.model, self.opt, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in root.glob("step_*") if (p / ".metadata").exists()]  # DCP writes .metadata last
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=2)
    args = parser.parse_args()

    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")

    # a tiny model so the recipe runs anywhere; AutoModelForCausalLM.from_pretrained(path, torch_dtype=...) in practice
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).to(torch.bfloat16).to(device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = HELENE(model, lr=1e-4, eps=1e-3, seed=0)  # after fully_shard; bf16 shards get an fp32 master

    state = TrainState(model, opt)
    last = latest_checkpoint(args.ckpt)
    if last is not None:
        dcp.load({"train": state}, checkpoint_id=last)  # any world size: DCP reshards the DTensors
        if rank == 0:
            print(f"resumed from {last} at step {opt.step_count}", flush=True)

    while opt.step_count < args.steps:  # the optimizer counts its steps and checkpoints the count
        step = opt.step_count
        # this rank's share of the step's global batch (your DataLoader with a DistributedSampler)
        tokens = torch.randint(0, 128, (8, 17), generator=torch.Generator().manual_seed(step))[rank::world].to(device)

        def closure():  # forward only, run under no_grad in eval mode; (sum, count): the global mean
            logits = model(input_ids=tokens[:, :-1]).logits.float()  # fp32 loss: ZO needs its resolution
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"), tokens[:, 1:].numel()

        loss = opt.step(closure)  # a float: the global mean loss of the step's probes
        if rank == 0:
            print(f"step {step} loss {loss:.6f}", flush=True)
        if opt.step_count % args.save_every == 0 or opt.step_count == args.steps:
            dcp.save({"train": state}, checkpoint_id=args.ckpt / f"step_{opt.step_count}")

    del model, opt, state
    destroy_distributed()  # frees the groups while the interpreter is fully alive


if __name__ == "__main__":
    main()
