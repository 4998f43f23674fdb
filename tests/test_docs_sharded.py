"""docs/sharded.md describes every optimizer zo_scale exports (issue #23: FZOO and HiZOO-L were missing) in
each of its per-optimizer tables, and what step() returns is what the docs say (a float, not a tensor)."""

import inspect
import re
from pathlib import Path

import pytest
import torch

import zo_scale

DOC = Path(__file__).resolve().parents[1] / "docs" / "sharded.md"
OPTIMIZERS = sorted(name for name in zo_scale.__all__
                    if inspect.isclass(getattr(zo_scale, name)) and issubclass(getattr(zo_scale, name), zo_scale.ZOOptimizer)
                    and getattr(zo_scale, name) is not zo_scale.ZOOptimizer)
TABLES = ["| optimizer | forwards per step", "| optimizer | state", "| optimizer | all-reduces"]


def table_rows(header: str) -> list[str]:
    """First-column names of the markdown table whose header line starts with ``header``."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip().strip("`"))
    return rows


@pytest.mark.parametrize("header", TABLES)
def test_every_optimizer_has_a_row(header):
    assert sorted(table_rows(header)) == OPTIMIZERS


def test_step_returns_a_float_as_documented():
    assert re.search(r"`opt\.step\(closure\)` returns the step's loss as a Python `float`", DOC.read_text())
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    for name in OPTIMIZERS:
        loss = getattr(zo_scale, name)(model, lr=1e-3).step(lambda: model(x).square().mean())
        assert type(loss) is float, name
