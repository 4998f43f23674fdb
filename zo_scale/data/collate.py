"""Training batches: tensors for `token_loss` built from prompted examples.

causal_lm_batch: input_ids / attention_mask / labels with labels = -100 where no loss is taken.
  loss_on="answer" (default, MeZO's "only train the option"): loss on the gold candidate's tokens (or the
  gold answer's for generation tasks), i.e. training as classification on the correct option.
  loss_on="full": plain LM loss over prompt and answer.
masked_lm_batch: the LM-BFF form for masked LMs (cross-entropy over verbalizer logits at the mask).
Labels are aligned with input_ids (Hugging Face convention); the loss shifts them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zo_scale.data.encoding import (
    encode_prompt_answer,
    encode_with_mask,
    pad_id,
    pad_sequences,
    position_ids_from_mask,
    verbalizer_token_ids,
)
from zo_scale.data.example import Example

IGNORE_INDEX = -100


def causal_lm_batch(
    tokenizer,
    examples: Sequence[Example],
    *,
    loss_on: str = "answer",
    max_length: int | None = None,
    padding_side: str = "right",
    append_eos: bool | None = None,
) -> dict[str, torch.Tensor]:
    """A batch for a causal LM. Prompts longer than max_length lose tokens from their left.

    append_eos (default: only for generation examples) ends the target with EOS so that greedy decoding
    learns to stop. With padding_side="left" the batch also carries position_ids counted over real tokens.
    """
    if loss_on not in ("answer", "full"):
        raise ValueError(f"loss_on must be 'answer' or 'full', got {loss_on!r}")
    if not examples:
        raise ValueError("empty batch")
    ids_list, label_list = [], []
    for example in examples:
        eos = example.is_generation if append_eos is None else append_eos
        encoded = encode_prompt_answer(tokenizer, example.prompt, example.target, max_length, append_eos=eos)
        labels = list(encoded.ids)
        if loss_on == "answer":
            labels[: encoded.answer_start] = [IGNORE_INDEX] * encoded.answer_start
        ids_list.append(encoded.ids)
        label_list.append(labels)
    input_ids = pad_sequences(ids_list, pad_id(tokenizer), padding_side)
    attention_mask = pad_sequences([[1] * len(ids) for ids in ids_list], 0, padding_side)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pad_sequences(label_list, IGNORE_INDEX, padding_side),
    }
    if padding_side == "left":
        batch["position_ids"] = position_ids_from_mask(attention_mask)
    return batch


def masked_lm_batch(
    tokenizer, examples: Sequence[Example], *, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """A batch for a masked LM: the template with one mask token, scored on the label words.

    Keys: input_ids, attention_mask, mask_positions [B], verbalizer_ids [C] (shared by the batch) and
    labels [B] (gold class index, -100 if unlabeled). Right-padded: masked LMs see the whole row anyway.
    """
    if not examples:
        raise ValueError("empty batch")
    words = examples[0].verbalizers
    if not words or any(e.mask_context is None or e.verbalizers != words for e in examples):
        raise ValueError("masked-LM batches need examples of one LM-BFF-style task (mask_context and verbalizers)")
    encoded = [encode_with_mask(tokenizer, e.mask_context, max_length) for e in examples]
    ids_list = [ids for ids, _ in encoded]
    return {
        "input_ids": pad_sequences(ids_list, pad_id(tokenizer), "right"),
        "attention_mask": pad_sequences([[1] * len(ids) for ids in ids_list], 0, "right"),
        "mask_positions": torch.tensor([at for _, at in encoded], dtype=torch.long),
        "verbalizer_ids": torch.tensor(verbalizer_token_ids(tokenizer, words), dtype=torch.long),
        "labels": torch.tensor([IGNORE_INDEX if e.label is None else e.label for e in examples], dtype=torch.long),
    }
