"""Learning-rate schedules of the training application: the lr of step t is a pure function of t.

So a resumed run needs nothing but its step to continue the schedule exactly, on any world size.

    factor(t) = (t + 1) / warmup                                  for t < warmup
              = 1                                                 constant
              = m + (1 − m)·(1 − p)                               linear
              = m + (1 − m)·(1 + cos(π·p)) / 2                    cosine
    with p = (t − warmup) / (steps − warmup), m = min_lr_ratio (the factor the decay ends at).
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, *, steps: int, schedule: str = "constant", warmup_steps: int = 0,
              min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the base lr at ``step`` (0-based) of a ``steps``-step run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape
