"""Peak tensor memory of a ZO forward, traced without running it: the planner's check on any machine.

    python -m zo_scale.memtrace --model opt-1.3b --optimizer helene     # trace vs plan, one GPU
    python -m zo_scale.memtrace --model opt-66b --batch 4 --seq 512 --attention eager

Under ``FakeTensorMode`` the real transformers model is built, the real optimizer allocates its
state and master shard, and one no-grad forward + loss runs: every aten op allocates fake storage
with true sizes and no data, so OPT-66B traces in seconds on a laptop. ``LiveTensorBytes`` counts
the storages alive after each op; its maximum is the step's peak of tensor bytes (what
``torch.cuda.max_memory_allocated`` reports on a GPU, less allocator rounding and kernel workspaces).

This checks ``zo_scale.plan``'s arithmetic against what the libraries really allocate (a KV cache
nobody reads, an fp32 copy of the logits), for one process holding the whole model. Sharding adds
the engine's gathered-parameter buffers: ``python -m zo_scale.dryrun`` traces those, one rank of a
fake W-rank world at a time, with this counter (and :func:`following_fsdp2_resizes`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zo_scale.plan import DTYPE_ALIASES, GIB, P_DRAW, P_ROWS, ModelShape, Plan, PlanError, plan, resolve_model

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages that aten ops create while the mode is on, and their peak.

    Storages that already exist when an op returns one of them (parameters, the inputs) are not
    counted: register them with ``ignore`` or create them before entering. A storage counts once,
    however many views it has, until its last reference goes.
    """

    def __init__(self):
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def ignore(self, tensors) -> None:
        """Leave these tensors' storages out of the count (say, weights accounted for apart)."""
        for t in tensors:
            self._sizes.setdefault(t.untyped_storage()._cdata, 0)

    def hold(self, tensors) -> None:
        """Count these existing tensors' storages as live from now on, until they are freed."""
        for t in tensors:
            self._add(t.untyped_storage())
        self.peak = max(self.peak, self.live)

    def resized(self, tensor) -> None:
        """``tensor``'s storage was resized in place (FSDP2 frees and refills its gathered parameters so,
        out of sight of aten ops): count its new size from now on."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._sizes:
            self._add(storage)
        else:
            self.live += storage.nbytes() - self._sizes[key]
            self._sizes[key] = storage.nbytes()
        self.peak = max(self.peak, self.live)

    def _add(self, storage) -> None:
        key = storage._cdata
        if key not in self._sizes:
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        self.peak = max(self.peak, self.live)
        return out


@contextlib.contextmanager
def following_fsdp2_resizes(counter: LiveTensorBytes):
    """FSDP2 frees a gathered parameter by resizing its storage to 0 bytes and refills it by resizing it back
    (``_fsdp_param.free_storage`` / ``alloc_storage``), which no aten op sees: tell ``counter`` each time."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def counted_alloc(tensor):
        alloc(tensor)
        counter.resized(tensor)

    def counted_free(tensor):
        free(tensor)
        counter.resized(tensor)

    # _fsdp_param_group imports alloc_storage by name
    patched = [(_fsdp_param, "alloc_storage", counted_alloc), (_fsdp_param, "free_storage", counted_free),
               (_fsdp_param_group, "alloc_storage", counted_alloc)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
    for mod, name, fn in patched:
        setattr(mod, name, fn)
    try:
        yield counter
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def build_model(shape: ModelShape, dtype: torch.dtype, device="cpu", attention: str = "sdpa"):
    """A randomly initialised transformers model of ``shape`` (OPT or Llama family), in eval mode,
    created directly in ``dtype`` (no fp32 copy of the weights on the way)."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    common = dict(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  vocab_size=shape.vocab, max_position_embeddings=shape.max_positions,
                  tie_word_embeddings=shape.tied_embeddings, attn_implementation=attention)
    if shape.family == "opt":
        cfg = OPTConfig(ffn_dim=shape.ffn, word_embed_proj_dim=shape.proj_dim or shape.hidden, dropout=0.0,
                        attention_dropout=0.0, **common)
        cls = OPTForCausalLM
    else:
        cfg = LlamaConfig(intermediate_size=shape.ffn, num_key_value_heads=shape.kv_heads or shape.heads, **common)
        cls = LlamaForCausalLM
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@dataclass
class TracedMemory:
    weights: int
    state: int  # optimizer state and master shard, as the optimizer allocated them
    forward_peak: int  # activations + logits + loss at the forward's peak, beyond weights and state

    @property
    def total(self) -> int:
        return self.weights + self.state + self.forward_peak


def trace_memory(model, *, batch: int = 16, seq: int = 256, dtype: str = "bf16", optimizer: str = "helene",
                 state_dtype: str = "fp32", master: bool | None = None, attention: str = "sdpa") -> TracedMemory:
    """Trace one replicated process: weights, the optimizer's allocations, and a no-grad forward with
    labels on every token (the planner's worst case), as ``bench/step_bench.py`` runs it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zo_scale import FZOO, HELENE, HELENEFZOO, HELENEMuon, HiZOO, HiZOOL, MeZO, ZOMuon

    shape = resolve_model(model)
    dtype = TORCH_DTYPES[DTYPE_ALIASES.get(dtype, dtype)]
    state = TORCH_DTYPES[DTYPE_ALIASES.get(state_dtype, state_dtype)]
    optimizers = {"mezo": MeZO, "hizoo": HiZOO, "helene": HELENE, "fzoo": FZOO, "hizoo-l": HiZOOL, "zo-muon": ZOMuon,
                  "helene-muon": HELENEMuon, "helene-fzoo": HELENEFZOO}
    with FakeTensorMode():
        net = build_model(shape, dtype, attention=attention)
        weights = sum(p.numel() * p.element_size() for p in net.parameters())
        counter = LiveTensorBytes()
        counter.ignore(net.parameters())
        with counter:
            opt = optimizers[optimizer](net, lr=1e-6, eps=1e-3, seed=0, master_weights=master, state_dtype=state)
            allocated = counter.live
            counter.peak = allocated  # from here the step: construction's transient copies are not part of it
            ids = torch.zeros(batch, seq, dtype=torch.long)
            with torch.no_grad():
                net(input_ids=ids, labels=ids, use_cache=False).loss
        del opt
    return TracedMemory(weights, allocated, counter.peak - allocated)


def compare(model, *, batch=16, seq=256, dtype="bf16", optimizer="helene", state_dtype="fp32", master=None,
            attention="sdpa") -> tuple[TracedMemory, Plan]:
    """The trace, and the planner's plan of the same run on one process, with no runtime reserve."""
    traced = trace_memory(model, batch=batch, seq=seq, dtype=dtype, optimizer=optimizer, state_dtype=state_dtype,
                          master=master, attention=attention)
    p = plan(model, 1, dtype=dtype, optimizer=optimizer, batch=batch, seq=seq, backend="replicated", master=master,
             state_dtype=state_dtype, attention=attention, reserve_gib=0.0)
    return traced, p


def planned_total(p: Plan) -> int:
    """The plan's bytes that a trace sees: all but the z chunk (the fused kernels keep z in registers)
    and ZO-Muon's bases (drawn at the first step, which a fake-tensor trace cannot take: z needs data)."""
    return p.total_bytes - p.parts["z chunk (fp32)"] - p.parts.get(P_ROWS, 0) - p.parts.get(P_DRAW, 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zo_scale.memtrace", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a zo_scale.plan model name or a transformers config.json")
    ap.add_argument("--optimizer", default="helene", choices=["mezo", "hizoo", "helene", "fzoo", "hizoo-l", "zo-muon",
                                                              "helene-muon", "helene-fzoo"])
    ap.add_argument("--dtype", default="bf16", choices=list(TORCH_DTYPES))
    ap.add_argument("--state-dtype", default="fp32", choices=list(TORCH_DTYPES))
    ap.add_argument("--master", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    args = ap.parse_args(argv)
    try:
        traced, p = compare(args.model, batch=args.batch, seq=args.seq, dtype=args.dtype, optimizer=args.optimizer,
                            state_dtype=args.state_dtype, master=args.master, attention=args.attention)
    except PlanError as err:
        print(f"zo_scale.memtrace: error: {err}", file=sys.stderr)
        return 2
    rows = [("weights", traced.weights, p.parts["weight shard"]),
            ("optimizer state + master", traced.state, p.state_bytes),
            ("forward + loss peak", traced.forward_peak, p.parts["forward peak (activations)"]),
            ("total (no reserve, no z chunk)", traced.total, planned_total(p))]
    print(f"{args.model}: {args.optimizer}, {args.dtype} weights, batch {args.batch} × seq {args.seq}, "
          f"{args.attention} attention, one process")
    print(f"  {'GiB':<34}{'traced':>9}{'planned':>9}{'plan/trace':>12}")
    print("\n".join(f"  {name:<34}{t / GIB:>9.2f}{pl / GIB:>9.2f}{pl / t if t else 1.0:>12.3f}" for name, t, pl in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
