"""A user's FSDP2 training loop with a zo_scale optimizer, checkpointed through torch's own APIs the way
pytorch/examples ``distributed/FSDP2`` and torchtitan do (launched by tests/test_dcp.py):

    torchrun --nproc_per_node 2 tests/dist_scripts/dcp_user_loop.py --phase save   --out DIR
    torchrun --nproc_per_node 3 tests/dist_scripts/dcp_user_loop.py --phase resume --out DIR
    torchrun --nproc_per_node 1 tests/dist_scripts/dcp_user_loop.py --phase resume --out DIR

``save`` (2 ranks), per optimizer: ``get_optimizer_state_dict`` on a fresh optimizer (lr and grads
afterwards); RESUME_AT steps; then four checkpoints of that point —
  dsd          dcp.save of get_model_state_dict / get_optimizer_state_dict
  titan        the same with StateDictOptions(flatten_optimizer_state_dict=True), as torchtitan saves
  plain        dcp.save of model.state_dict() / opt.state_dict()
  full_dcp     full state dicts from get_*_state_dict(full_state_dict=True, cpu_offload=True), torch.save
               on rank 0 (the example's Checkpointer with dcp_api=True)
  full_dtensor full state dicts gathered by hand from opt.state_dict()["state"] DTensors (dcp_api=False)
— and the uninterrupted run on to K_STEPS (the reference). Then a flat-range state goes through DCP,
and every rank's error on loading it back is recorded.

``resume`` (3 ranks or 1), per optimizer and checkpoint: a fresh FSDP2 model and optimizer (lr 10x
wrong: it must come back from the checkpoint), the load that matches the save, the remaining steps.
At one process the ``dsd`` checkpoint is also loaded into a plain (not sharded) model.

Every scenario is caught and recorded (rank 0 writes ``results_{phase}_w{W}.pt``), so each fails its own
test. The closure runs one forward per sequence and sums in fp64: 1, 2 and 3 ranks then see bit-identical
losses, and a resumed run must match the reference exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import zo_scale  # noqa: E402
from zo_scale.distributed import destroy_distributed  # noqa: E402

K_STEPS, RESUME_AT = 4, 2
VOCAB, DIM, HIDDEN, SEQ, GLOBAL_BATCH = 37, 10, 13, 9, 6  # 37, 13, 10 rows: uneven shards at 2 and 3 ranks
OPTIMIZERS = {  # name -> (weights dtype, options): every kind of state, and none (MeZO in fp32)
    "HELENE": (torch.bfloat16, dict(lr=1e-3, eps=1e-2, anneal_horizon=4.0)),
    "MeZO": (torch.float32, dict(lr=1e-2, eps=1e-2)),
    "HiZOOL": (torch.float32, dict(lr=1e-2, eps=1e-2, hessian_smooth=1e-3)),
    # M (r×n, whole on every rank) per matrix, its epoch in the group; resampled at step 3, after the resume
    "HELENEMuon": (torch.bfloat16, dict(lr=1e-3, eps=1e-2, n_directions=2, rank=4, resample_every=3, lr_1d=1e-3,
                                        anneal_horizon=4.0)),
    # a per-coordinate momentum beside the master, still annealing at the resume (α_2 ≠ β1)
    "HELENEFZOO": (torch.bfloat16, dict(lr=1e-3, eps=1e-2, n_directions=2, anneal_horizon=4.0)),
}
KINDS = ("dsd", "titan", "plain", "full_dcp", "full_dtensor")
FLAT = {"dsd": StateDictOptions(), "titan": StateDictOptions(flatten_optimizer_state_dict=True)}
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_LOAD = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(DIM, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.layers = torch.nn.ModuleList([Block(), Block()])
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def build_model(dtype, shard: bool = True):
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    if shard:
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def make_closure(model, step: int):
    """This rank's part of the step's global batch; returns (summed token loss, token count)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))

    def closure():
        total = torch.zeros((), dtype=torch.float64)
        for seq in tokens[rank::world]:
            logits = model(seq[None, :-1]).float()
            total += F.cross_entropy(logits.flatten(0, 1), seq[1:], reduction="sum").double()
        return total, len(tokens[rank::world]) * (SEQ - 1)

    return closure


def train(model, opt, start: int, stop: int) -> list[float]:
    return [opt.step(make_closure(model, step)) for step in range(start, stop)]


def full_params(model) -> dict:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone() for n, p in model.named_parameters()}


def make_optimizer(name, model, lr_scale: float = 1.0):
    _, options = OPTIMIZERS[name]
    return getattr(zo_scale, name)(model, seed=7, **{**options, "lr": options["lr"] * lr_scale})


# ---------------------------------------------------------------------------------------------- save


def check_fresh_state_dict(name) -> dict:
    """What get_optimizer_state_dict does to an optimizer that has not stepped yet."""
    model = build_model(OPTIMIZERS[name][0])
    opt = make_optimizer(name, model)
    lr = opt.param_groups[0]["lr"]
    rec = {"lr_before": lr}
    try:
        sd = get_optimizer_state_dict(model, opt)
        params = dict(model.named_parameters())
        rec["layout"] = {
            fqn: {k: (type(t).__name__, tuple(getattr(t, "placements", ())) == tuple(getattr(params[fqn], "placements", ())))
                  for k, t in entry.items()}
            for fqn, entry in sd["state"].items()
        }
        rec["group_keys"] = sorted(sd["param_groups"][0])
        # opt.state_dict() hands out the optimizer's own tensors, laid out like the parameters
        own = opt.state_dict()["state"][0]
        rec["shares_memory"] = {k: t.to_local().data_ptr() == opt.shard_state["embed.weight"][k].data_ptr()
                                for k, t in own.items() if isinstance(t, DTensor)}
    except Exception as e:  # noqa: BLE001 - recorded for the test
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["lr_after"] = opt.param_groups[0]["lr"]
    rec["grads"] = [n for n, p in model.named_parameters() if p.grad is not None]
    return rec


def save_full_by_hand(model, opt) -> tuple[dict, dict]:
    """The example's dcp_api=False path: gather every DTensor with full_tensor(), keep it on rank 0."""
    model_sd = {n: t.full_tensor().cpu() for n, t in model.state_dict().items()}
    sd = opt.state_dict()
    state = {pid: {k: (t.full_tensor() if isinstance(t, DTensor) else t).cpu() for k, t in entry.items()}
             for pid, entry in sd["state"].items()}
    return model_sd, {"param_groups": sd["param_groups"], "state": state}


def save_phase(out: Path, rec: dict) -> None:
    rank = dist.get_rank()
    for name, (dtype, _) in OPTIMIZERS.items():
        rec[("fresh", name)] = check_fresh_state_dict(name)
        model = build_model(dtype)
        opt = make_optimizer(name, model)
        losses = train(model, opt, 0, RESUME_AT)
        saves = {}
        for kind in KINDS:
            try:
                path = out / f"{kind}_{name}"
                if kind in FLAT:
                    dcp.save({"model": get_model_state_dict(model),
                              "optim": get_optimizer_state_dict(model, opt, options=FLAT[kind])}, checkpoint_id=path)
                elif kind == "plain":
                    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
                else:
                    if kind == "full_dcp":
                        sds = (get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, opt, options=FULL))
                    else:
                        sds = save_full_by_hand(model, opt)
                    if rank == 0:
                        path.mkdir(parents=True, exist_ok=True)
                        torch.save(sds[0], path / "model.pt")
                        torch.save(sds[1], path / "optim.pt")
                saves[kind] = "ok"
            except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001
                saves[kind] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        dist.barrier()
        mid = full_params(model)
        losses += train(model, opt, RESUME_AT, K_STEPS)
        rec[("reference", name)] = {"losses": losses, "params": full_params(model), "mid": mid, "saves": saves,
                                    "lr": opt.param_groups[0]["lr"]}
    rec["flat_through_dcp"] = flat_state_through_dcp(out / "flat_HELENE")


def flat_state_through_dcp(path: Path) -> list:
    """The flat-range format saved with dcp.save, on a 16x16 layer (even shards: DCP's planner accepts
    them; uneven ones it refuses itself with a size mismatch): DCP keeps one rank's copy of a plain
    tensor that every rank saves under the same key, so the other rank's range is not in the checkpoint."""
    torch.manual_seed(0)
    model = fully_shard(torch.nn.Linear(16, 16).to(torch.bfloat16))
    opt = zo_scale.HELENE(model, lr=1e-3, eps=1e-2, seed=7)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    opt.step(lambda: model(x).float().square().mean())
    try:
        dcp.save({"optim": opt.flat_state_dict()}, checkpoint_id=path)
        template = {"optim": opt.flat_state_dict()}
        dcp.load(template, checkpoint_id=path)
        opt.load_state_dict(template["optim"])
        msg = None
    except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        msg = f"{type(e).__name__}: {e}"
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, msg)
    return every


# ---------------------------------------------------------------------------------------------- resume


def resume(name: str, kind: str, out: Path, shard: bool = True) -> dict:
    dtype = OPTIMIZERS[name][0]
    path = out / f"{kind}_{name}"
    model = build_model(dtype, shard)
    if kind == "full_dtensor":  # the example loads the model first, replacing its parameters
        full = torch.load(path / "model.pt", mmap=True, weights_only=True, map_location="cpu")
        live = model.state_dict()
        model.load_state_dict({n: torch.nn.Parameter(distribute_tensor(t, live[n].device_mesh, live[n].placements))
                               for n, t in full.items()}, assign=True)
    opt = make_optimizer(name, model, lr_scale=10.0)
    if kind in FLAT:
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=FLAT[kind])}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"], options=FLAT[kind])
    elif kind == "plain":
        sd = {"model": model.state_dict(), "optim": opt.state_dict()}
        dcp.load(sd, checkpoint_id=path)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
    elif kind == "full_dcp":
        full_model = torch.load(path / "model.pt", mmap=True, weights_only=True, map_location="cpu")
        full_optim = torch.load(path / "optim.pt", mmap=True, weights_only=True, map_location="cpu")
        set_model_state_dict(model, full_model, options=FULL_LOAD)
        set_optimizer_state_dict(model, opt, full_optim, options=FULL_LOAD)
    else:
        full_optim = torch.load(path / "optim.pt", mmap=True, weights_only=True, map_location="cpu")
        sd = opt.state_dict()
        group, full_group = sd["param_groups"][0], full_optim["param_groups"][0]
        group.update({k: v for k, v in full_group.items() if k != "params"})
        for pid, full_pid in zip(group["params"], full_group["params"]):
            for k, t in full_optim["state"][full_pid].items():
                live = sd["state"][pid][k]
                sd["state"][pid][k] = distribute_tensor(t, live.device_mesh, live.placements) if isinstance(live, DTensor) else t
        opt.load_state_dict(sd)
    rec = {"lr": opt.param_groups[0]["lr"], "step": opt.step_count}
    rec["losses"] = train(model, opt, RESUME_AT, K_STEPS)
    rec["params"] = full_params(model)
    return rec


def resume_phase(out: Path, rec: dict) -> None:
    for name in OPTIMIZERS:
        for kind in KINDS:
            rec[("resume", name, kind)] = attempt(resume, name, kind, out)
        if dist.get_world_size() == 1:
            rec[("resume_plain", name, "dsd")] = attempt(resume, name, "dsd", out, shard=False)


def attempt(fn, *args, **kwargs) -> dict:
    try:
        return fn(*args, **kwargs)
    except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 - every rank fails alike (same code and checkpoint)
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("save", "resume"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rec: dict = {}
    (save_phase if args.phase == "save" else resume_phase)(args.out, rec)
    if dist.get_rank() == 0:
        torch.save(rec, args.out / f"results_{args.phase}_w{dist.get_world_size()}.pt")
    destroy_distributed()  # frees the groups while the interpreter is alive (no abort at exit)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
