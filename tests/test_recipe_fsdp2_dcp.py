"""docs/recipes/fsdp2_dcp.py as a user runs it: 2 ranks train 4 steps with DCP checkpoints at steps 2
and 4; with step 4's checkpoint gone, 3 ranks resume from step 2 (DCP reshards 2 -> 3) and repeat
steps 2 and 3 with the same losses (batched forwards: to the rounding of 2 vs 3 ranks' matmuls)."""

import re
import shutil

import pytest

from conftest import REPO, VENV_BIN, free_port, run_multiproc

RECIPE = REPO / "docs" / "recipes" / "fsdp2_dcp.py"
LOSS = re.compile(r"^step (\d+) loss ([0-9.]+)$", re.M)


def launch(world: int, ckpt, steps: int) -> str:
    r = run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
                       "--master_port", str(free_port()), RECIPE, "--ckpt", ckpt, "--steps", str(steps)], timeout=300)
    return r.stdout


@pytest.mark.multiproc
@pytest.mark.slow
def test_recipe_resumes_on_another_world_size(tmp_path):
    first = launch(2, tmp_path, 4)
    losses = {int(s): float(v) for s, v in LOSS.findall(first)}
    assert sorted(losses) == [0, 1, 2, 3]
    assert (tmp_path / "step_2" / ".metadata").exists() and (tmp_path / "step_4" / ".metadata").exists()
    shutil.rmtree(tmp_path / "step_4")
    second = launch(3, tmp_path, 4)
    assert f"resumed from {tmp_path / 'step_2'} at step 2" in second
    resumed = {int(s): float(v) for s, v in LOSS.findall(second)}
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        assert abs(resumed[step] - losses[step]) <= 5e-5, (step, resumed[step], losses[step])
    assert (tmp_path / "step_4" / ".metadata").exists()
