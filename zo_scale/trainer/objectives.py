"""What a ZO step minimises on this rank's share of the batch: a ``(sum, weight)`` pair, which the
optimizer all-reduces into a global weighted mean.

* ``loss``: token cross-entropy (``zo_scale.data.token_loss``) on the answer tokens or the whole text
  (``task.loss_on``): MeZO's objective; weight = labeled tokens. For a masked LM the batch is a
  ``masked_lm_batch`` and this is LM-BFF's loss: cross-entropy over the label words at the mask,
  weight = examples.
* ``candidates``: cross-entropy of the gold candidate against the other candidates, from their
  (length-normalised) log-likelihoods: the LM-BFF classification loss, for a causal LM. It trains
  the *choice* between the label words directly instead of their probability among the whole
  vocabulary, so a model that starts biased towards one label word gets a useful signal at once.
  Classification tasks only; weight = examples. One forward per distinct scoring context: one per
  example when the label words are single tokens (``zo_scale.data.scoring.shared_contexts``).
* ``accuracy``: minus the accuracy (or F1) of the predictions: non-differentiable, fine for ZO (a masked
  LM predicts with its label words at the mask).
"""

from __future__ import annotations

import math

import torch

from zo_scale import evaluate as ev
from zo_scale.data import token_loss
from zo_scale.data.scoring import candidate_scores, model_device


def candidate_cross_entropy(model, tokenizer, examples, *, length_normalize: bool = True, batch_size: int = 8,
                            max_length: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum over examples of -log softmax(candidate scores)[gold], number of examples)."""
    scores = candidate_scores(model, tokenizer, examples, length_normalize=length_normalize, batch_size=batch_size,
                              max_length=max_length)
    total = sum(gold_cross_entropy(s, example.label) for s, example in zip(scores, examples))
    return torch.tensor(total, dtype=torch.float64, device=model_device(model)), len(examples)


def gold_cross_entropy(scores, label: int) -> float:
    """-log softmax(scores)[label], computed stably (the largest score is subtracted first)."""
    top = max(scores)
    return top + math.log(sum(math.exp(v - top) for v in scores)) - scores[label]


def make_closure(objective: str, model, tokenizer, batch, eval_options: dict):
    """The closure ``opt.step`` calls (several times per step, on the same batch)."""
    if objective == "loss":
        return lambda: token_loss(model, batch.tensors)
    if objective == "candidates":
        opts = {k: eval_options[k] for k in ("length_normalize", "batch_size", "max_length")}
        return lambda: candidate_cross_entropy(model, tokenizer, batch.examples, **opts)
    if objective == "accuracy":
        return lambda: ev.accuracy_objective(model, tokenizer, batch.examples, **eval_options)
    raise ValueError(f"unknown objective {objective!r}")
