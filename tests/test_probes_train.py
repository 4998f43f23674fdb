"""``optimizer.batched_probes`` in a training run: the trainer's loss closure takes the group count, and
a batched run logs the losses of the sequential one (within test_probes.py's tolerance)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO
from zo_scale.trainer.cli import main

TINY_LLAMA = str(REPO / "configs" / "tiny-fsdp.json")
TINY_ROBERTA = str(REPO / "configs" / "tiny-roberta-lmbff.json")


def _steps(config, out, *sets):
    args = ["--config", config, "--set", f"output_dir={out}", "--set", "backend=none", "--set", "train.steps=2",
            "--set", "eval.every=0"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    lines = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["type"] == "step"]


@pytest.mark.parametrize("config, optimizer", [
    (TINY_LLAMA, '{"name": "fzoo", "lr": 0.001, "eps": 0.001, "n_directions": 3}'),  # causal LM, ℓ₀ + 3 probes
    (TINY_ROBERTA, '{"name": "mezo", "lr": 0.001, "eps": 0.001}'),  # masked LM: the verbalizer loss
])
def test_batched_run_logs_the_sequential_losses(tmp_path, config, optimizer):
    seq = _steps(config, tmp_path / "seq", f"optimizer={optimizer}")
    bat = _steps(config, tmp_path / "bat", f"optimizer={optimizer}", "optimizer.batched_probes=true")
    assert [r["forward_passes"] for r in bat] == [r["forward_passes"] for r in seq]
    for a, b in zip(seq, bat):
        for key in ("loss", "loss_plus"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6), (key, a, b)


def test_batched_probes_need_the_loss_objective(tmp_path, capsys):
    code = main(["--config", TINY_LLAMA, "--set", f"output_dir={tmp_path}", "--set", "task.objective=candidates",
                 "--set", "optimizer.batched_probes=true"])
    assert code == 2
    assert "zo_scale: error: optimizer.batched_probes needs task.objective 'loss'" in capsys.readouterr().err
