"""Forward passes that score examples: candidate log-likelihoods (causal LM), label-word log-probabilities
at the mask (masked LM) and greedy decoding. Batched, without autograd, in eval mode.

Candidates that continue the same context (every token but the last) share one forward, which keeps only
the logits of the positions that predict them (`SharedContexts`, `logits_to_keep`).

Sharded engines (FSDP2, DeepSpeed ZeRO-3) run collectives inside every forward, so every rank must make
the same number of forward calls. With `sync_ranks` on (default: whenever torch.distributed runs with
more than one rank) ranks agree on the largest number of batches and ranks with fewer run throw-away
forwards; generation also passes `synced_gpus=True` so ranks keep stepping until all are done.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zo_scale.data.collate import masked_lm_batch
from zo_scale.data.encoding import (
    PromptAnswerIds,
    encode_prompt,
    encode_prompt_answer,
    pad_id,
    pad_sequences,
    position_ids_from_mask,
)
from zo_scale.data.example import Example


def model_device(model) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _inner_model(model):
    """The transformers model inside an engine or adapter wrapper, whose class and forward signature say
    what the model is (the wrappers' say nothing)."""
    inner = getattr(model, "module", model)  # DeepSpeed engine / DDP keep the model in .module
    if hasattr(inner, "get_base_model"):  # a PeftModel; peft passes keyword arguments on to it
        inner = inner.get_base_model()
    return inner


def no_cache(model) -> dict:
    """``{"use_cache": False}`` for a transformers model, else nothing. Left on, a causal LM builds a KV
    cache in every forward (2 × layers × tokens × hidden values, alive at the logits' peak) that a ZO
    forward never reads: on OPT-1.3B at batch 16 × 256 that is 0.75 GiB of a 2.7 GiB activation peak."""
    config = getattr(_inner_model(model), "config", None)
    return {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}


def is_masked_lm(model) -> bool:
    """True for *ForMaskedLM models (also when FSDP2 renames the class to FSDP<Name>, and under peft)."""
    return "MaskedLM" in type(_inner_model(model)).__name__


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off and no autograd; the previous train/eval mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def should_sync(sync_ranks: bool | None) -> bool:
    if sync_ranks is None:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return sync_ranks


def run_in_step(batches: Sequence, run: Callable, run_dummy: Callable, sync: bool, device: torch.device) -> list:
    """[run(b) for b in batches]; with sync, then run_dummy() until every rank made as many calls.

    The ranks agree on the call count before any forward: once forwards start, their own collectives
    (parameter gathers, generate's "all finished?" flag) must be the only ones in flight.
    """
    extra = 0
    if sync:
        # NCCL only reduces device tensors; gloo (CPU runs) wants host tensors.
        where = device if dist.get_backend() == "nccl" else "cpu"
        count = torch.tensor([len(batches)], dtype=torch.long, device=where)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        extra = int(count.item()) - len(batches)
    results = [run(batch) for batch in batches]
    for _ in range(extra):
        run_dummy()
    return results


def chunks(items: Sequence, size: int) -> list:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    # At least fp32; a float64 model stays float64 (exact checks in tests).
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _dummy_forward(model, tokenizer, device) -> Callable:
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id(tokenizer)

    def run():
        input_ids = torch.tensor([[first]], device=device)
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **no_cache(model))

    return run


# --- causal LM: continuation log-likelihoods ------------------------------------------------------------


@dataclass(frozen=True)
class SharedContexts:
    """Continuations grouped by the forward that scores them.

    The logits at position t depend only on tokens <= t, so a continuation encoded as `ids` is scored from
    one forward over `ids[:-1]` (its context), reading its last positions. Continuations with the same
    context share that forward: single-token label words (" great" / " terrible", " Yes" / " No") are then
    one forward per example instead of one per candidate.
    """

    contexts: list[tuple[int, ...]]
    keep: list[int]  # per context: how many trailing positions its continuations read
    members: list[list[int]]  # per context: the indices of the continuations it scores


def _scored_tokens(encoded: PromptAnswerIds) -> list[int]:
    # The answer tokens some position predicts: a first token of the whole sequence has none.
    return encoded.ids[max(encoded.answer_start, 1) :]


def shared_contexts(encoded: Sequence[PromptAnswerIds]) -> SharedContexts:
    index: dict[tuple[int, ...], int] = {}
    groups = SharedContexts([], [], [])
    for i, e in enumerate(encoded):
        context = tuple(e.ids[:-1])
        if context not in index:
            index[context] = len(groups.contexts)
            groups.contexts.append(context)
            groups.keep.append(0)
            groups.members.append([])
        c = index[context]
        groups.keep[c] = max(groups.keep[c], len(_scored_tokens(e)))
        groups.members[c].append(i)
    return groups


def takes_logits_to_keep(model) -> bool:
    """Whether the forward can run the LM head on the last positions only (transformers causal LMs)."""
    return "logits_to_keep" in inspect.signature(_inner_model(model).forward).parameters


def last_logits(model, ids: list[list[int]], pad: int, keep: int, trim: bool, device) -> torch.Tensor:
    """[B, keep, V] logits of each context's last `keep` positions: left padding aligns the ends, and
    position ids count real tokens only, so every row sees the positions of its unpadded forward."""
    input_ids = pad_sequences(ids, pad, "left").to(device)
    attention_mask = pad_sequences([[1] * len(x) for x in ids], 0, "left").to(device)
    position_ids = position_ids_from_mask(attention_mask)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **no_cache(model))
    if trim:
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[:, -keep:]


def _sum_scored(log_probs: torch.Tensor, answers: list[tuple[int, list[int]]]) -> list[float]:
    """Per (row, answer tokens): the sum of the tokens' log-probabilities, which the row's last positions
    predict. One gather for the whole batch."""
    keep = log_probs.shape[1]
    at_row, at_col, tokens, owner = [], [], [], []
    for k, (row, answer) in enumerate(answers):
        at_row += [row] * len(answer)
        at_col += range(keep - len(answer), keep)
        tokens += answer
        owner += [k] * len(answer)
    index = torch.tensor([at_row, at_col, tokens, owner], device=log_probs.device)
    picked = log_probs[index[0], index[1], index[2]]
    return torch.zeros(len(answers), dtype=picked.dtype, device=picked.device).index_add_(0, index[3], picked).tolist()


def continuation_logprobs_from_ids(
    model,
    tokenizer,
    encoded: Sequence[PromptAnswerIds],
    *,
    batch_size: int = 8,
    sync_ranks: bool | None = None,
) -> list[tuple[float, int]]:
    """`continuation_logprobs` of already encoded continuations; batch_size counts contexts per forward."""
    groups = shared_contexts(encoded)
    order = sorted(range(len(groups.contexts)), key=lambda c: len(groups.contexts[c]))  # less padding
    device = model_device(model)
    pad = pad_id(tokenizer)
    trim = takes_logits_to_keep(model)

    def score(batch: list[int]) -> list[tuple[int, float]]:
        keep = max(groups.keep[c] for c in batch)
        logits = last_logits(model, [list(groups.contexts[c]) for c in batch], pad, keep, trim, device)
        members = [(i, row) for row, c in enumerate(batch) for i in groups.members[c]]
        sums = _sum_scored(_log_softmax(logits), [(row, _scored_tokens(encoded[i])) for i, row in members])
        return [(i, total) for (i, _), total in zip(members, sums)]

    with eval_mode(model):
        results = run_in_step(
            chunks(order, batch_size), score, _dummy_forward(model, tokenizer, device), should_sync(sync_ranks), device
        )
    totals = dict(item for chunk in results for item in chunk)
    return [(totals[i], e.num_answer_tokens) for i, e in enumerate(encoded)]


def continuation_logprobs(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    sync_ranks: bool | None = None,
) -> list[tuple[float, int]]:
    """For each (prompt, continuation): (sum of log p(continuation tokens | prompt), number of those tokens).

    Encoding is `encode_prompt_answer` (full-text tokenization, prompt truncated from the left). Continuations
    sharing a context share a forward (`SharedContexts`); batch_size counts those forwards' sequences.
    """
    encoded = [encode_prompt_answer(tokenizer, prompt, cont, max_length) for prompt, cont in pairs]
    return continuation_logprobs_from_ids(model, tokenizer, encoded, batch_size=batch_size, sync_ranks=sync_ranks)


def candidate_scores(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    length_normalize: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    sync_ranks: bool | None = None,
) -> list[list[float]]:
    """Per example, one score per candidate: the candidate's log-likelihood given the prompt, averaged
    over its tokens when length_normalize (MeZO's default) or summed otherwise."""
    pairs = [(e.prompt, c) for e in examples for c in e.candidates]
    scored = continuation_logprobs(
        model, tokenizer, pairs, batch_size=batch_size, max_length=max_length, sync_ranks=sync_ranks
    )
    out, at = [], 0
    for e in examples:
        per_candidate = scored[at : at + len(e.candidates)]
        at += len(e.candidates)
        out.append([total / n if length_normalize else total for total, n in per_candidate])
    return out


# --- masked LM: label words at the mask -----------------------------------------------------------------


def logits_at_mask(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, V] logits at each row's mask position (a `masked_lm_batch`), in at least fp32."""
    device = model_device(model)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    rows = torch.arange(logits.shape[0], device=device)
    at_mask = logits[rows, batch["mask_positions"].to(device)]
    return at_mask.to(torch.promote_types(at_mask.dtype, torch.float32))


def verbalizer_scores(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    sync_ranks: bool | None = None,
) -> list[list[float]]:
    """Per example, log p(label word | text with <mask>) at the mask, over the full vocabulary."""
    device = model_device(model)

    def score(chunk) -> list[list[float]]:
        batch = masked_lm_batch(tokenizer, chunk, max_length=max_length)
        log_probs = torch.log_softmax(logits_at_mask(model, batch), dim=-1)
        return log_probs[:, batch["verbalizer_ids"].to(device)].tolist()

    def dummy():
        ids = [tokenizer.mask_token_id]
        input_ids = torch.tensor([ids], device=device)
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))

    with eval_mode(model):
        results = run_in_step(chunks(list(examples), batch_size), score, dummy, should_sync(sync_ranks), device)
    return [row for chunk in results for row in chunk]


# --- generation ---------------------------------------------------------------------------------------


def _generate_fn(model):
    return model.generate if hasattr(model, "generate") else model.module.generate


def greedy_answers(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 50,
    batch_size: int = 8,
    max_length: int | None = None,
    stop_at_newline: bool = True,
    sync_ranks: bool | None = None,
) -> list[str]:
    """Greedy continuations of each prompt (left-padded batches), cut at the first newline and stripped.

    max_length bounds prompt + new tokens: prompts keep their last max_length - max_new_tokens tokens.
    """
    device = model_device(model)
    pad = pad_id(tokenizer)
    sync = should_sync(sync_ranks)
    budget = None if max_length is None else max(1, max_length - max_new_tokens)
    prompts = [encode_prompt(tokenizer, e.prompt, budget) for e in examples]
    generate = _generate_fn(model)

    def run_generate(ids: list[list[int]]) -> torch.Tensor:
        input_ids = pad_sequences(ids, pad, "left").to(device)
        attention_mask = pad_sequences([[1] * len(x) for x in ids], 0, "left").to(device)
        output = generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=sync,
        )
        return output[:, input_ids.shape[1] :]

    def decode(chunk) -> list[str]:
        texts = tokenizer.batch_decode(run_generate(chunk).tolist(), skip_special_tokens=True)
        if stop_at_newline:
            texts = [t.split("\n", 1)[0] for t in texts]
        return [t.strip() for t in texts]

    def dummy():
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad
        run_generate([[first]])

    with eval_mode(model):
        results = run_in_step(chunks(prompts, batch_size), decode, dummy, sync, device)
    return [text for chunk in results for text in chunk]
