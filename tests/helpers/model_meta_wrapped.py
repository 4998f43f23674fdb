"""model_meta must give the same canonical names and global shapes for a plain module, a DeepSpeed
ZeRO-3 engine and FSDP2 (fully_shard). One process on a 1-rank gloo group; prints one JSON line.

Run in its own process: deepspeed.initialize and the process group are global state.
"""

import json
import os

from zo_scale.distributed import process_group
from zo_scale.models import load_model_and_tokenizer, model_meta


def zero3() -> dict:
    import deepspeed  # after the group exists, so it adopts it

    out = {}
    # OPT ties lm_head to the embedding: the tie must survive both wrappers.
    for arch in ("llama", "opt"):
        model, _ = load_model_and_tokenizer({"arch": arch})
        ref = model_meta(model)
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=None)
        raw = [n for n, _ in engine.named_parameters()]
        zero3 = model_meta(engine)
        out[f"{arch}_zero3"] = {"same": zero3 == ref, "raw_prefix": raw[0].split(".")[0],
                                "partitioned": hasattr(next(engine.parameters()), "ds_tensor"),
                                "tied": ref.tied, "n": len(ref.params)}
    return out


def fsdp2() -> dict:
    from torch.distributed.fsdp import fully_shard

    out = {}
    for arch in ("llama", "opt"):
        model, _ = load_model_and_tokenizer({"arch": arch})
        ref = model_meta(model)
        inner = model.model.layers if arch == "llama" else model.model.decoder.layers
        for layer in inner:
            fully_shard(layer)
        fully_shard(model)
        out[f"{arch}_fsdp2"] = {"same": model_meta(model) == ref,
                                "dtensor": type(next(model.parameters())).__name__, "tied": ref.tied}
    return out


with process_group(force_group=True):
    out = {**zero3(), **fsdp2()}
os.write(1, (json.dumps(out) + "\n").encode())
