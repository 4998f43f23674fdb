"""A user's own FSDP2 training loop with a zo_scale optimizer, written the way pytorch/examples
``distributed/FSDP2/example.py`` is: the script starts its process group itself, shards a small
transformer with ``fully_shard``, trains, and ends with ``destroy_process_group()`` while the
sharded model is still alive. bench/stress_user_teardown.sh launches it many times and counts the
runs that abort at exit (issue #23, item 5).

    torchrun --nproc_per_node 2 bench/user_fsdp2_loop.py [--optimizer HELENE] [--steps 10] [--no-destroy]
"""

import argparse

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

import zo_scale


class Block(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 32, n_layers: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(Block(dim) for _ in range(n_layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def main(args):
    torch.distributed.init_process_group(backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = TinyLM()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    optim = getattr(zo_scale, args.optimizer)(model, lr=1e-3, eps=1e-3, seed=0)
    gen = torch.Generator().manual_seed(rank)
    for step in range(args.steps):
        tokens = torch.randint(0, 256, (4, 16), generator=gen)
        loss = optim.step(lambda: F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten()))
        if rank == 0:
            print(f"step {step} loss {loss:.4f}")  # step() returns a float
    if not args.no_destroy:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a user's FSDP2 loop with a zo_scale optimizer")
    parser.add_argument("--optimizer", default="HELENE")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-destroy", action="store_true", help="end without destroy_process_group, as many scripts do")
    main(parser.parse_args())
