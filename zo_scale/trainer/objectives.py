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

import torch.nn.functional as F

from zo_scale import evaluate as ev
from zo_scale import probes
from zo_scale.data import token_loss
from zo_scale.data.collate import IGNORE_INDEX
from zo_scale.data.scoring import (candidate_scores, eval_mode, logits_at_mask, model_device, no_cache,
                                   takes_logits_to_keep)


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


def grouped_token_loss(model, batch: dict[str, torch.Tensor], groups: int) -> tuple[torch.Tensor, int]:
    """``token_loss`` of each probe group (``optimizer.batched_probes``): one forward of the batch repeated
    ``groups`` times along dim 0; returns the (groups,) fp64 sums and the count each group shares."""
    device = model_device(model)
    rep = {k: probes.replicate(v, groups) for k, v in batch.items()}
    with eval_mode(model):
        if "verbalizer_ids" in batch:  # masked LM: cross-entropy over the label words at the mask
            labels = rep["labels"].to(device)
            logits = logits_at_mask(model, rep)[:, batch["verbalizer_ids"].to(device)]
            per_row = F.cross_entropy(logits, labels.clamp(min=0), reduction="none").masked_fill(labels == IGNORE_INDEX, 0)
            return probes.group_sums(per_row.double(), groups), int((batch["labels"] != IGNORE_INDEX).sum())
        targets = rep["labels"][:, 1:].to(device)
        inputs = {k: rep[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in rep}
        if takes_logits_to_keep(model):  # the LM head only where some row's label is predicted
            cols = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1).to(device)
            logits = model(**inputs, logits_to_keep=cols, **no_cache(model)).logits
            targets = targets[:, cols]
        else:
            logits = model(**inputs, **no_cache(model)).logits[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return probes.group_sums(per_token.double(), groups), n_tokens


def make_closure(objective: str, model, tokenizer, batch, eval_options: dict):
    """The closure ``opt.step`` calls (several times per step, on the same batch); for the loss objective it
    also takes the probe-group count (``closure(groups)``, batched probes)."""
    if objective == "loss":
        return lambda groups=None: (token_loss(model, batch.tensors) if groups is None
                                    else grouped_token_loss(model, batch.tensors, groups))
    if objective == "candidates":
        opts = {k: eval_options[k] for k in ("length_normalize", "batch_size", "max_length")}
        return lambda: candidate_cross_entropy(model, tokenizer, batch.examples, **opts)
    if objective == "accuracy":
        return lambda: ev.accuracy_objective(model, tokenizer, batch.examples, **eval_options)
    raise ValueError(f"unknown objective {objective!r}")
