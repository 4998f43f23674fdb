"""The differentiable-free objective of a ZO step: summed token cross-entropy and its token count.

`token_loss` returns a SUM and a COUNT rather than a mean so that data-parallel ranks can all-reduce both
and form the global token-weighted mean (invariant 4: never a mean of per-rank means).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zo_scale.data.collate import IGNORE_INDEX
from zo_scale.data.scoring import eval_mode, logits_at_mask, model_device, no_cache, takes_logits_to_keep

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of per-token cross-entropy over labeled tokens as a float64 scalar tensor, number of tokens).

    batch: a `causal_lm_batch` (labels aligned with input_ids, -100 = no loss) or a `masked_lm_batch`
    (then the "tokens" are the examples: one cross-entropy over the label words at each mask).
    Runs without autograd and with dropout off; the model's train/eval mode is restored afterwards.
    """
    if "verbalizer_ids" in batch:
        return verbalizer_loss(model, batch)
    device = model_device(model)
    targets = batch["labels"][:, 1:]  # token t is predicted at position t-1
    labeled = targets != IGNORE_INDEX
    n_tokens = int(labeled.sum())  # on the labels' device: CPU batches need no device sync here
    inputs = {k: batch[k].to(device) for k in _MODEL_INPUTS if k in batch}
    with eval_mode(model):
        if takes_logits_to_keep(model):  # the LM head only where some row's label is predicted
            cols = labeled.any(0).nonzero().squeeze(1)
            logits = model(**inputs, logits_to_keep=cols.to(device), **no_cache(model)).logits
            labeled, targets = labeled[:, cols], targets[:, cols]
        else:
            logits = model(**inputs, **no_cache(model)).logits[:, :-1]
        promoted = torch.promote_types(logits.dtype, torch.float32)
        if n_tokens == labeled.numel():  # every kept position labelled: one fp32 copy, no row gather (a second)
            selected, gold = logits.to(promoted).flatten(0, 1), targets.to(device).flatten()
        else:
            labeled = labeled.to(device)
            selected, gold = logits[labeled].to(promoted), targets.to(device)[labeled]
        loss_sum = F.cross_entropy(selected, gold, reduction="sum")
    return loss_sum.to(torch.float64), n_tokens


def verbalizer_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """LM-BFF's masked-LM loss: cross-entropy over the label words' logits at the mask, summed over rows."""
    device = model_device(model)
    labels = batch["labels"]
    labeled = labels != IGNORE_INDEX
    n_examples = int(labeled.sum())
    with eval_mode(model):
        label_word_logits = logits_at_mask(model, batch)[:, batch["verbalizer_ids"].to(device)]
        labeled = labeled.to(device)
        loss_sum = F.cross_entropy(label_word_logits[labeled], labels.to(device)[labeled], reduction="sum")
    return loss_sum.to(torch.float64), n_examples
