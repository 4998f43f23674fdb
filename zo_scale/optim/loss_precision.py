"""Whether the closure's loss can see a ZO probe at all.

A probe moves the loss by ℓ₊ − ℓ₋ ≈ 2ε·pg, typically 1e-4 to 1e-2 of the loss itself. A bf16 loss
resolves about 2⁻⁸ ≈ 0.4 % of its value (fp16 about 0.05 %), so ZO then estimates its gradient
from rounding: MeZO stalls or blows up, FZOO finds all probes equal. Nothing fails, hence a warning,
once per optimizer: at the first low-precision loss, or after a few steps in a row whose probes all
gave exactly the same loss (a loss rounded elsewhere, e.g. ``.item()`` of a bf16 tensor).
"""

from __future__ import annotations

import sys
import warnings

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
FLAT_STEPS = 3  # steps in a row with all probe losses equal before warning
FIX = "compute the loss in fp32: .float() the logits (or whatever the loss is computed from) before the loss"


class LossResolution:
    """Per optimizer: watches the closure's results and warns once when they cannot resolve a probe."""

    def __init__(self, owner: str):
        self.owner = owner
        self.warned = False
        self.flat_steps = 0

    def check_value(self, value) -> None:
        """A closure's result: a loss, or (loss_sum, weight)."""
        loss = value[0] if isinstance(value, (tuple, list)) else value
        if isinstance(loss, torch.Tensor) and loss.dtype in LOW_PRECISION:
            self._warn(f"the closure's loss is {str(loss.dtype).removeprefix('torch.')}, which resolves only "
                       f"~{torch.finfo(loss.dtype).eps:.1g} of its value: too coarse for the loss change of a probe; "
                       f"{FIX}")

    def check_step(self, flat: bool) -> None:
        """One step's reduced probe losses: ``flat`` when the probes could not tell the directions apart
        (every ℓ₊ⱼ equal to its ℓ₋ⱼ)."""
        self.flat_steps = self.flat_steps + 1 if flat else 0
        if self.flat_steps == FLAT_STEPS:
            self._warn(f"each probe's two losses were exactly equal in {FLAT_STEPS} steps in a row: the loss "
                       f"does not resolve the change of a probe; {FIX}, else eps may be too small")

    def _warn(self, what: str) -> None:
        if self.warned:
            return
        self.warned = True
        warnings.warn(f"zo_scale: {self.owner}: {what}", stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The stacklevel, seen from ``warnings.warn``'s caller, of the first frame outside zo_scale and torch
    (torch's no_grad wrapper sits between): the user's ``opt.step(...)`` line."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("zo_scale", "torch"):
        frame, level = frame.f_back, level + 1
    return level
