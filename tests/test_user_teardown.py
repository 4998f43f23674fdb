"""Issue #23: a user's own script starts and ends its process group (pytorch/examples' FSDP2 style:
``destroy_process_group()`` with the sharded model still alive, or no destroy at all). Its gloo threads
used to run into interpreter shutdown, where one can abort the finished run ("terminate called without
an active exception", 3 of 60 runs). ``import zo_scale`` now installs an atexit teardown that frees the
group first: no group thread may be alive when shutdown begins. bench/stress_user_teardown.sh counts
the aborts themselves."""

import json

import pytest

from conftest import HELPERS, REPO, VENV_BIN, free_port, run_multiproc

USER_SCRIPT = REPO / "bench" / "user_fsdp2_loop.py"


@pytest.mark.multiproc
@pytest.mark.parametrize("ending", [[], ["--no-destroy"]], ids=["destroy_with_model_alive", "no_destroy"])
def test_user_started_group_is_freed_before_shutdown(ending):
    r = run_multiproc([VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                       "--master_port", str(free_port()), HELPERS / "threads_at_exit.py", USER_SCRIPT,
                       "--steps", "2", *ending], timeout=240)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"rank"')]
    assert len(rows) == 2, r.stdout + r.stderr
    assert all(row["alive_at_exit"] == [] for row in rows), rows
    assert "step 1 loss" in r.stdout
