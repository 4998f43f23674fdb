"""Token ids for prompts and answers, shared by training batches and evaluation.

A causal example is encoded as the tokenizer sees the full text `prompt + answer`: the answer tokens are
what follows the longest common prefix with the tokenization of `prompt` alone. That keeps the exact
tokens a model reads at inference (no artefacts from tokenizing the answer in isolation, e.g. a
SentencePiece "▁" or a lost merge), and when a token straddles the boundary it is counted as answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptAnswerIds:
    ids: list[int]
    answer_start: int  # ids[answer_start:] are the answer tokens

    @property
    def num_answer_tokens(self) -> int:
        return len(self.ids) - self.answer_start


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def truncate_left(ids: list[int], keep_from: int, max_length: int, keep_first: bool) -> tuple[list[int], int]:
    """Drop prompt tokens from the left so len(ids) <= max_length; returns (ids, number of tokens dropped).

    keep_first keeps a leading BOS. The tokens from `keep_from` on (the answer) are never dropped unless
    they alone exceed the budget, in which case the answer is cut on the right.
    """
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, 0
    head = ids[:1] if keep_first else []
    start = len(head)
    # Without a kept BOS, keep one prompt token: the first answer token needs something to follow.
    removable = max(0, keep_from - start - (0 if head else 1))
    dropped = min(excess, removable)
    ids = head + ids[start + dropped :]
    if len(ids) > max_length:  # the answer alone is too long
        ids = ids[:max_length]
    return ids, dropped


def encode_prompt_answer(
    tokenizer, prompt: str, answer: str, max_length: int | None = None, append_eos: bool = False
) -> PromptAnswerIds:
    """Ids of prompt+answer (with the tokenizer's special tokens) and where the answer starts."""
    full = tokenizer(prompt + answer, add_special_tokens=True)["input_ids"]
    prompt_only = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_start = _common_prefix_length(full, prompt_only)
    if answer_start == len(full):
        raise ValueError(f"answer {answer!r} adds no tokens after prompt ...{prompt[-40:]!r}")
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos needs a tokenizer with an eos token")
        full = full + [tokenizer.eos_token_id]
    if max_length is not None:
        keep_bos = tokenizer.bos_token_id is not None and full[0] == tokenizer.bos_token_id
        full, dropped = truncate_left(full, answer_start, max_length, keep_bos)
        answer_start -= dropped
    return PromptAnswerIds(full, answer_start)


def encode_prompt(tokenizer, prompt: str, max_length: int | None = None) -> list[int]:
    """Prompt ids for generation, truncated from the left (a leading BOS is kept)."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if max_length is not None:
        keep_bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
        ids, _ = truncate_left(ids, len(ids), max_length, keep_bos)
    return ids


# --- masked LM -----------------------------------------------------------------------------------------


def verbalizer_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """One token id per label word, preferring the word-initial form (" great" -> "Ġgreat" in RoBERTa)."""
    ids = []
    for word in words:
        for form in (" " + word, word):
            pieces = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(pieces) == 1:
                ids.append(pieces[0])
                break
        else:
            raise ValueError(f"label word {word!r} is not a single token for this tokenizer")
    return ids


def encode_with_mask(tokenizer, mask_context: tuple[str, str], max_length: int | None = None) -> tuple[list[int], int]:
    """Ids of before + <mask> + after and the mask position; truncates the side away from the mask."""
    if tokenizer.mask_token is None:
        raise ValueError("masked-LM scoring needs a tokenizer with a mask token")
    before, after = mask_context
    ids = tokenizer(before + tokenizer.mask_token + after, add_special_tokens=True)["input_ids"]
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
    if len(positions) != 1:
        raise ValueError(f"expected exactly one mask token, found {len(positions)}")
    mask_at = positions[0]
    if max_length is not None and len(ids) > max_length:
        ids, mask_at = _truncate_around(ids, mask_at, max_length, set(tokenizer.all_special_ids) - {tokenizer.mask_token_id})
    return ids, mask_at


def _truncate_around(ids: list[int], mask_at: int, max_length: int, special: set[int]) -> tuple[list[int], int]:
    """Cut text tokens until len(ids) <= max_length, first on the side away from the mask (SST's mask is
    late: cut the start; TREC's is first: cut the end), keeping the mask and the boundary special tokens."""
    head = 1 if ids[0] in special else 0
    tail = 1 if ids[-1] in special else 0
    before = ids[head:mask_at]
    after = ids[mask_at + 1 : len(ids) - tail]
    excess = len(ids) - max_length
    for side in (("before", "after") if mask_at >= len(ids) / 2 else ("after", "before")):
        if side == "before":
            cut = min(excess, len(before))
            before = before[cut:]
        else:
            cut = min(excess, len(after))
            after = after[: len(after) - cut]
        excess -= cut
    kept = ids[:head] + before + [ids[mask_at]] + after + ids[len(ids) - tail :]
    return kept, head + len(before)


# --- padding -------------------------------------------------------------------------------------------


def pad_sequences(sequences: list[list[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            if side == "right":
                out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            else:
                out[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return out


def pad_id(tokenizer) -> int:
    # Causal LMs often ship without a pad token; any id works under a zero attention mask.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row; needed when rows are left-padded."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)
