"""Batched probes: every probe point of a step evaluated in one forward, one pass over the gathered layers.

A probe group is a point at which a step measures the loss: θ (ℓ₀), θ ± ε·z_j (SPSA), θ + ε·u_i (FZOO),
θ + ε·P·U_i (ZO-Muon). Sequentially, each group is one forward, and on FSDP2 / ZeRO-3 each forward
gathers the whole model again. Batched (``batched_probes=True``):

* the closure is called once as ``closure(groups)``: it runs its micro-batch repeated ``groups`` times
  along dim 0 (``replicate``) and returns one loss per group (``group_sums``);
* while that forward runs, every module that holds trainable parameters of its own (Linear,
  Embedding, norms: by the time its forward starts the engine has gathered them) is called once, as
  usual, so the engine gathers each unit once; inside, it runs its body once per group on that group's
  rows, with its own parameters replaced by W + scale·ε·d built from the gathered W. One module's
  perturbed copy exists at a time;
* d over the parameter's whole flat range comes from the optimizer (``_add_gathered_direction_``),
  drawn from the same counter-based stream as the shard-local path, so every rank forms the same weights;
  a tied weight is one view, hence one d, wherever it is used.

A module whose own parameters are used outside any leaf module (a container holding a parameter that
no leaf shares) runs its whole body once per group, its children in that group's weights: still exact,
but engine units inside it are then gathered once per group. Modules with parameters must see the batch
along dim 0, as in Hugging Face decoder and encoder models.

Precision: a group's weights are cast(W + scale·ε·d) from the gathered W (bf16 for a bf16 model), where the
sequential path writes cast(master + ε·d) from the fp32 master and moves fp32 weights leg by leg; losses
agree to rounding (fp32: ~1e-6 relative; bf16: the bf16 rounding of the perturbed weights).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

FULL_PRECISION = (torch.float32, torch.float64)


@dataclass(frozen=True)
class ProbeGroup:
    """The weights θ + scale·ε·d_sample (scale 0: θ itself)."""

    scale: float
    sample: int = 0


def replicate(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """``tensor`` repeated ``groups`` times along dim 0: group g's rows are ``[g·B, (g+1)·B)``."""
    return tensor.repeat(groups, *([1] * (tensor.dim() - 1)))


def group_sums(values: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-row values of a replicated batch (rows along dim 0) summed per group: shape ``(groups,)``."""
    return values.reshape(groups, -1).sum(1)


def takes_groups(closure: Callable) -> bool:
    """Whether ``closure`` can be called with the group count as its one positional argument."""
    try:
        params = list(inspect.signature(closure).parameters.values())
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def group_pairs(out, groups: int, device) -> list[torch.Tensor]:
    """A batched closure's result — ``(sums, weights)`` with one entry per group (weights may be one
    number shared by all groups) or one mean loss per group — as fp64 (sum, weight) pairs."""
    sums, weights = out if isinstance(out, (tuple, list)) else (out, 1.0)
    sums = torch.as_tensor(sums).detach().to(device=device, dtype=torch.float64).reshape(-1)
    weights = torch.as_tensor(weights).detach().to(device=device, dtype=torch.float64).reshape(-1)
    if sums.numel() != groups or weights.numel() not in (1, groups):
        raise ValueError(
            f"zo_scale: with batched_probes the closure must return one loss per group ({groups}), "
            f"got {sums.numel()} losses and {weights.numel()} weights"
        )
    weights = weights.expand(groups)
    return [torch.stack([s, w]) for s, w in zip(sums, weights)]


# ---------------------------------------------------------------------------------------------
# which module perturbs which parameter


@dataclass
class _Holder:
    module: torch.nn.Module
    params: list[tuple[str, object]]  # (attribute name, ShardView) of the module's own trainable parameters


def _holders(root: torch.nn.Module, views) -> list[_Holder]:
    """Modules to wrap: each leaf holding a trainable parameter, and each container holding one that no
    leaf shares (a tied parameter registered on a container and a leaf is perturbed at the leaf)."""
    by_param = {id(v.param): v for v in views}
    own = {}
    for m in root.modules():
        ps = [(n, by_param[id(p)]) for n, p in m._parameters.items() if p is not None and id(p) in by_param]
        if ps:
            own[m] = ps
    leaves = {m for m in own if not any(c in own for c in m.modules() if c is not m)}
    at_leaves = {id(v) for m in leaves for _, v in own[m]}
    return [_Holder(m, ps) for m, ps in own.items() if m in leaves or any(id(v) not in at_leaves for _, v in ps)]


# ---------------------------------------------------------------------------------------------
# splitting a module call by group


def _split(name: str, args, kwargs, groups: int, unit: int) -> list[tuple]:
    """Each group's share of a module call: every tensor argument cut into ``groups`` blocks of rows
    along dim 0; its rows must be a multiple of ``unit`` (groups × the rows per group seen first)."""
    leaves, spec = tree_flatten((args, kwargs))
    per_group = [list(leaves) for _ in range(groups)]
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            continue  # shared by every group
        if x.size(0) % unit:
            raise ValueError(
                f"zo_scale: batched probes: module {name!r} got a tensor of {x.size(0)} rows, not a multiple of the "
                f"{groups} probe groups x {unit // groups} rows per group (the batch must be along dim 0)"
            )
        for g, part in enumerate(x.chunk(groups)):
            per_group[g][i] = part
    return [tree_unflatten(p, spec) for p in per_group]


def _join(outputs: list):
    flat = [tree_flatten(o) for o in outputs]
    leaves, spec = flat[0]
    joined = [
        torch.cat([f[0][i] for f in flat]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
        for i, x in enumerate(leaves)
    ]
    return tree_unflatten(joined, spec)


class ProbePass:
    """While entered, a forward of the model evaluates every group: ``with ProbePass(...): closure(G)``.

    ``perturb_(view, flat, group)`` adds ``group``'s perturbation to ``flat``, a fresh copy of the whole
    gathered parameter (flat, its engine dtype), in place."""

    def __init__(self, holders: list[_Holder], names: dict, groups: list[ProbeGroup], perturb_: Callable):
        self.holders, self.names, self.groups, self.perturb_ = holders, names, groups, perturb_
        self.active: ProbeGroup | None = None  # set while a container runs one group's body
        self.unit: int | None = None  # rows every split tensor is a multiple of: groups × the first call's rows per group
        self._saved: list[tuple[torch.nn.Module, object]] = []

    @staticmethod
    def plan(root: torch.nn.Module, views) -> tuple[list[_Holder], dict]:
        """The modules to wrap (computed once per optimizer; needs the model's sharded parameters)."""
        holders = _holders(root, views)
        names = {id(m): n for n, m in root.named_modules()}
        return holders, names

    def __enter__(self):
        for h in self.holders:
            self._saved.append((h.module, h.module.__dict__.get("forward")))
            h.module.forward = self._wrap(h, h.module.forward)
        return self

    def __exit__(self, *exc):
        for module, prev in reversed(self._saved):
            if prev is None:
                del module.forward
            else:
                module.forward = prev
        self._saved = []
        self.active = None
        return False

    def _weights(self, h: _Holder, group: ProbeGroup) -> dict[str, torch.Tensor]:
        out = {}
        for attr, view in h.params:
            gathered = h.module._parameters[attr]
            if gathered.numel() != view.global_numel:
                raise RuntimeError(
                    f"zo_scale: batched probes: {view.name} has {gathered.numel()} of {view.global_numel} elements "
                    "when its module runs (not gathered by the engine at this module?)"
                )
            w = gathered.detach().clone(memory_format=torch.contiguous_format)
            self.perturb_(view, w.view(-1), group)
            out[attr] = w
        return out

    def _run(self, h: _Holder, forward, group: ProbeGroup, args, kwargs):
        if group.scale == 0:
            return forward(*args, **kwargs)
        params = h.module._parameters
        saved = {attr: params[attr] for attr, _ in h.params}
        params.update(self._weights(h, group))
        try:
            return forward(*args, **kwargs)
        finally:
            params.update(saved)

    def _wrap(self, h: _Holder, forward):
        def batched_forward(*args, **kwargs):
            if self.active is not None:  # inside a container's per-group body: that group only
                return self._run(h, forward, self.active, args, kwargs)
            outs = []
            if self.unit is None:  # the first module of the forward fixes the rows per group
                rows = [x.size(0) for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor) and x.dim()]
                if rows and rows[0] % len(self.groups) == 0:
                    self.unit = rows[0]
            unit = self.unit or len(self.groups)
            parts = _split(self.names.get(id(h.module), "?"), args, kwargs, len(self.groups), unit)
            for group, (a, kw) in zip(self.groups, parts):
                self.active = group
                try:
                    outs.append(self._run(h, forward, group, a, kw))
                finally:
                    self.active = None
            return _join(outs)

        return batched_forward


def add_direction_(flat: torch.Tensor, alpha: float, direction_chunks) -> None:
    """``flat += alpha·d`` chunk by chunk, ``direction_chunks`` yielding (lo, hi, d[lo:hi] in fp32);
    low-precision weights go through fp32 and are cast once, as the sequential path's master."""
    for lo, hi, d in direction_chunks:
        seg = flat[lo:hi]
        if seg.dtype in FULL_PRECISION:
            seg.add_(d.to(seg.dtype), alpha=alpha)
        else:
            seg.copy_(seg.float().add_(d, alpha=alpha))
