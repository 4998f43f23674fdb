"""launch/train.py on two ranks under every launcher: torchrun (FSDP2), deepspeed (ZeRO-3), mpirun,
a real Slurm batch job; resume on another world size; a rank that dies ends the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, VENV_BIN, free_port, launch_env, run_multiproc, sbatch_and_wait

pytestmark = pytest.mark.multiproc

TRAIN = str(REPO / "launch" / "train.py")
TINY_FSDP = str(REPO / "configs" / "tiny-fsdp.json")
TINY_ZERO3 = str(REPO / "configs" / "tiny-zero3.json")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Each path is compared with one process running the same config with backend "none".
REL = 2e-5  # fp32, two ranks: the same trajectory up to reduction order


def _sets(out: Path, *extra: str) -> list[str]:
    args = ["--set", f"output_dir={out}"]
    for e in extra:
        args += ["--set", e]
    return args


def records(out: Path, kind: str = "step") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def assert_same_trajectory(out: Path, ref: Path, rel: float = REL) -> None:
    a, b = records(out), records(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["forward_passes"] for r in a] == [r["forward_passes"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss_plus", "loss_minus"):
            assert x[key] == pytest.approx(y[key], rel=rel), (x["step"], key)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2


def check_outputs(out: Path, adapter: bool = False) -> None:
    assert (out / "plot.png").is_file() and (out / "config.json").is_file()
    files = {p.name for p in (out / "final_model").iterdir()}
    assert ("adapter_model.safetensors" if adapter else "model.safetensors") in files


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs of both tiny configs (backend none): what every launcher must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for name, cfg in (("fsdp", TINY_FSDP), ("zero3", TINY_ZERO3)):
        out[name] = root / name
        run_multiproc([PYTHON, TRAIN, "--config", cfg, *_sets(out[name], "backend=none", "deepspeed=null")],
                      env=OFFLINE, timeout=120)
    return out


def test_torchrun_fsdp2(tmp_path, reference):
    out = tmp_path / "run"
    r = run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                       "--master_port", str(free_port()), TRAIN, "--config", TINY_FSDP, *_sets(out)],
                      env=OFFLINE, timeout=150)
    assert r.stdout.count("done: 6 steps") == 1  # rank 0 only
    assert_same_trajectory(out, reference["fsdp"])
    check_outputs(out)
    assert_export_is_consolidated(out)


def assert_export_is_consolidated(out: Path) -> None:
    """final_model/ holds exactly the parameter slices the ranks saved in the last checkpoint, stitched."""
    import torch
    from safetensors.torch import load_file

    exported = load_file(out / "final_model" / "model.safetensors")
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    pieces = [torch.load(p, weights_only=True) for p in sorted(ckpt.glob("params_rank*.pt"))]
    assert len(pieces) == 2
    for name, weight in exported.items():
        flat = torch.empty(weight.numel(), dtype=weight.dtype)
        for piece in pieces:
            entry = piece[name]
            flat[entry["start"]:entry["end"]] = entry["tensor"]
        assert torch.equal(flat, weight.view(-1)), name


BUILD_WORKER = str(REPO / "tests" / "dist_scripts" / "build_worker.py")
LORA = '{"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}'
BUILD_CASES = {  # name -> config, overrides: an untied Llama (rotary buffers), PEFT, tied embeddings, bf16
    "llama": [TINY_FSDP],
    "lora": [TINY_FSDP, f"peft={LORA}"],
    "prefix": [TINY_FSDP, 'peft={"method": "prefix", "num_virtual_tokens": 4}'],
    "opt_bf16": [TINY_FSDP, 'model={"arch": "opt", "tokenizer": "offline", "dtype": "bfloat16"}'],
    "roberta": [str(REPO / "configs" / "tiny-roberta-lmbff.json")],
}


def test_fsdp2_loads_on_rank0_only(tmp_path):
    """FSDP2 on two ranks: rank 1 builds a meta skeleton (no weight storage before sharding) and gets its
    shards from rank 0, yet every rank ends with what one process loads: the same weights, non-persistent
    buffers, weight ties, tokenizer and logits."""
    import sys

    import torch

    from zo_scale.config import load_config
    from zo_scale.distributed import DistInfo
    from zo_scale.trainer.build import build

    sys.path.insert(0, str(REPO / "tests" / "dist_scripts"))
    from build_worker import snapshot

    run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), BUILD_WORKER, tmp_path, json.dumps(BUILD_CASES)],
                  env=OFFLINE, timeout=180)
    single = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")
    for name, (config, *sets) in BUILD_CASES.items():
        one = build(load_config(config, [*sets, "backend=none"]), single)
        ref = snapshot(one, one.module.state_dict())
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert ranks[0]["loaded_bytes"] == ref["loaded_bytes"] > 0, name
        assert ranks[1]["loaded_bytes"] == 0, name  # never more than its shards
        for got in ranks:
            assert got["state"].keys() == ref["state"].keys(), name
            for key, value in ref["state"].items():
                assert torch.equal(got["state"][key], value), (name, key)
            assert got["buffers"].keys() == ref["buffers"].keys(), name
            for key, value in ref["buffers"].items():
                assert torch.equal(got["buffers"][key], value), (name, key)
            assert (got["tied"], got["ids"], got["vocab"]) == (ref["tied"], ref["ids"], ref["vocab"]), name
            torch.testing.assert_close(got["logits"], ref["logits"], msg=name)


def test_deepspeed_zero3(tmp_path, reference):
    out = tmp_path / "run"
    # On a machine without GPUs the deepspeed launcher still starts --num_gpus processes (CPU accelerator).
    run_multiproc([VENV_BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
                   "--config", TINY_ZERO3, *_sets(out)], env=OFFLINE, timeout=180)
    assert_same_trajectory(out, reference["zero3"])
    check_outputs(out)
    assert_export_is_consolidated(out)


def test_mpirun(tmp_path, reference):
    out = tmp_path / "run"
    run_multiproc([VENV_BIN / "mpirun", "-n", "2", PYTHON, TRAIN, "--config", TINY_ZERO3, *_sets(out)],
                  env=OFFLINE, timeout=180)
    assert_same_trajectory(out, reference["zero3"])
    check_outputs(out)


@pytest.mark.parametrize("script", ["train-1node.sbatch", "train-multinode.sbatch"])
def test_slurm_batch_job(tmp_path, reference, slurm_cluster, script):
    """sbatch launch/slurm/*.sbatch on a real one-node Slurm, two tasks (the GPU, CPU and node requests
    replaced on the command line by what the CI node has)."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm_cluster, **OFFLINE, "PYTHON": PYTHON}
    _, state = sbatch_and_wait(["--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                                f"--chdir={REPO}", "-o", log, REPO / "launch" / "slurm" / script, TINY_ZERO3,
                                *_sets(out)], env=env, timeout=240)
    text = log.read_text()
    assert state == "COMPLETED", text
    assert "2 tasks" in text and text.count("done: 6 steps") == 1
    assert_same_trajectory(out, reference["zero3"])
    check_outputs(out)


def test_lora_on_zero3_two_ranks(tmp_path):
    out = tmp_path / "run"
    peft = '{"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}'
    run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), TRAIN, "--config", TINY_ZERO3,
                   *_sets(out, f"peft={peft}", "train.steps=3", "eval.every=0", "checkpoint.every=0")],
                  env=OFFLINE, timeout=150)
    check_outputs(out, adapter=True)


def test_resume_on_another_world_size(tmp_path, reference):
    """FSDP2 on two ranks stops at step 3; one process (backend none) resumes and finishes: the same run."""
    out = tmp_path / "run"
    run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), TRAIN, "--config", TINY_FSDP, *_sets(out, "train.steps=3")],
                  env=OFFLINE, timeout=150)
    r = run_multiproc([PYTHON, TRAIN, "--config", TINY_FSDP, *_sets(out, "backend=none"), "--resume"],
                      env=OFFLINE, timeout=120)
    assert "saved on 2 ranks, now 1" in r.stderr
    a, b = records(out), records(reference["fsdp"])
    assert [x["step"] for x in a] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x["loss_plus"] == pytest.approx(y["loss_plus"], rel=REL)
    # and back to two ranks under ZeRO-3 (another backend) for two more steps
    run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), TRAIN, "--config", TINY_FSDP,
                   *_sets(out, "backend=deepspeed", 'deepspeed={"zero_optimization": {"stage": 3}}', "train.steps=8"),
                   "--resume"], env=OFFLINE, timeout=150)
    assert [x["step"] for x in records(out)] == list(range(1, 9))


def test_prefix_tuning_on_fsdp2_resumes_in_one_process(tmp_path):
    """The prefix encoder stays replicated under FSDP2, so both ranks save it whole; loading those two
    copies (resume, and the best-dev weights at the end) once failed with 'covers 1024 of 512'."""
    out = tmp_path / "run"
    prefix = ('peft={"method": "prefix", "num_virtual_tokens": 4}', "eval.every=1", "optimizer.lr=3e-2")
    run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), TRAIN, "--config", TINY_FSDP, *_sets(out, *prefix, "train.steps=3")],
                  env=OFFLINE, timeout=150)
    run_multiproc([PYTHON, TRAIN, "--config", TINY_FSDP, *_sets(out, *prefix, "backend=none"), "--resume"],
                  env=OFFLINE, timeout=120)
    assert [x["step"] for x in records(out)] == list(range(1, 7))
    check_outputs(out, adapter=True)


def test_batch_must_split_evenly(tmp_path):
    """Checked from the launch environment before any process group exists: one line, exit code 2."""
    out = tmp_path / "run"
    env = launch_env({**OFFLINE, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(free_port())})
    r = subprocess.run([PYTHON, TRAIN, "--config", TINY_FSDP, *_sets(out, "train.batch_size=5")], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "zo_scale: error: train.batch_size 5 (global) does not split evenly over 2 ranks"
    assert not out.exists()


def test_a_dead_rank_ends_the_run(tmp_path):
    """Rank 1 is killed mid-run (no launcher to clean up): rank 0 must fail within the collective
    timeout instead of waiting for ever."""
    out = tmp_path / "run"
    timeout_s = 20
    env = launch_env({**OFFLINE, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    args = [PYTHON, TRAIN, "--config", TINY_FSDP,
            *_sets(out, "train.steps=100000", "eval.every=0", "checkpoint.every=0",
                   f"distributed.timeout_s={timeout_s}")]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r)}, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").exists() and len(records(out)) >= 3:
                break
            assert procs[0].poll() is None, procs[0].stderr.read()
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached step 3")
        os.kill(procs[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert procs[0].returncode not in (0, None)
    assert waited < timeout_s + 30, f"rank 0 took {waited:.0f} s to notice"
    assert not (out / "summary.json").exists()
