"""One rank of the FSDP2 model-building check (launched by torchrun). Usage:

    torchrun --nproc_per_node W tests/dist_scripts/build_worker.py OUT CASES_JSON

CASES_JSON maps a case name to ``[config path, override, ...]`` (launch/train.py's --config and --set).
Every rank builds each case with ``zo_scale.trainer.build.build`` and writes ``OUT/<case>_rank<r>.pt``:
``loaded_bytes`` (the real storage the rank held before sharding), the full state dict gathered from the
shards, the non-persistent buffers, the number of tied parameters, the tokenizer's ids of a fixed text
and the logits of one forward. The test compares them with one process building the same config with
backend "none".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from zo_scale.config import load_config  # noqa: E402
from zo_scale.distributed import process_group  # noqa: E402
from zo_scale.trainer.build import _tied_parameters, build  # noqa: E402

TEXT = ["It was a wonderful film with a moving story.", "The plot was boring."]


def snapshot(built, full_state: dict) -> dict:
    """What must be the same on every rank and in one process."""
    model = built.module
    buffers = {f"{mn}.{n}" if mn else n: b.detach().cpu().clone()
               for mn, m in model.named_modules() for n, b in m.named_buffers(recurse=False)
               if n in m._non_persistent_buffers_set}
    batch = built.tokenizer(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = built.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return {"state": {k: v.detach().cpu().clone() for k, v in full_state.items()}, "buffers": buffers,
            "tied": len(_tied_parameters(model)), "ids": batch["input_ids"].tolist(), "vocab": len(built.tokenizer),
            "logits": logits.detach().cpu().clone(), "loaded_bytes": built.loaded_bytes}


def main() -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    with process_group(force_group=True) as info:
        for name, (config, *sets) in cases.items():
            cfg = load_config(config, sets)
            built = build(cfg, info)
            full = get_model_state_dict(built.model, options=StateDictOptions(full_state_dict=True))
            torch.save(snapshot(built, full), out / f"{name}_rank{info.rank}.pt")
            del built, full  # they hold the group


if __name__ == "__main__":
    main()
