"""Issue #23: a misspelt optimizer option is a TypeError naming it and the accepted ones (as torch.optim),
for every optimizer and for a new one that declares its options the documented way."""

import pytest
import torch

import zo_scale
from zo_scale.config import optimizer_arg_names


def model():
    return torch.nn.Linear(4, 3)


@pytest.mark.parametrize(
    "cls, typo, meant",
    [
        (zo_scale.MeZO, "weight_decy", "weight_decay"),
        (zo_scale.FZOO, "n_direction", "n_directions"),
        (zo_scale.HiZOO, "hessian_smoth", "hessian_smooth"),
        (zo_scale.HiZOOL, "factored_min_dims", "factored_min_dim"),
        (zo_scale.HELENE, "beta_1", "beta1"),
        (zo_scale.HELENEFZOO, "anneal_horizn", "anneal_horizon"),  # its own option, beside FZOO's
    ],
)
def test_unknown_option_raises_type_error(cls, typo, meant):
    with pytest.raises(TypeError) as err:
        cls(model(), lr=1e-3, eps=1e-3, **{typo: 0.1})
    msg = str(err.value)
    assert msg.startswith(f"zo_scale: {cls.__name__} got an unexpected keyword argument {typo!r}")
    assert f"did you mean {meant!r}" in msg
    assert all(name in msg for name in ("lr", "eps", meant))


def test_inherited_options_are_accepted():
    opt = zo_scale.HiZOOL(model(), lr=1e-3, hessian_smooth=1e-6, weight_decay=0.1, factored_min_dim=3)
    assert opt.param_groups[0]["hessian_smooth"] == 1e-6 and opt.param_groups[0]["weight_decay"] == 0.1


class SignSGD(zo_scale.ZOOptimizer):
    """A new optimizer declared as the base class docstring says: keyword-only options, forwarded."""

    def __init__(self, model, *, lr: float, momentum: float = 0.0, **kwargs):
        super().__init__(model, lr=lr, momentum=momentum, **kwargs)


def test_a_new_optimizer_gets_the_check_and_the_config_keys():
    assert SignSGD(model(), lr=0.1, momentum=0.9).param_groups[0]["momentum"] == 0.9
    with pytest.raises(TypeError, match="'momentun' .*did you mean 'momentum'"):
        SignSGD(model(), lr=0.1, momentun=0.9)
    keys = optimizer_arg_names(SignSGD)
    assert {"lr", "eps", "momentum", "weight_decay"} <= set(keys) and "seed" not in keys
