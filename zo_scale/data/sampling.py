"""Seeded subsets of a split: N examples (MeZO) or k per class (LM-BFF).

Everything is derived from one seeded permutation of the row indices (`random.Random(seed)`, whose
shuffle is stable across Python versions and platforms), so a seed fixes the sample exactly.
Rows the template rejects (it returns None) are skipped and the next row in the permutation is used.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence

from zo_scale.data.example import Example

Render = Callable[[dict], "Example | None"]


def seeded_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _rendered(rows: Sequence[dict], indices: Iterable[int], render: Render) -> Iterator[Example]:
    for i in indices:
        example = render(rows[int(i)])
        if example is not None:
            example.meta["row"] = int(i)  # position in the source split, for tracing and disjointness checks
            yield example


def all_examples(rows: Sequence[dict], render: Render) -> list[Example]:
    """Every usable row, in file order."""
    return list(_rendered(rows, range(len(rows)), render))


def first_n(rows: Sequence[dict], render: Render, num: int, seed: int, from_end: bool = False) -> list[Example]:
    """`num` examples in seeded order (fewer if the split is smaller).

    from_end=True walks the same permutation backwards: that is how a dev set is carved out of train,
    disjoint from a train sample of the same seed as long as the two sizes add up to at most the split.
    """
    order = seeded_order(len(rows), seed)
    if from_end:
        order.reverse()
    picked: list[Example] = []
    if num <= 0:
        return picked
    for example in _rendered(rows, order, render):
        picked.append(example)
        if len(picked) == num:
            break
    return picked


def k_per_class(
    rows: Sequence[dict], render: Render, k: int, seed: int, skip_per_class: int = 0
) -> list[Example]:
    """Up to k examples of every class, in seeded order (LM-BFF's few-shot sampling).

    Like LM-BFF, a class with fewer rows contributes what it has (TREC's ABBR class has 86 train rows,
    so k=512 gives 86). skip_per_class=k gives LM-BFF's dev set: the next k of each class after the k
    train examples. Classes are the candidate indices of the rendered examples.
    """
    order = seeded_order(len(rows), seed)
    seen_per_class: dict[int, int] = {}
    picked = []
    for example in _rendered(rows, order, render):
        if example.label is None:
            continue
        seen = seen_per_class.get(example.label, 0)
        seen_per_class[example.label] = seen + 1
        if skip_per_class <= seen < skip_per_class + k:
            picked.append(example)
            if len(picked) == k * len(example.candidates):
                break  # every class is full: no need to render the rest of a large split
    return picked
