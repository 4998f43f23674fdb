"""One prompted example: the unit that samplers return and that batching and evaluation consume."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """A task row already rendered through its prompt template.

    A causal LM reads `prompt` and continues it with one of `candidates` (classification) or with free
    text compared against `answers` (generation). Candidates and answers carry their own leading space
    where the template needs one, so `prompt + candidate` is the exact text the model sees.
    """

    prompt: str
    candidates: tuple[str, ...] = ()  # classification: every option, in label order
    label: int | None = None  # classification: index of the gold candidate (the training target)
    answers: tuple[str, ...] = ()  # gold answer strings, compared after SQuAD normalisation
    answer_prefix: str = " "  # generation: put between prompt and answers[0] to form the training target
    # Candidates counted correct at evaluation. Usually (label,); ReCoRD can have several gold entities.
    gold: tuple[int, ...] = ()
    # Masked-LM form (LM-BFF tasks): the text is mask_context[0] + <mask> + mask_context[1] and the
    # label words in `verbalizers` (label order) are scored at the mask position.
    mask_context: tuple[str, str] | None = None
    verbalizers: tuple[str, ...] = ()
    # Examples with the same group are the options of one question (MultiRC: the rows of one
    # (paragraph, question)); evaluation scores them jointly (exact match over the whole question).
    group: tuple | None = None
    # The answer string each candidate stands for, when a candidate is more than its answer (ReCoRD:
    # the entity, while the candidate is entity + rest of the query); scored against `answers` by F1/EM.
    candidate_answers: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, compare=False)  # source ids, for tracing only

    def __post_init__(self):
        if self.candidate_answers and len(self.candidate_answers) != len(self.candidates):
            raise ValueError("candidate_answers needs one answer string per candidate")

    @property
    def is_generation(self) -> bool:
        return not self.candidates

    @property
    def gold_indices(self) -> tuple[int, ...]:
        if self.gold:
            return self.gold
        return () if self.label is None else (self.label,)

    @property
    def target(self) -> str:
        """The continuation a causal LM is trained on."""
        if self.candidates:
            if self.label is None:
                raise ValueError("an unlabeled classification example has no training target")
            return self.candidates[self.label]
        if not self.answers:
            raise ValueError("a generation example without answers has no training target")
        return self.answer_prefix + self.answers[0]
