"""Run a user's script (``threads_at_exit.py SCRIPT ARGS...``) and, as the last atexit hook, print one
JSON line: the process-group threads (gloo workers, TCPStore) still alive when interpreter shutdown
starts. Such a thread can abort the finished process ("terminate called without an active exception").

The hook is registered before the script imports anything, so it runs after every hook the script's
imports register (atexit runs last-registered first): it sees what shutdown will see.
"""

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

GROUP_THREADS = ("pt_gloo", "gloo_", "pt_tcpstore")  # as tests/helpers/dist_teardown.py


def report() -> None:
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    alive = sorted(n for n in names if n.startswith(GROUP_THREADS))
    os.write(1, (json.dumps({"rank": os.environ.get("RANK"), "alive_at_exit": alive}) + "\n").encode())


atexit.register(report)
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))
runpy.run_path(sys.argv[0], run_name="__main__")
