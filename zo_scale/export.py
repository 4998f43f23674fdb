"""Export the trained model with ``save_pretrained`` (safetensors), consolidated from the shards.

* plain module: its own state dict;
* FSDP2: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` gathers every parameter
  to CPU on rank 0, one at a time;
* DeepSpeed ZeRO-3: ``engine._zero3_consolidated_16bit_state_dict()`` gathers module by module onto
  rank 0's CPU (the weights are in the engine's dtype: bf16/fp16 runs export bf16/fp16).

A PEFT model saves its adapter only (``adapter_model.safetensors`` + ``adapter_config.json``), loadable
with ``PeftModel.from_pretrained(base, dir)``. Every rank must call :func:`export_model`; rank 0
writes into a temporary directory and renames it, so ``dir`` is either absent or complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

from zo_scale.backends import is_deepspeed_engine


def full_state_dict(model):
    """The consolidated state dict on rank 0 (None elsewhere); None everywhere for a plain module
    (save_pretrained then reads the module itself)."""
    if is_deepspeed_engine(model):
        return model._zero3_consolidated_16bit_state_dict()
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def export_model(model, module, tokenizer, directory: Path, is_main: bool) -> None:
    """Write ``module`` (the transformers or peft model inside ``model``) to ``directory``."""
    directory = Path(directory)
    state = full_state_dict(model)
    if is_main:
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        kwargs = {"safe_serialization": True}
        if state is not None:
            kwargs["state_dict"] = state
        module.save_pretrained(tmp, **kwargs)
        tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
