"""DeepSpeed ZeRO-3 with a ZO optimizer: the engine's own ``save_checkpoint`` / ``load_checkpoint``
keep the training (issue 23), and the recipe in docs/sharded.md runs.

A user's loop (``tests/dist_scripts/ds_resume_worker.py``, HelloDeepSpeed style) trains 5 steps on
2 gloo ranks, saving with ``engine.save_checkpoint`` after 2; a new launch builds the engine and
the optimizer again, calls ``engine.load_checkpoint`` and trains on. Losses and weights must equal
the uninterrupted run bit for bit (same ranks, same seed, same batches: nothing may differ), for
an optimizer section with fp32 and bf16 weights and for a forward-only engine (fp32, bf16).
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO, VENV_BIN, free_port, run_multiproc

WORKER = REPO / "tests" / "dist_scripts" / "ds_resume_worker.py"
RECIPE = REPO / "docs" / "recipes" / "deepspeed_zero3.py"
RUN_RECIPE = REPO / "tests" / "dist_scripts" / "run_recipe.py"


def _torchrun(*args, timeout: float):
    cmd = [VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    return run_multiproc(cmd, env={"DS_ACCELERATOR": "cpu"}, timeout=timeout)


@pytest.mark.multiproc
@pytest.mark.slow
def test_engine_checkpoint_resumes_the_zo_trajectory(tmp_path):
    _torchrun(WORKER, "--phase", "run", "--out", tmp_path, timeout=400)
    _torchrun(WORKER, "--phase", "resume", "--out", tmp_path, timeout=400)
    assert json.loads((tmp_path / "resume.json").read_text()) == []
    # default tags follow the ZO steps, and a forward-only engine's checkpoint holds its weights
    assert (tmp_path / "adam_fp32" / "latest").read_text() == "global_step2"
    assert sorted(p.name for p in (tmp_path / "forward_only_fp32" / "global_step2" / "zo_scale").iterdir()) == [
        "engine_rank00000.pt", "engine_rank00001.pt", "optim_rank00000.json", "optim_rank00000.pt",
        "optim_rank00001.json", "optim_rank00001.pt"]


def _losses(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("step ")]


@pytest.mark.multiproc
@pytest.mark.slow
def test_deepspeed_recipe_resumes(tmp_path):
    """docs/recipes/deepspeed_zero3.py as a user runs it: 4 steps with checkpoints after 2 and 4;
    then, pointed back at the step-2 checkpoint, it resumes and repeats steps 3-4 exactly."""
    ckpt = tmp_path / "ckpt"
    first = _losses(_torchrun(RUN_RECIPE, RECIPE, "--ckpt", ckpt, "--steps", "4", timeout=300).stdout)
    assert [line.split()[1] for line in first] == ["1", "2", "3", "4"]
    assert (ckpt / "latest").read_text() == "global_step4"
    (ckpt / "latest").write_text("global_step2")
    again = _losses(_torchrun(RUN_RECIPE, RECIPE, "--ckpt", ckpt, "--steps", "4", timeout=300).stdout)
    assert again == first[2:]


def test_sharded_md_shows_the_recipe_as_it_runs():
    doc = (REPO / "docs" / "sharded.md").read_text()
    marker = "<!-- recipe: docs/recipes/deepspeed_zero3.py -->\n```python\n"
    block = doc[doc.index(marker) + len(marker):]
    block = block[: block.index("```")]
    recipe = RECIPE.read_text()
    assert block == recipe[recipe.index("import argparse"):]
