"""Forward passes that score examples: candidate log-likelihoods (causal LM), label-word log-probabilities
at the mask (masked LM) and greedy decoding. Batched, without autograd, in eval mode.

Sharded engines (FSDP2, DeepSpeed ZeRO-3) run collectives inside every forward, so every rank must make
the same number of forward calls. With `sync_ranks` on (default: whenever torch.distributed runs with
more than one rank) ranks agree on the largest number of batches and ranks with fewer run throw-away
forwards; generation also passes `synced_gpus=True` so ranks keep stepping until all are done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from zo_scale.data.collate import masked_lm_batch
from zo_scale.data.encoding import encode_prompt, encode_prompt_answer, pad_id, pad_sequences
from zo_scale.data.example import Example


def model_device(model) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def is_masked_lm(model) -> bool:
    """True for *ForMaskedLM models (also when FSDP2 renames the class to FSDP<Name>)."""
    inner = getattr(model, "module", model)  # DeepSpeed engine / DDP keep the model in .module
    return "MaskedLM" in type(inner).__name__


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


def _right_padded(ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = pad_sequences(ids, pad, "right").to(device)
    attention_mask = pad_sequences([[1] * len(x) for x in ids], 0, "right").to(device)
    return input_ids, attention_mask


def _dummy_forward(model, tokenizer, device) -> Callable:
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id(tokenizer)

    def run():
        input_ids = torch.tensor([[first]], device=device)
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))

    return run


# --- causal LM: continuation log-likelihoods ------------------------------------------------------------


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

    Encoding is `encode_prompt_answer` (full-text tokenization, prompt truncated from the left).
    """
    encoded = [encode_prompt_answer(tokenizer, prompt, cont, max_length) for prompt, cont in pairs]
    device = model_device(model)
    pad = pad_id(tokenizer)

    def score(chunk) -> list[tuple[float, int]]:
        input_ids, attention_mask = _right_padded([e.ids for e in chunk], pad, device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        # Token t is predicted at position t-1.
        log_probs = _log_softmax(logits[:, :-1]).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        positions = torch.arange(log_probs.shape[1], device=device)
        starts = torch.tensor([e.answer_start - 1 for e in chunk], device=device)
        ends = torch.tensor([len(e.ids) - 1 for e in chunk], device=device)
        in_answer = (positions >= starts[:, None]) & (positions < ends[:, None])
        sums = torch.where(in_answer, log_probs, torch.zeros_like(log_probs)).sum(-1)
        return list(zip(sums.tolist(), (e.num_answer_tokens for e in chunk)))

    with eval_mode(model):
        results = run_in_step(
            chunks(encoded, batch_size), score, _dummy_forward(model, tokenizer, device), should_sync(sync_ranks), device
        )
    return [item for chunk in results for item in chunk]


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
