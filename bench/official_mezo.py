"""The MeZO baseline as the official code writes it (princeton-nlp/MeZO, trainer.py), for timing.

Each pass reseeds torch's global generator and draws z with ``torch.normal`` for every
parameter, then rebuilds ``param.data`` out of place: +ε, −2ε, +ε (restore), update — four
passes, each materialising z and several full-size temporaries per tensor.
"""

from __future__ import annotations

import torch


def _no_decay(name: str) -> bool:
    return "bias" in name or "layer_norm" in name or "layernorm" in name


class OfficialMeZO:
    def __init__(self, model: torch.nn.Module, *, lr: float, eps: float, weight_decay: float = 0.0, seed: int = 0):
        self.model, self.lr, self.eps, self.wd = model, lr, eps, weight_decay
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.seed = seed
        self.step_count = 0

    @torch.no_grad()
    def perturb(self, scaling_factor: float) -> None:
        torch.manual_seed(self.seed)
        for _, p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scaling_factor * z * self.eps

    @torch.no_grad()
    def update(self, projected_grad: float) -> None:
        torch.manual_seed(self.seed)
        for name, p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            if _no_decay(name):
                p.data = p.data - self.lr * (projected_grad * z)
            else:
                p.data = p.data - self.lr * (projected_grad * z + self.wd * p.data)

    @staticmethod
    def _forward(closure) -> torch.Tensor:
        with torch.inference_mode():  # as zo_forward there; the perturbations run under no_grad
            return closure().detach()

    def step(self, closure) -> float:
        self.seed = 1_000_003 * self.step_count + 17  # a fresh seed per step, as np.random.randint there
        self.model.eval()
        self.perturb(1)
        loss1 = self._forward(closure)
        self.perturb(-2)
        loss2 = self._forward(closure)
        projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
        self.perturb(1)
        self.update(projected_grad)
        self.step_count += 1
        return float(loss1)
