"""Evaluation: counts from one rank's share of examples, an all-reduce of the counts, metrics from them.

Classification: every candidate is scored by the log-likelihood of its tokens given the prompt (default
length-normalised, i.e. the mean token log-probability, as in MeZO; `length_normalize=False` sums) and the
argmax is the prediction. Masked LMs (LM-BFF tasks) score the label words at the mask instead.
Generation (SQuAD, DROP): greedy decoding, then SQuAD-normalised exact match and token F1 against the
best gold answer.

SuperGLUE's official metrics where accuracy is not one: MultiRC ("f1a") is binary F1 over all answer
options (positive = label 1, " Yes") and exact match over questions (examples sharing `Example.group`);
ReCoRD ("f1") is token F1 / exact match of the predicted entity (`Example.candidate_answers`) against the
gold answers. Both keep per-example accuracy too.

Counts are sums, so a distributed caller evaluates `rank_share(examples, rank, world)` on each rank, sums
the counts (`all_reduce_counts`) and turns them into metrics (`metrics_from_counts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from zo_scale.data.answer_metrics import best_over_answers, exact_match, token_f1
from zo_scale.data.example import Example
from zo_scale.data.scoring import (
    candidate_scores,
    greedy_answers,
    is_masked_lm,
    model_device,
    verbalizer_scores,
)

CLASSIFICATION_METRICS = ("accuracy", "f1a", "f1")


def _kind_of(examples: Sequence[Example], kind: str | None) -> str:
    if kind is not None:
        if kind not in ("classification", "generation"):
            raise ValueError(f"kind must be 'classification' or 'generation', got {kind!r}")
        return kind
    if not examples:
        raise ValueError("no examples: pass kind= so that empty shares still return the right count keys")
    kinds = {e.is_generation for e in examples}
    if len(kinds) > 1:
        raise ValueError("examples mix classification and generation")
    return "generation" if kinds.pop() else "classification"


def _metric_of(examples: Sequence[Example], kind: str, metric: str | None) -> str:
    """The primary metric, which fixes the count keys: `metric` if given, else what the examples carry
    (groups -> "f1a", candidate answers -> "f1"), so callers holding only examples (the trainer) get it."""
    if metric is None:
        if kind == "generation":
            metric = "f1"
        elif any(e.group is not None for e in examples):
            metric = "f1a"
        elif any(e.candidate_answers for e in examples):
            metric = "f1"
        else:
            metric = "accuracy"
    allowed = ("f1",) if kind == "generation" else CLASSIFICATION_METRICS
    if metric not in allowed:
        raise ValueError(f"metric for {kind} must be one of {allowed}, got {metric!r}")
    return metric


def _question_keys(examples: Sequence[Example]) -> list[tuple]:
    # An example without a group is a question of its own.
    return [("group", e.group) if e.group is not None else ("example", i) for i, e in enumerate(examples)]


def _argmax(scores: Sequence[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties -> the first candidate


def predict_candidates(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    scorer: str = "auto",
    length_normalize: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    sync_ranks: bool | None = None,
) -> list[int]:
    """Index of the best-scoring candidate per example. scorer: "causal", "mlm" or "auto" (by model class)."""
    if scorer == "auto":
        scorer = "mlm" if is_masked_lm(model) else "causal"
    common = dict(batch_size=batch_size, max_length=max_length, sync_ranks=sync_ranks)
    if scorer == "mlm":
        scores = verbalizer_scores(model, tokenizer, examples, **common)
    elif scorer == "causal":
        scores = candidate_scores(model, tokenizer, examples, length_normalize=length_normalize, **common)
    else:
        raise ValueError(f"scorer must be 'auto', 'causal' or 'mlm', got {scorer!r}")
    return [_argmax(s) for s in scores]


def _answer_counts(predicted: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    pairs = list(zip(predicted, examples, strict=True))
    return {
        "em_sum": float(sum(best_over_answers(exact_match, a, e.answers) for a, e in pairs)),
        "f1_sum": float(sum(best_over_answers(token_f1, a, e.answers) for a, e in pairs)),
    }


def generation_counts(answers: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """{"em_sum", "f1_sum", "total"} of generated answers, each against its example's best gold answer."""
    return {**_answer_counts(answers, examples), "total": float(len(examples))}


def _candidate_answer(example: Example, index: int) -> str:
    if not example.candidate_answers:
        raise ValueError("metric 'f1' on a classification task needs Example.candidate_answers")
    return example.candidate_answers[index]


def _option_counts(predictions: Sequence[int], examples: Sequence[Example]) -> dict[str, float]:
    # Binary F1 over answer options: positive = label 1 (MultiRC's " Yes": the proposed answer is correct).
    if any(len(e.candidates) != 2 for e in examples):
        raise ValueError("metric 'f1a' scores binary examples (positive class = label 1)")
    pairs = [(p == 1, e.label == 1) for p, e in zip(predictions, examples, strict=True)]
    return {
        "tp": float(sum(p and g for p, g in pairs)),
        "fp": float(sum(p and not g for p, g in pairs)),
        "fn": float(sum(g and not p for p, g in pairs)),
    }


def _question_counts(hits: Sequence[bool], examples: Sequence[Example]) -> dict[str, float]:
    # A question is exact when every one of its options present here is right.
    exact: dict[tuple, bool] = {}
    for key, hit in zip(_question_keys(examples), hits):
        exact[key] = exact.get(key, True) and hit
    return {"questions": float(len(exact)), "questions_exact": float(sum(exact.values()))}


def classification_counts(
    predictions: Sequence[int], examples: Sequence[Example], metric: str = "accuracy"
) -> dict[str, float]:
    """Counts (sums, so ranks can add them) from predicted candidate indices.

    Always {"correct", "total"} (prediction in `gold_indices`); metric "f1" adds {"f1_sum", "em_sum"} of the
    predicted candidate's answer string against `answers` (ReCoRD); "f1a" adds {"tp", "fp", "fn"} over
    options and {"questions", "questions_exact"} over groups (MultiRC).
    """
    if metric not in CLASSIFICATION_METRICS:
        raise ValueError(f"metric must be one of {CLASSIFICATION_METRICS}, got {metric!r}")
    hits = [p in e.gold_indices for p, e in zip(predictions, examples, strict=True)]
    counts = {"correct": float(sum(hits)), "total": float(len(examples))}
    if metric == "f1":
        counts.update(_answer_counts([_candidate_answer(e, p) for p, e in zip(predictions, examples)], examples))
    elif metric == "f1a":
        counts.update(_option_counts(predictions, examples))
        counts.update(_question_counts(hits, examples))
    return counts


def evaluate_counts(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    kind: str | None = None,
    metric: str | None = None,
    scorer: str = "auto",
    length_normalize: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    max_new_tokens: int = 50,
    sync_ranks: bool | None = None,
) -> dict[str, float]:
    """Counts over this rank's examples: `classification_counts` or `generation_counts`.

    kind ("classification" / "generation") and metric (a task's primary metric: "accuracy", "f1a", "f1")
    default to what the examples are; pass both when a rank's share may be empty, so that every rank
    returns the same keys.
    """
    kind = _kind_of(examples, kind)
    metric = _metric_of(examples, kind, metric)
    if kind == "classification":
        predictions = predict_candidates(
            model,
            tokenizer,
            examples,
            scorer=scorer,
            length_normalize=length_normalize,
            batch_size=batch_size,
            max_length=max_length,
            sync_ranks=sync_ranks,
        )
        return classification_counts(predictions, examples, metric)
    answers = greedy_answers(
        model,
        tokenizer,
        examples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_length=max_length,
        sync_ranks=sync_ranks,
    )
    return generation_counts(answers, examples)


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else float("nan")


def _binary_f1(tp: float, fp: float, fn: float) -> float:
    # 2PR / (P + R) = 2tp / (2tp + fp + fn); nothing positive, gold or predicted, scores 0 (as sklearn).
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def metrics_from_counts(counts: dict[str, float]) -> dict[str, float]:
    """Metrics (fractions in [0, 1]) from (reduced) counts, the primary metric FIRST (the trainer picks the
    best dev checkpoint by the first key): {"accuracy"}; MultiRC {"f1a", "em", "accuracy"} (em over
    questions); ReCoRD {"f1", "em", "accuracy"}; generation {"f1", "em"}. NaN for zero examples."""
    total = counts["total"]
    metrics = {}
    if "tp" in counts:
        f1a = _binary_f1(counts["tp"], counts["fp"], counts["fn"]) if total else float("nan")
        metrics = {"f1a": f1a, "em": _ratio(counts["questions_exact"], counts["questions"])}
    elif "f1_sum" in counts:
        metrics = {"f1": _ratio(counts["f1_sum"], total), "em": _ratio(counts["em_sum"], total)}
    if "correct" in counts:
        metrics["accuracy"] = _ratio(counts["correct"], total)
    return metrics


def all_reduce_counts(counts: dict[str, float], group=None, device: torch.device | str | None = None) -> dict[str, float]:
    """Sum the counts over the ranks of `group` (every rank must pass the same keys); a no-op without
    torch.distributed. device: where the collective runs (a CUDA device for NCCL); default CPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(counts)
    keys = sorted(counts)
    packed = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=device or "cpu")
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, packed.tolist()))


def rank_share(examples: Sequence[Example], rank: int, world_size: int) -> list[Example]:
    """Every world_size-th example starting at rank: shares differ in size by at most one.

    With groups (MultiRC questions), every world_size-th group in first-appearance order instead, in the
    examples' order: exact match over a question needs all its options on one rank.
    """
    if all(e.group is None for e in examples):
        return list(examples[rank::world_size])
    keys = _question_keys(examples)
    position: dict[tuple, int] = {}
    for key in keys:
        position.setdefault(key, len(position))
    return [e for e, key in zip(examples, keys) if position[key] % world_size == rank]


def evaluate(model, tokenizer, examples: Sequence[Example], *, group=None, **options) -> dict[str, float]:
    """Metrics over `examples` (the full list, the same on every rank). Under torch.distributed, each rank
    scores its `rank_share` and the counts are summed; otherwise it is a plain single-process evaluation.
    options: those of `evaluate_counts`."""
    kind = _kind_of(examples, options.pop("kind", None))
    # Fixed from the full list, so that every share (even an empty one) returns the same count keys.
    options["metric"] = _metric_of(examples, kind, options.pop("metric", None))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        counts = evaluate_counts(model, tokenizer, rank_share(examples, rank, world), kind=kind, **options)
        device = model_device(model) if dist.get_backend(group) == "nccl" else "cpu"
        counts = all_reduce_counts(counts, group=group, device=device)
    else:
        counts = evaluate_counts(model, tokenizer, examples, kind=kind, **options)
    return metrics_from_counts(counts)


def accuracy_objective(model, tokenizer, examples: Sequence[Example], **options) -> tuple[torch.Tensor, int]:
    """A non-differentiable objective to minimise: (-(number correct) or -(sum of F1), number of examples).

    Same (sum, count) shape as `token_loss`, so the optimizer reduces it the same way; the global mean is
    minus the accuracy (classification, MultiRC and ReCoRD included: a per-example score) or minus the F1
    (generation). options: those of `evaluate_counts`.
    """
    counts = evaluate_counts(model, tokenizer, examples, **options)
    score = counts["correct"] if "correct" in counts else counts["f1_sum"]
    return torch.tensor(-score, dtype=torch.float64, device=model_device(model)), int(counts["total"])
