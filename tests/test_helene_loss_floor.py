"""Issue #23: HELENE with a loss that can be negative. hessian_scale='loss' is c = 1/(2(ℓ − ℓ*)), the
Gauss–Newton scale of ℓ = ℓ* + ½r², with ℓ* = loss_floor (0 by default: unchanged for positive losses).
A loss shifted below zero, with its floor shifted alike, trains as the positive loss does; without a
floor the error says what to set."""

import math
import sys
from pathlib import Path

import pytest

import zo_scale
from zo_scale.config import ConfigError, config_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from helene_toy import LayeredQuadratic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_config import _cfg  # noqa: E402

SHIFT = 200.0  # the toy starts at ℓ ≈ 126: shifted, every loss of the run is negative
FORWARDS, LR = 600, 0.03  # bench/helene_toy.py's best lr for the default HELENE


def final_log_loss(shift: float, **kw) -> float:
    model = LayeredQuadratic()
    opt = zo_scale.HELENE(model, lr=LR, eps=1e-4, seed=0, **kw)
    while opt.forward_passes < FORWARDS:
        opt.step(lambda: model() - shift)
    return math.log10(model().item())


def test_shifted_negative_loss_with_its_floor_trains_like_the_positive_loss():
    start = math.log10(LayeredQuadratic()().item())
    positive = final_log_loss(0.0)
    shifted = final_log_loss(SHIFT, loss_floor=-SHIFT)
    assert positive < start - 2.5  # the default makes real progress here ...
    assert shifted == pytest.approx(positive, abs=0.1)  # ... and so does the shifted loss with its floor


def test_loss_below_the_floor_names_what_to_set():
    model = LayeredQuadratic()
    opt = zo_scale.HELENE(model, lr=LR, eps=1e-4, seed=0)
    with pytest.raises(ValueError) as err:
        opt.step(lambda: model() - SHIFT)
    msg = str(err.value)
    assert "set loss_floor to the lowest value your loss can take (below -74.4" in msg
    assert "fixed hessian_scale such as 0.00672" in msg  # 1/(2|ℓ|) at ℓ ≈ -74.43
    with pytest.raises(ValueError, match="loss_floor must be a finite number"):
        zo_scale.HELENE(model, lr=LR, loss_floor=math.nan)


def test_accuracy_objective_config_takes_the_floor():
    with pytest.raises(ConfigError, match="set optimizer.loss_floor to -1"):
        config_from_dict(_cfg(task__objective="accuracy"))
    config_from_dict(_cfg(task__objective="accuracy", optimizer__loss_floor=-1))
