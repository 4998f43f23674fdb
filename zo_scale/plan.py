"""Per-GPU memory plan for a ZO fine-tuning run: will it fit, and where do the bytes go?

    python -m zo_scale.plan --model opt-66b --gpus 8 --backend zero3 --optimizer helene
    python -m zo_scale.plan --config configs/opt66b.json --gpus 8

A ZO step needs no gradients and no activations kept for a backward pass, so a GPU holds: its
weight shard, the parameters the engine gathers for the layer being run (plus prefetch), the
forward's peak (one layer's working set or the logits and the loss's fp32 copies, whichever is
larger), the optimizer's per-coordinate state and fp32 master shard, and one z chunk. ``plan()``
adds these up; the CLI prints them. The engines' gathers are replayed by ``zo_scale.plan_gather``.
Estimates: ``python -m zo_scale.memtrace`` checks them against a fake-tensor trace of the real model and
optimizer on one process, ``python -m zo_scale.dryrun`` against one real sharded step per rank at W ranks,
bench/step_bench.py against a real GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zo_scale.model_shape import ModelShape

GIB = 1 << 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
STATE_TENSORS = {"mezo": 0, "hizoo": 1, "helene": 2, "fzoo": 0}  # per-coordinate tensors each optimizer keeps
STATE_TENSORS["hizoo-l"] = 0  # a full H for vectors only; R, C per matrix: see factored_state_numbers
STATE_TENSORS["zo-muon"] = 0  # rows of P per matrix: see subspace_state_numbers
STATE_TENSORS["helene-muon"] = 0  # ZO-Muon's plus a momentum: M (r×n) per matrix, a full one for vectors
STATE_TENSORS["helene-fzoo"] = 1  # FZOO's none plus HELENE's momentum m, sharded like the weights
# ZO-Muon's bases: regenerated from the seed (never saved), drawn at the first step, not at construction
P_ROWS, P_DRAW = "subspace bases: P rows (fp32)", "P draw + QR, U_i (per matrix)"
BACKENDS = ("zero3", "fsdp2", "replicated")
BACKEND_ALIASES = {"deepspeed": "zero3", "zero-3": "zero3", "ds": "zero3", "fsdp": "fsdp2", "ddp": "replicated",
                   "single": "replicated", "none": "replicated"}


class PlanError(ValueError):
    """An input the planner refuses, with a message saying why."""


# ---------------------------------------------------------------------------------- model shapes


def factored_state_numbers(shape: ModelShape) -> tuple[int, int, int]:
    """HiZOO-L's state: (Σ(m + n) over matrices — its R, C, replicated on every rank; elements of
    1-D tensors — a full H, sharded, or whole on every rank with batched probes; elements of the matrices)."""
    mats, vec = shape.matrices()
    return sum(m + n for m, n in mats), vec, sum(m * n for m, n in mats)


def subspace_state_numbers(shape: ModelShape, rank: int) -> dict[str, int]:
    """ZO-Muon / HELENE-Muon numbers, with r = min(rank, m) per matrix: ``basis`` Σ m·r (P, of which
    a rank keeps the rows of its shard), ``momentum`` Σ r·n (HELENE-Muon's M, replicated), ``vectors``
    (elements of 1-D tensors), ``qr`` max m·r (the whole P a rank draws and orthonormalises, one
    matrix at a time) and ``factors`` max r·n (one matrix's U_i)."""
    mats, vec = shape.matrices()
    return dict(basis=sum(m * min(rank, m) for m, _ in mats), momentum=sum(min(rank, m) * n for m, n in mats),
                vectors=vec, qr=max(m * min(rank, m) for m, _ in mats),
                factors=max(min(rank, m) * n for m, n in mats))


def _opt(name, h, layers, heads, ffn, proj=0):
    return ModelShape(name, "opt", h, layers, heads, ffn, 50272, 2048, proj_dim=proj)


def _llama(name, h, layers, heads, ffn, kv=0):
    return ModelShape(name, "llama", h, layers, heads, ffn, 32000, 4096, kv_heads=kv, tied_embeddings=False)


MODELS = {
    m.name: m
    for m in [
        _opt("opt-125m", 768, 12, 12, 3072),
        _opt("opt-350m", 1024, 24, 16, 4096, proj=512),
        _opt("opt-1.3b", 2048, 24, 32, 8192),
        _opt("opt-2.7b", 2560, 32, 32, 10240),
        _opt("opt-6.7b", 4096, 32, 32, 16384),
        _opt("opt-13b", 5120, 40, 40, 20480),
        _opt("opt-30b", 7168, 48, 56, 28672),
        _opt("opt-66b", 9216, 64, 72, 36864),
        _llama("llama-2-7b", 4096, 32, 32, 11008),
        _llama("llama-2-13b", 5120, 40, 40, 13824),
        _llama("llama-2-70b", 8192, 80, 64, 28672, kv=8),
    ]
}


def shape_from_hf_config(cfg: dict, name: str = "custom") -> ModelShape:
    """A ModelShape from a transformers config dict (OPT, or any Llama-like gated-MLP model)."""
    try:
        h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
        vocab = cfg["vocab_size"]
    except KeyError as err:
        raise PlanError(f"transformers config {name!r} lacks {err.args[0]!r}") from None
    if cfg.get("model_type") == "opt":
        proj = cfg.get("word_embed_proj_dim", h)
        return ModelShape(name, "opt", h, layers, heads, cfg["ffn_dim"], vocab, cfg.get("max_position_embeddings", 2048),
                          proj_dim=0 if proj == h else proj, tied_embeddings=cfg.get("tie_word_embeddings", True))
    ffn = cfg.get("intermediate_size")
    if ffn is None:
        raise PlanError(f"config {name!r} (model_type {cfg.get('model_type')!r}): no intermediate_size; "
                        "only OPT and Llama-like models are modelled")
    return ModelShape(name, "llama", h, layers, heads, ffn, vocab, cfg.get("max_position_embeddings", 4096),
                      kv_heads=cfg.get("num_key_value_heads") or heads,
                      tied_embeddings=cfg.get("tie_word_embeddings", False))


def resolve_model(spec) -> ModelShape:
    """A known name ('opt-66b', 'facebook/opt-66b', 'meta-llama/Llama-2-70b-hf'), a transformers
    config.json (or a directory holding one), a config dict, or a ModelShape."""
    if isinstance(spec, ModelShape):
        return spec
    if isinstance(spec, dict):
        return shape_from_hf_config(spec)
    key = str(spec).strip().lower().split("/")[-1].removesuffix("-hf")
    if key in MODELS:
        return MODELS[key]
    path = Path(str(spec))
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return shape_from_hf_config(json.loads(path.read_text()), name=path.parent.name or path.stem)
        except json.JSONDecodeError as err:
            raise PlanError(f"{path} is not valid JSON: {err}") from None
    raise PlanError(f"unknown model {spec!r}: use one of {', '.join(MODELS)} or a transformers config.json path")


# ---------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    model: str
    params: int
    gpus: int
    backend: str
    dtype: str
    optimizer: str
    state_dtype: str
    master: bool
    batch: int
    seq: int
    gpu_mem_bytes: int
    # per-GPU bytes, one entry per line of the report
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    gather_bytes_per_forward: int = 0  # what this GPU receives from the engine's all-gathers in one forward

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def state_bytes(self) -> int:
        """What the optimizer allocates beside the weights: its per-coordinate state and the fp32 master."""
        return sum(v for k, v in self.parts.items() if k.startswith(("optimizer state", "fp32 master")))

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_mem_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.gpu_mem_bytes - self.total_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits, headroom_bytes=self.headroom_bytes)
        return d

    def report(self) -> str:
        state = f"{STATE_TENSORS[self.optimizer]}×{self.state_dtype} state" if STATE_TENSORS[self.optimizer] else "no state"
        if self.optimizer == "hizoo-l":
            state = "factored H: fp32 R, C per matrix + full H of vectors"
        if self.optimizer == "zo-muon":
            state = "rows of P per matrix"
        if self.optimizer == "helene-muon":
            state = "rows of P, M (r×n) per matrix + momentum of vectors"
        if self.optimizer == "helene-fzoo":
            state = f"momentum: 1×{self.state_dtype} state"
        lines = [
            f"zo_scale memory plan: {self.model} ({self.params / 1e9:.2f} B params), {self.dtype} weights, "
            f"{self.backend} on {self.gpus} GPU{'s' if self.gpus > 1 else ''}",
            f"  optimizer {self.optimizer} ({state}, {'fp32 master' if self.master else 'no master'}), "
            f"micro-batch {self.batch} × seq {self.seq} per GPU",
            "",
            f"  {'per GPU':<34}{'GiB':>10}",
        ]
        lines += [f"  {k:<34}{v / GIB:>10.2f}" for k, v in self.parts.items()]
        lines += [f"  {'-' * 44}", f"  {'total':<34}{self.total_bytes / GIB:>10.2f}",
                  f"  {'GPU memory':<34}{self.gpu_mem_bytes / GIB:>10.2f}"]
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        lines.append(f"  {verdict}: headroom {self.headroom_bytes / GIB:.2f} GiB")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _norm(value, aliases, allowed, what):
    v = aliases.get(str(value).lower(), str(value).lower())
    if v not in allowed:
        raise PlanError(f"unknown {what} {value!r}: expected one of {', '.join(allowed)}")
    return v


def _positive_int(value, what) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{what} must be a positive integer, got {value!r}")
    return value


# probe groups of a batched step and how many of them are perturbed, per optimizer (default N)
GROUPS = {"mezo": (2, 2), "hizoo": (3, 2), "hizoo-l": (3, 2), "helene": (2, 2), "fzoo": (9, 8),
          "zo-muon": (5, 4), "helene-muon": (5, 4), "helene-fzoo": (9, 8)}
# batched probes need the direction over the whole gathered layer: HiZOO's z/√H reads a sharded H;
# HiZOO-L's reads its replicated R, C and, for vectors, a whole H every rank then keeps;
# ZO-Muon's P·U_i needs all of P, which every rank draws anyway
BATCHED_ON_SHARDS = {"mezo": True, "helene": True, "fzoo": True, "hizoo": False, "hizoo-l": True,
                     "zo-muon": True, "helene-muon": True, "helene-fzoo": True}


# the optimizers whose probe count is an option (n_directions): a step is ℓ₀ and N one-sided probes
PROBE_SETS = ("fzoo", "zo-muon", "helene-muon", "helene-fzoo")


def probe_groups(optimizer: str, n_directions: int | None) -> int:
    """G, the probe groups of one batched step (FZOO, HELENE-FZOO, ZO-Muon, HELENE-Muon: ℓ₀ and their N directions;
    ``None``: the optimizer's default N)."""
    if optimizer in PROBE_SETS and n_directions is not None:
        return n_directions + 1
    return GROUPS[optimizer][0]


def check_batched_on_shards(optimizer: str, sharded: bool) -> None:
    """The optimizer's own refusal, for the planners: batched probes on shards need the direction over whole layers."""
    if sharded and not BATCHED_ON_SHARDS[optimizer]:
        raise PlanError(f"{optimizer} refuses batched probes on sharded parameters (its direction reads a sharded H): "
                        "set optimizer.batched_probes to false, run it replicated, or use hizoo-l (batched on shards)")


def plan(
    model,
    gpus: int,
    *,
    dtype: str = "bf16",
    optimizer: str = "helene",
    batch: int = 16,
    seq: int = 256,
    backend: str = "zero3",
    master: bool | None = None,
    state_dtype: str = "fp32",
    gpu_mem_gib: float = 80.0,
    chunk: int = 1 << 22,
    prefetch_bucket: int = 50_000_000,
    persistence_threshold: int = 100_000,
    attention: str = "eager",
    reserve_gib: float = 1.0,
    max_live_parameters: int = 1_000_000_000,
    reuse_distance: int = 1_000_000_000,
    rank: int = 0,
    subspace_rank: int = 64,
    n_directions: int | None = None,
    batched_probes: bool = False,
) -> Plan:
    """Per-GPU bytes of a ZO run. ``batch`` is the micro-batch each GPU runs its forwards on;
    ``prefetch_bucket`` and ``persistence_threshold`` are ZeRO-3's stage3_* settings in elements;
    ``attention`` 'eager' materialises B·heads·S² scores, 'sdpa' (flash/memory-efficient) does not;
    ``reserve_gib`` covers the CUDA context, NCCL buffers and allocator slack. ``max_live_parameters`` and
    ``reuse_distance`` are ZeRO-3's stage3_max_live_parameters / stage3_max_reuse_distance (elements).
    ``rank``: whose shard to count (rank 0 holds the most on both backends). ``subspace_rank`` and
    ``n_directions`` are ZO-Muon's / HELENE-Muon's r and N (N also FZOO's and HELENE-FZOO's; None: each
    one's default, 8 or 4); ``batched_probes``: one forward carries every
    probe group (``probe_groups``), its activations G times the micro-batch's, with a perturbed copy of
    the running module (``plan_gather.Batched``)."""
    shape = resolve_model(model)
    gpus = _positive_int(gpus, "gpus")
    batch, seq = _positive_int(batch, "batch"), _positive_int(seq, "seq")
    dtype = _norm(dtype, DTYPE_ALIASES, tuple(DTYPE_BYTES), "dtype")
    state_dtype = _norm(state_dtype, DTYPE_ALIASES, tuple(DTYPE_BYTES), "state dtype")
    optimizer = _norm(optimizer, {}, tuple(STATE_TENSORS), "optimizer")
    backend = _norm(backend, BACKEND_ALIASES, BACKENDS, "backend")
    attention = _norm(attention, {"flash": "sdpa"}, ("eager", "sdpa"), "attention")
    if seq > shape.max_positions:
        raise PlanError(f"seq {seq} exceeds {shape.name}'s {shape.max_positions} positions")
    if not gpu_mem_gib > 0:
        raise PlanError(f"gpu memory must be positive, got {gpu_mem_gib} GiB")
    if chunk < 1 or prefetch_bucket < 0 or persistence_threshold < 0 or reserve_gib < 0:
        raise PlanError("chunk must be >= 1; prefetch bucket, persistence threshold and reserve >= 0")
    if max_live_parameters < 0 or reuse_distance < 0:
        raise PlanError("max live parameters and reuse distance must be >= 0")
    if not 0 <= rank < gpus:
        raise PlanError(f"rank {rank} is not one of the {gpus} GPUs")
    if master is None:  # as the optimizers default: a master wherever weights are low precision
        master = dtype != "fp32"

    wb, sb = DTYPE_BYTES[dtype], DTYPE_BYTES[state_dtype]
    n = shape.param_count()
    from zo_scale import plan_gather  # imports this module's ModelShape

    shard = sum(plan_gather.shard_numel(t, backend, gpus, rank) for t in plan_gather.model_params(shape))
    p = Plan(shape.name, n, gpus, backend, dtype, optimizer, state_dtype, bool(master), batch, seq,
             int(gpu_mem_gib * GIB))
    p.parts["weight shard"] = shard * wb
    if batched_probes and optimizer not in GROUPS:
        raise PlanError(f"batched probes are not available for {optimizer} (only {', '.join(GROUPS)})")
    if batched_probes:
        check_batched_on_shards(optimizer, sharded=backend != "replicated" and gpus > 1)
    # batched probes: one forward carries every group's micro-batch (plan_gather.Batched for the rest)
    if n_directions is not None:
        n_directions = _positive_int(n_directions, "n_directions")
    groups = probe_groups(optimizer, n_directions) if batched_probes else 1
    # HiZOO-L builds each chunk's z/√H from its factors: three fp32 chunks besides z
    batched = plan_gather.Batched(wb, chunk, 3 if optimizer == "hizoo-l" else 0) if batched_probes else None
    if backend == "replicated" or gpus == 1:
        p.parts["gathered parameters"] = 0
        p.parts["forward peak (activations)"] = _forward_peak(shape, batch * groups, seq, wb, attention, p.notes)
        if batched:  # an upper bound: no replay here, so the largest module's copy is added to the forward's peak
            p.parts["batched: perturbed module copy"] = max(batched.copy(m) for m in plan_gather.forward_modules(shape))
    else:
        act = _activations(shape, batch * groups, seq, wb, attention)
        if backend == "fsdp2":
            replay = plan_gather.fsdp2_forward(shape, gpus, wb, act, batched)
        else:
            replay = plan_gather.zero3_forward(shape, gpus, wb, act, bucket=prefetch_bucket,
                                               max_live=max_live_parameters, reuse_distance=reuse_distance,
                                               persistence=persistence_threshold, batched=batched)
        # one moment of the forward: the gathered parameters and buffers alive then, and the activations
        p.parts["gathered parameters"] = replay.peak.gathered
        p.parts["forward peak (activations)"] = replay.peak.activations
        if batched:
            p.parts["batched: perturbed module copy"] = replay.peak.perturbed
        p.gather_bytes_per_forward = replay.gather_bytes
        copy = f" + {replay.peak.perturbed / GIB:.2f} GiB perturbed copy" if batched else ""
        p.notes.append(f"{backend} forward peak at {replay.peak.where}: {replay.peak.gathered / GIB:.2f} GiB gathered "
                       f"+ {replay.peak.activations / GIB:.2f} GiB activations{copy}; {replay.gathers} all-gathers "
                       f"({replay.gather_bytes / GIB:.2f} GiB) per forward"
                       + (f", once per step ({groups} probe groups in it)" if batched else ""))
    p.parts[f"optimizer state ({state_dtype})"] = STATE_TENSORS[optimizer] * shard * sb
    if optimizer == "hizoo-l":  # fp32 R, C replicated; vectors' H sharded (whole when batched); the step's fp64 sums
        factors, vectors, _ = factored_state_numbers(shape)
        vec_shard = sum(plan_gather.shard_numel(t, backend, gpus, rank)
                        for t in plan_gather.model_params(shape) if len(t.shape) == 1)
        if batched_probes:  # on shards every rank keeps the vectors' whole H (HiZOOL's whole_hessian)
            vec_shard = vectors
        matrices = len(shape.matrices()[0])  # each keeps 1/ΣR as a 0-d fp32 tensor too
        p.parts[f"optimizer state ({state_dtype})"] = 4 * factors + sb * vec_shard + 4 * matrices
        p.parts["factor sums (fp64, per step)"] = 8 * factors
    if optimizer in ("zo-muon", "helene-muon"):
        _subspace_parts(p, shape, _positive_int(subspace_rank, "subspace_rank"), probe_groups(optimizer, n_directions) - 1,
                        sb, gpus if backend != "replicated" else 1)
    p.parts["fp32 master shard"] = 4 * shard if master else 0
    p.parts["z chunk (fp32)"] = 4 * min(chunk, shard)
    p.parts["runtime reserve"] = int(reserve_gib * GIB)
    if master and dtype == "fp32":
        p.notes.append("a master copy of fp32 weights duplicates them; pass --no-master")
    if not master and dtype != "fp32":
        p.notes.append("no master: updates below the weight dtype's resolution round away")
    return p


def _subspace_parts(p: Plan, shape: ModelShape, rank: int, n_directions: int, sb: int, shards: int) -> None:
    """ZO-Muon: each rank keeps the rows of P its shard touches (fp32; about 1/shards of them, plus
    a cut row per matrix under ZeRO-3) and, one matrix at a time, draws the whole P (fp64 QR) and
    the N factors U_i (fp32). HELENE-Muon adds M (fp32, replicated) and the vectors' momentum (sharded)."""
    k = subspace_state_numbers(shape, rank)
    mats, _ = shape.matrices()
    p.parts[f"optimizer state ({p.state_dtype})"] = 0
    p.parts[P_ROWS] = 4 * (-(-k["basis"] // shards) + (rank * len(mats) if shards > 1 else 0))
    if p.optimizer == "helene-muon":
        p.parts[f"optimizer state ({p.state_dtype})"] = sb * -(-k["vectors"] // shards)
        p.parts["optimizer state: M (replicated)"] = 4 * k["momentum"]
    p.parts[P_DRAW] = 8 * 2 * k["qr"] + 4 * n_directions * k["factors"]


def _activations(shape, b, s, wb, attention):
    """The forward's activation terms of ``_forward_peak``, apart, for the sharded replays."""
    from zo_scale.plan_gather import Activations

    h, f, heads = shape.hidden, shape.ffn, shape.heads
    kv = (shape.kv_heads or heads) * shape.head_dim
    tokens = b * s
    attn = tokens * (h + 2 * kv + h) * wb
    if attention == "eager":
        attn += b * heads * s * s * (wb + 8 if wb < 4 else 8)
    mlp_width = 2 * f if shape.family == "opt" else 3 * f
    return Activations(residual=2 * tokens * h * wb, attention=attn, mlp=tokens * mlp_width * wb,
                       logits=tokens * shape.vocab * wb, loss=tokens * shape.vocab * (wb + _upcast(wb) + 4))


def _upcast(wb: int) -> int:
    """Bytes per element of the loss's fp32 copy of low-precision logits (fp32 logits are used as they are)."""
    return 4 if wb < 4 else 0


def _forward_peak(shape, b, s, wb, attention, notes) -> int:
    """Peak live activations of a no-grad forward + loss: the residual stream, plus the largest of one
    layer's attention or MLP working set (layers run one after another and free their temporaries)
    and the logits with the loss's fp32 copies. Checked against traces of the real transformers
    models in tests/test_memtrace.py."""
    act = _activations(shape, b, s, wb, attention)
    largest = max(("logits + loss", act.loss), ("attention", act.attention), ("MLP", act.mlp), key=lambda part: part[1])
    notes.append(f"forward peak: {largest[0]} ({largest[1] / GIB:.2f} GiB) + residual stream ({act.residual / GIB:.2f} GiB)")
    return act.residual + largest[1]


# ---------------------------------------------------------------------------------- config + CLI


def read_config(path) -> dict:
    """The planner's inputs from a zo_scale run config; keys it does not know are ignored."""
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"config {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise PlanError(f"config {path} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"config {path} must hold a JSON object")
    out = {}
    model = cfg.get("model")
    if isinstance(model, dict):
        if "dtype" in model:  # zo_scale.config keeps the weight dtype in the model section
            out["dtype"] = model["dtype"]
        model = model.get("name") or model.get("name_or_path") or model.get("config")
    if model is not None:
        out["model"] = model
    for key in ("dtype", "backend", "gpus"):
        if key in cfg:
            out[key] = cfg[key]
    opt = cfg.get("optimizer")
    if isinstance(opt, dict):
        opt = opt.get("name") or opt.get("type")
        if "state_dtype" in cfg["optimizer"]:
            out["state_dtype"] = cfg["optimizer"]["state_dtype"]
        if "master_weights" in cfg["optimizer"]:
            out["master"] = cfg["optimizer"]["master_weights"]
        if "batched_probes" in cfg["optimizer"]:
            out["batched_probes"] = cfg["optimizer"]["batched_probes"]
        if "n_directions" in cfg["optimizer"] and opt in PROBE_SETS:
            out["n_directions"] = cfg["optimizer"]["n_directions"]
    if opt is not None:
        out["optimizer"] = opt
    out.update(zero3_settings(cfg.get("deepspeed")))
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    if "batch" in cfg or "batch_size" in data:
        out["batch"] = cfg.get("batch", data.get("batch_size"))
    if "max_length" in data:
        out["seq"] = data["max_length"]
    # zo_scale.config: train.batch_size is the GLOBAL batch (split over the GPUs), task.max_length the sequence
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    task = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    if "batch_size" in train and "batch" not in out:
        out["global_batch"] = train["batch_size"]
    if task.get("max_length") and "seq" not in out:
        out["seq"] = task["max_length"]
    return out


# the DeepSpeed zero_optimization keys the ZeRO-3 replay reads, and plan()'s names for them
ZERO3_SETTINGS = {"stage3_prefetch_bucket_size": "prefetch_bucket", "stage3_param_persistence_threshold":
                  "persistence_threshold", "stage3_max_live_parameters": "max_live_parameters",
                  "stage3_max_reuse_distance": "reuse_distance"}


def zero3_settings(ds_config) -> dict:
    """plan() keyword arguments from a DeepSpeed config's zero_optimization section (numbers only: "auto"
    and missing keys keep DeepSpeed's defaults, which are plan()'s)."""
    zero = ds_config.get("zero_optimization") if isinstance(ds_config, dict) else None
    if not isinstance(zero, dict):
        return {}
    return {ours: int(zero[key]) for key, ours in ZERO3_SETTINGS.items()
            if isinstance(zero.get(key), (int, float)) and not isinstance(zero.get(key), bool)}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zo_scale.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a zo_scale run config (JSON); explicit flags override it")
    ap.add_argument("--model", help=f"{', '.join(MODELS)} or a transformers config.json")
    ap.add_argument("--gpus", type=int, help="GPUs sharing the model (default 1)")
    ap.add_argument("--dtype", help="weight dtype: bf16 (default), fp16, fp32")
    ap.add_argument("--optimizer",
                    help="helene (default), hizoo, hizoo-l, mezo, fzoo, helene-fzoo, zo-muon, helene-muon")
    ap.add_argument("--subspace-rank", type=int, help="zo-muon / helene-muon subspace rank r (default 64)")
    ap.add_argument("--n-directions", type=int,
                    help="probes per step N of fzoo / helene-fzoo (default 8) and zo-muon / helene-muon (default 4)")
    ap.add_argument("--batch", type=int, help="micro-batch per GPU (default 16)")
    ap.add_argument("--seq", type=int, help="sequence length (default 256)")
    ap.add_argument("--backend", help="zero3 (default), fsdp2, replicated")
    ap.add_argument("--master", action=argparse.BooleanOptionalAction, default=None,
                    help="fp32 master shard (default: when weights are not fp32)")
    ap.add_argument("--state-dtype", help="dtype of optimizer state: fp32 (default), bf16")
    ap.add_argument("--gpu-mem-gib", type=float, help="memory per GPU in GiB (default 80)")
    ap.add_argument("--attention", help="eager (default: B·heads·S² scores) or sdpa")
    ap.add_argument("--chunk", type=int, help="z chunk in elements (default 4194304)")
    ap.add_argument("--prefetch-bucket", type=int, help="ZeRO-3 stage3_prefetch_bucket_size (elements, default 5e7)")
    ap.add_argument("--reserve-gib", type=float, help="CUDA context, NCCL, allocator slack (default 1)")
    ap.add_argument("--batched-probes", action="store_true", default=None,
                    help="every probe group in one forward (optimizer.batched_probes)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        kw = read_config(args.config) if args.config else {}
        flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "json")}
        kw.update(flags)
        if "model" not in kw:
            raise PlanError("say which model: --model NAME|config.json, or --config with a 'model' key")
        kw.setdefault("gpus", 1)
        global_batch = kw.pop("global_batch", None)
        if global_batch is not None and "batch" not in kw:
            kw["batch"] = max(1, global_batch // kw["gpus"])
        result = plan(kw.pop("model"), kw.pop("gpus"), **kw)
    except PlanError as err:
        print(f"zo_scale.plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.report())
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
