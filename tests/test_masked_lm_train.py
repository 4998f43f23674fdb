"""LM-BFF tasks through a masked LM's MLM head, from a config: a random-init tiny RoBERTa (or a saved one by
path) trains on sst2-lmbff, sst5 and trec, is evaluated at the mask and exported as a *ForMaskedLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import PYTHON, REPO, VENV_BIN, free_port, run_multiproc
from zo_scale import evaluate as ev
from zo_scale import run_checkpoint
from zo_scale.config import load_config
from zo_scale.trainer.cli import main

CONFIG = str(REPO / "configs" / "tiny-roberta-lmbff.json")
TRAIN = str(REPO / "launch" / "train.py")
FIXTURES = REPO / "tests" / "fixtures" / "tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
LORA = '{"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}'


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _sets(out: Path, *extra: str) -> list[str]:
    """In-process runs: one rank, backend none, tiny sets (k = 4 examples per class, 8 test examples)."""
    args = []
    for e in (f"output_dir={out}", "backend=none", "task.k_per_class=4", "task.num_test=8", "train.steps=3",
              "eval.every=0", *extra):
        args += ["--set", e]
    return args


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def final_test_accuracy(out: Path) -> float:
    """The test accuracy of the final weights (not a best-dev snapshot's)."""
    [test] = [r for r in records(out, "eval") if r["split"] == "test" and "weights" not in r]
    return test["metrics"]["accuracy"]


def lmbff_splits(name: str) -> dict:
    """The examples an in-process run of task ``name`` used (see :func:`_sets`)."""
    from zo_scale.trainer.data import load_splits

    return load_splits(load_config(CONFIG, [f"task.name={name}", "task.k_per_class=4", "task.num_test=8"]))


# ---------------------------------------------------------------------------------------------
# Whole runs


@pytest.mark.parametrize("name, objective", [("sst2-lmbff", "loss"), ("sst5", "loss"), ("trec", "accuracy")])
def test_masked_lm_run_trains_evaluates_and_exports(tmp_path, name, objective):
    out = tmp_path / name
    assert main(["--config", CONFIG, *_sets(out, f"task.name={name}", f"task.objective={objective}")]) == 0

    steps, evals = records(out, "step"), records(out, "eval")
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["forward_passes"] for r in steps] == [2, 4, 6]
    if objective == "loss":  # cross-entropy over the label words: ln(classes) for an undecided model
        assert all(0.0 < r["loss_plus"] < 3.0 for r in steps)
    else:  # minus the fraction of the batch predicted right
        assert all(-1.0 <= r["loss_plus"] <= 0.0 for r in steps)
    assert {(r["split"], r["step"]) for r in evals} >= {("dev", 0), ("dev", 3), ("test", 3)}
    assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 for r in evals)

    # the export is a masked LM with the trained weights, and scoring it at the mask gives the logged accuracy
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(out / "final_model").eval()
    assert type(model).__name__ == "RobertaForMaskedLM"
    saved = torch.load(run_checkpoint.latest_checkpoint(out / "checkpoints") / "params_rank00000.pt", weights_only=True)
    params = dict(model.named_parameters())
    for pname, entry in saved.items():
        assert torch.equal(params[pname].detach().view(-1), entry["tensor"]), pname
    tokenizer = AutoTokenizer.from_pretrained(out / "final_model")
    test = lmbff_splits(name)["test"]
    assert ev.evaluate(model, tokenizer, test, batch_size=8, max_length=64)["accuracy"] == final_test_accuracy(out)


def test_lora_on_a_masked_lm_trains_only_the_adapter(tmp_path):
    out = tmp_path / "lora"
    assert main(["--config", CONFIG, *_sets(out, f"peft={LORA}", "optimizer.lr=0.1")]) == 0  # moves B visibly
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == 2 * 2 * (4 * 64 + 64 * 4)  # 2 layers x (query, value) x (A + B)
    saved = torch.load(run_checkpoint.latest_checkpoint(out / "checkpoints") / "params_rank00000.pt", weights_only=True)
    assert saved and all("lora_" in name for name in saved)  # the optimizer held nothing else
    files = {p.name for p in (out / "final_model").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files

    from peft import PeftModel

    from zo_scale.data import token_loss
    from zo_scale.models import load_model_and_tokenizer
    from zo_scale.trainer.build import model_spec
    from zo_scale.trainer.data import local_batch

    cfg = load_config(CONFIG)
    base, tokenizer = load_model_and_tokenizer(model_spec(cfg))
    splits = lmbff_splits("sst2-lmbff")
    batch = local_batch(cfg, tokenizer, splits["train"][:4], 0, 1).tensors
    base_loss, _ = token_loss(base, batch)
    model = PeftModel.from_pretrained(base, out / "final_model").eval()
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in model.named_parameters())
    # evaluation sees the masked LM through the wrapper: the logged test accuracy is the MLM scorer's
    assert ev.evaluate(model, tokenizer, splits["test"], batch_size=8, max_length=64)["accuracy"] == \
        final_test_accuracy(out)
    # token_loss reaches the MLM logits through the wrapper: the loss of the adapted model, not of the base
    with_adapter, n = token_loss(model, batch)
    merged, _ = token_loss(model.merge_and_unload(), batch)
    assert n == 4 and float(with_adapter) == pytest.approx(float(merged), rel=1e-5)
    assert abs(float(with_adapter) - float(base_loss)) > 1e-5  # the trained adapter is applied (1.8e-4 here)


def test_masked_lm_from_a_local_directory(tmp_path):
    """name_or_path: the head comes from the checkpoint's config (architectures: RobertaForMaskedLM)."""
    first = tmp_path / "first"
    assert main(["--config", CONFIG, *_sets(first, "train.steps=1", "eval.at_start=false")]) == 0
    out = tmp_path / "again"
    model = json.dumps({"name_or_path": str(first / "final_model")})
    assert main(["--config", CONFIG, *_sets(out, f"model={model}", "train.steps=1")]) == 0
    [dev0] = [r for r in records(out, "eval") if r["split"] == "dev" and r["step"] == 0]
    [dev1] = [r for r in records(first, "eval") if r["split"] == "dev" and r["step"] == 1]
    assert dev0["metrics"] == dev1["metrics"]  # it continued from the saved masked LM, scored at the mask
    # and trained on the label words at the mask (a causal LM's token loss would be near ln(vocab) = 7.6)
    assert all(0.0 < r["loss_plus"] < 3.0 for r in records(out, "step"))


# ---------------------------------------------------------------------------------------------
# One step by hand


def test_mlm_step_loss_is_cross_entropy_over_label_word_logits():
    from zo_scale.models import load_model_and_tokenizer
    from zo_scale.trainer.build import model_spec
    from zo_scale.trainer.data import load_splits, local_batch
    from zo_scale.trainer.objectives import make_closure

    cfg = load_config(CONFIG, ["task.name=sst5", "train.batch_size=6", "task.max_length=128"])  # no truncation
    model, tokenizer = load_model_and_tokenizer(model_spec(cfg))
    examples = load_splits(cfg)["train"][:6]
    batch = local_batch(cfg, tokenizer, examples, 0, 1)
    loss_sum, n = make_closure("loss", model, tokenizer, batch, {})()

    word_ids = []
    for word in examples[0].verbalizers:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, word
        word_ids += ids
    expected = 0.0
    for e in examples:
        ids = tokenizer(e.mask_context[0] + "<mask>" + e.mask_context[1])["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id  # the mlm-style tokenizer
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, ids.index(tokenizer.mask_token_id)]
        expected += F.cross_entropy(logits[word_ids][None].double(), torch.tensor([e.label])).item()
    assert n == 6 and loss_sum.dtype == torch.float64
    assert float(loss_sum) == pytest.approx(expected, rel=1e-5)

    # two ranks: each keeps its rows (mask positions, labels) and the shared label-word ids; sums add up
    parts = [local_batch(cfg, tokenizer, examples, r, 2) for r in range(2)]
    for r, p in enumerate(parts):
        assert p.examples == examples[3 * r:3 * r + 3] and p.global_tokens == batch.global_tokens
        assert torch.equal(p.tensors["verbalizer_ids"], batch.tensors["verbalizer_ids"])
        assert torch.equal(p.tensors["labels"], batch.tensors["labels"][3 * r:3 * r + 3])
        assert torch.equal(p.tensors["mask_positions"], batch.tensors["mask_positions"][3 * r:3 * r + 3])
    assert batch.global_tokens == int(batch.tensors["attention_mask"].sum())
    halves = [make_closure("loss", model, tokenizer, p, {})() for p in parts]
    assert sum(h[1] for h in halves) == 6 and float(sum(h[0] for h in halves)) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad combinations: one line, exit code 2


@pytest.mark.parametrize("extra, expect", [
    (["task.name=rte", f"task.data_dir={FIXTURES}"], "a masked LM needs an LM-BFF task"),
    (["task.objective=candidates"], "task.objective 'candidates' is for causal LMs"),
    (["task.loss_on=full"], "task.loss_on 'full' is for causal LMs"),
    (['peft={"method": "prefix", "num_virtual_tokens": 4}'], "peft.method 'prefix' needs a causal LM"),
    (["model.head=masked"], "model.head 'masked' only goes with model.name_or_path"),
    (["task.max_length=300"], "task.max_length must be at most 256 for arch 'roberta'"),
])
def test_bad_masked_lm_configs(tmp_path, capsys, extra, expect):
    out = tmp_path / "run"
    assert main(["--config", CONFIG, *_sets(out, *extra)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zo_scale: error: ") and expect in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("extra, expect", [
    (["task.name=boolq", f"task.data_dir={FIXTURES}", "task.k_per_class=null", "task.num_train=8",
      "task.num_dev=4"], "a masked LM needs an LM-BFF task"),
    (["task.objective=candidates"], "task.objective 'candidates' is for causal LMs"),
    (['peft={"method": "prefix", "num_virtual_tokens": 4}'], "peft.method 'prefix' needs a causal LM"),
])
def test_bad_masked_lm_configs_found_from_the_checkpoint(tmp_path, capsys, extra, expect):
    """By path the head is known once the checkpoint's config is read: refused before training starts."""
    from zo_scale.data.tokenizer_tools import build_offline_tokenizer
    from zo_scale.models import build_random_model

    saved = tmp_path / "roberta"
    tokenizer = build_offline_tokenizer(style="mlm")
    build_random_model("roberta", {}, tokenizer).save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    out = tmp_path / "run"
    model = json.dumps({"name_or_path": str(saved)})
    args = ["--config", CONFIG]
    for e in (f"output_dir={out}", "backend=none", f"model={model}", *extra):
        args += ["--set", e]
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("zo_scale: loading")]
    assert len(lines) == 1 and lines[0].startswith("zo_scale: error: ") and expect in lines[0], lines
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Two ranks


@pytest.mark.multiproc
def test_two_ranks_fsdp2_follow_the_single_process_run(tmp_path):
    """The shipped config as is (FSDP2, RoBERTa's tied embeddings left to the root unit) on 2 ranks."""
    ref, out = tmp_path / "ref", tmp_path / "fsdp2"
    short = ["--set", "train.steps=3", "--set", "eval.every=0", "--set", "task.num_test=8"]
    run_multiproc([PYTHON, TRAIN, "--config", CONFIG, "--set", f"output_dir={ref}", "--set", "backend=none", *short],
                  env=OFFLINE, timeout=120)
    run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                   str(free_port()), TRAIN, "--config", CONFIG, "--set", f"output_dir={out}", *short],
                  env=OFFLINE, timeout=150)
    a, b = records(out, "step"), records(ref, "step")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in ("loss_plus", "loss_minus"):
            assert x[key] == pytest.approx(y[key], rel=2e-5), (x["step"], key)
    assert [r["metrics"] for r in records(out, "eval")] == [r["metrics"] for r in records(ref, "eval")]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert (out / "final_model" / "model.safetensors").is_file()
