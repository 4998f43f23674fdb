"""HiZOO-L: HiZOO with its Hessian kept in Adafactor-like low-rank form (Zhao et al., 2025, the
memory-lean variant; no public code — reconstructed here, every choice below documented).

HiZOO keeps a full diagonal H (init 1), perturbs along z/√H and updates
    H ← (1−α)·H + α·|ℓ₊+ℓ₋−2ℓ₀|·H⊙z²/(2ε²),   θ ← θ − lr·pg·z/√H   (the updated H).
HiZOO-L keeps, for a parameter seen as an m×n matrix, a row vector R (m) and a column vector C (n):
    H_ij = R_i·C_j / ΣR                                   (Adafactor's V ≈ R·Cᵀ/(1ᵀR); init R = n, C = m: H = 1)
    S    = H⊙z²  with the current H                        (the per-element part of HiZOO's estimate)
    R ← (1−α)·R + α·|ℓ₊+ℓ₋−2ℓ₀|/(2ε²)·rowsum(S)            C likewise with colsum(S)
    θ ← θ − lr·pg·z/√H  with H rebuilt from the updated R, C.
Since ΣR = ΣC stays the total of H and rowsum(R·Cᵀ/ΣR) = R, this is (with no ``hessian_floor``)
exactly HiZOO's H update projected onto its row and column sums (Adafactor's factorisation of
the new H). Tensors that are
not factored (1-D: biases, norms; or smaller than ``factored_min_dim``) keep HiZOO's full H.

On shards. Every rank keeps R and C whole (m + n numbers, replicated; checkpointed once per rank
and loadable on any world size). A rank's shard is a flat range of the row-major matrix —
FSDP2 holds whole rows, a ZeRO-3 partition may start and end mid-row — so during the +εd pass it
adds its partial row sums and partial column sums of S into one fp64 buffer of Σ(m + n) numbers
for all factored tensors; that buffer rides in the step's loss all-reduce (SUM), which completes
the sums: still ONE all-reduce per step, 48 B + 8·Σ(m + n) B (a replicated tensor — DDP, HSDP
replicas, FSDP2's unsharded parameters — is counted once: its sums are divided by its replication
degree, measured once at construction). Nothing is gathered. H is rebuilt chunk by chunk from R, C
(``updates.factored_hessian``), so no full-size H exists, not even per shard.

Batched probes (``batched_probes=True``, ``zo_scale.probes``) on shards too: each gathered layer is
perturbed along z/√H over its whole flat range, which every rank can form with no collective — from
the replicated R, C for a factored tensor, and, for an unfactored one, from a whole H that every rank
then keeps (instead of its shard's range of it). That whole H is updated by every rank from z over the
whole tensor (counter-based) and the all-reduced scalars: identical on every rank, still no collective.
Its size: the elements of the unfactored tensors — for a language model its 1-D biases and norm
weights, a few hidden-size vectors per layer (Llama-2-7B: 0.27 M numbers, 1 MiB in fp32, against 2.6 M
numbers of R, C; OPT-66B with its biases: 7.7 M, 29 MiB). A tensor is kept whole only if it has no more
elements than R, C of its shape would (numel ≤ rows + cols: vectors); a matrix left unfactored by a
large ``factored_min_dim`` is refused. Checkpoints keep the sequential form: each rank saves its range
of that H (flat-range pieces; torch's layout on FSDP2 holds the whole H as a plain tensor, as for R and
C, which DCP reshards to and from the sequential DTensor), so a save loads on any world size, backend or
mode; loading into this mode reads every range of those tensors (``checkpoint_ranges``).

Torch path only: ``_uses_kernels`` is False (the fused Triton kernels read a stored H; on CUDA this
optimizer runs the chunked torch ops — a few more passes over each chunk than HiZOO's kernel).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from zo_scale import rng
from zo_scale.optim.base import FULL_PRECISION
from zo_scale.optim.hizoo import HiZOO
from zo_scale.optim.updates import (
    factored_ema,
    factored_hessian,
    factored_sums_,
    hizoo_direction,
    hizoo_hessian_update_,
    hizoo_update_,
)
from zo_scale.shards import ShardView, fill_from_slices


def factored_shape(global_shape, min_dim: int = 2) -> tuple[int, int] | None:
    """(rows, cols) of the matrix a tensor is factored as — dim 0 against the rest (out × fan-in
    for linear, embedding and conv weights; FSDP2's Shard(0) then holds whole rows) — or None for
    a tensor that keeps a full H: fewer than 2 dims, or a matrix side below ``min_dim``."""
    shape = tuple(global_shape)
    if len(shape) < 2:
        return None
    rows = shape[0]
    cols = math.prod(shape[1:])
    if rows < min_dim or cols < min_dim:
        return None
    return rows, cols


class HiZOOL(HiZOO):
    """HiZOO with a factored (rank-1, Adafactor-style) Hessian per matrix.

    Options (defaults in brackets), besides HiZOO's ``hessian_smooth`` α [1e-8], ``alpha_schedule``
    ['constant'], ``total_steps``, ``decay_1d`` [False]:
      factored_min_dim [2]   a tensor with ≥ 2 dims is factored as (shape[0], numel/shape[0]) when
                             both sides are ≥ this; others keep HiZOO's full H. A side of 1 would be
                             exact anyway (R·Cᵀ/ΣR = C), so 2 factors every real matrix; a huge value
                             gives HiZOO exactly (a test checks it).
      hessian_floor [0.0]    H ≥ floor: applied to the full H as in HiZOO and, for a factored tensor,
                             to each element of R·Cᵀ/ΣR where it is used (direction, estimate, step);
                             R and C themselves are not clamped.
      state_dtype [fp32]     dtype of the full H of unfactored tensors. R and C are kept in fp64 if
                             state_dtype is fp64, else fp32 (they are m + n numbers; bf16 would only
                             lose their resolution), and their update is computed in fp64.
    Probes and forwards as HiZOO (3 per step, n_samples = 1). ``batched_probes=True`` works on every
    backend (see the module docstring: on shards, the H of unfactored tensors is kept whole on every rank).
    """

    batched_on_shards = True  # R, C are whole on every rank; unfactored tensors keep a whole H then

    def __init__(self, model, *, factored_min_dim: int = 2, **kwargs):  # kwargs: HiZOO's options
        if isinstance(factored_min_dim, bool) or not isinstance(factored_min_dim, int) or factored_min_dim < 1:
            raise ValueError(f"zo_scale: HiZOOL factored_min_dim must be an integer >= 1, got {factored_min_dim!r}")
        self._factored_min_dim = factored_min_dim  # needed by _init_state, called from the base constructor
        # R, C per factored tensor (replicated; updated in place, opt.state shows them), filled below
        self.factors: dict[str, dict[str, torch.Tensor]] = {}
        # batched probes on shards: each unfactored tensor's whole H (shard_state holds its range of it)
        self.whole_hessian: dict[str, torch.Tensor] = {}
        super().__init__(model, factored_min_dim=factored_min_dim, **kwargs)
        fdtype = self.state_dtype if self.state_dtype in FULL_PRECISION else torch.float32
        # and the layout of the step's fp64 sum buffer
        self._layout: dict[str, tuple[int, int, int]] = {}  # name -> (offset, rows, cols)
        offset = 0
        for v in self.views:
            mn = factored_shape(v.global_shape, factored_min_dim)
            if mn is None:
                continue
            m, n = mn
            dev = v.local.device
            self.factors[v.name] = self._with_inverse(
                {"rows": torch.full((m,), float(n), dtype=fdtype, device=dev),
                 "cols": torch.full((n,), float(m), dtype=fdtype, device=dev)}
            )
            self._layout[v.name] = (offset, m, n)
            offset += m + n
        self._payload_numel = offset
        self._degree = self._replication_degrees()
        self._sums: torch.Tensor | None = None  # this step's partial sums (filled during the +εd pass)
        self._reduced: torch.Tensor | None = None
        self._next: dict[str, dict[str, torch.Tensor]] | None = None  # factors after this step's update
        self._collecting = False
        self._expose_state()  # again, now with the factors

    # ------------------------------------------------------------------ layout

    def _is_factored(self, view) -> bool:
        return factored_shape(view.global_shape, self._factored_min_dim) is not None

    def _init_state(self, name, view):
        if self._is_factored(view):
            return None  # kept as R, C in self.factors
        if not (self.batched_probes and self.backend.name != "replicated"):
            return super()._init_state(name, view)
        rows = view.global_shape[0] if len(view.global_shape) else 1
        cols = view.global_numel // max(rows, 1)
        if view.global_numel > rows + cols:  # more than its R, C would be (a matrix); the same verdict on every rank
            raise ValueError(
                f"zo_scale: HiZOOL with batched_probes on shards keeps each unfactored tensor's H whole on every "
                f"rank, and {view.name} {list(view.global_shape)} is not factored (factored_min_dim="
                f"{self._factored_min_dim}): lower factored_min_dim or use batched_probes=False"
            )
        whole = torch.ones(view.global_numel, dtype=self.state_dtype, device=view.local.device)
        self.whole_hessian[view.name] = whole
        return whole[view.start : view.end]  # this rank's range: updated with θ, checkpointed as HiZOO's H

    @staticmethod
    def _with_inverse(f: dict) -> dict:
        f["inv"] = 1.0 / f["rows"].double().sum().to(f["rows"].dtype)  # 0-d tensor: no host sync
        return f

    def _replication_degrees(self) -> dict[str, float]:
        """How many ranks hold each element of each factored tensor (1 when sharded, W when
        replicated), from one all-reduce of the local element counts at construction."""
        names = list(self._layout)
        if not names or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.process_group) == 1:
            return {n: 1.0 for n in names}
        by_name = {v.name: v for v in self.views}
        counts = torch.tensor([float(by_name[n].numel) for n in names], dtype=torch.float64,
                              device=self.backend.loss_device())
        dist.all_reduce(counts, group=self.process_group)
        out = {}
        for n, total in zip(names, counts.tolist()):
            degree = total / by_name[n].global_numel
            if degree < 1 or degree != round(degree):
                raise RuntimeError(f"zo_scale: HiZOOL: the shards of {n} cover {total:g} of {by_name[n].global_numel} "
                                   "elements over the process group (neither sharded nor replicated)")
            out[n] = float(degree)
        return out

    def _uses_kernels(self, view) -> bool:
        return False  # torch path only (see the module docstring)

    # ------------------------------------------------------------------ H of a chunk

    def _hessian_chunk(self, view, start: int, length: int, factors: dict) -> torch.Tensor:
        """H of a factored tensor on its global flat range [start, start + length)."""
        f = factors[view.name]
        return factored_hessian(f["rows"], f["cols"], f["inv"], start, length,
                                floor=self.param_groups[0]["hessian_floor"])

    def _direction(self, view, lo, hi, z):
        if view.name not in self.factors:
            return super()._direction(view, lo, hi, z)
        hess = self._hessian_chunk(view, view.start + lo, hi - lo, self.factors)
        z = z.to(hess.dtype)
        if self._collecting:  # the +εd pass: this rank's partial row / column sums of H⊙z²
            off, m, n = self._layout[view.name]
            factored_sums_(self._sums[off : off + m], self._sums[off + m : off + m + n], hess * z.square(),
                           view.start + lo)
        return z / hess.sqrt()

    def _gathered_direction(self, view, lo, hi, z):
        # [lo, hi) is global: R, C and the whole H of unfactored tensors cover every element on every rank
        if view.name in self.factors:
            hess = self._hessian_chunk(view, lo, hi - lo, self.factors)
        elif view.name in self.whole_hessian:
            hess = self.whole_hessian[view.name][lo:hi]
            hess = hess if hess.dtype in FULL_PRECISION else hess.float()
        else:
            return super()._gathered_direction(view, lo, hi, z)  # replicated: the shard is the whole parameter
        return hizoo_direction(z.to(hess.dtype), hess)

    def _move_to(self, offset: int, sample: int) -> None:
        # the first move of a step (θ → θ + εd) regenerates z once anyway: collect the sums there
        self._collecting = offset == 1 and self._offset == 0 and self._payload_numel > 0
        if self._collecting:
            device = next(iter(self.factors.values()))["rows"].device
            self._sums = torch.zeros(self._payload_numel, dtype=torch.float64, device=device)
        try:
            super()._move_to(offset, sample)
        finally:
            self._collecting = False

    def _batched_forward(self, closure):
        # no +εd move with batched probes: collect the partial sums in a local pass over z instead
        if self._payload_numel:
            device = next(iter(self.factors.values()))["rows"].device
            self._sums = torch.zeros(self._payload_numel, dtype=torch.float64, device=device)
            self._collecting = True
            try:
                for view in self.views:
                    if view.name in self.factors:
                        for lo, hi in self._chunk_ranges(view):
                            self._direction(view, lo, hi, self._z(view, lo, hi, 0))
            finally:
                self._collecting = False
        return super()._batched_forward(closure)

    # ------------------------------------------------------------------ the step

    def _step_payload(self):
        if self._payload_numel == 0:
            return None
        sums, self._sums = self._sums, None
        if sums is None:
            raise RuntimeError("zo_scale: HiZOOL step without its +εd pass")
        return sums

    def _take_payload(self, reduced):
        self._reduced = reduced

    def _before_update(self, losses):
        scalars = super()._before_update(losses)
        reduced, self._reduced = self._reduced, None
        eps = self.param_groups[0]["eps"]
        nxt = {}
        for name, (off, m, n) in self._layout.items():
            f, degree = self.factors[name], self._degree[name]
            row_sums, col_sums = reduced[off : off + m], reduced[off + m : off + m + n]
            if degree != 1.0:
                row_sums, col_sums = row_sums / degree, col_sums / degree
            kw = dict(alpha=scalars["alpha"], curvature=scalars["curvature"], eps=eps)
            nxt[name] = self._with_inverse(
                {"rows": factored_ema(f["rows"], row_sums.to(f["rows"].device), **kw),
                 "cols": factored_ema(f["cols"], col_sums.to(f["cols"].device), **kw)}
            )
        self._next = nxt
        return scalars

    def _update_chunk(self, view, lo, hi, theta, zs, pgs, scalars):
        if view.name not in self.factors:
            return super()._update_chunk(view, lo, hi, theta, zs, pgs, scalars)
        group = self.param_groups[0]
        hess = self._hessian_chunk(view, view.start + lo, hi - lo, self._next)  # the updated H: HiZOO steps with it
        wd = group["weight_decay"] if self._decays(view) else 0.0
        hizoo_update_(theta, zs[0].to(theta.dtype), hess, lr=group["lr"], proj_grad=pgs[0], weight_decay=wd)

    def _restore_and_update(self, pgs, scalars):
        out = super()._restore_and_update(pgs, scalars)  # restores along the old H, steps with the new
        for name, f in self.factors.items():  # in place: opt.state and state_dict() hold these tensors
            nxt = self._next[name]
            f["rows"].copy_(nxt["rows"])
            f["cols"].copy_(nxt["cols"])
            f["inv"] = nxt["inv"]
        self._next = None
        self._update_other_ranges(scalars)
        return out

    def _update_other_ranges(self, scalars) -> None:
        """Each whole H outside this rank's range, as the ranks that hold those ranges update theirs
        (the same z, scalars and ops): the whole H stays identical on every rank, with no collective."""
        group = self.param_groups[0]
        for view in self.views:
            whole = self.whole_hessian.get(view.name)
            if whole is None:
                continue
            stream, n = self._stream(view, 0), view.global_numel
            for a, b in ((0, min(view.start, n)), (min(view.end, n), n)):
                for lo in range(a, b, self.chunk_size):
                    seg = whole[lo : min(lo + self.chunk_size, b)]
                    hess = seg if seg.dtype in FULL_PRECISION else seg.float()
                    z = rng.draw_range(stream, lo, seg.numel(), device=seg.device)
                    hizoo_hessian_update_(hess, z.to(hess.dtype), alpha=scalars["alpha"],
                                          curvature=scalars["curvature"], eps=group["eps"],
                                          floor=group["hessian_floor"])
                    if hess is not seg:
                        seg.copy_(hess)

    # ------------------------------------------------------------------ checkpoints

    layout_options = ("master_weights", "factored_min_dim")

    def _param_state(self, view):
        st = super()._param_state(view)
        f = self.factors.get(view.name)
        if f is not None:  # whole on every rank, plain tensors in either layout
            st.update(hessian_rows=f["rows"], hessian_cols=f["cols"])
        whole = self.whole_hessian.get(view.name)
        if whole is not None:  # whole on every rank too: a plain tensor, which DCP reshards to and from HiZOO's DTensor
            st["hessian"] = whole.view(view.global_shape)
        return st

    def checkpoint_ranges(self) -> dict[str, tuple[int, int]]:
        ranges = super().checkpoint_ranges()
        ranges.update({name: (0, h.numel()) for name, h in self.whole_hessian.items()})
        return ranges

    def _after_state_load(self) -> None:
        super()._after_state_load()
        for f in self.factors.values():
            self._with_inverse(f)
        self._sums = self._reduced = self._next = None

    def flat_state_dict(self) -> dict:
        """The base state (full H of unfactored tensors, master, by global range) plus every
        factored tensor's R and C — whole and identical on every rank, so any rank's file serves
        any world size."""
        sd = super().flat_state_dict()
        sd["factors"] = {
            name: {"shape": [m, n], "rows": self.factors[name]["rows"].detach().clone(),
                   "cols": self.factors[name]["cols"].detach().clone()}
            for name, (_, m, n) in self._layout.items()
        }
        return sd

    def load_flat_state_dict(self, state_dict) -> None:
        pieces = state_dict if isinstance(state_dict, (list, tuple)) else [state_dict]
        saved = pieces[0].get("factors")
        if saved is None:
            raise ValueError("zo_scale: HiZOOL state without factors")
        if set(saved) != set(self._layout):
            raise ValueError(f"zo_scale: the checkpoint factors {sorted(saved)} but this HiZOOL factors "
                             f"{sorted(self._layout)} (another factored_min_dim?)")
        for name, (_, m, n) in self._layout.items():
            if list(saved[name]["shape"]) != [m, n]:
                raise ValueError(f"zo_scale: {name} is factored as {m}x{n} here, {saved[name]['shape']} in the checkpoint")
        super().load_flat_state_dict(state_dict)
        for view in self.views:  # a whole H from the ranges every rank saved of it
            whole = self.whole_hessian.get(view.name)
            if whole is not None:
                entries = (sd["shards"].get(view.name) for sd in pieces)
                slices = [(e["start"], e["global_numel"], e["tensors"]["hessian"])
                          for e in entries if e and "hessian" in e["tensors"]]
                fill_from_slices(whole, ShardView(view.name, view.param, whole, 0, view.global_shape), slices,
                                 f"{view.name}/hessian", hint=_WHOLE_PIECES)
        for name, f in self.factors.items():
            f["rows"].copy_(saved[name]["rows"])
            f["cols"].copy_(saved[name]["cols"])
            self._with_inverse(f)


_WHOLE_PIECES = (
    "HiZOOL with batched_probes on shards keeps the H of unfactored tensors whole: pass the pieces of every rank "
    "that saved a range of it (zo_scale.checkpoint.load_optimizer_state opens them: opt.checkpoint_ranges())"
)
