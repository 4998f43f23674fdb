#!/usr/bin/env python
"""Zeroth-order fine-tuning run: ``launch/train.py --config FILE.json [--set key=value ...] [--resume]``.

The same script under every launcher (see docs/launch.md):
    python launch/train.py --config configs/default.json
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny-fsdp.json
    deepspeed --num_gpus 2 launch/train.py --config configs/tiny-zero3.json
    mpirun -n 2 python launch/train.py --config configs/tiny-zero3.json
    srun -n 2 python launch/train.py --config configs/tiny-zero3.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zo_scale.trainer.cli import run  # noqa: E402

if __name__ == "__main__":
    run()
