"""bench/step_bench.py: the --tiny CPU smoke run and the bytes each pass must move."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_tiny_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "tiny.json"
    env_cmd = [sys.executable, str(BENCH / "step_bench.py"), "--tiny", "--device", "cpu", "--repeats", "2",
               "--out", str(out)]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "copy bandwidth" in proc.stdout and "official-mezo" in proc.stdout
    res = json.loads(out.read_text())
    assert res["copy_bw"] > 0
    (m,) = res["models"]
    assert m["model"] == "tiny" and (m["batch"], m["seq"]) == (2, 32) and m["forward_ms"] > 0
    assert set(m["steps"]) == {"mezo", "hizoo", "helene", "official-mezo"}
    assert all(s["ms"] > 0 for s in m["steps"].values())
    names = [p["pass"] for p in m["passes"]]
    assert "helene update" in names and "official torch.normal perturb" in names
    assert all(p["zo_scale_ms"] > 0 and p["floor_ms"] > 0 for p in m["passes"] if p["bytes"])


def test_pass_bytes():
    sys.path.insert(0, str(BENCH))
    try:
        import step_bench as sb
    finally:
        sys.path.remove(str(BENCH))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False)).to(torch.bfloat16)
    n = 64
    mezo = sb.MeZO(model, lr=0.0)
    assert sb.pass_bytes(mezo, "perturb") == n * 6  # read 4 B master, write 2 B weight
    assert sb.pass_bytes(mezo, "update") == n * 10  # master read + write, weight write
    hizoo = sb.HiZOO(model, lr=0.0)
    assert sb.pass_bytes(hizoo, "perturb") == n * 10  # + read 4 B H
    assert sb.pass_bytes(hizoo, "update") == n * 18  # + H read + write
    helene = sb.HELENE(model, lr=0.0, state_dtype=torch.bfloat16)
    assert sb.pass_bytes(helene, "update") == n * (10 + 2 * 2 * 2)  # m and h: bf16 read + write
    fp32 = torch.nn.Linear(8, 8, bias=False)
    assert sb.pass_bytes(sb.MeZO(fp32, lr=0.0), "perturb") == n * 8  # in place: read + write 4 B
    assert sb.pass_bytes(sb.MeZO(fp32, lr=0.0), "update") == n * 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the full benchmark needs a GPU")
def test_gpu_bench_opt125m(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "step_bench.py"), "--models", "opt-125m", "--repeats", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(out.read_text())["models"][0]
    assert m["inference_peak_bytes"] and all("peak_bytes" in s or "skipped" in s for s in m["steps"].values())
