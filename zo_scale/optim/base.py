"""Step orchestration shared by every ZO optimizer: perturb, measure, reduce, update.

A step, for each SPSA sample j:  θ+εd_j → ℓ₊ⱼ,  θ−εd_j → ℓ₋ⱼ,  restore (fused with the update
for the last sample). d is z (or z/√H for HiZOO) regenerated from ``zo_scale.rng`` chunk by
chunk: no full-model temporaries. Losses are returned by the closure per rank as (sum, weight)
and reduced with one fp64 all-reduce; nothing else crosses ranks.

Subclasses define the state they keep, the direction they perturb along, the extra forwards they
need (HiZOO's ℓ₀) and the per-chunk update, which calls the pure math in ``updates.py``.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from zo_scale import probes, rng
from zo_scale.backends import detect as detect_backend
from zo_scale.optim.loss_precision import LossResolution
from zo_scale.optim.state_dict import GROUP_KEYS, is_torch_layout, load_torch_state_dict, name_group, torch_state_dict
from zo_scale.optim.updates import combined_direction
from zo_scale.shards import ShardView, fill_from_slices

STATE_FORMAT = "zo_scale.optimizer.v1"
FULL_PRECISION = (torch.float32, torch.float64)  # updated in place; anything else goes through fp32
# The probes move weights by up to 2·ε·|z| in fp32, and |z| < 8 (Box–Muller from 32-bit uniforms).
_MAX_EPS = torch.finfo(torch.float32).max / 16


def is_int_at_least(value, minimum: int) -> bool:
    """Whether an option is an integer >= ``minimum``; a bool is refused (True would pass as 1)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


class NonFiniteLossError(RuntimeError):
    """A ZO forward produced NaN/inf; parameters were restored before raising."""


@dataclass
class StepStats:
    step: int  # index of the step just taken (0-based)
    loss: float  # global mean loss of this step's probes, (ℓ₊ + ℓ₋)/2 averaged over samples
    loss_plus: float
    loss_minus: float
    proj_grad: float  # (ℓ₊ − ℓ₋)/(2ε), averaged over samples
    lr: float
    forward_passes: int  # total so far, this step included
    loss_zero: float | None = None
    skipped: bool = False
    extra: dict = field(default_factory=dict)  # optimizer-specific (HELENE: alpha, clip_fraction)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def _as_sum_and_weight(value, device) -> torch.Tensor:
    """A closure's result as a (sum, weight) fp64 pair: a scalar loss counts with weight 1."""
    if isinstance(value, (tuple, list)):
        loss_sum, weight = value
    else:
        loss_sum, weight = value, 1.0
    loss_sum = torch.as_tensor(loss_sum).detach().to(device=device, dtype=torch.float64).reshape(())
    weight = torch.as_tensor(weight).detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.stack([loss_sum, weight])


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: ``opt = Cls(model, lr=..., eps=..., seed=...)``, then ``loss = opt.step(closure)``.

    ``closure()`` runs a forward pass on this rank's current micro-batch and returns either a
    mean loss (weight 1) or ``(loss_sum, weight)`` (e.g. summed token losses and the token
    count): the optimizer forms the global weighted mean across data-parallel ranks.
    ``step`` returns the step's loss as a Python float (no ``.item()``).

    Options. An optimizer's options are the keyword-only parameters of its ``__init__`` and of
    every ZOOptimizer class above it (:meth:`options`). A subclass declares each of its own with
    a default, checks it, and forwards it by name to ``super().__init__(model, ..., name=value,
    **kwargs)``, which keeps it in ``param_groups[0]`` (saved in checkpoints) and passes ``kwargs``
    on. Anything that reaches this class under a name no class declares is a misspelt or foreign
    option: it raises ``TypeError`` naming it and the accepted ones, as ``torch.optim`` does. The
    run configuration (``zo_scale.config``) reads the same declarations, so a new optimizer needs
    nothing else to be configurable.
    """

    state_names: tuple[str, ...] = ()  # per-coordinate state kept by the subclass
    probes_loss_zero = False  # HiZOO needs ℓ₀ at the unperturbed point
    supports_n_samples = True

    def __init__(
        self,
        model,
        *,
        lr: float,
        eps: float = 1e-3,
        seed: int = 0,
        weight_decay: float = 0.0,
        n_samples: int = 1,
        master_weights: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
        chunk_size: int = 1 << 22,
        process_group=None,
        on_nonfinite: str = "raise",
        batched_probes: bool = False,
        **hparams,
    ):
        self._check_option_names(hparams)
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"zo_scale: lr must be finite and >= 0, got {lr}")
        # the probes move weights by up to 2·ε·z in fp32: beyond this bound the step itself overflows
        if not (0 < eps <= _MAX_EPS):
            raise ValueError(f"zo_scale: eps must be in (0, {_MAX_EPS:g}], got {eps}")
        if n_samples < 1 or (n_samples > 1 and not self.supports_n_samples):
            raise ValueError(f"zo_scale: {type(self).__name__} does not support n_samples={n_samples}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"zo_scale: on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if chunk_size < 1024 or chunk_size % 256:
            raise ValueError("zo_scale: chunk_size must be a multiple of 256 and at least 1024")
        self.backend = detect_backend(model)
        self.views: list[ShardView] = self.backend.shard_views()
        if not any(v.param.requires_grad for v in self.views):
            raise ValueError("zo_scale: the model has no parameters with requires_grad=True")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, **hparams)
        super().__init__([v.param for v in self.views], defaults)
        self.seed = int(seed)
        self.n_samples = n_samples
        self.chunk_size = chunk_size
        self.state_dtype = state_dtype
        self.process_group = process_group
        self.on_nonfinite = on_nonfinite
        self.batched_probes = bool(batched_probes)  # all probe groups in one forward (zo_scale.probes)
        self._probe_plan = None
        self.step_count = 0
        self.forward_passes = 0
        self.last_stats: StepStats | None = None
        self.loss_resolution = LossResolution(type(self).__name__)
        self._offset = 0  # current perturbation, in units of ε along the current direction
        self._sample = 0  # the sample whose direction that is
        if master_weights is None:  # an fp32 master wherever weights are low precision
            master_weights = any(v.local.dtype not in FULL_PRECISION for v in self.views)
        self.master_weights = master_weights
        self.shard_state: dict[str, dict[str, torch.Tensor]] = {}
        for v in self.views:
            st = {}
            if master_weights:
                st["master"] = v.local.detach().to(torch.float32).clone()
            for sname in self.state_names:
                t = self._init_state(sname, v)
                if t is not None:  # None: this view keeps that state in another form (HiZOO-L's factors)
                    st[sname] = t
            self.shard_state[v.name] = st
        self._expose_state()
        self.backend.attach(self)

    @classmethod
    def options(cls) -> dict[str, inspect.Parameter]:
        """The keyword options ``cls`` accepts, by name: the keyword parameters of ``__init__`` along
        its ZOOptimizer class chain, a subclass's declaration (and default) winning."""
        out = {}
        for klass in reversed(cls.__mro__):
            if not (isinstance(klass, type) and issubclass(klass, ZOOptimizer)):
                continue
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.kind is p.KEYWORD_ONLY:
                    out[name] = p
        return out

    def _check_option_names(self, hparams: dict) -> None:
        accepted = type(self).options()
        for name in hparams:
            if name not in accepted:
                close = difflib.get_close_matches(name, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(
                    f"zo_scale: {type(self).__name__} got an unexpected keyword argument {name!r}{hint}; "
                    f"it accepts {', '.join(sorted(accepted))}"
                )

    # ------------------------------------------------------------------ subclass hooks

    def _init_state(self, name: str, view: ShardView) -> torch.Tensor | None:
        return torch.zeros(view.numel, dtype=self.state_dtype, device=view.local.device)

    def _direction(self, view: ShardView, lo: int, hi: int, z: torch.Tensor) -> torch.Tensor:
        """The perturbation direction for this chunk (z, or z/√H for HiZOO)."""
        return z

    def _direction_hessian(self, view: ShardView) -> torch.Tensor | None:
        """For the fused kernels: the H whose z/√H is the direction (HiZOO), else None."""
        return None

    def _fused_update(self, view: ShardView, pgs, scalars, restore: float) -> torch.Tensor | None:
        """Restore + update of a whole shard by a fused kernel (see zo_scale.kernels)."""
        raise NotImplementedError

    def _before_update(self, losses: dict) -> dict:
        """Scalars the per-chunk update needs, from the reduced losses. Same on every rank."""
        return {}

    def _update_chunk(self, view, lo, hi, theta, zs, pgs, scalars) -> torch.Tensor | None:
        """Update fp32 ``theta`` (this chunk) in place; may return a count of clipped coords."""
        raise NotImplementedError

    def _extra_stats(self, scalars: dict, clipped: float, total: float) -> dict:
        return {}

    def _step_payload(self) -> torch.Tensor | None:
        """Extra fp64 numbers to sum over ranks in this step's loss all-reduce (one collective for both)."""
        return None

    def _take_payload(self, reduced: torch.Tensor) -> None:
        """The payload of ``_step_payload`` summed over ranks, before ``_before_update``."""

    # ------------------------------------------------------------------ z and perturbation

    def _stream(self, view: ShardView, sample: int) -> rng.ZStream:
        return rng.ZStream.make(self.seed, view.uid, self.step_count, sample)

    def _chunk_ranges(self, view: ShardView):
        for lo in range(0, view.numel, self.chunk_size):
            yield lo, min(lo + self.chunk_size, view.numel)

    def _z(self, view: ShardView, lo: int, hi: int, sample: int) -> torch.Tensor:
        return rng.draw_range(self._stream(view, sample), view.start + lo, hi - lo, device=view.local.device)

    def _uses_kernels(self, view: ShardView) -> bool:
        """Fused Triton kernels for this shard: on CUDA (or the CPU interpreter in tests)."""
        if self._kernels_ok is None:
            from zo_scale import kernels

            self._kernels_ok = kernels.available() and self._kernel_takes_samples(kernels)
        if not self._kernels_ok:
            return False
        from zo_scale import kernels

        st = self.shard_state[view.name].values()
        return (
            (view.local.is_cuda or kernels.interpreter_enabled())
            and view.local.dtype in kernels.DTYPES
            and all(t.dtype in kernels.DTYPES for t in st)
        )

    _kernels_ok: bool | None = None

    def _kernel_takes_samples(self, kernels) -> bool:
        """Whether the fused update takes this many samples (their coefficients are scalar arguments)."""
        return self.n_samples <= kernels.MAX_SAMPLES

    def _move_to(self, offset: int, sample: int) -> None:
        """Set the weights to θ + offset·ε·d_sample (master: written fresh; else: moved in place).

        Weights without a master that sit along another sample's direction (FZOO's one-sided probes
        go from +εu_i straight to +εu_j) leave it in the same pass: two legs, old and new."""
        eps = self.param_groups[0]["eps"]
        if self._offset and sample != self._sample:
            legs = [(self._sample, -self._offset), (sample, offset)]
        else:
            legs = [(sample, offset - self._offset)]
        legs = [(s, k) for s, k in legs if k]
        self.backend.prepare_edit()
        fused = {True: [], False: []}  # shards for the fused kernels, by whether they have a master
        for view in self.views:
            master = self.shard_state[view.name].get("master")
            if self._uses_kernels(view):
                fused[master is not None].append((view, master, self._direction_hessian(view)))
                continue
            for lo, hi in self._chunk_ranges(view):
                local = view.local[lo:hi]
                if master is not None:
                    # cast(master ± εd) instead of accumulating: the restore is exact
                    if offset == 0:
                        local.copy_(master[lo:hi])
                    else:
                        d = self._direction(view, lo, hi, self._z(view, lo, hi, sample))
                        local.copy_(master[lo:hi] + (offset * eps) * d)
                    continue
                for s, k in legs:
                    d = self._direction(view, lo, hi, self._z(view, lo, hi, s))
                    local.add_(d.to(local.dtype), alpha=k * eps)
        if fused[True] or fused[False]:
            from zo_scale import kernels

            # small shards share launches (kernels.perturb_shards_); a master is written fresh at the
            # absolute offset, weights without one move leg by leg
            kernels.perturb_shards_(
                [(v.local, m, h, self._stream(v, sample), v.start) for v, m, h in fused[True]], offset * eps
            )
            for s, k in legs:
                kernels.perturb_shards_([(v.local, m, h, self._stream(v, s), v.start) for v, m, h in fused[False]], k * eps)
        self.backend.finish_edit()
        self._offset, self._sample = offset, sample

    # ------------------------------------------------------------------ the step

    def _forward(self, closure: Callable) -> torch.Tensor:
        module = self.backend.eval_module()
        module.eval()  # ZO forwards: no dropout
        with torch.no_grad():
            out = closure()
        self.forward_passes += 1
        self.loss_resolution.check_value(out)
        return _as_sum_and_weight(out, self.backend.loss_device())

    # ------------------------------------------------------------------ batched probes

    def _probe_groups(self) -> list[probes.ProbeGroup]:
        """The step's probe points in the order of its losses: [θ,] then +εd_j, −εd_j per sample."""
        groups = [probes.ProbeGroup(0.0)] if self.probes_loss_zero else []
        for j in range(self.n_samples):
            groups += [probes.ProbeGroup(+1.0, j), probes.ProbeGroup(-1.0, j)]
        return groups

    def _gathered_direction(self, view: ShardView, lo: int, hi: int, z: torch.Tensor) -> torch.Tensor:
        """The direction on global elements [lo, hi) of a gathered parameter (``_direction`` is shard-local)."""
        return z

    def _add_gathered_direction_(self, view: ShardView, flat: torch.Tensor, group: probes.ProbeGroup) -> None:
        """``flat`` (the whole parameter, as the engine gathered it) += scale·ε·d_sample, in chunks. A
        structured direction (ZO-Muon's P·U) overrides this."""
        stream = self._stream(view, group.sample)
        alpha = group.scale * self.param_groups[0]["eps"]
        if self._uses_kernels(view) and flat.dtype == view.local.dtype:
            from zo_scale import kernels

            # z generated in the kernel: one read and one write of the copy (H is whole: see HiZOO)
            kernels.perturb_(flat, stream, 0, alpha, hess=self._direction_hessian(view))
            return
        chunks = (
            (lo, hi, self._gathered_direction(view, lo, hi, rng.draw_range(stream, lo, hi - lo, device=flat.device)))
            for lo in range(0, view.global_numel, self.chunk_size)
            for hi in [min(lo + self.chunk_size, view.global_numel)]
        )
        probes.add_direction_(flat, alpha, chunks)

    def _batched_forward(self, closure: Callable) -> list[torch.Tensor]:
        """Every probe group's (sum, weight) from one ``closure(groups)`` forward (``zo_scale.probes``)."""
        if not probes.takes_groups(closure):
            raise TypeError(
                "zo_scale: batched_probes=True calls closure(groups): run the micro-batch repeated `groups` times "
                "along dim 0 (zo_scale.probes.replicate) and return one loss per group (zo_scale.probes.group_sums)"
            )
        groups = self._probe_groups()
        self.backend.prepare_edit()  # FSDP2 / ZeRO-3 drop gathered copies: the pass gathers each unit once
        if self._probe_plan is None:
            self._probe_plan = probes.ProbePass.plan(self.backend.module, self.views)
        module = self.backend.eval_module()
        module.eval()  # ZO forwards: no dropout
        with probes.ProbePass(*self._probe_plan, groups, self._add_gathered_direction_), torch.no_grad():
            out = closure(len(groups))
        self.forward_passes += len(groups)
        return probes.group_pairs(out, len(groups), self.backend.loss_device())

    def _reduce(self, pairs: list[torch.Tensor]) -> list[float]:
        """Global weighted means of this step's losses: one fp64 all-reduce of a few scalars (and of
        the subclass's payload, if any, in the same call)."""
        payload = self._step_payload()
        n_loss = 2 * len(pairs)
        if payload is not None:
            pairs = pairs + [payload.to(device=pairs[0].device, dtype=torch.float64)]
        flat = torch.cat(pairs)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(flat, group=self.process_group)
        if payload is not None:
            self._take_payload(flat[n_loss:])
        vals = flat[:n_loss].view(-1, 2).tolist()
        return [s / w if w > 0 else float("nan") for s, w in vals]

    @torch.no_grad()
    def step(self, closure: Callable) -> float:
        if closure is None:
            raise ValueError("zo_scale: ZO optimizers need a closure that runs a forward pass and returns the loss")
        group = self.param_groups[0]
        eps = group["eps"]
        if self.batched_probes:
            vals = self._reduce(self._batched_forward(closure))
        else:
            pairs = []
            if self.probes_loss_zero:
                pairs.append(self._forward(closure))
            for j in range(self.n_samples):
                self._move_to(+1, j)
                pairs.append(self._forward(closure))
                self._move_to(-1, j)
                pairs.append(self._forward(closure))
                if j < self.n_samples - 1:
                    self._move_to(0, j)
            vals = self._reduce(pairs)
        loss_zero = vals[0] if self.probes_loss_zero else None
        pm = vals[1:] if self.probes_loss_zero else vals
        plus, minus = pm[0::2], pm[1::2]
        pgs = [(a - b) / (2.0 * eps) for a, b in zip(plus, minus)]
        stats = StepStats(
            step=self.step_count,
            loss=sum(plus + minus) / (2 * self.n_samples),
            loss_plus=sum(plus) / self.n_samples,
            loss_minus=sum(minus) / self.n_samples,
            proj_grad=sum(pgs) / self.n_samples,
            lr=group["lr"],
            forward_passes=self.forward_passes,
            loss_zero=loss_zero,
        )
        if not all(math.isfinite(x) for x in vals):
            self._move_to(0, self.n_samples - 1)
            if self.on_nonfinite == "raise":
                raise NonFiniteLossError(
                    f"zo_scale: non-finite loss at step {self.step_count} "
                    f"(l+={plus}, l-={minus}, l0={loss_zero}); parameters restored"
                )
            stats.skipped = True
        else:
            self.loss_resolution.check_step(all(a == b for a, b in zip(plus, minus)))
            try:
                scalars = self._before_update({"plus": plus, "minus": minus, "zero": loss_zero, "proj_grads": pgs})
            except Exception:
                self._move_to(0, self.n_samples - 1)  # never leave the weights perturbed
                raise
            clipped, total = self._restore_and_update(pgs, scalars)
            stats.extra = self._extra_stats(scalars, clipped, total)
        self.step_count += 1
        self.last_stats = stats
        return stats.loss

    def _restore_and_update(self, pgs: list[float], scalars: dict) -> tuple[float, float]:
        """One pass: restore θ from −εd to θ, then apply the update — z generated once."""
        restore = -self._offset * self.param_groups[0]["eps"]
        counts = []  # clipped-coordinate counts, kept on the device until the end (no syncs)
        self.backend.prepare_edit()
        for view in self.views:
            if self._uses_kernels(view):
                counts.append(self._fused_update(view, pgs, scalars, restore))
            else:
                counts.extend(self._torch_update(view, pgs, scalars, restore))
        self.backend.finish_edit()
        self.backend.after_update()
        self._offset = 0
        total = float(sum(v.numel for v in self.views))
        if not self.reports_clipping:
            return 0.0, total
        device = self.backend.loss_device()
        clipped = sum((c.to(device, torch.float64) for c in counts if c is not None), torch.zeros((), dtype=torch.float64, device=device))
        both = torch.stack([clipped, torch.tensor(total, dtype=torch.float64, device=device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(both, group=self.process_group)
        clipped_f, total = both.tolist()
        return clipped_f, total

    reports_clipping = False

    def _torch_update(self, view: ShardView, pgs: list[float], scalars: dict, restore: float) -> list:
        """Restore + update of one shard, chunk by chunk, by ``_update_chunk`` (z regenerated per chunk)."""
        last = self.n_samples - 1
        master = self.shard_state[view.name].get("master")
        counts = []
        for lo, hi in self._chunk_ranges(view):
            local = view.local[lo:hi]
            zs = [self._z(view, lo, hi, j) for j in range(self.n_samples)]
            if master is not None:
                theta = master[lo:hi]  # the master never saw the perturbation
            else:  # fp32/fp64 in place; low precision without master goes through fp32 (lossy)
                theta = local if local.dtype in FULL_PRECISION else local.float()
                if restore:  # batched probes leave the weights at θ
                    theta.add_(self._direction(view, lo, hi, zs[last]), alpha=restore)
            counts.append(self._update_chunk(view, lo, hi, theta, zs, pgs, scalars))
            if theta is not local:
                local.copy_(theta)
        return counts

    # ------------------------------------------------------------------ helpers for subclasses

    def _grad_dir(self, zs: list[torch.Tensor], pgs: list[float], dtype: torch.dtype) -> torch.Tensor:
        """The ZO gradient estimate on this chunk, in ``dtype``: mean over samples of pg_j·z_j."""
        return combined_direction(zs, [pg / len(zs) for pg in pgs], dtype)

    def _decays(self, view: ShardView) -> bool:
        """Weight decay skips 1-D tensors (biases, norms) unless ``decay_1d`` is set."""
        return self.param_groups[0].get("decay_1d", False) or len(view.global_shape) >= 2

    # ------------------------------------------------------------------ checkpoints
    # Two layouts (see zo_scale/optim/state_dict.py): torch's, for DCP and torch-style code, where the
    # backend can lay state out like its parameters; and the flat-range one, on every backend.

    layout_options = ("master_weights",)  # options that change which state tensors a parameter has

    def _param_state(self, view: ShardView) -> dict[str, torch.Tensor]:
        """torch's ``state[param]``: this parameter's state tensors laid out like it (views, no copies)."""
        return {name: self.backend.state_layout(view, t) for name, t in self.shard_state[view.name].items()}

    def _expose_state(self) -> None:
        """What torch-style code reads: ``self.state[param]`` and the ``zo_*`` entries of the group."""
        for v in self.views:
            self.state[v.param] = self._param_state(v)
        name_group(self)

    def state_dict(self) -> dict:
        """torch's layout (``state`` / ``param_groups``, DTensor state on FSDP2; the optimizer's own
        tensors, as torch optimizers return theirs) where the backend has one, else (ZeRO-3, FSDP1) the
        flat-range format of :meth:`flat_state_dict`."""
        if self.backend.dcp_native:
            return torch_state_dict(self)
        return self.flat_state_dict()

    def checkpoint_ranges(self) -> dict[str, tuple[int, int]]:
        """The global flat range of each parameter whose saved state this rank loads: its shard's
        (``zo_scale.checkpoint.load_optimizer_state`` opens the files that overlap these)."""
        return {v.name: (v.start, v.end) for v in self.views if v.numel > 0}

    def load_state_dict(self, state_dict) -> None:
        """Load either layout (a list of flat-range pieces too), saved on any world size or backend."""
        if is_torch_layout(state_dict):
            load_torch_state_dict(self, state_dict)
        else:
            self.load_flat_state_dict(state_dict)

    def flat_state_dict(self) -> dict:
        """This rank's state (copies), keyed by (parameter name, global flat range)."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params" and k not in GROUP_KEYS}
        return {
            "format": STATE_FORMAT,
            "optimizer": type(self).__name__,
            "step": self.step_count,
            "forward_passes": self.forward_passes,
            "seed": self.seed,
            "hparams": group,
            "shards": {
                v.name: {
                    "start": v.start,
                    "end": v.end,
                    "global_numel": v.global_numel,
                    "tensors": {k: t.detach().clone() for k, t in self.shard_state[v.name].items()},
                }
                for v in self.views
            },
        }

    def load_flat_state_dict(self, state_dict) -> None:
        """Load flat-range state saved by this optimizer on any world size or backend.

        Accepts one state dict or a list of them (one per saving rank); each local view takes
        its global range from whichever pieces overlap it and checks it is fully covered.
        """
        pieces = state_dict if isinstance(state_dict, (list, tuple)) else [state_dict]
        head = pieces[0]
        if head.get("format") != STATE_FORMAT or head.get("optimizer") != type(self).__name__:
            raise ValueError(
                f"zo_scale: cannot load a {head.get('optimizer')!r} state ({head.get('format')!r}) "
                f"into {type(self).__name__}"
            )
        if head["seed"] != self.seed:
            raise ValueError(f"zo_scale: checkpoint seed {head['seed']} differs from optimizer seed {self.seed}")
        self.step_count = head["step"]
        self.forward_passes = head["forward_passes"]
        self.param_groups[0].update(head["hparams"])
        for v in self.views:
            for sname, dest in self.shard_state[v.name].items():
                _fill_from_pieces(dest, v, sname, pieces)
        self._after_state_load()

    def _after_state_load(self) -> None:
        if self.master_weights:  # weights must equal cast(master) for the restore to stay exact
            self.backend.prepare_edit()  # ZeRO-3 / FSDP2 may hold gathered copies that would hide it
            for v in self.views:
                v.local.copy_(self.shard_state[v.name]["master"])
            self.backend.finish_edit()
        self._offset = 0


# A flat-range piece holds the ranges its rank saved. dcp.save keeps ONE copy of a plain tensor that
# every rank saves under the same key, so a flat-range state saved through DCP holds one rank's only.
_MISSING_PIECES = (
    "pieces of other ranks are missing: pass every rank's state (zo_scale.checkpoint.load_optimizer_state "
    "does); through torch.distributed.checkpoint, which keeps one rank's copy of plain tensors, save "
    "opt.state_dict() of an FSDP2 or plain model (DTensor state) instead of a flat-range state"
)


def _fill_from_pieces(dest: torch.Tensor, view: ShardView, sname: str, pieces: list[dict]) -> None:
    entries = (sd["shards"].get(view.name) for sd in pieces)
    slices = [(e["start"], e["global_numel"], e["tensors"][sname]) for e in entries if e and sname in e["tensors"]]
    fill_from_slices(dest, view, slices, f"{view.name}/{sname}", hint=_MISSING_PIECES)
