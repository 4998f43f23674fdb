"""Readers for the bundled LM-BFF "original" files (zo_scale/data/lmbff/, see its README.md).

Each file has its own layout, so each gets a small parser; all return rows {"sentence": str, "label": int}.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

LMBFF_DIR = Path(__file__).resolve().parent / "lmbff"

# task name -> (folder, {split: file name})
LMBFF_FILES = {
    "sst2-lmbff": ("SST-2", {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}),
    "sst5": ("sst-5", {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}),
    "trec": ("trec", {"train": "train.csv", "test": "test.csv"}),
}


def _read_lines(path: Path) -> list[str]:
    # newline="" keeps a stray "\r" inside a sentence from splitting it; the files use "\n" endings.
    with open(path, encoding="utf-8", newline="") as f:
        return [line for line in f.read().split("\n") if line]


def _sentence_tab_label_with_header(path: Path) -> list[dict]:
    lines = _read_lines(path)
    if lines[0] != "sentence\tlabel":
        raise ValueError(f"{path}: expected the header 'sentence<TAB>label', got {lines[0]!r}")
    rows = []
    for line in lines[1:]:
        sentence, label = line.rsplit("\t", 1)
        rows.append({"sentence": sentence, "label": int(label)})
    return rows


def _label_space_sentence(path: Path) -> list[dict]:
    # SST-2 test.tsv: "0 no movement , ..." -- label, one space, sentence; no header.
    rows = []
    for line in _read_lines(path):
        label, sentence = line.split(" ", 1)
        rows.append({"sentence": sentence, "label": int(label)})
    return rows


def _label_tab_sentence(path: Path) -> list[dict]:
    rows = []
    for line in _read_lines(path):
        label, sentence = line.split("\t", 1)
        rows.append({"sentence": sentence, "label": int(label)})
    return rows


def _label_comma_question_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [{"sentence": question, "label": int(label)} for label, question in csv.reader(f)]


def _parser_for(task: str, split: str):
    if task == "sst2-lmbff":
        return _label_space_sentence if split == "test" else _sentence_tab_label_with_header
    if task == "sst5":
        return _label_tab_sentence
    return _label_comma_question_csv


@functools.lru_cache(maxsize=None)
def _cached_rows(task: str, split: str) -> tuple[dict, ...]:
    folder, files = LMBFF_FILES[task]
    if split not in files:
        raise KeyError(f"{task} has no {split!r} file (has {sorted(files)})")
    return tuple(_parser_for(task, split)(LMBFF_DIR / folder / files[split]))


def read_lmbff_split(task: str, split: str) -> list[dict]:
    """Rows of one bundled file, in file order. split: "train", "dev" (SST-2, SST-5 only) or "test"."""
    return [dict(row) for row in _cached_rows(task, split)]


def lmbff_splits(task: str) -> tuple[str, ...]:
    return tuple(LMBFF_FILES[task][1])
