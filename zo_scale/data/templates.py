"""Prompt templates: one function per task turning a dataset row into an `Example` (or None to skip it).

The wording follows the spirit of MeZO's GPT-style templates (context, a question, then "Answer:" and a
short option) but is our own. Field names are those of the Hugging Face datasets (super_glue, glue/sst2,
squad, drop) and of the bundled LM-BFF files ({"sentence", "label"}).
"""

from __future__ import annotations

from zo_scale.data.example import Example

YES_NO = (" No", " Yes")  # label 0 = false / not coreferent / different sense, label 1 = true


def _meta(row: dict, *keys: str) -> dict:
    return {k: row[k] for k in keys if k in row}


def _label(row: dict) -> int | None:
    # super_glue test rows carry label -1 (hidden); treat any negative label as "unlabeled".
    label = row.get("label")
    return None if label is None or int(label) < 0 else int(label)


def _question(text: str) -> str:
    text = text.strip()
    return text if text.endswith("?") else text + "?"


def _unique(strings) -> tuple[str, ...]:
    # Keep first occurrences in order: gold lists repeat the same span from several annotators.
    return tuple(dict.fromkeys(s for s in strings if s))


# --- sentiment and question type (GLUE SST-2, LM-BFF SST-2 / SST-5 / TREC) ---------------------------

SST2_WORDS = ("terrible", "great")
SST5_WORDS = ("terrible", "bad", "okay", "good", "great")
# LM-BFF's TREC label words (label 2 is ABBR, which LM-BFF verbalises as "Expression").
TREC_MLM_WORDS = ("Description", "Entity", "Expression", "Human", "Location", "Number")
# Causal answers are one token each (SmolLM2/GPT-2 BPE): candidates are scored by their mean token
# log-probability, and a multi-token answer whose later tokens are near-certain wins that mean for every
# question (" Abbreviation", 3 tokens, was SmolLM2's zero-shot answer to all of them: 1 % test).
TREC_CAUSAL_ANSWERS = (" Description", " Entity", " Expression", " Person", " Location", " Number")


def _sentiment(row: dict, words: tuple[str, ...]) -> Example:
    sentence = row["sentence"].strip()
    prompt = f"{sentence} It was"
    return Example(
        prompt=prompt,
        candidates=tuple(" " + w for w in words),
        label=_label(row),
        mask_context=(prompt, "."),
        verbalizers=words,
        meta=_meta(row, "idx"),
    )


def sst2(row: dict) -> Example:
    return _sentiment(row, SST2_WORDS)


def sst5(row: dict) -> Example:
    return _sentiment(row, SST5_WORDS)


def trec(row: dict) -> Example:
    question = row["sentence"].strip()
    return Example(
        prompt=f"Question: {question}\nAnswer type:",
        candidates=TREC_CAUSAL_ANSWERS,
        label=_label(row),
        mask_context=("", f": {question}"),  # LM-BFF: "<mask>: question"
        verbalizers=TREC_MLM_WORDS,
    )


# --- SuperGLUE ----------------------------------------------------------------------------------------


def rte(row: dict) -> Example:
    # label 0 = entailment, 1 = not_entailment
    prompt = (
        f"{row['premise'].strip()}\n"
        f"Question: according to the text above, is it true that \"{row['hypothesis'].strip()}\"? Yes or No?\n"
        "Answer:"
    )
    return Example(prompt=prompt, candidates=(" Yes", " No"), label=_label(row), meta=_meta(row, "idx"))


def cb(row: dict) -> Example:
    # label 0 = entailment, 1 = contradiction, 2 = neutral
    prompt = (
        f"{row['premise'].strip()}\n"
        f"Question: according to the text above, is it true that \"{row['hypothesis'].strip()}\"? "
        "Yes, No, or Maybe?\n"
        "Answer:"
    )
    return Example(prompt=prompt, candidates=(" Yes", " No", " Maybe"), label=_label(row), meta=_meta(row, "idx"))


def boolq(row: dict) -> Example:
    prompt = f"{row['passage'].strip()}\nQuestion: {_question(row['question'])}\nAnswer:"
    return Example(prompt=prompt, candidates=YES_NO, label=_label(row), meta=_meta(row, "idx"))


def wsc(row: dict) -> Example:
    prompt = (
        f"{row['text'].strip()}\n"
        f"Question: in the passage above, does the pronoun \"{row['span2_text']}\" refer to "
        f"\"{row['span1_text']}\"?\n"
        "Answer:"
    )
    return Example(prompt=prompt, candidates=YES_NO, label=_label(row), meta=_meta(row, "idx"))


def wic(row: dict) -> Example:
    prompt = (
        f"Sentence 1: {row['sentence1'].strip()}\n"
        f"Sentence 2: {row['sentence2'].strip()}\n"
        f"Question: is the word \"{row['word']}\" used with the same meaning in both sentences?\n"
        "Answer:"
    )
    return Example(prompt=prompt, candidates=YES_NO, label=_label(row), meta=_meta(row, "idx"))


def multirc(row: dict) -> Example:
    prompt = (
        f"{row['paragraph'].strip()}\n"
        f"Question: {row['question'].strip()}\n"
        f"Proposed answer: {row['answer'].strip()}\n"
        "Is the proposed answer correct?\n"
        "Answer:"
    )
    idx = row.get("idx") or {}
    # One question = one (paragraph, question) pair; its answer options are scored jointly (EM).
    group = (idx["paragraph"], idx["question"]) if "paragraph" in idx and "question" in idx else None
    return Example(prompt=prompt, candidates=YES_NO, label=_label(row), group=group, meta=_meta(row, "idx"))


def copa(row: dict) -> Example:
    # "question" says whether the right choice is the premise's cause or its effect.
    connective = " because" if row["question"] == "cause" else " so"
    premise = row["premise"].strip().rstrip(".")

    def as_continuation(choice: str) -> str:
        choice = choice.strip()
        return " " + choice[:1].lower() + choice[1:]

    return Example(
        prompt=premise + connective,
        candidates=(as_continuation(row["choice1"]), as_continuation(row["choice2"])),
        label=_label(row),
        meta=_meta(row, "idx"),
    )


def record(row: dict) -> Example | None:
    """Cloze over the passage's entities: each candidate fills "@placeholder" and finishes the query."""
    passage = row["passage"].replace("@highlight\n", "- ").strip()
    before, after = row["query"].split("@placeholder", 1)
    entities = _unique(row["entities"])
    answers = _unique(row.get("answers") or ())
    # The space before the placeholder belongs to the candidate, so the prompt ends on a word.
    lead = ""
    if before.endswith(" "):
        before, lead = before.rstrip(" "), " "
    prompt = f"{passage}\n{before}" if before else f"{passage}\n"
    candidates = tuple(lead + entity + after for entity in entities)
    gold = tuple(i for i, entity in enumerate(entities) if entity in answers)
    if not entities or (answers and not gold):
        return None  # no gold entity among the candidates: unusable for training or scoring
    return Example(
        prompt=prompt,
        candidates=candidates,
        label=gold[0] if gold else None,
        answers=answers,
        gold=gold,
        candidate_answers=entities,  # F1/EM compare the predicted entity, not the whole candidate
        meta=dict(row.get("idx") or {}),
    )


# --- extractive / abstractive QA (generation) -------------------------------------------------------


def squad(row: dict) -> Example:
    title = row.get("title", "").replace("_", " ").strip()
    prompt = f"Title: {title}\nContext: {row['context'].strip()}\nQuestion: {row['question'].strip()}\nAnswer:"
    return Example(prompt=prompt, answers=_unique(a.strip() for a in row["answers"]["text"]), meta=_meta(row, "id"))


def drop(row: dict) -> Example:
    prompt = f"Passage: {row['passage'].strip()}\nQuestion: {row['question'].strip()}\nAnswer:"
    spans = row["answers_spans"]["spans"]
    return Example(prompt=prompt, answers=_unique(s.strip() for s in spans), meta=_meta(row, "query_id"))
