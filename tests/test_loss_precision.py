"""Issue #23: a loss computed in bf16 (or otherwise too coarse to see a probe) defeats ZO silently;
each optimizer now warns once and names the fix (.float() the logits), FZOO's σ = 0 message first."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import zo_scale


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))

    def forward(self, x):
        return self.body(x)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 16, generator=g), torch.randint(0, 10, (64,), generator=g)


def bf16_loss(model):
    """The HelloDeepSpeed pattern: cross-entropy of bf16 logits, so the loss itself is bf16."""
    x, y = data()
    return lambda: F.cross_entropy(model(x).bfloat16(), y)


def fp32_loss(model):
    x, y = data()
    return lambda: F.cross_entropy(model(x).float(), y)


OPTIMIZERS = [
    (zo_scale.MeZO, {}),
    (zo_scale.HiZOO, {}),
    (zo_scale.HiZOOL, {}),
    (zo_scale.HELENE, {}),
    (zo_scale.FZOO, {"n_directions": 4}),
    (zo_scale.HELENEFZOO, {"n_directions": 4}),
]


@pytest.mark.parametrize("cls, kw", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
def test_bf16_loss_warns_once_naming_the_fix(cls, kw):
    model = Classifier()
    opt = cls(model, lr=1e-3, eps=1e-3, **kw)
    closure = bf16_loss(model)
    with pytest.warns(UserWarning) as record:
        for _ in range(3):
            opt.step(closure)
    said = [str(w.message) for w in record if "bfloat16" in str(w.message)]
    assert len(said) == 1, said
    assert said[0].startswith(f"zo_scale: {cls.__name__}:") and ".float() the logits" in said[0]


@pytest.mark.parametrize("cls, kw", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
def test_fp32_loss_does_not_warn(cls, kw):
    model = Classifier()
    opt = cls(model, lr=1e-3, eps=1e-3, **kw)
    closure = fp32_loss(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(closure)


def test_loss_rounded_before_it_reaches_the_optimizer_warns_after_a_few_flat_steps():
    """A bf16 loss handed over as a Python float (``.item()``) carries no dtype: every probe pair comes out
    equal, which is what the optimizer can see."""
    model = Classifier()
    opt = zo_scale.MeZO(model, lr=1e-3, eps=1e-5)  # a probe moves the loss by ~1e-5, its bf16 spacing is 2⁻⁶
    closure = bf16_loss(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: closure().item())
        opt.step(lambda: closure().item())
    with pytest.warns(UserWarning, match=r"exactly equal in 3 steps in a row.*\.float\(\) the logits"):
        opt.step(lambda: closure().item())
    assert opt.last_stats.loss_plus == opt.last_stats.loss_minus


def test_fzoo_sigma_zero_names_the_loss_precision_first():
    model = Classifier()
    opt = zo_scale.FZOO(model, lr=1e-3, eps=1e-5, n_directions=4)
    closure = bf16_loss(model)
    with pytest.warns(UserWarning, match="σ = 0") as record:
        opt.step(lambda: closure().item())
    msg = next(str(w.message) for w in record if "σ = 0" in str(w.message))
    assert opt.last_stats.skipped
    assert msg.index(".float() the logits") < msg.index("eps may be too small")
