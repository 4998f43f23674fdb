"""Learning-rate schedules of the training application: the formula, the lr each logged step used,
and that checkpoints written before a config key existed still resume."""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO
from zo_scale.config import ConfigError, load_config
from zo_scale.trainer.cli import main
from zo_scale.trainer.loop import check_resumable
from zo_scale.trainer.schedule import lr_factor

TINY = str(REPO / "configs" / "tiny-tasks.json")


def test_lr_factor_shapes():
    f = lambda step, **kw: lr_factor(step, steps=10, **kw)  # noqa: E731
    assert [f(t) for t in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [f(t, warmup_steps=4) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # linear from 1 at the end of warmup to min_lr_ratio at the last step's end
    assert f(2, schedule="linear", warmup_steps=2) == 1.0
    assert f(6, schedule="linear", warmup_steps=2) == pytest.approx(0.5)
    assert f(6, schedule="linear", warmup_steps=2, min_lr_ratio=0.2) == pytest.approx(0.6)
    assert f(5, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10, schedule="cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        f(0, schedule="step")


def test_each_step_uses_the_scheduled_lr(tmp_path):
    out = tmp_path / "run"
    assert main(["--config", TINY, "--set", f"output_dir={out}", "--set", "train.steps=6",
                 "--set", "train.lr_schedule=cosine", "--set", "train.warmup_steps=2",
                 "--set", "train.min_lr_ratio=0.1", "--set", "eval.at_start=false"]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in steps if r["type"] == "step"]
    expected = [1e-3 * lr_factor(t, steps=6, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1) for t in range(6)]
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("key, value, message", [
    ("train.min_lr_ratio", "1.5", "train.min_lr_ratio must be in [0, 1]"),
    ("train.warmup_steps", "-1", "train.warmup_steps must be >= 0"),
    ("train.lr_schedule", "step", "train.lr_schedule must be one of"),
])
def test_bad_schedule_options(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(TINY, [f"{key}={value}"])


def test_checkpoint_from_before_a_key_existed_still_resumes(tmp_path):
    current = load_config(TINY).to_dict()
    saved = json.loads(json.dumps(current))
    del saved["train"]["lr_schedule"], saved["eval"]["keep_best"], saved["model"]["head"]
    check_resumable(saved, current, tmp_path)  # the new keys hold their defaults: the same run
    changed = load_config(TINY, ["train.lr_schedule=cosine"]).to_dict()
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        check_resumable(saved, changed, tmp_path)
