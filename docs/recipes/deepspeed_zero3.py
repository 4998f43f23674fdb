"""DeepSpeed ZeRO-3 with a zo_scale optimizer, checkpointed with the engine's own calls.

    deepspeed --num_gpus 8 docs/recipes/deepspeed_zero3.py --ckpt ckpt --steps 1000
    torchrun --nproc_per_node 2 docs/recipes/deepspeed_zero3.py --ckpt ckpt   # CPU: DS_ACCELERATOR=cpu

Run it again with the same --ckpt and it resumes from the latest checkpoint, exactly where the
interrupted run would have gone. tests/test_deepspeed_checkpoint.py runs this file.
"""

import argparse

import deepspeed
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, OPTConfig

from zo_scale.optim import MeZO

parser = argparse.ArgumentParser()
parser.add_argument("--ckpt", required=True)
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--save-every", type=int, default=2)
args = parser.parse_args()

deepspeed.init_distributed()
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

# a tiny model so the recipe runs anywhere; use AutoModelForCausalLM.from_pretrained(path) in practice
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(OPTConfig(
    vocab_size=128, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=4,
    ffn_dim=64, max_position_embeddings=32))

config = {
    "train_micro_batch_size_per_gpu": 2,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 3},  # an "optimizer" section works too: its fp32 copy is kept in step
}
engine, *_ = deepspeed.initialize(model=model, config=config)
opt = MeZO(engine, lr=1e-4, eps=1e-3, seed=0)  # the ENGINE, not engine.module; bf16: an fp32 master is kept

# Build the ZO optimizer first, then load: load_checkpoint restores the engine and the ZO state.
path, client_state = engine.load_checkpoint(args.ckpt)  # (None, None) when there is no checkpoint yet
start = client_state["step"] if path is not None else 0

for step in range(start, args.steps):
    g = torch.Generator().manual_seed(step)  # this step's global batch; each rank takes its rows
    ids = torch.randint(2, 128, (2 * world, 16), generator=g)[2 * rank : 2 * rank + 2].to(engine.device)

    def closure():  # forward only: the optimizer runs it under no_grad, in eval mode
        logits = engine(input_ids=ids).logits
        loss_sum = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        return loss_sum, ids[:, 1:].numel()  # (sum, count): the optimizer forms the global mean

    loss = opt.step(closure)  # a float already: no loss.item()
    if rank == 0:
        print(f"step {step + 1} loss {loss:.6f}", flush=True)
    if (step + 1) % args.save_every == 0:
        engine.save_checkpoint(args.ckpt, client_state={"step": step + 1})  # tag global_step{N}: N = ZO steps
