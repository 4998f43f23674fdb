"""Task registry, loaders, templates, sampling, the offline tokenizer and training batches (CPU, fast)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

from zo_scale.data import (
    IGNORE_INDEX,
    LMBFF_TASKS,
    MEZO_TASKS,
    TASK_NAMES,
    causal_lm_batch,
    get_task,
    masked_lm_batch,
    templates,
)
from zo_scale.data.encoding import encode_prompt_answer, verbalizer_token_ids
from zo_scale.data.example import Example
from zo_scale.data.lmbff_files import read_lmbff_split
from zo_scale.data.sources import DATA_DIR_ENV, DataNotFoundError
from zo_scale.data.tokenizer_tools import OFFLINE_VOCAB_SIZE, build_offline_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"




# --- registry -------------------------------------------------------------------------------------------


def test_registry_names():
    assert set(MEZO_TASKS) == {"sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop"}
    assert set(LMBFF_TASKS) == {"sst2-lmbff", "sst5", "trec"}
    assert set(TASK_NAMES) == set(MEZO_TASKS) | set(LMBFF_TASKS)
    assert get_task("BoolQ", data_dir=FIXTURES).name == "boolq"
    with pytest.raises(KeyError, match="unknown task"):
        get_task("mnli")
    with pytest.raises(ValueError):
        get_task("trec", data_dir=FIXTURES)


def test_kinds_and_metrics():
    for name in TASK_NAMES:
        task = get_task(name, data_dir=FIXTURES if name in MEZO_TASKS else None)
        generation = name in ("squad", "drop")
        assert task.kind == ("generation" if generation else "classification")
        official = {"multirc": "f1a", "record": "f1"}  # SuperGLUE's metrics where accuracy is not one
        assert task.metric == ("f1" if generation else official.get(name, "accuracy"))


# --- bundled LM-BFF files ---------------------------------------------------------------------------------

LMBFF_COUNTS = {
    ("sst2-lmbff", "train"): (6920, {0: 3310, 1: 3610}),
    ("sst2-lmbff", "dev"): (872, {0: 428, 1: 444}),
    ("sst2-lmbff", "test"): (1821, {0: 912, 1: 909}),
    ("sst5", "train"): (8544, {0: 1092, 1: 2218, 2: 1624, 3: 2322, 4: 1288}),
    ("sst5", "dev"): (1101, {0: 139, 1: 289, 2: 229, 3: 279, 4: 165}),
    ("sst5", "test"): (2210, {0: 279, 1: 633, 2: 389, 3: 510, 4: 399}),
    ("trec", "train"): (5452, {0: 1162, 1: 1250, 2: 86, 3: 1223, 4: 835, 5: 896}),
    ("trec", "test"): (500, {0: 138, 1: 94, 2: 9, 3: 65, 4: 81, 5: 113}),
}


@pytest.mark.parametrize("task,split", sorted(LMBFF_COUNTS))
def test_bundled_lmbff_counts(task, split):
    rows = read_lmbff_split(task, split)
    count, per_label = LMBFF_COUNTS[(task, split)]
    assert len(rows) == count
    assert dict(collections.Counter(r["label"] for r in rows)) == per_label
    assert all(r["sentence"] and r["sentence"] == r["sentence"].strip() for r in rows)
    assert len(get_task(task).examples(split)) == count


def test_bundled_files_match_the_readme_checksums():
    import hashlib
    import re

    from zo_scale.data.lmbff_files import LMBFF_DIR

    listed = re.findall(r"^([0-9a-f]{64})  (\S+)$", (LMBFF_DIR / "README.md").read_text(), flags=re.M)
    assert len(listed) == 8
    for digest, name in listed:
        assert hashlib.sha256((LMBFF_DIR / name).read_bytes()).hexdigest() == digest, name


def test_bundled_lmbff_formats():
    # SST-2 test: "label sentence" with a space and no header; train/dev: header + sentence<TAB>label.
    assert read_lmbff_split("sst2-lmbff", "test")[0] == {
        "sentence": "no movement , no yuks , not much of anything .",
        "label": 0,
    }
    first_train = read_lmbff_split("sst2-lmbff", "train")[0]
    assert first_train["label"] == 1 and first_train["sentence"].startswith("a stirring , funny and finally")
    assert read_lmbff_split("sst5", "dev")[0]["sentence"].startswith("in his first stab at the form")
    # TREC is a quoted CSV: the comma inside the question survives.
    trec_test = read_lmbff_split("trec", "test")
    assert trec_test[0] == {"sentence": "How far is it from Denver to Aspen ?", "label": 5}
    assert trec_test[1] == {"sentence": "What county is Modesto , California in ?", "label": 4}
    with pytest.raises(KeyError):
        read_lmbff_split("trec", "dev")


def test_lmbff_templates():
    sst2 = get_task("sst2-lmbff").examples("test")[0]
    assert sst2.prompt == "no movement , no yuks , not much of anything . It was"
    assert sst2.candidates == (" terrible", " great") and sst2.label == 0
    assert sst2.mask_context == (sst2.prompt, ".") and sst2.verbalizers == ("terrible", "great")
    sst5 = get_task("sst5").examples("train")[0]
    assert sst5.verbalizers == ("terrible", "bad", "okay", "good", "great") and sst5.label == 4
    trec = get_task("trec").examples("test")[0]
    assert trec.mask_context == ("", ": How far is it from Denver to Aspen ?")
    assert trec.verbalizers[trec.label] == "Number" and trec.candidates[trec.label] == " Number"


# --- sampling ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LMBFF_TASKS)
def test_k_shot_sampling_is_seeded(name):
    task = get_task(name)
    train = task.examples("train", k_per_class=16, seed=13)
    assert train == task.examples("train", k_per_class=16, seed=13)
    assert train != task.examples("train", k_per_class=16, seed=21)
    num_classes = len(train[0].candidates)
    assert collections.Counter(e.label for e in train) == {c: 16 for c in range(num_classes)}
    # LM-BFF's few-shot dev: the next 16 of each class, disjoint from train.
    dev = task.examples("dev", k_per_class=16, seed=13)
    assert len(dev) == 16 * num_classes
    assert not {e.meta["row"] for e in train} & {e.meta["row"] for e in dev}
    # Not grouped by class: the seeded order is kept.
    assert [e.label for e in train] != sorted(e.label for e in train)


def test_k_shot_short_class_takes_what_it_has():
    counts = collections.Counter(e.label for e in get_task("trec").examples("train", k_per_class=512, seed=42))
    assert counts == {0: 512, 1: 512, 2: 86, 3: 512, 4: 512, 5: 512}  # ABBR has 86 training questions


def test_sample_splits_lmbff():
    splits = get_task("sst5").sample_splits(seed=87, k_per_class=16)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [80, 80, 2210]


def test_num_sampling_is_seeded_and_dev_is_disjoint():
    task = get_task("sst2-lmbff")
    a = task.examples("train", num=100, seed=0)
    assert a == task.examples("train", num=100, seed=0) and len(a) == 100
    assert a != task.examples("train", num=100, seed=1)
    assert task.examples("train", num=10, seed=0) == a[:10]  # smaller samples are prefixes
    trec = get_task("trec")
    with pytest.raises(ValueError, match="no dev split"):
        trec.examples("dev")
    train, dev = trec.examples("train", num=3000, seed=5), trec.examples("dev", num=2000, seed=5)
    assert not {e.meta["row"] for e in train} & {e.meta["row"] for e in dev}
    assert len(task.examples("test", num=10**6, seed=0)) == 1821  # capped at the split size


def test_mezo_sample_splits_on_fixture():
    task = get_task("boolq", data_dir=FIXTURES)
    splits = task.sample_splits(seed=3, num_train=8, num_dev=4, num_test=5)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [8, 4, 5]
    assert not {e.meta["row"] for e in splits["train"]} & {e.meta["row"] for e in splits["dev"]}
    assert splits == task.sample_splits(seed=3, num_train=8, num_dev=4, num_test=5)
    with pytest.raises(ValueError, match="overlap"):
        task.sample_splits(seed=3, num_train=10, num_dev=4)
    with pytest.raises(ValueError):
        task.examples("test", k_per_class=2)
    with pytest.raises(ValueError):
        get_task("record", data_dir=FIXTURES).examples("train", k_per_class=2)


# --- MeZO tasks on local fixtures ---------------------------------------------------------------------------


def _first_row(task: str, split: str = "train") -> dict:
    folder = "wsc.fixed" if task == "wsc" else task
    return json.loads((FIXTURES / folder / f"{split}.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("name", MEZO_TASKS)
def test_mezo_task_loads_fixture(name):
    task = get_task(name, data_dir=FIXTURES)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) == 12 and len(test) == 6
    for example in train + test:
        assert isinstance(example, Example) and example.prompt
        if task.kind == "classification":
            assert example.label is not None and 0 <= example.label < len(example.candidates)
            assert all(c.strip() for c in example.candidates)
        else:
            assert example.answers and not example.candidates
            assert example.target == " " + example.answers[0]
    if name not in ("record",):  # every class appears in the fixture
        labels = {e.label for e in train}
        assert task.kind == "generation" or len(labels) == len(train[0].candidates)


def test_superglue_templates_use_the_fields():
    boolq = get_task("boolq", data_dir=FIXTURES).examples("train")[0]
    row = _first_row("boolq")
    assert row["passage"] in boolq.prompt and row["question"] + "?" in boolq.prompt
    assert boolq.prompt.endswith("Answer:") and boolq.candidates == (" No", " Yes")
    assert boolq.candidates[boolq.label] == (" Yes" if row["label"] else " No")

    rte = get_task("rte", data_dir=FIXTURES).examples("train")[0]  # label 0 = entailment -> " Yes"
    assert rte.candidates[rte.label] == " Yes" and _first_row("rte")["hypothesis"] in rte.prompt
    cb = get_task("cb", data_dir=FIXTURES).examples("train")
    assert [e.candidates[e.label] for e in cb[:3]] == [" Yes", " No", " Maybe"]

    wsc_row, wsc = _first_row("wsc"), get_task("wsc", data_dir=FIXTURES).examples("train")[0]
    assert wsc_row["span1_text"] in wsc.prompt and f'"{wsc_row["span2_text"]}"' in wsc.prompt

    wic_row, wic = _first_row("wic"), get_task("wic", data_dir=FIXTURES).examples("train")[0]
    assert wic_row["sentence1"] in wic.prompt and wic_row["sentence2"] in wic.prompt and f'"{wic_row["word"]}"' in wic.prompt

    multirc = get_task("multirc", data_dir=FIXTURES).examples("train")[1]
    assert "Proposed answer: Potatoes" in multirc.prompt and multirc.candidates[multirc.label] == " No"


def test_multirc_groups_are_questions():
    examples = get_task("multirc", data_dir=FIXTURES).examples("train")
    rows = [json.loads(line) for line in (FIXTURES / "multirc" / "train.jsonl").read_text().splitlines()]
    assert [e.group for e in examples] == [(r["idx"]["paragraph"], r["idx"]["question"]) for r in rows]
    assert examples[0].group == examples[1].group != examples[2].group
    assert examples[0].candidate_answers == () and examples[0].meta["idx"] == rows[0]["idx"]
    no_idx = {k: v for k, v in rows[0].items() if k != "idx"}
    assert templates.multirc(no_idx).group is None


def test_copa_template():
    row, copa = _first_row("copa"), get_task("copa", data_dir=FIXTURES).examples("train")[0]
    assert row["question"] == "cause" and copa.prompt == "The lights went out because"
    assert copa.candidates == (" a storm hit the town.", " the cat slept.") and copa.label == 0
    effect = get_task("copa", data_dir=FIXTURES).examples("train")[1]
    assert effect.prompt.endswith(" so")


def test_record_template():
    examples = get_task("record", data_dir=FIXTURES).examples("train")
    first = examples[0]  # "@placeholder now employs four people."
    assert "@highlight" not in first.prompt and "\n- " in first.prompt and first.prompt.endswith("\n")
    assert first.candidates == ("Mara now employs four people.", "Lisbon now employs four people.",
                                "Harvest Mill now employs four people.")
    assert first.gold == (0,) and first.label == 0
    assert first.candidate_answers == ("Mara", "Lisbon", "Harvest Mill") and first.group is None  # the entities
    with pytest.raises(ValueError, match="one answer string per candidate"):
        Example(prompt="p", candidates=(" a", " b"), candidate_answers=("a",))
    middle = examples[1]  # "The bread comes from @placeholder, a local supplier."
    assert middle.prompt.endswith("\nThe bread comes from") and middle.candidates[2] == " Harvest Mill, a local supplier."
    assert examples[2].answers == ("Oslo",) and examples[2].gold == (1,)  # duplicate gold answers collapse


def test_record_skips_rows_without_gold_entity(tmp_path):
    row = _first_row("record")
    row["answers"] = ["Nobody"]
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(_first_row("record")) + "\n")
    assert len(get_task("record", data_dir=tmp_path).examples("train")) == 1


def test_generation_templates():
    squad = get_task("squad", data_dir=FIXTURES).examples("train")
    assert squad[0].prompt.startswith("Title: Observatory of Lisbon\nContext: ") and squad[0].prompt.endswith("Answer:")
    assert squad[0].answers == ("1875",)  # three identical annotations collapse to one
    assert squad[1].answers == ("the astronomer Clara Voss", "Clara Voss")
    drop = get_task("drop", data_dir=FIXTURES).examples("test")
    assert drop[0].answers == ("the second half", "second half") and drop[1].answers == ("31",)


# --- local data directory layouts -------------------------------------------------------------------------


def _rows(task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / task / f"{split}.jsonl").read_text().splitlines()]


def test_task_dir_directly_and_dev_alias(tmp_path):
    (tmp_path / "train.jsonl").write_text((FIXTURES / "rte" / "train.jsonl").read_text())
    (tmp_path / "dev.json").write_text(json.dumps(_rows("rte", "validation")))  # JSON array, "dev" name
    task = get_task("rte", data_dir=tmp_path)
    assert len(task.examples("train")) == 12 and len(task.examples("test")) == 6


def test_save_to_disk_and_parquet(tmp_path):
    import datasets

    rows = {split: _rows("cb", split) for split in ("train", "validation")}
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in rows.items()}).save_to_disk(str(tmp_path / "cb"))
    from_disk = get_task("cb", data_dir=tmp_path)  # a root: finds the "cb" sub-directory
    expected = get_task("cb", data_dir=FIXTURES)
    assert from_disk.examples("train", num=5, seed=2) == expected.examples("train", num=5, seed=2)
    assert from_disk.examples("test") == expected.examples("test")

    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    for split, split_rows in rows.items():
        datasets.Dataset.from_list(split_rows).to_parquet(str(parquet_dir / f"{split}.parquet"))
    assert get_task("cb", data_dir=parquet_dir).examples("test") == expected.examples("test")


def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(FIXTURES))
    assert len(get_task("wsc").examples("train")) == 12  # found as $ZO_SCALE_DATA_DIR/wsc.fixed


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="no split files"):
        get_task("boolq", data_dir=tmp_path).examples("train")
    (tmp_path / "train.jsonl").write_text(json.dumps(_first_row("boolq")) + "\n")
    with pytest.raises(DataNotFoundError, match="validation"):
        get_task("boolq", data_dir=tmp_path).examples("test")


# --- offline tokenizer ----------------------------------------------------------------------------------------


def test_offline_tokenizer_is_deterministic(tokenizer):
    again = build_offline_tokenizer()
    assert len(tokenizer) == OFFLINE_VOCAB_SIZE
    assert tokenizer.get_vocab() == again.get_vocab()
    text = "a deliciously nonsensical comedy . It was great"
    assert tokenizer(text)["input_ids"] == again(text)["input_ids"]
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    small = build_offline_tokenizer(vocab_size=512)
    assert len(small) == 512


def test_offline_tokenizer_label_words_are_single_tokens(tokenizer, mlm_tokenizer):
    for name in LMBFF_TASKS:
        words = get_task(name).examples("test")[0].verbalizers
        ids = verbalizer_token_ids(mlm_tokenizer, words)
        assert len(set(ids)) == len(words)
    ids = mlm_tokenizer("It was <mask>.")["input_ids"]
    assert ids[0] == mlm_tokenizer.bos_token_id and ids[-1] == mlm_tokenizer.eos_token_id
    assert ids == mlm_tokenizer("It was<mask>.")["input_ids"]  # the mask absorbs the space, like RoBERTa's
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


# --- encoding and batches ----------------------------------------------------------------------------------


def test_encode_prompt_answer_finds_the_answer(tokenizer):
    encoded = encode_prompt_answer(tokenizer, "a fine film . It was", " great")
    assert tokenizer.decode(encoded.ids[encoded.answer_start :]) == " great"
    assert encoded.ids[: encoded.answer_start] == tokenizer("a fine film . It was")["input_ids"]
    with_eos = encode_prompt_answer(tokenizer, "Q: x\nAnswer:", " 42", append_eos=True)
    assert with_eos.ids[-1] == tokenizer.eos_token_id and with_eos.num_answer_tokens >= 2


def test_truncation_drops_prompt_tokens_from_the_left(tokenizer):
    prompt = " ".join(["long"] * 50) + " . It was"
    full = encode_prompt_answer(tokenizer, prompt, " terrible")
    cut = encode_prompt_answer(tokenizer, prompt, " terrible", max_length=12)
    assert len(cut.ids) == 12 and cut.ids[0] == tokenizer.bos_token_id
    assert cut.ids[1:] == full.ids[-11:]
    assert cut.ids[cut.answer_start :] == full.ids[full.answer_start :]


def test_truncate_left_keeps_the_answer_and_some_context():
    from zo_scale.data.encoding import truncate_left

    ids = [0, 11, 12, 13, 14, 21, 22]  # BOS, prompt 11..14, answer 21 22 (starts at 5)
    assert truncate_left(ids, 5, 4, keep_first=True) == ([0, 14, 21, 22], 3)
    assert truncate_left(ids, 5, 3, keep_first=True) == ([0, 21, 22], 4)
    assert truncate_left(ids[1:], 4, 3, keep_first=False) == ([14, 21, 22], 3)
    assert truncate_left(ids[1:], 4, 2, keep_first=False) == ([14, 21], 3)  # one prompt token stays
    assert truncate_left(ids, 5, 10, keep_first=True) == (ids, 0)


def test_causal_batch_labels_only_the_answer(tokenizer):
    examples = get_task("sst2-lmbff").examples("train", num=4, seed=0)
    batch = causal_lm_batch(tokenizer, examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, example in enumerate(examples):
        labeled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labeled) == example.candidates[example.label]
        length = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :length].all()  # right padding
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
    full = causal_lm_batch(tokenizer, examples, loss_on="full")
    assert torch.equal(full["labels"] != IGNORE_INDEX, batch["attention_mask"].bool())


def test_causal_batch_left_padding_and_generation_targets(tokenizer):
    examples = get_task("squad", data_dir=FIXTURES).examples("train", num=3, seed=0)
    right = causal_lm_batch(tokenizer, examples)
    left = causal_lm_batch(tokenizer, examples, padding_side="left", max_length=40)
    assert "position_ids" in left and left["input_ids"].shape[1] <= 40
    for row, example in enumerate(examples):
        labeled = right["labels"][row][right["labels"][row] != IGNORE_INDEX].tolist()
        assert labeled[-1] == tokenizer.eos_token_id  # generation targets end with EOS
        assert tokenizer.decode(labeled[:-1]) == " " + example.answers[0]
        mask = left["attention_mask"][row]
        assert mask[-1] == 1 and left["position_ids"][row][mask.bool()].tolist() == list(range(int(mask.sum())))
        left_labeled = left["labels"][row][left["labels"][row] != IGNORE_INDEX].tolist()
        assert left_labeled == labeled


def test_masked_lm_batch(mlm_tokenizer):
    examples = get_task("sst2-lmbff").examples("train", k_per_class=2, seed=13)
    batch = masked_lm_batch(mlm_tokenizer, examples, max_length=16)
    rows = torch.arange(len(examples))
    assert (batch["input_ids"][rows, batch["mask_positions"]] == mlm_tokenizer.mask_token_id).all()
    assert batch["input_ids"].shape[1] <= 16
    assert batch["verbalizer_ids"].tolist() == verbalizer_token_ids(mlm_tokenizer, ("terrible", "great"))
    assert batch["labels"].tolist() == [e.label for e in examples]
    # TREC's mask comes first; truncation must cut the end of the question instead.
    trec = get_task("trec").examples("train", num=3, seed=0)
    trec_batch = masked_lm_batch(mlm_tokenizer, trec, max_length=6)
    assert trec_batch["mask_positions"].tolist() == [1, 1, 1]
    assert (trec_batch["input_ids"][:, 5] == mlm_tokenizer.eos_token_id).all()
    with pytest.raises(ValueError, match="LM-BFF"):
        masked_lm_batch(mlm_tokenizer, get_task("boolq", data_dir=FIXTURES).examples("train", num=2))
