"""Parameter slices in run checkpoints: assembled from any set of saved ranks, replicated ones included."""

from __future__ import annotations

import pytest
import torch

import zo_scale
from zo_scale import run_checkpoint


def _opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return model, zo_scale.MeZO(model, lr=0.1)


def _save(directory, rank: int, slices: dict) -> None:
    torch.save(slices, directory / f"params_rank{rank:05d}.pt")


def _slice(view, start: int, end: int, value: float) -> dict:
    return {"start": start, "end": end, "global_numel": view.global_numel,
            "tensor": torch.full((end - start,), value)}


def test_replicated_slices_saved_by_every_rank_load(tmp_path):
    """Every rank saves a replicated parameter whole (e.g. the prefix-tuning encoder FSDP2 leaves
    unsharded): two full copies cover the range once, not twice."""
    model, opt = _opt()
    for rank in range(2):
        _save(tmp_path, rank, {v.name: _slice(v, 0, v.global_numel, 7.0) for v in opt.views})
    run_checkpoint.load_param_slices(tmp_path, opt)
    assert all(torch.all(p == 7.0) for p in model.parameters())


def test_uneven_overlapping_shards_load_and_gaps_are_refused(tmp_path):
    model, opt = _opt()
    view = opt.views[0]
    n = view.global_numel
    _save(tmp_path, 0, {v.name: _slice(v, 0, n // 2 + 1, 1.0) if v is view else _slice(v, 0, v.global_numel, 1.0)
                        for v in opt.views})
    _save(tmp_path, 1, {view.name: _slice(view, n // 2, n, 1.0)})
    run_checkpoint.load_param_slices(tmp_path, opt)
    assert torch.all(model[0].weight == 1.0)

    (tmp_path / "params_rank00001.pt").unlink()
    with pytest.raises(ValueError, match=f"covers {n // 2 + 1} of {n} local elements"):
        run_checkpoint.load_param_slices(tmp_path, opt)
