"""Where a task's raw rows come from: the bundled LM-BFF files, a local directory, or the Hugging Face Hub.

Rows are returned as a sequence of dicts shaped like the Hugging Face dataset's rows. A sequence (a list,
or a `datasets.Dataset`, which indexes lazily) lets samplers touch only the rows they pick.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zo_scale.data.lmbff_files import lmbff_splits, read_lmbff_split

DATA_DIR_ENV = "ZO_SCALE_DATA_DIR"  # default root of local task directories when no data_dir is given

# Accepted file stems per source split in a local directory, first match wins.
SPLIT_FILE_STEMS = {
    "train": ("train",),
    "validation": ("validation", "dev", "val"),
    "test": ("test",),
}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class BundledSource:
    """An LM-BFF task read from zo_scale/data/lmbff/."""

    task: str

    def has_split(self, split: str) -> bool:
        return split in lmbff_splits(self.task)

    def rows(self, split: str) -> Sequence[dict]:
        return read_lmbff_split(self.task, split)

    def describe(self) -> str:
        return f"bundled LM-BFF files for {self.task}"


@dataclass(frozen=True)
class HubOrLocalSource:
    """A Hub dataset (`load_dataset(path, config)`) or its local copy in `data_dir`.

    `local_names` are sub-directory names searched under `data_dir` (and under $ZO_SCALE_DATA_DIR) when
    `data_dir` itself holds no split files, so one root can serve every task.
    """

    hub_path: str
    hub_config: str | None
    local_names: tuple[str, ...]
    data_dir: str | None = None

    def has_split(self, split: str) -> bool:
        return split in SPLIT_FILE_STEMS

    def rows(self, split: str) -> Sequence[dict]:
        directory = self._local_directory()
        if directory is not None:
            return read_local_split(directory, split)
        return _load_from_hub(self.hub_path, self.hub_config, split)

    def describe(self) -> str:
        directory = self._local_directory()
        if directory is not None:
            return f"local files in {directory}"
        config = f", {self.hub_config!r}" if self.hub_config else ""
        return f"load_dataset({self.hub_path!r}{config})"

    def _local_directory(self) -> Path | None:
        roots = [self.data_dir] if self.data_dir else []
        if not roots and os.environ.get(DATA_DIR_ENV):
            roots = [os.environ[DATA_DIR_ENV]]
        for root in roots:
            root = Path(root)
            for candidate in (root, *(root / name for name in self.local_names)):
                if _looks_like_split_dir(candidate):
                    return candidate
        if self.data_dir:
            raise DataNotFoundError(
                f"{self.data_dir}: no split files ({'/'.join(s + '.jsonl' for s in SPLIT_FILE_STEMS)}, .json, "
                f".parquet) or save_to_disk dataset, here or in sub-directories {list(self.local_names)}"
            )
        return None


def _looks_like_split_dir(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    if (directory / "dataset_dict.json").is_file():
        return True
    return any(_split_file(directory, split) is not None for split in SPLIT_FILE_STEMS)


def _split_file(directory: Path, split: str) -> Path | None:
    for stem in SPLIT_FILE_STEMS[split]:
        for suffix in FILE_SUFFIXES:
            path = directory / (stem + suffix)
            if path.is_file():
                return path
    return None


def read_local_split(directory: str | Path, split: str) -> Sequence[dict]:
    """Rows of `split` ("train", "validation" or "test") from a local task directory."""
    directory = Path(directory)
    if (directory / "dataset_dict.json").is_file():
        import datasets

        dataset_dict = datasets.load_from_disk(str(directory))
        if split not in dataset_dict:
            raise DataNotFoundError(f"{directory}: saved dataset has no {split!r} split ({list(dataset_dict)})")
        return dataset_dict[split]
    path = _split_file(directory, split)
    if path is None:
        names = ", ".join(stem + "{" + ",".join(FILE_SUFFIXES) + "}" for stem in SPLIT_FILE_STEMS[split])
        raise DataNotFoundError(f"{directory}: no file for split {split!r} (looked for {names})")
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    return _read_json_rows(path)


def _read_json_rows(path: Path) -> list[dict]:
    """A JSON array of objects, or JSON lines (one object per line), whatever the suffix says."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _load_from_hub(path: str, config: str | None, split: str) -> Sequence[dict]:
    import datasets

    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as error:  # offline, renamed repo, ...: say how to use local data instead
        raise DataNotFoundError(
            f"could not load {path!r} ({config}) split {split!r} from the Hub: {error}. "
            f"Pass data_dir= (or set ${DATA_DIR_ENV}) to a directory of local split files; see docs/tasks.md."
        ) from error
