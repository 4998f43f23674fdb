"""launch/train.py in one process: outputs, exact resume after kill -9, torn checkpoints, bad input, NaN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import PYTHON, REPO, launch_env
from zo_scale import run_checkpoint
from zo_scale.optim.updates import helene_alpha
from zo_scale.trainer.cli import main

TRAIN = str(REPO / "launch" / "train.py")
TINY_LLAMA = str(REPO / "configs" / "tiny-fsdp.json")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _sets(out: Path, *extra: str) -> list[str]:
    args = ["--set", f"output_dir={out}", "--set", "backend=none"]
    for e in extra:
        args += ["--set", e]
    return args


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, TRAIN, *args], env=launch_env(OFFLINE), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def step_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final_model" / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# A whole run in this process


def test_single_process_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    assert main(["--config", TINY_LLAMA, *_sets(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for key in ("loss", "proj_grad", "lr", "forward_passes", "tokens_per_s", "step_time_s", "rss_mb", "peak_rss_mb"):
        assert all(r[key] is not None for r in steps), key
    assert [r["forward_passes"] for r in steps] == [2 * i for i in range(1, 7)]  # HELENE: two forwards a step
    # dev never beat step 0's (ties keep the earlier): test is also evaluated on those best-dev weights
    assert [(r["split"], r["step"], r.get("weights")) for r in evals] == [
        ("dev", 0, None), ("dev", 3, None), ("dev", 6, None), ("test", 6, None), ("test", 0, "best")]
    assert all("accuracy" in r["metrics"] for r in evals)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6 and summary["forward_passes"] == 12
    assert summary["final"]["dev"]["step"] == 6 and summary["final"]["test"]["metrics"]["accuracy"] >= 0
    assert summary["initial"]["dev"]["step"] == 0 and summary["peak_memory_mb"]["peak_rss_mb"] > 0
    assert summary["config"]["optimizer"]["name"] == "helene" and "torch" in summary["versions"]
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the exported model is the trained one: its weights equal the last checkpoint's parameter slices
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final_model")
    ckpt = run_checkpoint.latest_checkpoint(out / "checkpoints")
    assert ckpt.name == "step_00000006"
    saved = torch.load(ckpt / "params_rank00000.pt", weights_only=True)
    params = dict(model.named_parameters())
    for name, entry in saved.items():
        assert torch.equal(params[name].detach().view(-1), entry["tensor"]), name


def test_lora_run_exports_an_adapter(tmp_path):
    out = tmp_path / "lora"
    peft = '{"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}'
    assert main(["--config", TINY_LLAMA, *_sets(out, f"peft={peft}", "train.steps=3", "eval.every=0",
                                                 "checkpoint.every=0")]) == 0
    files = {p.name for p in (out / "final_model").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    summary = json.loads((out / "summary.json").read_text())
    # 2 layers x r=4 x (q_proj 64 -> 64: A 4x64 + B 64x4; v_proj 64 -> 32 (2 KV heads): A 4x64 + B 32x4)
    assert summary["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32))
    from peft import PeftModel
    from safetensors.torch import load_file

    from zo_scale.config import load_config
    from zo_scale.models import load_model_and_tokenizer
    from zo_scale.trainer.build import model_spec

    base, _ = load_model_and_tokenizer(model_spec(load_config(TINY_LLAMA)))
    model = PeftModel.from_pretrained(base, out / "final_model")
    adapter = load_file(out / "final_model" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # trained (B starts at 0)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == summary["trainable_params"]


def test_best_dev_weights_are_evaluated_and_exported(tmp_path):
    """The snapshot taken at the best dev score is what best_model/ holds and what best_dev.test measured."""
    out = tmp_path / "best"
    args = ("optimizer.lr=3e-2", "eval.every=1", "train.steps=8", "checkpoint.every=1", "checkpoint.keep=100")
    assert main(["--config", TINY_LLAMA, *_sets(out, *args)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in records if r["type"] == "eval" and r["split"] == "dev"]
    scores = [r["metrics"]["accuracy"] for r in dev]
    best_step = dev[scores.index(max(scores))]["step"]  # the first of equal scores
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_dev"]["step"] == best_step and summary["primary_metric"] == "accuracy"
    assert 0 < best_step < 8, "this seed and lr were chosen so that the best dev score is mid-run"

    # best_model/ holds the parameters of that step's checkpoint, not the final ones
    from transformers import AutoModelForCausalLM

    best_model = AutoModelForCausalLM.from_pretrained(out / "best_model")
    saved = torch.load(out / "checkpoints" / run_checkpoint.step_dir_name(best_step) / "params_rank00000.pt",
                       weights_only=True)
    params = dict(best_model.named_parameters())
    for name, entry in saved.items():
        assert torch.equal(params[name].detach().view(-1), entry["tensor"]), name
    assert not torch.equal(final_weights(out)["lm_head.weight"], params["lm_head.weight"])

    # best_dev.test is the test accuracy of best_model/, logged with weights "best"
    from zo_scale import evaluate as ev
    from zo_scale.config import load_config
    from zo_scale.trainer.data import load_splits

    cfg = load_config(TINY_LLAMA, [f"output_dir={out}"])
    tokenizer = AutoTokenizer.from_pretrained(out / "best_model")
    test = ev.evaluate(best_model, tokenizer, load_splits(cfg)["test"], batch_size=8, max_length=cfg.task.max_length)
    assert summary["best_dev"]["test"]["metrics"] == test
    logged = [r for r in records if r["type"] == "eval" and r.get("weights") == "best"]
    assert [(r["split"], r["step"], r["metrics"]) for r in logged] == [("test", best_step, test)]


def test_keep_best_off_writes_no_snapshot(tmp_path):
    out = tmp_path / "nobest"
    assert main(["--config", TINY_LLAMA, *_sets(out, "optimizer.lr=3e-2", "eval.every=1", "train.steps=8",
                                                 "eval.keep_best=false")]) == 0
    assert not (out / "best_model").exists() and not (out / "checkpoints" / "best").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_dev"]["step"] not in (0, 8) and summary["best_dev"]["test"] is None


def test_resumed_segment_drops_the_earlier_best_model(tmp_path):
    """A run resumed for more steps whose best dev weights are now its final ones (here: keep_best turned
    off) must not leave the first segment's best_model/ next to a summary that no longer names it."""
    out = tmp_path / "segments"
    args = ("optimizer.lr=3e-2", "eval.every=1", "train.steps=8", "checkpoint.every=4")
    assert main(["--config", TINY_LLAMA, *_sets(out, *args)]) == 0
    assert (out / "best_model").is_dir()  # the first segment's best was mid-run
    assert main(["--config", TINY_LLAMA, *_sets(out, *args[:2], "train.steps=10", args[3], "eval.keep_best=false"),
                 "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10
    assert not (out / "best_model").exists()


# ---------------------------------------------------------------------------------------------
# Resume: kill -9 at some moment, resume, same result bitwise


RESUME_ARGS = ("train.steps=40", "checkpoint.every=5", "eval.every=10", "train.batch_size=4",
               'model.config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3}')


def _kill_when(proc: subprocess.Popen, out: Path, min_steps: int, timeout: float = 120) -> int:
    """SIGKILL the run once metrics.jsonl shows ``min_steps`` steps; returns the steps seen then."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed:\n{proc.stderr.read()}")
        if metrics.exists():
            n = sum('"type": "step"' in line for line in metrics.read_text().splitlines())
            if n >= min_steps:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return n
        time.sleep(0.005)
    proc.kill()
    pytest.fail("the run did not reach the kill point in time")


def test_resume_after_kill9_is_bitwise_identical(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = run_cli(["--config", TINY_LLAMA, *_sets(ref, *RESUME_ARGS)])
    assert r.returncode == 0, r.stderr

    # killed twice at different moments (mid-interval, then right after a checkpoint), resumed each time
    for kill_at in (12, 26):
        proc = subprocess.Popen([PYTHON, TRAIN, "--config", TINY_LLAMA, *_sets(cut, *RESUME_ARGS)]
                                + (["--resume"] if kill_at != 12 else []),
                                env=launch_env(OFFLINE), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        _kill_when(proc, cut, kill_at)
        assert not (cut / "summary.json").exists()
    r = run_cli(["--config", TINY_LLAMA, *_sets(cut, *RESUME_ARGS), "--resume"])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr

    a, b = step_records(ref), step_records(cut)
    assert [x["step"] for x in b] == list(range(1, 41))  # no step lost or repeated in the log
    for key in ("loss", "loss_plus", "loss_minus", "proj_grad", "forward_passes"):
        assert [x[key] for x in a] == [x[key] for x in b], key
    wa, wb = final_weights(ref), final_weights(cut)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, cut))
    assert sa["final"]["dev"]["metrics"] == sb["final"]["dev"]["metrics"]
    assert sa["best_dev"] == sb["best_dev"]
    assert len(sb["resumed_from"]) == 2


def test_torn_checkpoints_are_never_loaded(tmp_path):
    out = tmp_path / "run"
    assert main(["--config", TINY_LLAMA, *_sets(out, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5")]) == 0
    root = out / "checkpoints"
    assert [p.name for p in run_checkpoint.complete_checkpoints(root)] == ["step_00000002", "step_00000004"]
    latest = root / "step_00000004"
    # a save killed before its rename leaves only a temp dir
    (root / ".tmp-step_00000006").mkdir()
    (root / ".tmp-step_00000006" / "params_rank00000.pt").write_bytes(b"partial")
    assert run_checkpoint.latest_checkpoint(root) == latest
    # a truncated file or a missing marker disqualifies a checkpoint
    bad = root / "step_00000008"
    import shutil

    shutil.copytree(latest, bad)
    params = bad / "params_rank00000.pt"
    params.write_bytes(params.read_bytes()[:100])
    assert run_checkpoint.latest_checkpoint(root) == latest
    shutil.rmtree(bad)
    shutil.copytree(latest, bad)
    (bad / "COMPLETE").unlink()
    assert run_checkpoint.latest_checkpoint(root) == latest
    # resuming sweeps the leftovers and continues from step 4
    assert main(["--config", TINY_LLAMA, *_sets(out, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=5"),
                 "--resume"]) == 0
    names = sorted(p.name for p in root.iterdir())
    assert names == ["best", "step_00000002", "step_00000004", "step_00000006"]
    # the best-dev snapshot is sealed the same way: without its marker it does not exist
    assert run_checkpoint.read_best_record(root)["step"] == 0
    (root / "best" / "COMPLETE").unlink()
    assert run_checkpoint.read_best_record(root) is None


def test_resume_refuses_a_different_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", TINY_LLAMA, *_sets(out, "train.steps=2")]) == 0
    capsys.readouterr()
    assert main(["--config", TINY_LLAMA, *_sets(out, "train.steps=4", "optimizer.lr=0.5"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "config differs in optimizer.lr" in err and len(err.strip().splitlines()) == 1
    # steps may change: extending a finished run continues it
    assert main(["--config", TINY_LLAMA, *_sets(out, "train.steps=4"), "--resume"]) == 0
    assert [r["step"] for r in step_records(out)] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, no output left behind


@pytest.mark.parametrize("extra, expect", [
    (["--set", "train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (["--set", "train.steps=ten"], "train.steps must be an integer"),
    (["--set", "optimizer.name=adam"], "unknown optimizer 'adam'"),
    (["--set", "optimizer.betta1=0.9"], "did you mean 'optimizer.beta1'"),
    (["--set", "optimizer.clip_mode=sometimes"], "clip_mode must be one of"),
    (["--set", "task.name=imdb"], "unknown task 'imdb'"),
    (["--set", "backend=zero"], "backend must be one of"),
    (["--set", "model.tokenizer=/no/such/tokenizer"], "model.tokenizer: /no/such/tokenizer does not exist"),
    (["--set", "task.name=boolq", "--set", "task.data_dir=/no/such/dir"], "task.data_dir: /no/such/dir does not exist"),
    (["--set", "train.batch_size=1000"], "exceeds the 64 training examples"),
    (["--set", "model.trainable=[\"nothing_matches\"]"], "matches no parameter"),
    (["--set", "peft={\"method\": \"lora\", \"target_modules\": [\"no_such_module\"]}"], "peft:"),
    (["--resume"], "no complete checkpoint"),
    (["--set", "optimizer.eps=3e38"], "eps must be in (0, "),  # once an fp32 overflow deep in the first step
    (["--set", "optimizer.lr=-1"], "lr must be finite and >= 0"),
    (["--set", 'optimizer={"name": "fzoo", "lr": 0.001, "n_directions": 1}'], "needs n_directions >= 2"),
    (["--set", 'optimizer={"name": "zo-muon", "lr": 0.01, "rank": "64"}'], "optimizer.rank has the wrong type"),
])
def test_bad_input_in_process(tmp_path, capsys, extra, expect):
    out = tmp_path / "run"
    assert main(["--config", TINY_LLAMA, "--set", f"output_dir={out}", "--set", "backend=none", *extra]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith("zo_scale: loading")]  # said before a (possibly long) model load
    assert len(lines) == 1 and lines[0].startswith("zo_scale: error: ") and expect in lines[0], lines
    assert not out.exists()


def test_bad_input_cli_exit_code_and_one_line(tmp_path):
    out = tmp_path / "run"
    for args in (["--config", str(tmp_path / "missing.json")],
                 ["--config", TINY_LLAMA, "--set", f"output_dir={out}", "--set", "optimizer.lr=fast"],
                 ["--config", TINY_LLAMA, "--set", f"output_dir={out}", "--set", "task.name=boolq",
                  "--set", f"task.data_dir={tmp_path}"]):
        r = run_cli(args, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("zo_scale: error:"), r.stderr
        assert "Traceback" not in r.stderr and not out.exists()


@pytest.mark.parametrize("rank, local_rank, printed", [(0, 0, "zo_scale: error: config "),
                                                        (4, 0, "zo_scale: error: [rank 4] config "), (5, 1, None)])
def test_bad_input_is_said_once_per_node(tmp_path, capsys, monkeypatch, rank, local_rank, printed):
    """A node can lack what another has (a data file on local disk): the first rank of every node says why,
    tagged with its rank, and the other ranks of a node, which see the same files, stay quiet."""
    for name, value in {"RANK": rank, "WORLD_SIZE": 8, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": 4}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("ZO_SCALE_ALL_RANKS_LOG", raising=False)
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert (err.startswith(printed) and err.count("\n") == 0) if printed else err == ""


def test_non_empty_output_dir_with_resume_never(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["--config", TINY_LLAMA, *_sets(out, "checkpoint.resume=never")]) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "notes.txt").exists()
    # a finished run that kept no checkpoint is not overwritten by a fresh start either
    done = tmp_path / "done"
    assert main(["--config", TINY_LLAMA, *_sets(done, "train.steps=1", "checkpoint.at_end=false")]) == 0
    capsys.readouterr()
    assert main(["--config", TINY_LLAMA, *_sets(done, "train.steps=1")]) == 2
    assert "holds a finished run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Non-finite losses


# A probe of ε = 1e6 pushes fp16 weights past 65504: inf weights, NaN loss (a real way to get one).


def test_nonfinite_loss_stops_with_a_clear_message(tmp_path):
    out = tmp_path / "run"
    r = run_cli(["--config", TINY_LLAMA, *_sets(out, "optimizer.eps=1e6", "model.dtype=float16", "eval.at_start=false")])
    assert r.returncode == 3, r.stderr
    assert "non-finite loss at step 0" in r.stderr and "train.on_nonfinite=skip" in r.stderr
    assert "Traceback" not in r.stderr and not (out / "summary.json").exists()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "nonfinite_loss"


def test_nonfinite_loss_skipped_when_configured(tmp_path):
    out = tmp_path / "run"
    assert main(["--config", TINY_LLAMA, *_sets(out, "optimizer.eps=1e6", "model.dtype=float16", "train.on_nonfinite=skip",
                                                "train.steps=3", "eval.every=0")]) == 0
    steps = step_records(out)
    assert all(r["skipped"] and r["loss"] is None for r in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_train_loss"] is None


# ---------------------------------------------------------------------------------------------
# Pieces


def test_batch_order_is_a_pure_function_of_the_step():
    from zo_scale.trainer.data import BatchOrder

    order = BatchOrder(num_examples=10, batch_size=4, seed=3)
    steps = [order.indices(t) for t in range(10)]  # 40 draws = 4 epochs
    stream = [i for batch in steps for i in batch]
    for epoch in range(4):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))  # each epoch a permutation
    assert stream[:10] != stream[10:20]  # reshuffled every epoch
    fresh = BatchOrder(num_examples=10, batch_size=4, seed=3)
    assert [fresh.indices(t) for t in (7, 2, 9)] == [steps[7], steps[2], steps[9]]  # any step, any order
    assert BatchOrder(10, 4, seed=4).indices(0) != steps[0]
    assert order.position(5) == {"seed": 3, "num_examples": 10, "batch_size": 4, "epoch": 2, "position": 0,
                                 "next_step": 5}


def test_ranks_split_the_global_batch():
    from zo_scale.config import load_config
    from zo_scale.data.tokenizer_tools import build_offline_tokenizer
    from zo_scale.trainer.data import load_splits, local_batch

    cfg = load_config(TINY_LLAMA, ["train.batch_size=6"])
    tok = build_offline_tokenizer()
    examples = load_splits(cfg)["train"][:6]
    whole = local_batch(cfg, tok, examples, 0, 1)
    parts = [local_batch(cfg, tok, examples, r, 3) for r in range(3)]
    assert [p.examples for p in parts] == [examples[0:2], examples[2:4], examples[4:6]]
    assert all(p.global_tokens == whole.global_tokens for p in parts)
    for r, p in enumerate(parts):
        width = p.tensors["input_ids"].shape[1]
        assert torch.equal(p.tensors["input_ids"], whole.tensors["input_ids"][2 * r:2 * r + 2, :width])
        assert torch.equal(p.tensors["labels"], whole.tensors["labels"][2 * r:2 * r + 2, :width])


@pytest.mark.parametrize("objective, extra", [("candidates", []), ("accuracy", ["optimizer.hessian_scale=1.0"])])
def test_other_objectives(tmp_path, objective, extra):
    out = tmp_path / "run"
    assert main(["--config", TINY_LLAMA, *_sets(out, f"task.objective={objective}", "train.steps=2",
                                                "eval.every=0", *extra)]) == 0
    steps = step_records(out)
    if objective == "accuracy":  # minus the fraction of the batch predicted right
        assert all(-1.0 <= r["loss_plus"] <= 0.0 for r in steps)
    else:  # cross-entropy between the two candidates: ln 2 for a model that cannot tell them apart
        assert all(0.0 < r["loss_plus"] < 5.0 for r in steps)


@pytest.mark.parametrize("name, extra", [("fzoo", ""), ("helene-fzoo", ', "beta1": 0.8, "anneal_horizon": 2.0')])
def test_fzoo_from_a_config(tmp_path, name, extra):
    """optimizer.name 'fzoo' / 'helene-fzoo': N + 1 forwards a step, σ and ℓ₀ in the step records (and
    HELENE-FZOO's α_t, annealed by the config's β1 and horizon)."""
    out = tmp_path / "run"
    opt = f'{{"name": "{name}", "lr": 0.001, "eps": 0.001, "n_directions": 3{extra}}}'
    assert main(["--config", TINY_LLAMA, *_sets(out, f"optimizer={opt}", "train.steps=3", "eval.every=0")]) == 0
    steps = step_records(out)
    assert [r["forward_passes"] for r in steps] == [4, 8, 12]
    assert all(r["sigma"] > 0 and r["loss"] == r["loss_zero"] and r["loss_minus"] is None for r in steps)
    alphas = [helene_alpha(t, beta1=0.8, anneal="exp", horizon=2.0) for t in range(3)]
    assert [r.get("alpha") for r in steps] == (alphas if name == "helene-fzoo" else [None] * 3)


@pytest.mark.parametrize("name, extra", [("zo-muon", ""), ("helene-muon", ', "beta1": 0.8, "resample_momentum": "reset"')])
def test_zo_muon_from_a_config(tmp_path, name, extra):
    """optimizer.name 'zo-muon' / 'helene-muon': N + 1 forwards a step, P's epoch (and HELENE-Muon's α) logged."""
    out = tmp_path / "run"
    opt = f'{{"name": "{name}", "lr": 0.01, "eps": 0.001, "n_directions": 2, "rank": 4, "resample_every": 2{extra}}}'
    assert main(["--config", TINY_LLAMA, *_sets(out, f"optimizer={opt}", "train.steps=3", "eval.every=0")]) == 0
    steps = step_records(out)
    assert [r["forward_passes"] for r in steps] == [3, 6, 9] and [r["epoch"] for r in steps] == [0, 0, 1]
    assert all(r["loss"] == r["loss_zero"] and r["loss_minus"] is None for r in steps)
    assert all(("alpha" in r) == (name == "helene-muon") for r in steps)


def test_candidate_cross_entropy_by_hand():
    import math

    from zo_scale.config import load_config
    from zo_scale.data.scoring import continuation_logprobs
    from zo_scale.models import load_model_and_tokenizer
    from zo_scale.trainer.build import model_spec
    from zo_scale.trainer.data import load_splits
    from zo_scale.trainer.objectives import candidate_cross_entropy

    cfg = load_config(TINY_LLAMA)
    model, tok = load_model_and_tokenizer(model_spec(cfg))
    examples = load_splits(cfg)["train"][:3]
    total, n = candidate_cross_entropy(model, tok, examples)
    expect = 0.0
    for e in examples:
        scores = [s / k for s, k in continuation_logprobs(model, tok, [(e.prompt, c) for c in e.candidates])]
        expect -= scores[e.label] - math.log(sum(math.exp(s) for s in scores))
    assert n == 3 and float(total) == pytest.approx(expect, rel=1e-6)
