"""Every task runs end to end from a config with local data: launch/train.py's code in this process, a
tiny random-init OPT, MeZO's tasks on the fixture rows in tests/fixtures/tasks, LM-BFF's on the bundled
files. Each run trains, evaluates dev and test and reports the task's own metrics."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from zo_scale.data.tasks import LMBFF_TASKS, MEZO_TASKS, TASKS
from zo_scale.trainer.cli import main

CONFIG = str(REPO / "configs" / "tiny-tasks.json")
FIXTURES = REPO / "tests" / "fixtures" / "tasks"

# What each task's evaluation reports, primary metric first.
EXPECTED_METRICS = {name: ["accuracy"] for name in TASKS}
EXPECTED_METRICS.update(multirc=["f1a", "em", "accuracy"], record=["f1", "em", "accuracy"], squad=["f1", "em"],
                        drop=["f1", "em"])


@pytest.mark.parametrize("name", MEZO_TASKS + LMBFF_TASKS)
def test_task_runs_from_config_with_local_data(name, tmp_path):
    out = tmp_path / name
    data = f"task.data_dir={FIXTURES}" if name in MEZO_TASKS else "task.data_dir=null"
    sample = ["task.k_per_class=2", "task.num_train=null", "task.num_dev=null"] if name in LMBFF_TASKS else []
    assert main(["--config", CONFIG, "--set", f"task.name={name}", "--set", data, "--set", f"output_dir={out}",
                 *[a for s in sample for a in ("--set", s)]]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["forward_passes"] == 4
    assert summary["primary_metric"] == EXPECTED_METRICS[name][0] == TASKS[name].metric
    for split in ("dev", "test"):
        metrics = summary["final"][split]["metrics"]
        assert list(metrics) == EXPECTED_METRICS[name], split
        assert all(0.0 <= v <= 1.0 for v in metrics.values()), metrics
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in steps if r["type"] == "step")
    assert (out / "final_model" / "model.safetensors").is_file()
