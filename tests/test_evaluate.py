"""Scoring, losses and evaluation against hand computations on tiny random float64 models (CPU)."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from zo_scale import evaluate as ev
from zo_scale.data import IGNORE_INDEX, causal_lm_batch, get_task, masked_lm_batch, token_loss
from zo_scale.data.answer_metrics import exact_match, normalize_answer, token_f1
from zo_scale.data.encoding import encode_prompt_answer, verbalizer_token_ids
from zo_scale.data.example import Example
from zo_scale.data.scoring import (
    candidate_scores,
    continuation_logprobs,
    greedy_answers,
    shared_contexts,
    verbalizer_scores,
)
from zo_scale.data.tokenizer_tools import OFFLINE_VOCAB_SIZE, build_offline_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=OFFLINE_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).to(torch.float64).eval()


def tiny_roberta(seed: int = 0) -> transformers.RobertaForMaskedLM:
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(
        vocab_size=OFFLINE_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=520,
        bos_token_id=0,
        pad_token_id=1,  # RoBERTa derives positions from input_ids != pad: must match the tokenizer
        eos_token_id=2,
    )
    return transformers.RobertaForMaskedLM(config).to(torch.float64).eval()


pytestmark = pytest.mark.usefixtures("one_cpu_thread")




@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def roberta():
    return tiny_roberta()


def hand_logprob(model, tokenizer, prompt: str, continuation: str) -> tuple[float, int]:
    """log p(continuation | prompt) from one unpadded forward, summed token by token."""
    full = tokenizer(prompt + continuation)["input_ids"]
    start = len(tokenizer(prompt)["input_ids"])
    assert full[:start] == tokenizer(prompt)["input_ids"]  # these prompts end on a token boundary
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    total = sum(log_probs[t - 1, full[t]].item() for t in range(start, len(full)))
    return total, len(full) - start


# --- answer metrics -----------------------------------------------------------------------------------------


def test_normalization_and_exact_match():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert exact_match("the Beatles.", "Beatles") == 1.0
    assert exact_match("Beatles band", "Beatles") == 0.0


def test_token_f1_known_cases():
    assert token_f1("Clara Voss", "the astronomer Clara Voss") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("in 1875", "1875") == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert token_f1("red red blue", "red blue blue") == pytest.approx(2 / 3)  # multiset overlap: red, blue
    assert token_f1("nothing shared", "1875") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to empty
    assert token_f1("", "1875") == 0.0


# --- causal LM scoring ----------------------------------------------------------------------------------------


def test_continuation_logprobs_match_hand_computation(llama, tokenizer):
    examples = get_task("sst5").examples("train", num=4, seed=1)  # different lengths -> padding
    pairs = [(e.prompt, c) for e in examples for c in e.candidates]
    scored = continuation_logprobs(llama, tokenizer, pairs, batch_size=3)
    for (prompt, continuation), (total, n) in zip(pairs, scored):
        expected, expected_n = hand_logprob(llama, tokenizer, prompt, continuation)
        assert n == expected_n
        assert total == pytest.approx(expected, abs=1e-10)


def test_candidate_scores_sum_and_mean(llama, tokenizer):
    # COPA candidates span several tokens, so the two reductions differ.
    examples = get_task("copa", data_dir=FIXTURES).examples("train", num=3, seed=0)
    summed = candidate_scores(llama, tokenizer, examples, length_normalize=False, batch_size=4)
    mean = candidate_scores(llama, tokenizer, examples, length_normalize=True, batch_size=2)
    for example, sums, means in zip(examples, summed, mean):
        for candidate, s, m in zip(example.candidates, sums, means):
            expected, n = hand_logprob(llama, tokenizer, example.prompt, candidate)
            assert n > 1
            assert s == pytest.approx(expected, abs=1e-10)
            assert m == pytest.approx(expected / n, abs=1e-10)


def test_classification_counts_follow_the_argmax(llama, tokenizer):
    examples = get_task("cb", data_dir=FIXTURES).examples("test")
    scores = candidate_scores(llama, tokenizer, examples)
    predictions = ev.predict_candidates(llama, tokenizer, examples, batch_size=5)
    assert predictions == [max(range(len(s)), key=s.__getitem__) for s in scores]
    counts = ev.evaluate_counts(llama, tokenizer, examples)
    assert counts == {"correct": float(sum(p == e.label for p, e in zip(predictions, examples))), "total": 6.0}
    assert ev.metrics_from_counts(counts) == {"accuracy": counts["correct"] / 6}
    summed = ev.evaluate_counts(llama, tokenizer, examples, length_normalize=False)
    assert summed["total"] == 6.0


def test_record_counts_any_gold_entity(llama, tokenizer):
    example = get_task("record", data_dir=FIXTURES).examples("train")[0]
    predicted = ev.predict_candidates(llama, tokenizer, [example])[0]
    all_gold = Example(prompt=example.prompt, candidates=example.candidates, label=0, gold=(0, 1, 2))
    only_other = Example(prompt=example.prompt, candidates=example.candidates, label=(predicted + 1) % 3,
                         gold=((predicted + 1) % 3,))
    assert ev.evaluate_counts(llama, tokenizer, [all_gold, only_other]) == {"correct": 1.0, "total": 2.0}


# --- token loss ------------------------------------------------------------------------------------------------


def test_token_loss_is_a_sum_over_labeled_tokens(llama, tokenizer):
    examples = get_task("sst2-lmbff").examples("train", num=5, seed=3)
    batch = causal_lm_batch(tokenizer, examples)
    loss_sum, n_tokens = token_loss(llama, batch)
    assert loss_sum.dtype == torch.float64 and loss_sum.dim() == 0 and not loss_sum.requires_grad
    assert n_tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 5  # one token per verbalizer
    expected = -sum(hand_logprob(llama, tokenizer, e.prompt, e.candidates[e.label])[0] for e in examples)
    assert loss_sum.item() == pytest.approx(expected, abs=1e-10)
    with torch.no_grad():  # Hugging Face's mean loss (computed in fp32) times the count: the same sum
        hf = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert loss_sum.item() == pytest.approx(hf.item() * n_tokens, rel=1e-6)


def test_token_loss_padding_side_and_full_lm(llama, tokenizer):
    examples = get_task("squad", data_dir=FIXTURES).examples("train", num=4, seed=0)
    right = token_loss(llama, causal_lm_batch(tokenizer, examples))
    left = token_loss(llama, causal_lm_batch(tokenizer, examples, padding_side="left"))
    assert right[1] == left[1] and right[0].item() == pytest.approx(left[0].item(), abs=1e-9)
    full_sum, full_n = token_loss(llama, causal_lm_batch(tokenizer, examples, loss_on="full"))
    assert full_n > right[1] and full_sum.item() > right[0].item()


def test_token_loss_restores_mode_and_ignores_dropout(tokenizer):
    model = tiny_llama()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    batch = causal_lm_batch(tokenizer, get_task("sst2-lmbff").examples("train", num=3, seed=0))
    first, second = token_loss(model, batch)[0], token_loss(model, batch)[0]
    assert model.training and first.item() == second.item()
    assert all(p.grad is None for p in model.parameters())


# --- generation ------------------------------------------------------------------------------------------------


def _manual_greedy(model, tokenizer, prompt: str, steps: int) -> str:
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            next_id = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            new.append(next_id)
    return tokenizer.decode(new, skip_special_tokens=True).split("\n", 1)[0].strip()


def test_greedy_answers_batched_equals_unbatched(llama, tokenizer):
    examples = get_task("drop", data_dir=FIXTURES).examples("test")[:2] + get_task(
        "squad", data_dir=FIXTURES
    ).examples("test")[:2]  # prompts of different lengths -> left padding
    batched = greedy_answers(llama, tokenizer, examples, max_new_tokens=6, batch_size=4)
    single = greedy_answers(llama, tokenizer, examples, max_new_tokens=6, batch_size=1)
    assert batched == single
    assert batched[0] == _manual_greedy(llama, tokenizer, examples[0].prompt, 6)


def test_generation_counts(llama, tokenizer):
    examples = get_task("squad", data_dir=FIXTURES).examples("test")[:3]
    outputs = greedy_answers(llama, tokenizer, examples, max_new_tokens=5)
    assume = [o for o in outputs if normalize_answer(o)]
    assert assume, "the random model produced only empty answers; pick another seed"
    # Gold answers equal to the model's own output score 1; a disjoint answer scores 0.
    rigged = [
        Example(prompt=e.prompt, answers=(out,) if normalize_answer(out) else ("zzz",)) for e, out in zip(examples, outputs)
    ]
    counts = ev.evaluate_counts(llama, tokenizer, rigged, max_new_tokens=5)
    hits = float(len(assume))
    assert counts == {"em_sum": hits, "f1_sum": hits, "total": 3.0}
    assert ev.metrics_from_counts(counts) == {"f1": hits / 3, "em": hits / 3}
    partial = [Example(prompt=examples[0].prompt, answers=(outputs[0] + " extra words",))]
    f1 = ev.evaluate_counts(llama, tokenizer, partial, max_new_tokens=5)["f1_sum"]
    assert 0 < f1 < 1 or not normalize_answer(outputs[0])


# --- masked LM ---------------------------------------------------------------------------------------------------


def _hand_mask_logits(model, tokenizer, example: Example) -> torch.Tensor:
    ids = tokenizer(example.mask_context[0] + tokenizer.mask_token + example.mask_context[1])["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, ids.index(tokenizer.mask_token_id)]
    return logits


@pytest.mark.parametrize("name", ["sst2-lmbff", "trec"])
def test_masked_lm_scoring_matches_hand_computation(roberta, mlm_tokenizer, name):
    examples = get_task(name).examples("train", num=5, seed=0)
    scores = verbalizer_scores(roberta, mlm_tokenizer, examples, batch_size=2)
    word_ids = verbalizer_token_ids(mlm_tokenizer, examples[0].verbalizers)
    for example, row in zip(examples, scores):
        expected = torch.log_softmax(_hand_mask_logits(roberta, mlm_tokenizer, example), dim=-1)[word_ids]
        assert row == pytest.approx(expected.tolist(), abs=1e-10)
    predictions = ev.predict_candidates(roberta, mlm_tokenizer, examples)  # "auto" picks the MLM scorer
    assert predictions == [max(range(len(s)), key=s.__getitem__) for s in scores]
    assert ev.predict_candidates(roberta, mlm_tokenizer, examples, scorer="mlm") == predictions


def test_masked_lm_loss_is_ce_over_label_words(roberta, mlm_tokenizer):
    roberta.train()  # dropout must not leak into the loss
    try:
        examples = get_task("sst5").examples("train", k_per_class=1, seed=13)
        batch = masked_lm_batch(mlm_tokenizer, examples)
        loss_sum, n = token_loss(roberta, batch)
        assert roberta.training and n == 5 and loss_sum.dtype == torch.float64
        word_ids = verbalizer_token_ids(mlm_tokenizer, examples[0].verbalizers)
        expected = sum(
            F.cross_entropy(_hand_mask_logits(roberta.eval(), mlm_tokenizer, e)[word_ids][None], torch.tensor([e.label])).item()
            for e in examples
        )
        assert loss_sum.item() == pytest.approx(expected, abs=1e-10)
    finally:
        roberta.eval()


# --- objective, reduction helpers ------------------------------------------------------------------------------


def test_accuracy_objective(llama, tokenizer):
    examples = get_task("boolq", data_dir=FIXTURES).examples("test")
    negative, n = ev.accuracy_objective(llama, tokenizer, examples)
    counts = ev.evaluate_counts(llama, tokenizer, examples)
    assert n == 6 and negative.dtype == torch.float64 and negative.item() == -counts["correct"]
    squad = get_task("squad", data_dir=FIXTURES).examples("test")[:2]
    negative_f1, n = ev.accuracy_objective(llama, tokenizer, squad, max_new_tokens=3)
    assert n == 2 and negative_f1.item() == -ev.evaluate_counts(llama, tokenizer, squad, max_new_tokens=3)["f1_sum"]


def test_reduction_helpers(llama, tokenizer):
    examples = get_task("wic", data_dir=FIXTURES).examples("test")
    shares = [ev.rank_share(examples, r, 4) for r in range(4)]
    assert sorted(len(s) for s in shares) == [1, 1, 2, 2]
    assert sorted(e.meta["row"] for s in shares for e in s) == list(range(6))
    summed = {"correct": 0.0, "total": 0.0}
    for share in shares:
        counts = ev.evaluate_counts(llama, tokenizer, share, kind="classification")
        summed = {k: summed[k] + counts[k] for k in summed}
    assert summed == ev.evaluate_counts(llama, tokenizer, examples)
    assert ev.evaluate_counts(llama, tokenizer, [], kind="generation") == {"em_sum": 0, "f1_sum": 0, "total": 0.0}
    assert ev.all_reduce_counts(summed) == summed  # no process group: a no-op
    assert ev.evaluate(llama, tokenizer, examples) == ev.metrics_from_counts(summed)
    assert math.isnan(ev.metrics_from_counts({"correct": 0.0, "total": 0.0})["accuracy"])
    with pytest.raises(ValueError, match="kind"):
        ev.evaluate_counts(llama, tokenizer, [])


# --- SuperGLUE metrics: MultiRC F1a / EM over questions, ReCoRD F1 / EM of the predicted entity -----------------


def _option(group, label: int) -> Example:
    return Example(prompt="q", candidates=(" No", " Yes"), label=label, group=group)


def test_multirc_f1a_and_question_em_by_hand():
    # Options of three questions, interleaved as in a seeded sample; predictions are candidate indices.
    rows = [  # (group, label, prediction)
        ((0, 0), 1, 1), ((0, 1), 1, 1), ((0, 0), 0, 0), ((1, 0), 0, 0),
        ((0, 1), 0, 1),  # the one wrong option: question (0, 1) is not exact
        ((0, 0), 1, 1), ((1, 0), 0, 0),
    ]
    examples = [_option(g, label) for g, label, _ in rows]
    predictions = [p for _, _, p in rows]
    counts = ev.classification_counts(predictions, examples, "f1a")
    assert counts == {"correct": 6.0, "total": 7.0, "tp": 3.0, "fp": 1.0, "fn": 0.0,
                      "questions": 3.0, "questions_exact": 2.0}
    metrics = ev.metrics_from_counts(counts)
    assert list(metrics) == ["f1a", "em", "accuracy"]  # primary first: the trainer's best-dev key
    assert metrics == pytest.approx({"f1a": 6 / 7, "em": 2 / 3, "accuracy": 6 / 7})  # 2tp / (2tp + fp + fn)

    never_yes = ev.classification_counts([0] * len(examples), examples, "f1a")  # no positive prediction
    assert never_yes["tp"] == never_yes["fp"] == 0 and never_yes["fn"] == 3
    assert ev.metrics_from_counts(never_yes) == pytest.approx({"f1a": 0.0, "em": 1 / 3, "accuracy": 4 / 7})
    negatives = [_option((2, 0), 0), _option((2, 0), 0)]  # nothing positive, gold or predicted: F1a 0
    assert ev.metrics_from_counts(ev.classification_counts([0, 0], negatives, "f1a")) == {
        "f1a": 0.0, "em": 1.0, "accuracy": 1.0}
    with pytest.raises(ValueError, match="binary"):
        ev.classification_counts([0], [Example(prompt="q", candidates=("a", "b", "c"), label=0)], "f1a")


def test_record_f1_and_em_of_the_predicted_entity():
    def cloze(answers, label):
        entities = ("Harvest Mill", "Mara", "Oslo")
        return Example(prompt="p", candidates=tuple(f" {e} now employs four people." for e in entities), label=label,
                       answers=answers, gold=(label,), candidate_answers=entities)

    examples = [
        cloze(("Harvest Mill Co", "Mill"), 0),  # predicts "Harvest Mill": F1 max(0.8, 2/3), EM 0, gold index hit
        cloze(("Mara",), 1),  # predicts "Harvest Mill" against "Mara": 0
        cloze(("the Oslo.",), 2),  # predicts "Oslo": normalised exact match
    ]
    counts = ev.classification_counts([0, 0, 2], examples, "f1")
    assert counts == pytest.approx({"correct": 2.0, "total": 3.0, "f1_sum": 1.8, "em_sum": 1.0})
    metrics = ev.metrics_from_counts(counts)
    assert list(metrics) == ["f1", "em", "accuracy"]
    assert metrics == pytest.approx({"f1": 0.6, "em": 1 / 3, "accuracy": 2 / 3})
    with pytest.raises(ValueError, match="candidate_answers"):
        ev.classification_counts([0], [Example(prompt="p", candidates=(" a", " b"), label=0, answers=("a",))], "f1")


def test_metric_defaults_follow_the_examples(llama, tokenizer):
    multirc = get_task("multirc", data_dir=FIXTURES).examples("test")
    record = get_task("record", data_dir=FIXTURES).examples("test")
    assert list(ev.evaluate(llama, tokenizer, multirc)) == ["f1a", "em", "accuracy"]
    assert list(ev.evaluate(llama, tokenizer, record)) == ["f1", "em", "accuracy"]
    predictions = ev.predict_candidates(llama, tokenizer, multirc)
    assert ev.evaluate_counts(llama, tokenizer, multirc) == ev.classification_counts(predictions, multirc, "f1a")
    assert ev.evaluate_counts(llama, tokenizer, multirc, metric="accuracy").keys() == {"correct", "total"}
    with pytest.raises(ValueError, match="metric"):
        ev.evaluate_counts(llama, tokenizer, multirc, metric="f1a", kind="generation")


def test_group_aware_rank_share():
    examples = get_task("multirc", data_dir=FIXTURES).examples("train", num=12, seed=0)  # options interleaved
    groups = list(dict.fromkeys(e.group for e in examples))  # first-appearance order
    assert len(groups) == 6 and sum(a.group != b.group for a, b in zip(examples, examples[1:])) > 5  # not contiguous
    for world in (2, 3):
        shares = [ev.rank_share(examples, r, world) for r in range(world)]
        assert sorted(e.meta["row"] for s in shares for e in s) == list(range(12))  # a partition of the examples
        for rank, share in enumerate(shares):
            mine = set(groups[rank::world])  # whole questions, strided over groups, kept in the examples' order
            assert [e.meta["row"] for e in share] == [e.meta["row"] for e in examples if e.group in mine]
    wic = get_task("wic", data_dir=FIXTURES).examples("test")  # no groups: the plain stride, unchanged
    assert all(ev.rank_share(wic, r, 4) == wic[r::4] for r in range(4))


@pytest.mark.parametrize("name", ["multirc", "record"])
def test_counts_over_rank_shares_add_up(llama, tokenizer, name):
    task = get_task(name, data_dir=FIXTURES)
    examples = task.examples("train", num=12, seed=0)
    whole = ev.evaluate_counts(llama, tokenizer, examples)
    for world in (2, 3):
        summed = dict.fromkeys(whole, 0.0)
        for rank in range(world):
            share = ev.rank_share(examples, rank, world)
            counts = ev.evaluate_counts(llama, tokenizer, share, kind=task.kind, metric=task.metric)
            summed = {k: summed[k] + counts[k] for k in summed}
        assert summed == pytest.approx(whole, abs=1e-12)
    if name == "multirc":
        assert whole["questions"] == 6.0  # two options per question, every question on one rank


@pytest.mark.parametrize("name", ["multirc", "record"])
def test_empty_share_returns_the_same_keys(llama, tokenizer, name):
    task = get_task(name, data_dir=FIXTURES)
    full = ev.evaluate_counts(llama, tokenizer, task.examples("test"))
    examples = task.examples("test")[:1]
    assert ev.rank_share(examples, 2, 3) == []
    empty = ev.evaluate_counts(llama, tokenizer, [], kind=task.kind, metric=task.metric)
    assert empty.keys() == full.keys() and set(empty.values()) == {0.0}
    metrics = ev.metrics_from_counts(empty)  # no division error: NaN for no examples
    assert list(metrics) == list(ev.metrics_from_counts(full)) and all(math.isnan(v) for v in metrics.values())


# --- two ranks (gloo): uneven shares, synchronised forward counts -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, world: int, port: int, results):
    from zo_scale.distributed import process_group

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    # The library's group, not a bare init_process_group: the model below imports torch.distributed.nn,
    # which would otherwise keep the group (and gloo's threads) alive into shutdown and abort (issue #15).
    with process_group("gloo", timeout_s=120):
        tokenizer = build_offline_tokenizer()
        model = tiny_llama()
        calls = []
        model.register_forward_pre_hook(lambda *_: calls.append(1))
        classification = get_task("rte", data_dir=FIXTURES).examples("test", num=5, seed=0)  # shares 3 / 2
        accuracy = ev.evaluate(model, tokenizer, classification, batch_size=2)
        classification_calls = len(calls)
        squad = get_task("squad", data_dir=FIXTURES).examples("test", num=3, seed=0)  # shares 2 / 1
        generation = ev.evaluate(model, tokenizer, squad, batch_size=1, max_new_tokens=4)
        generation_calls = len(calls)
        multirc = get_task("multirc", data_dir=FIXTURES).examples("test")  # 3 questions: 2 on rank 0, 1 on rank 1
        grouped = ev.evaluate(model, tokenizer, multirc, batch_size=2)
        results.put((rank, accuracy, generation, grouped, classification_calls, generation_calls, len(calls)))


@pytest.mark.multiproc
def test_two_ranks_match_one_process(llama, tokenizer):
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_two_rank_worker, args=(2, _free_port(), queue), nprocs=2, join=True)
    results = {}
    while not queue.empty():
        rank, *values = queue.get()
        results[rank] = values
    classification = get_task("rte", data_dir=FIXTURES).examples("test", num=5, seed=0)
    squad = get_task("squad", data_dir=FIXTURES).examples("test", num=3, seed=0)
    expected_accuracy = ev.evaluate(llama, tokenizer, classification)
    expected_generation = ev.evaluate(llama, tokenizer, squad, max_new_tokens=4)
    expected_grouped = ev.evaluate(llama, tokenizer, get_task("multirc", data_dir=FIXTURES).examples("test"))
    for rank in (0, 1):
        accuracy, generation, grouped, *_ = results[rank]
        assert accuracy == pytest.approx(expected_accuracy, abs=1e-12)
        assert generation == pytest.approx(expected_generation, abs=1e-12)
        assert grouped == pytest.approx(expected_grouped, abs=1e-12) and list(grouped) == ["f1a", "em", "accuracy"]
    # Sharded engines need the same number of forwards on every rank: rank 1 pads with dummy forwards.
    assert results[0][3:] == results[1][3:]


# --- shared-context scoring: one forward per context, left padding, logits of the last positions only ------


def plain_logprob(model, tokenizer, prompt: str, continuation: str, max_length: int | None = None):
    """(sum of log p(answer tokens), count) from one unpadded full-logits forward over the exact encoding."""
    e = encode_prompt_answer(tokenizer, prompt, continuation, max_length)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([e.ids])).logits[0], dim=-1)
    return sum(log_probs[t - 1, e.ids[t]].item() for t in range(e.answer_start, len(e.ids))), e.num_answer_tokens


# Candidates of different lengths, shared contexts (single tokens after one prompt) and answers that merge
# with the prompt's last token ("gr" + "eat" -> " great").
MIXED_PAIRS = [
    ("It was", " great"), ("It was", " terrible"), ("It was", " not good at all, sadly"),
    ("It was gr", "eat"), ("It was gr", "im and long"), ("The film was terr", "ible"),
    ("Answer: Ye", "s"), ("Answer:", " No"), ("A much longer review of the film, which was", " fine"),
]


def test_shared_contexts_match_plain_forwards_on_mixed_candidates(llama, tokenizer):
    merged = [encode_prompt_answer(tokenizer, p, c) for p, c in MIXED_PAIRS[3:7]]
    assert all(e.answer_start < len(tokenizer(p)["input_ids"]) for e, (p, _) in zip(merged, MIXED_PAIRS[3:7]))
    for max_length in (None, 7):  # 7: prompts truncated by a different amount per candidate
        expected = [plain_logprob(llama, tokenizer, p, c, max_length) for p, c in MIXED_PAIRS]
        for batch_size in (1, 3, 100):
            scored = continuation_logprobs(llama, tokenizer, MIXED_PAIRS, batch_size=batch_size, max_length=max_length)
            for (total, n), (want, want_n) in zip(scored, expected):
                assert n == want_n and total == pytest.approx(want, abs=1e-10)


def test_single_token_candidates_share_one_forward(llama, tokenizer):
    examples = get_task("sst2-lmbff").examples("dev", num=6, seed=0)
    encoded = [encode_prompt_answer(tokenizer, e.prompt, c) for e in examples for c in e.candidates]
    assert len(shared_contexts(encoded).contexts) == len(examples)
    calls = []
    hook = llama.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        candidate_scores(llama, tokenizer, examples, batch_size=4)
    finally:
        hook.remove()
    assert len(calls) == 2  # 6 contexts, 4 per forward


def tiny_causal(arch: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    common = dict(vocab_size=OFFLINE_VOCAB_SIZE, bos_token_id=0, pad_token_id=1, eos_token_id=2)
    config = {
        "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, max_position_embeddings=512, **common),
        "opt": lambda: transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                              word_embed_proj_dim=32, max_position_embeddings=512, **common),
        "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common),
    }[arch]()
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_left_padding_matches_unpadded_forwards(tokenizer, arch):
    # Rotary (Llama), learned positions from the mask (OPT) and learned absolute positions (GPT-2).
    model = tiny_causal(arch)
    examples = get_task("sst5").examples("train", num=4, seed=1)  # different lengths -> padding
    pairs = [(e.prompt, c) for e in examples for c in e.candidates] + MIXED_PAIRS
    padded = continuation_logprobs(model, tokenizer, pairs, batch_size=len(pairs))
    alone = continuation_logprobs(model, tokenizer, pairs, batch_size=1)
    for (p, c), (a, n), (b, m) in zip(pairs, padded, alone):
        want, want_n = plain_logprob(model, tokenizer, p, c)
        assert n == m == want_n
        assert a == pytest.approx(want, abs=1e-10) and b == pytest.approx(want, abs=1e-10)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no logits_to_keep, inside an engine-like `.module` wrapper."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


class _Engine(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("wrap", ["no_logits_to_keep", "engine", "lora", "prefix"])
def test_wrapped_models_score_as_plain_forwards(llama, tokenizer, wrap):
    import copy

    import peft

    from zo_scale.data.scoring import takes_logits_to_keep

    if wrap == "no_logits_to_keep":
        model = _Engine(_NoLogitsToKeep(llama))
    elif wrap == "engine":
        model = _Engine(llama)
    else:
        torch.manual_seed(0)
        config = (peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                  if wrap == "lora" else peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
        model = peft.get_peft_model(copy.deepcopy(llama), config).to(torch.float64).eval()
    assert takes_logits_to_keep(model) == (wrap != "no_logits_to_keep")
    scored = continuation_logprobs(model, tokenizer, MIXED_PAIRS, batch_size=4)
    for (p, c), (total, n) in zip(MIXED_PAIRS, scored):
        want, want_n = plain_logprob(model, tokenizer, p, c)
        assert n == want_n and total == pytest.approx(want, abs=1e-10)


@pytest.mark.parametrize("loss_on", ["answer", "full"])
def test_token_loss_trims_the_lm_head_without_changing_the_loss(llama, tokenizer, loss_on):
    """Answer-only loss applies the LM head only at the positions that predict a label; the sum and count
    match the full-logits path (a model without logits_to_keep) on a right-padded batch."""
    examples = get_task("squad", data_dir=FIXTURES).examples("train", num=4, seed=0)
    batch = causal_lm_batch(tokenizer, examples, loss_on=loss_on)
    seen = []
    hook = llama.register_forward_hook(lambda m, args, kwargs, out: seen.append(out.logits.shape[1]),
                                       with_kwargs=True)
    try:
        trimmed = token_loss(llama, batch)
    finally:
        hook.remove()
    full = token_loss(_Engine(_NoLogitsToKeep(llama)), batch)
    assert trimmed[1] == full[1] and trimmed[0].item() == pytest.approx(full[0].item(), rel=1e-12)
    width = batch["input_ids"].shape[1]
    assert seen[0] < width / 2 if loss_on == "answer" else seen[0] == width - 1  # the last position predicts nothing


def test_causal_forwards_build_no_kv_cache(llama, tokenizer):
    """A ZO forward never reads a KV cache, and building one holds 2 × layers × tokens × hidden values at the
    logits' peak: the loss, the candidate scoring and the ranks' dummy forward all ask for none."""
    from zo_scale.data.scoring import _dummy_forward

    flags = []
    hook = llama.register_forward_hook(lambda m, args, kwargs, out: flags.append(kwargs.get("use_cache")),
                                       with_kwargs=True)
    try:
        examples = get_task("sst2-lmbff").examples("train", num=3, seed=0)
        token_loss(llama, causal_lm_batch(tokenizer, examples))
        token_loss(llama, causal_lm_batch(tokenizer, examples, loss_on="full"))
        continuation_logprobs(llama, tokenizer, MIXED_PAIRS, batch_size=4)
        _dummy_forward(llama, tokenizer, torch.device("cpu"))()
    finally:
        hook.remove()
    assert len(flags) >= 4 and all(f is False for f in flags)
