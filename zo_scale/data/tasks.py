"""The task registry: `get_task(name)` and the `Task` object that samples prompted examples.

Splits seen by training code are always "train", "dev" and "test":
  * MeZO's eleven tasks: train <- the dataset's train split; dev <- carved out of train (MeZO's recipe:
    the datasets' labelled validation split is the test set, SuperGLUE's test labels are hidden);
    test <- the dataset's validation split.
  * LM-BFF tasks (bundled files): train <- train; test <- test; dev <- with k_per_class, the next k of
    each class from train (LM-BFF's few-shot dev), otherwise the dev file (SST-2, SST-5; TREC has none and
    carves dev out of train).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zo_scale.data import sampling, templates
from zo_scale.data.example import Example
from zo_scale.data.sources import BundledSource, HubOrLocalSource

MEZO_NUM_TRAIN, MEZO_NUM_DEV, MEZO_NUM_TEST = 1000, 500, 1000
LMBFF_SEEDS = (13, 21, 42, 87, 100)
LMBFF_K_CHOICES = (16, 512)

CLASSIFICATION, GENERATION = "classification", "generation"
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # CLASSIFICATION or GENERATION
    metric: str  # the primary metric: "accuracy", "f1a" (MultiRC) or "f1" (ReCoRD, generation); see evaluate
    render: sampling.Render
    hub_path: str | None = None  # None: bundled LM-BFF task
    hub_config: str | None = None
    local_names: tuple[str, ...] = ()  # sub-directory names searched under a data root
    test_split: str = "validation"  # source split used as "test"
    dev_split: str | None = None  # source split used as "dev"; None -> carved out of train
    fixed_classes: bool = True  # labels name the same classes in every row (False for ReCoRD, QA)


def _superglue(
    name: str, render, config: str | None = None, fixed_classes: bool = True, metric: str = "accuracy"
) -> TaskSpec:
    config = config or name
    local_names = tuple(dict.fromkeys((name, config)))  # e.g. "wsc" and "wsc.fixed"
    return TaskSpec(name, CLASSIFICATION, metric, render, "aps/super_glue", config, local_names, fixed_classes=fixed_classes)


_SPECS = (
    TaskSpec("sst2", CLASSIFICATION, "accuracy", templates.sst2, "nyu-mll/glue", "sst2", ("sst2", "sst-2")),
    _superglue("rte", templates.rte),
    _superglue("cb", templates.cb),
    _superglue("boolq", templates.boolq),
    _superglue("wsc", templates.wsc, config="wsc.fixed"),
    _superglue("wic", templates.wic),
    _superglue("multirc", templates.multirc, metric="f1a"),  # SuperGLUE's official MultiRC metrics
    _superglue("copa", templates.copa),
    # Candidates are each row's own entities; F1 of the predicted entity is SuperGLUE's ReCoRD metric.
    _superglue("record", templates.record, fixed_classes=False, metric="f1"),
    TaskSpec("squad", GENERATION, "f1", templates.squad, "rajpurkar/squad", None, ("squad",)),
    TaskSpec("drop", GENERATION, "f1", templates.drop, "ucinlp/drop", None, ("drop",)),
    TaskSpec("sst2-lmbff", CLASSIFICATION, "accuracy", templates.sst2, test_split="test", dev_split="dev"),
    TaskSpec("sst5", CLASSIFICATION, "accuracy", templates.sst5, test_split="test", dev_split="dev"),
    TaskSpec("trec", CLASSIFICATION, "accuracy", templates.trec, test_split="test"),
)
TASKS = {spec.name: spec for spec in _SPECS}
TASK_NAMES = tuple(TASKS)
MEZO_TASKS = tuple(spec.name for spec in _SPECS if spec.hub_path is not None)
LMBFF_TASKS = tuple(spec.name for spec in _SPECS if spec.hub_path is None)


class Task:
    """A task bound to its data source. Build it with `get_task`."""

    def __init__(self, spec: TaskSpec, source):
        self.spec = spec
        self.source = source
        self._rows: dict[str, Sequence[dict]] = {}

    name = property(lambda self: self.spec.name)
    kind = property(lambda self: self.spec.kind)
    metric = property(lambda self: self.spec.metric)
    is_lmbff = property(lambda self: self.spec.hub_path is None)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, kind={self.kind!r}, metric={self.metric!r}, data={self.source.describe()})"

    def render(self, row: dict) -> Example | None:
        return self.spec.render(row)

    def rows(self, source_split: str) -> Sequence[dict]:
        """Raw rows of a source split ("train", "validation", "dev", "test"), loaded once per Task."""
        if source_split not in self._rows:
            self._rows[source_split] = self.source.rows(source_split)
        return self._rows[source_split]

    def examples(
        self, split: str, num: int | None = None, seed: int = 0, k_per_class: int | None = None
    ) -> list[Example]:
        """Prompted examples of `split` ("train", "dev" or "test").

        num: a seeded sample of that many (all of them, fewer, if the split is smaller);
        k_per_class: k examples of every class (classification only; train and dev);
        neither: the whole split in file order (not allowed for a dev carved out of train).
        Same arguments -> the same list; another seed -> another sample.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num is not None and k_per_class is not None:
            raise ValueError("give num or k_per_class, not both")
        if k_per_class is not None:
            if not (self.kind == CLASSIFICATION and self.spec.fixed_classes) or split == "test":
                raise ValueError("k_per_class samples the train/dev splits of tasks with fixed classes")
            # LM-BFF few-shot: dev is the next k of each class from train, whatever dev file exists.
            skip = k_per_class if split == "dev" else 0
            return sampling.k_per_class(self.rows("train"), self.render, k_per_class, seed, skip_per_class=skip)

        source_split = {"train": "train", "test": self.spec.test_split, "dev": self.spec.dev_split}[split]
        if source_split is None:  # dev carved out of train, from the far end of the seeded order
            if num is None:
                raise ValueError(f"{self.name} has no dev split of its own: give num (or k_per_class) to carve one out of train")
            return sampling.first_n(self.rows("train"), self.render, num, seed, from_end=True)
        rows = self.rows(source_split)
        if num is None:
            return sampling.all_examples(rows, self.render)
        return sampling.first_n(rows, self.render, num, seed)

    def sample_splits(
        self,
        seed: int = 0,
        num_train: int | None = MEZO_NUM_TRAIN,
        num_dev: int | None = MEZO_NUM_DEV,
        num_test: int | None = MEZO_NUM_TEST,
        k_per_class: int | None = None,
    ) -> dict[str, list[Example]]:
        """Train/dev/test for one run, with MeZO's sizes by default or LM-BFF's k-shot recipe.

        With k_per_class, train and dev are k per class and test is the whole test split (num_* ignored).
        A None size means the whole split. Raises if a carved dev would overlap the train sample.
        """
        if k_per_class is not None:
            return {
                "train": self.examples("train", k_per_class=k_per_class, seed=seed),
                "dev": self.examples("dev", k_per_class=k_per_class, seed=seed),
                "test": self.examples("test"),
            }
        if self.spec.dev_split is None and num_dev:
            available = len(self.rows("train"))
            if num_train is None or num_train + num_dev > available:
                raise ValueError(
                    f"{self.name}: dev is carved out of train ({available} rows); "
                    f"num_train={num_train} + num_dev={num_dev} would overlap"
                )
        return {
            "train": self.examples("train", num=num_train, seed=seed),
            "dev": self.examples("dev", num=num_dev, seed=seed) if num_dev else [],
            "test": self.examples("test", num=num_test, seed=seed),
        }


def get_task(
    name: str, data_dir: str | None = None, hub_path: str | None = None, hub_config: str | None = None
) -> Task:
    """The task called `name` (see TASK_NAMES).

    data_dir: a directory of split files (train/validation/test .jsonl, .json or .parquet) or a
    `save_to_disk` DatasetDict, or a root holding one such directory per task (named like the task or its
    Hub config). Without it, $ZO_SCALE_DATA_DIR is tried, then the Hub (`hub_path`/`hub_config` override
    the default dataset id). LM-BFF tasks always read the bundled files.
    """
    key = name.strip().lower()
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
    spec = TASKS[key]
    if spec.hub_path is None:
        if data_dir or hub_path:
            raise ValueError(f"{spec.name} reads the bundled LM-BFF files; data_dir/hub_path do not apply")
        return Task(spec, BundledSource(spec.name))
    source = HubOrLocalSource(
        hub_path or spec.hub_path,
        spec.hub_config if hub_config is None else hub_config,
        spec.local_names,
        str(data_dir) if data_dir is not None else None,
    )
    return Task(spec, source)
