"""Run a user-style script as ``__main__`` (``run_script.py SCRIPT ARGS...``) with DeepSpeed imported
for CPU tests first (``common.import_deepspeed``): otherwise ``deepspeed.initialize`` JIT-builds its
shared-memory all-reduce op, which gloo runs never use — minutes on a loaded machine, and forever
while another process's interrupted build leaves its lock file behind."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import import_deepspeed  # noqa: E402

import_deepspeed()
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
