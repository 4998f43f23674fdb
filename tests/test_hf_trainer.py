"""ZOTrainer (zo_scale.integrations): a transformers.Trainer script fine-tunes with ZO optimizers under
one process, DeepSpeed ZeRO-3 and FSDP2 (2 gloo ranks on CPU), and resumes from Trainer's own
checkpoint, in a new process, on the uninterrupted trajectory bit for bit (tolerance 0).

Per backend two launches of dist_scripts/hf_trainer_worker.py: 4 steps saving checkpoint-2, then a
resume from checkpoint-2. A different optimizer per backend, so state restore is exercised (HELENE's
m, h and HiZOO's H; FZOO with 3 directions). The recipe docs/recipes/hf_trainer.py: the same in bf16
under ZeRO-3 (MeZO with zo_scale's fp32 master).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, VENV_BIN, free_port, run_multiproc

WORKER = REPO / "tests" / "dist_scripts" / "hf_trainer_worker.py"
RUN_SCRIPT = REPO / "tests" / "dist_scripts" / "run_recipe.py"  # the recipe, with DeepSpeed's JIT ops off
RECIPE = REPO / "docs" / "recipes" / "hf_trainer.py"
CASES = {  # backend: (optimizer, ranks, zo_scale backend it must end up on)
    "single": ("FZOO", 1, "ReplicatedBackend"),
    "zero3": ("HELENE", 2, "ZeRO3Backend"),
    "fsdp": ("HiZOO", 2, "FSDP2Backend"),
}
TIMEOUT_S = 300  # per launch; ~15-40 s unloaded
_runs: dict[str, tuple[dict, dict]] = {}


def _launcher(ranks: int) -> list:
    if ranks == 1:
        return [PYTHON]
    return [VENV_BIN / "torchrun", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def _runs_of(backend: str, root: Path) -> tuple[dict, dict]:
    """(uninterrupted, resumed) results of ``backend``, launched once per session."""
    if backend not in _runs:
        optimizer, ranks, _ = CASES[backend]
        out = root / backend
        base = [*_launcher(ranks), WORKER, "--backend", backend, "--optimizer", optimizer, "--out", out]
        env = {"DS_ACCELERATOR": "cpu"}
        run_multiproc(base, env=env, timeout=TIMEOUT_S)
        run_multiproc([*_launcher(ranks), *base[len(_launcher(ranks)):], "--resume"], env=env, timeout=TIMEOUT_S)
        _runs[backend] = (torch.load(out / "full.pt"), torch.load(out / "resumed.pt"))
    return _runs[backend]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_trainer")


BACKENDS = [
    pytest.param("single"),
    pytest.param("zero3", marks=[pytest.mark.multiproc, pytest.mark.slow]),
    pytest.param("fsdp", marks=[pytest.mark.multiproc, pytest.mark.slow]),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_continues_the_uninterrupted_trajectory(backend, root):
    full, resumed = _runs_of(backend, root)
    assert full["backend"] == resumed["backend"] == CASES[backend][2]  # FSDP really is FSDP2, not DDP
    assert full["zo_steps"] == resumed["zo_steps"] == 4
    moved = max((full["weights"][k] - full["initial"][k]).abs().max().item() for k in full["initial"])
    assert moved > 1e-2, "the ZO steps did not train"
    # Trainer's logged losses (steps 3-4 measured again after the resume) and the weights: bit for bit
    assert sorted(full["losses"]) == [1, 2, 3, 4]
    assert resumed["losses"] == full["losses"]
    assert sorted(resumed["weights"]) == sorted(full["weights"]) == sorted(full["initial"])
    diff = {k: (resumed["weights"][k] - full["weights"][k]).abs().max().item() for k in full["weights"]}
    assert max(diff.values()) == 0.0, diff
    # the ZO lr is Trainer's linear schedule from 5e-2 to 0 over 4 steps, resumed or not
    expected = {step: 5e-2 * (1 - (step - 1) / 4) for step in range(1, 5)}
    assert full["zo_lrs"] == pytest.approx(expected, rel=1e-6)
    assert resumed["zo_lrs"] == pytest.approx({s: expected[s] for s in (3, 4)}, rel=1e-6)


@pytest.mark.parametrize("backend, case, words", [
    ("single", "grad_accum", "gradient_accumulation_steps=2"),
    ("single", "optimizers", "do not pass optimizers="),
    pytest.param("zero3", "ds_optimizer", "remove the 'optimizer' section",
                 marks=[pytest.mark.multiproc, pytest.mark.slow]),
    pytest.param("zero3", "ds_stage2", "set zero_optimization.stage to 3",
                 marks=[pytest.mark.multiproc, pytest.mark.slow]),
])
def test_refused_settings_name_the_fix(backend, case, words, root):
    full, _ = _runs_of(backend, root)
    message = full["refusals"][case]
    assert message.startswith("zo_scale: ") and words in message, message


def test_fp16_grad_scaler_leaves_the_step_alone(root):
    """accelerate attaches a GradScaler for fp16 on GPUs; its step asserts a scaled loss (emulated on CPU)."""
    full, _ = _runs_of("single", root)
    assert full["scaler_run"] == "trained"


@pytest.mark.multiproc
@pytest.mark.slow
def test_recipe_resumes_bf16_zero3_exactly(tmp_path):
    """docs/recipes/hf_trainer.py as the docs launch it (torchrun, --deepspeed ds_zero3.json, 2 ranks),
    in bf16: 4 steps saving checkpoint-2, then a resume from it; the final models are bit-identical."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    cmd = [*_launcher(2), RUN_SCRIPT, RECIPE, "--deepspeed", RECIPE.parent / "ds_zero3.json", "--use_cpu", "--bf16",
           "--output_dir", out, "--optimizer", "MeZO", "--max_steps", "4", "--save_steps", "2",
           "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
           "--report_to", "none", "--disable_tqdm", "true"]
    run_multiproc(cmd, env={"DS_ACCELERATOR": "cpu"}, timeout=TIMEOUT_S)
    ckpt = out / "checkpoint-2"
    assert (ckpt / "global_step2" / "zo_scale").is_dir()  # the engine's checkpoint carries the ZO state
    losses = [h["loss"] for h in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(l == l for l in losses)
    uninterrupted = load_file(out / "model.safetensors")
    initial = _recipe_module().build_model(None).state_dict()
    assert sorted(uninterrupted) == sorted(initial)
    assert {t.dtype for t in uninterrupted.values()} == {torch.bfloat16}
    assert max((uninterrupted[k].float() - initial[k]).abs().max().item() for k in initial) > 1e-3

    run_multiproc([*cmd, "--resume_from_checkpoint", ckpt], env={"DS_ACCELERATOR": "cpu"}, timeout=TIMEOUT_S)
    resumed = load_file(out / "model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in initial)


def _recipe_module():
    spec = importlib.util.spec_from_file_location("hf_trainer_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module
