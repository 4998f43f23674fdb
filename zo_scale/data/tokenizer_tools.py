"""An offline, deterministic tokenizer for tests and CPU demos (no Hugging Face Hub needed).

Trains a small GPT-2-style byte-level BPE on the bundled LM-BFF text (SST-2 sentences and TREC
questions) and wraps it in `transformers.PreTrainedTokenizerFast` with RoBERTa-like special tokens.
Byte-level BPE never needs an unknown token, so any prompt of any task can be encoded.
"""

from __future__ import annotations

import functools

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from zo_scale.data.lmbff_files import read_lmbff_split

OFFLINE_VOCAB_SIZE = 2048
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4, in this order

# Label words of the bundled templates. They are fed to the trainer many times so that each becomes
# one token (" great", " terrible", ...): masked-LM scoring needs single-token verbalizers.
DEFAULT_SINGLE_TOKEN_WORDS = (
    "great", "terrible", "bad", "okay", "good",
    "Description", "Entity", "Expression", "Human", "Location", "Number",
    "Yes", "No", "Maybe",
)
_FORCED_WORD_REPEATS = 500


def _training_corpus() -> list[str]:
    sst2 = [row["sentence"] for row in read_lmbff_split("sst2-lmbff", "train")]
    trec = [row["sentence"] for row in read_lmbff_split("trec", "train")]
    return sst2 + trec


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int, single_token_words: tuple[str, ...]) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    forced = [" ".join([" " + w] * _FORCED_WORD_REPEATS) for w in single_token_words]
    tokenizer.train_from_iterator(_training_corpus() + forced, trainer)
    return tokenizer.to_str()


def build_offline_tokenizer(
    vocab_size: int = OFFLINE_VOCAB_SIZE,
    style: str = "causal",
    single_token_words: tuple[str, ...] = DEFAULT_SINGLE_TOKEN_WORDS,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the bundled data; same arguments -> same tokenizer.

    style="causal": encodings start with `<s>` (like Llama/OPT); style="mlm": `<s> ... </s>` (like RoBERTa).
    The vocabulary has exactly `vocab_size` entries: build tiny models with `vocab_size` >= that.
    """
    if style not in ("causal", "mlm"):
        raise ValueError(f"style must be 'causal' or 'mlm', got {style!r}")
    tokenizer = Tokenizer.from_str(_trained_tokenizer_json(vocab_size, tuple(single_token_words)))
    # Like RoBERTa's: "It was <mask>" and "It was<mask>" encode the same way.
    tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)])
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    if style == "causal":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
        )
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
