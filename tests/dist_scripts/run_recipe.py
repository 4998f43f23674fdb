"""Run a docs/recipes script unchanged, as ``python recipe.py args...`` would, after importing
DeepSpeed the way the CPU tests do (``common.import_deepspeed``: without probing or JIT-building
its ops, which on CPU can wait minutes on another process's build of the shared-memory op)."""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.import_deepspeed()
recipe, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(recipe, run_name="__main__")
