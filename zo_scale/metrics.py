"""What a run writes about itself: ``metrics.jsonl`` (one JSON object per line), memory readings, the
``summary.json`` of a finished run, and a PNG of loss and dev metric over forward passes.

Records carry a ``"type"``: ``"step"`` (loss, projected gradient, lr, forward passes so far,
tokens/s, step time, memory), ``"eval"`` (split, step, forward passes, metrics) or ``"event"``.
Only rank 0 writes. A resumed run truncates the file to the offset saved with its checkpoint, so
the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
from pathlib import Path

import torch


class MetricsLog:
    def __init__(self, path: Path, enabled: bool, resume_offset: int | None = None):
        self.path, self.enabled = Path(path), enabled
        self._f = None
        if not enabled:
            return
        if resume_offset is None:
            self._f = open(self.path, "w")
        else:
            self._f = open(self.path, "r+" if self.path.exists() else "w")
            self._f.truncate(resume_offset)
            self._f.seek(resume_offset)

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record, default=_json_default, allow_nan=False) + "\n")
            self._f.flush()

    def offset(self) -> int:
        return self._f.tell() if self._f is not None else 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.item()
    return str(x)


def finite_or_none(x):
    """JSON has no NaN/inf: write null instead."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Memory


def memory_mb() -> dict:
    """Resident memory now and at its peak (this process), and CUDA's peak allocation if any."""
    out = {"rss_mb": _current_rss_mb(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Summary and plot


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("zo_scale", "transformers", "peft", "deepspeed", "accelerate"):
        mod = sys.modules.get(name)
        if mod is None and name in ("zo_scale", "transformers"):
            mod = __import__(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot(metrics_path: Path, png_path: Path, title: str = "") -> None:
    """Training loss (and dev metric, on a second axis) against forward passes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = [r for r in records if r.get("type") == "step" and r.get("loss") is not None]
    evals = [r for r in records if r.get("type") == "eval" and r.get("split") == "dev"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if steps:
        ax.plot([r["forward_passes"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.5, color="C0",
                label="train loss")
        smooth = _ema([r["loss"] for r in steps], 0.9)
        ax.plot([r["forward_passes"] for r in steps], smooth, lw=1.6, color="C0", label="train loss (EMA)")
    ax.set_xlabel("forward passes")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if evals:
        name = next(iter(evals[0]["metrics"]), None)  # evaluation puts the task's primary metric first
        if name is not None:
            ax2 = ax.twinx()
            ax2.plot([r["forward_passes"] for r in evals], [r["metrics"][name] for r in evals], "o-", color="C3",
                     label=f"dev {name}")
            ax2.set_ylabel(f"dev {name}")
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = Path(f"{png_path}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


def _ema(values, beta):
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out
