"""bench/hessian_signal.py runs on the tiny model: its differentiable loss is the library's candidate
cross-entropy and HELENE with lr = 0 leaves the weights where they were (both asserted inside), and
every correlation lies in [-1, 1]."""

from __future__ import annotations

import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_hessian_signal_runs_on_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import hessian_signal

    out = tmp_path / "signal.json"
    assert hessian_signal.main(["--model", "tiny", "--steps", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["d"] == 64 and result["steps"] == 4
    corrs = [result["corr_h_a_h_b"], result["corr_m_a_m_b"], result["corr_mean_h_true_diag"],
             *result["corr_h_true_diag"], *result["corr_m_true_mean_grad"]]
    assert all(-1.0 <= c <= 1.0 for c in corrs)
    assert result["cv_z_noise_only"] > 0 and all(cv > 0 for cv in result["cv_h"])
