"""Evaluation: counts from one rank's share of examples, an all-reduce of the counts, metrics from them.

Classification: every candidate is scored by the log-likelihood of its tokens given the prompt (default
length-normalised, i.e. the mean token log-probability, as in MeZO; `length_normalize=False` sums) and the
argmax is the prediction. Masked LMs (LM-BFF tasks) score the label words at the mask instead.
Generation (SQuAD, DROP): greedy decoding, then SQuAD-normalised exact match and token F1 against the
best gold answer.

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


def evaluate_counts(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    kind: str | None = None,
    scorer: str = "auto",
    length_normalize: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    max_new_tokens: int = 50,
    sync_ranks: bool | None = None,
) -> dict[str, float]:
    """Counts over this rank's examples.

    classification -> {"correct", "total"}; generation -> {"em_sum", "f1_sum", "total"}.
    kind defaults to what the examples are; pass it when a rank's share may be empty.
    """
    kind = _kind_of(examples, kind)
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
        correct = sum(p in e.gold_indices for p, e in zip(predictions, examples))
        return {"correct": float(correct), "total": float(len(examples))}
    answers = greedy_answers(
        model,
        tokenizer,
        examples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_length=max_length,
        sync_ranks=sync_ranks,
    )
    return {
        "em_sum": sum(best_over_answers(exact_match, a, e.answers) for a, e in zip(answers, examples)),
        "f1_sum": sum(best_over_answers(token_f1, a, e.answers) for a, e in zip(answers, examples)),
        "total": float(len(examples)),
    }


def metrics_from_counts(counts: dict[str, float]) -> dict[str, float]:
    """{"accuracy"} or {"f1", "em"} (fractions in [0, 1]) from (reduced) counts; NaN for zero examples."""
    total = counts["total"]
    ratio = (lambda x: x / total) if total else (lambda x: float("nan"))
    if "correct" in counts:
        return {"accuracy": ratio(counts["correct"])}
    return {"f1": ratio(counts["f1_sum"]), "em": ratio(counts["em_sum"])}


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
    """Every world_size-th example starting at rank: shares differ in size by at most one."""
    return list(examples[rank::world_size])


def evaluate(model, tokenizer, examples: Sequence[Example], *, group=None, **options) -> dict[str, float]:
    """Metrics over `examples` (the full list, the same on every rank). Under torch.distributed, each rank
    scores its `rank_share` and the counts are summed; otherwise it is a plain single-process evaluation.
    options: those of `evaluate_counts`."""
    kind = _kind_of(examples, options.pop("kind", None))
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
    minus the accuracy (classification) or minus the F1 (generation). options: those of `evaluate_counts`.
    """
    counts = evaluate_counts(model, tokenizer, examples, **options)
    score = counts["correct"] if "correct" in counts else counts["f1_sum"]
    return torch.tensor(-score, dtype=torch.float64, device=model_device(model)), int(counts["total"])
