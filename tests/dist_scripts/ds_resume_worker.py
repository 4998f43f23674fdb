"""A user's DeepSpeed ZeRO-3 loop with a ZO optimizer and the engine's own checkpoint calls, in the
style of DeepSpeedExamples' HelloDeepSpeed ``train_bert_ds.py`` (checkpoint with
``engine.save_checkpoint(dir, client_state=...)``, resume with ``engine.load_checkpoint(dir)``).

``--phase run``: per case, train STEPS steps and save a checkpoint (default tag) after SAVE_AT of
them; record the losses and the final full weights. ``--phase resume`` (a new process): per case,
build the same engine and optimizer, ``engine.load_checkpoint`` and train on to STEPS; check the
losses, the weights, the engine's step counter and the client state against the recorded run.
Launched by tests/test_deepspeed_checkpoint.py with 2 gloo ranks on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

STEPS, SAVE_AT = 5, 2
ADAMW = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
# name: (optimizer section or None, bf16, ZO optimizer)
CASES = {
    "adam_fp32": (ADAMW, False, "HELENE"),
    "adam_bf16": (ADAMW, True, "MeZO"),
    "forward_only_fp32": (None, False, "HELENE"),
    "forward_only_bf16": (None, True, "MeZO"),
}


def batch(step: int, rank: int, world: int):
    ids, mask = common.global_batch(seed=1000 + step)  # a new global batch every step
    per = ids.size(0) // world
    return ids[rank * per : (rank + 1) * per], mask[rank * per : (rank + 1) * per]


def build(case: str, with_zo: bool = True):
    deepspeed = common.import_deepspeed()
    section, bf16, zo_name = CASES[case]
    model = common.build_model("opt", dtype=torch.bfloat16 if bf16 else torch.float32)
    config = common.ds_config(threshold=None, bf16=bf16)  # DeepSpeed's default persistence threshold
    if section is not None:
        config["optimizer"] = section
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine, common.make_optimizer(zo_name, engine) if with_zo else None


def train(engine, opt, first: int, ckpt: Path | None, rank: int, world: int) -> list[float]:
    losses = []
    for step in range(first, STEPS):
        ids, mask = batch(step, rank, world)

        def closure():
            logits = engine(input_ids=ids, attention_mask=mask).float()
            labels = ids.masked_fill(mask == 0, -100)[:, 1:]
            loss_sum = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
            return loss_sum.double(), (labels != -100).sum()

        losses.append(opt.step(closure))  # a float: the step's global mean loss
        if ckpt is not None and step + 1 == SAVE_AT:
            engine.save_checkpoint(ckpt, client_state={"checkpoint_step": step + 1})
    return losses


def refusals(engine, ckpt: Path) -> list[str]:
    """Paths that cannot keep the ZO state fail with a message that names the fix."""
    out = []
    try:
        engine.load_checkpoint(ckpt, load_module_only=True)
        out.append("load_module_only=True was accepted")
    except ValueError as e:
        if not str(e).startswith("zo_scale:"):
            out.append(f"load_module_only: {e}")
    late, _ = build("adam_fp32", with_zo=False)  # the engine loads first, the ZO optimizer comes after
    late.load_checkpoint(ckpt)
    try:
        common.make_optimizer("HELENE", late)
        out.append("a ZO optimizer was built on an engine that had already loaded a checkpoint")
    except RuntimeError as e:
        if "build the ZO optimizer first" not in str(e):
            out.append(f"late optimizer: {e}")
    # a DeepSpeed checkpoint written without a ZO optimizer (a first-order run): ZO starts from its
    # weights, its fp32 master too (a stale master would write the old weights back at the next step)
    late.save_checkpoint(ckpt / "first_order")
    fresh, _ = build("adam_fp32", with_zo=False)
    opt = common.make_optimizer("MeZO", fresh, master_weights=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_checkpoint(ckpt / "first_order")
    if not any("holds no ZO optimizer state" in str(w.message) for w in caught):
        out.append("loading a checkpoint without ZO state gave no warning")
    stale = [v.name for v in opt.views if not torch.equal(opt.shard_state[v.name]["master"], v.local)]
    if stale:
        out.append(f"fp32 master not re-taken from the loaded weights: {stale[:3]}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=("run", "resume"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    common.quiet()
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))  # a stuck collective fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []
    for case in args.cases.split(","):
        ckpt = args.out / case
        engine, opt = build(case)
        record = ckpt / "uninterrupted.pt"
        if args.phase == "run":
            losses = train(engine, opt, 0, ckpt, rank, world)
            if rank == 0:
                torch.save({"losses": losses, "params": common.full_params(engine)}, record)
            else:
                common.full_params(engine)  # a collective: every rank takes part
            dist.barrier()
            continue
        try:
            path, client_state = engine.load_checkpoint(ckpt)
        except Exception as e:  # report every case, not just the first failure
            failures.append(f"{case}: load_checkpoint raised {type(e).__name__}: {e}")
            continue
        if client_state.get("checkpoint_step") != SAVE_AT:
            failures.append(f"{case}: client_state {client_state}")
        tag = (ckpt / "latest").read_text().strip()
        if tag != f"global_step{SAVE_AT}" or engine.global_steps != SAVE_AT:
            failures.append(f"{case}: tag {tag!r}, engine.global_steps {engine.global_steps} after load (want {SAVE_AT})")
        losses = train(engine, opt, SAVE_AT, None, rank, world)
        params = common.full_params(engine)
        if engine.global_steps != STEPS:
            failures.append(f"{case}: engine.global_steps {engine.global_steps} after {STEPS} steps")
        ref = torch.load(record, weights_only=False)
        if losses != ref["losses"][SAVE_AT:]:
            failures.append(f"{case}: resumed losses {losses} != uninterrupted {ref['losses'][SAVE_AT:]}")
        moved = [n for n in params if not torch.equal(params[n], ref["params"][n])]
        if moved:
            diff = max((params[n].float() - ref["params"][n].float()).abs().max().item() for n in moved)
            failures.append(f"{case}: {len(moved)}/{len(params)} parameters differ from the uninterrupted run "
                            f"(max |diff| {diff:.3g})")
        if case == "adam_fp32":
            failures += refusals(engine, ckpt)
    if rank == 0:
        (args.out / f"{args.phase}.json").write_text(json.dumps(failures))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
