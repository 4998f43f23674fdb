"""What FSDP2 and DeepSpeed ZeRO-3 hold gathered during one forward, replayed from the model's shape.

``zo_scale.plan`` asks this module for the transient peak of a sharded forward: the gathered parameters
(and the engine's flat all-gather buffers) alive at the worst moment, plus the activations alive then.
Both engines are replayed step by step the way their code runs, as ``python -m zo_scale.dryrun`` traces
them (fake tensors, real engines, storage resizes followed):

* FSDP2 (torch >= 2.6, ``_fsdp_param_group.py``): the root unit (embeddings, final norm, untied head)
  is gathered first and stays gathered for the whole forward. Each layer's unit is all-gathered into
  one flat buffer, copied out into its parameters' own (dim-0 padded) storages, and resharded after
  its forward; in forward the flat buffer of the previous all-gather is kept until this copy-out
  ends (so the copy-out may overlap the next all-gather on a GPU). Worst moments: the first layer's
  copy-out (root flat + root + layer flat + layer) and every later one (root + previous flat + flat +
  layer).
* ZeRO-3 (DeepSpeed >= 0.14, ``partitioned_param_coordinator.py``, with a complete trace, i.e. from
  the second forward on): each leaf module's parameters are fetched when it runs; then parameters
  are prefetched in trace order, at most ``stage3_prefetch_bucket_size`` elements per module and
  while fewer than ``stage3_max_live_parameters`` are gathered; after a module runs its parameters
  are released unless persistent (numel <= ``stage3_param_persistence_threshold``), prefetched for
  a later use, or used again within ``stage3_max_reuse_distance`` elements. A fetch of several
  parameters gathers into one flat buffer that lives until each of them was waited for, and each
  parameter gets its own copy; a fetch of one parameter keeps its padded buffer as the parameter.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from zo_scale.model_shape import ModelShape


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Module:
    name: str
    params: tuple[Param, ...]
    work: str = ""  # the activations it creates: "attention", "mlp", "logits" or none
    layer: int = -1  # decoder layer index, -1 outside the layers (FSDP2's root unit)


def forward_modules(shape: ModelShape) -> list[Module]:
    """Every leaf module with parameters, in the order a forward runs them (the tied head reuses the
    input embedding's parameter)."""
    h, f, v = shape.hidden, shape.ffn, shape.vocab
    kv = (shape.kv_heads or shape.heads) * shape.head_dim

    def linear(name, out, inp, bias, work, layer=-1):
        ps = (Param(f"{name}.weight", (out, inp)),) + ((Param(f"{name}.bias", (out,)),) if bias else ())
        return Module(name, ps, work, layer)

    def norm(name, bias, layer=-1):
        ps = (Param(f"{name}.weight", (h,)),) + ((Param(f"{name}.bias", (h,)),) if bias else ())
        return Module(name, ps, "", layer)

    embed = Param("embed_tokens.weight", (v, shape.proj_dim or h))
    mods = [Module("embed_tokens", (embed,))]
    if shape.family == "opt":
        p = shape.proj_dim or h
        mods.append(Module("embed_positions", (Param("embed_positions.weight", (shape.max_positions + 2, h)),)))
        if p != h:
            mods.append(linear("project_in", h, p, False, ""))
        for i in range(shape.layers):
            pre = f"layers.{i}."
            mods.append(norm(pre + "self_attn_layer_norm", True, i))
            mods += [linear(pre + f"self_attn.{x}_proj", h, h, True, "attention", i) for x in ("q", "k", "v", "out")]
            mods.append(norm(pre + "final_layer_norm", True, i))
            mods += [linear(pre + "fc1", f, h, True, "mlp", i), linear(pre + "fc2", h, f, True, "mlp", i)]
        if p != h:
            mods.append(linear("project_out", p, h, False, ""))
        else:
            mods.append(norm("final_layer_norm", True))
    else:
        for i in range(shape.layers):
            pre = f"layers.{i}."
            mods.append(norm(pre + "input_layernorm", False, i))
            mods += [linear(pre + "self_attn.q_proj", h, h, False, "attention", i),
                     linear(pre + "self_attn.k_proj", kv, h, False, "attention", i),
                     linear(pre + "self_attn.v_proj", kv, h, False, "attention", i),
                     linear(pre + "self_attn.o_proj", h, h, False, "attention", i),
                     norm(pre + "post_attention_layernorm", False, i)]
            mods += [linear(pre + f"mlp.{x}_proj", *dims, False, "mlp", i)
                     for x, dims in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f)))]
        mods.append(norm("norm", False))
    head = (embed,) if shape.tied_embeddings else (Param("lm_head.weight", (v, h)),)
    mods.append(Module("lm_head", head, "logits"))
    return mods


def model_params(shape: ModelShape) -> list[Param]:
    """Every parameter once (a tied one under its first name)."""
    seen, out = set(), []
    for m in forward_modules(shape):
        for p in m.params:
            if p.name not in seen:
                seen.add(p.name)
                out.append(p)
    return out


# ---------------------------------------------------------------------------------- shard sizes


def fsdp2_rows(d0: int, world: int, rank: int) -> int:
    """Rows of a ``d0``-row parameter that FSDP2 gives ``rank`` (torch.chunk: ceil(d0 / world) each)."""
    c = -(-d0 // world)
    return max(0, min(d0, (rank + 1) * c) - min(d0, rank * c))


def shard_numel(param: Param, backend: str, world: int, rank: int) -> int:
    """Elements of ``param`` that ``rank`` holds (FSDP2: a block of rows; ZeRO-3: a flat slice)."""
    if backend == "replicated" or world == 1:
        return param.numel
    if backend == "fsdp2":
        row = param.numel // param.shape[0]
        return fsdp2_rows(param.shape[0], world, rank) * row
    part = -(-param.numel // world)
    return max(0, min(param.numel, (rank + 1) * part) - rank * part)


def fsdp2_padded(param: Param, world: int) -> int:
    """Elements of the gathered parameter: dim 0 padded to a multiple of the world size."""
    row = param.numel // param.shape[0]
    return -(-param.shape[0] // world) * world * row


def zero3_padded(param: Param, world: int) -> int:
    return -(-param.numel // world) * world


# ---------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Activations:
    residual: int  # hidden states and the residual branch, alive through the forward
    attention: int  # q, k, v and the attention output of one layer
    mlp: int  # one layer's MLP intermediates
    logits: int  # the head's output in the weight dtype
    loss: int  # logits plus the loss's fp32 copy and log-softmax

    def of(self, work: str) -> int:
        return self.residual + {"attention": self.attention, "mlp": self.mlp, "logits": self.logits}.get(work, 0)


@dataclass(frozen=True)
class Batched:
    """Batched probes (``zo_scale.probes``) at each moment of a forward. The activations carry every group
    (the replays get Activations of groups × the micro-batch); a module that runs holds a perturbed copy
    of its own parameters while its groups run, built from the gathered ones with z drawn ``chunk``
    elements at a time (fp32, and an fp32 view of the copy's chunk when the copy is low precision); the
    head's per-group logits are joined into one tensor, both alive for a moment; and the loss is summed
    per group by the closure after the forward (transformers' own loss is one mean), when the engine has
    released what it gathered and only the logits and the loss's copies are alive. ``direction_temps``:
    fp32 chunks besides z alive while a direction is built (HiZOO-L's z/√H: H, √H and the quotient)."""

    wb: int
    chunk: int
    direction_temps: int = 0

    def copy(self, module: Module) -> int:
        if not module.params:
            return 0
        chunk = 4 * min(self.chunk, max(p.numel for p in module.params))
        z = chunk * (1 if self.wb == 4 else 2)
        return sum(p.numel for p in module.params) * self.wb + z + self.direction_temps * chunk


# ---------------------------------------------------------------------------------- the replays


@dataclass
class Peak:
    gathered: int = 0  # bytes of gathered parameters and gather buffers at the peak
    activations: int = 0
    where: str = ""
    perturbed: int = 0  # batched probes: the running module's perturbed copy and its z chunk

    @property
    def total(self) -> int:
        return self.gathered + self.activations + self.perturbed

    def offer(self, gathered: int, activations: int, where: str, perturbed: int = 0) -> None:
        if gathered + activations + perturbed > self.total:
            self.gathered, self.activations, self.where, self.perturbed = gathered, activations, where, perturbed

    def offer_head(self, gathered: int, act: Activations, copy: int, batched: bool, where: str = "the head") -> None:
        """The head runs (its perturbed copy beside the groups' logits); batched, its groups' logits are
        then joined (twice the logits for a moment)."""
        self.offer(gathered, act.logits + act.residual, where, copy)
        if batched:
            self.offer(gathered, 2 * act.logits + act.residual, f"{where}'s joined logits")


@dataclass
class ForwardReplay:
    peak: Peak
    gather_bytes: int  # bytes this rank receives from all-gathers in one forward
    gathers: int  # all-gather calls in one forward


def fsdp2_forward(shape: ModelShape, world: int, wb: int, act: Activations,
                  batched: Batched | None = None) -> ForwardReplay:
    mods = forward_modules(shape)
    root, layers = 0, [0] * shape.layers
    copy = batched.copy if batched else (lambda m: 0)
    first, head = copy(mods[0]), copy(mods[-1])
    layer_copy = [0] * shape.layers  # the largest perturbed copy a layer's modules make
    seen = set()
    for m in mods:
        if m.layer >= 0:
            layer_copy[m.layer] = max(layer_copy[m.layer], copy(m))
        for p in m.params:
            if p.name in seen:
                continue
            seen.add(p.name)
            b = fsdp2_padded(p, world) * wb
            if m.layer < 0:
                root += b
            else:
                layers[m.layer] += b
    peak = Peak()
    held_flat = root  # the root's flat buffer, kept until the first layer's copy-out ends
    peak.offer(root + held_flat, act.residual, "the embeddings", first)
    for i, unit in enumerate(layers):
        peak.offer(root + held_flat + 2 * unit, act.residual, f"copy-out of layer {i}'s all-gather")
        held_flat = unit  # this layer's flat buffer, kept until the next copy-out
        peak.offer(root + held_flat + unit, act.of("mlp" if act.mlp >= act.attention else "attention"),
                   f"layer {i}'s forward", layer_copy[i])
    peak.offer_head(root + held_flat, act, head, batched is not None)
    if batched:  # the closure sums each group's loss after the forward, every unit resharded by then
        peak.offer(0, act.loss, "the loss, after the forward")
    else:  # transformers' loss (labels=...) runs inside the root's forward
        peak.offer(root + held_flat, act.loss + act.residual, "the loss")
    return ForwardReplay(peak, root + sum(layers), 1 + len(layers))


def zero3_forward(shape: ModelShape, world: int, wb: int, act: Activations, *, bucket: int, max_live: int,
                  reuse_distance: int, persistence: int, batched: Batched | None = None) -> ForwardReplay:
    mods = forward_modules(shape)
    copy = batched.copy if batched else (lambda m: 0)
    trace = deque((p, step) for step, m in enumerate(mods) for p in m.params)
    status = {}  # param name -> "inflight" | "available"
    numel = {p.name: p.numel for m in mods for p in m.params}
    fetched_for = {}  # param name -> step of the latest use it was prefetched for
    storage = {}  # param name -> bytes of its own gathered storage
    group_of, groups = {}, {}  # in-flight param -> its fetch; fetch id -> [flat bytes, params left to wait for]
    state = dict(available=0, live=0, gather_bytes=0, gathers=0)  # gathers numbers the fetches too
    peak = Peak()

    def gather(names, where):
        state["available"] += sum(numel[n] for n in names)
        state["gathers"] += 1
        if len(names) == 1:  # one parameter: its padded buffer becomes the parameter
            n = names[0]
            b = -(-numel[n] // world) * world * wb
            storage[n] = b
            status[n] = "available"
            state["live"] += b
            state["gather_bytes"] += b
        else:
            b = sum(-(-numel[n] // world) for n in names) * world * wb
            gid = state["gathers"]
            groups[gid] = [b, set(names)]
            for n in names:
                group_of[n] = gid
                status[n] = "inflight"
            state["live"] += b
            state["gather_bytes"] += b
        peak.offer(state["live"], act.residual, f"gather for {where}")

    def wait(n):
        gid = group_of.pop(n, None)
        if gid is None:
            return
        flat, waiting = groups[gid]
        if any(status[x] == "inflight" for x in waiting):  # the first wait copies every parameter out
            for x in waiting:
                if status[x] == "inflight":
                    storage[x] = numel[x] * wb
                    status[x] = "available"
                    state["live"] += storage[x]
            peak.offer(state["live"], act.residual, "copy-out of a fetch")
        waiting.discard(n)
        if not waiting:
            state["live"] -= flat
            del groups[gid]

    def release(n):
        state["available"] -= numel[n]
        state["live"] -= storage.pop(n)
        del status[n]

    for step, m in enumerate(mods):
        names = list(dict.fromkeys(p.name for p in m.params))
        missing = [n for n in names if n not in status]
        if missing:
            gather(missing, m.name)
        for n in names:
            wait(n)
        # take this module's own uses off the prefetch queue
        own = {n for n in names if fetched_for.get(n, -1) < step}
        popped = set()
        while trace and len(popped) < len(own):
            p, s = trace.popleft()
            fetched_for[p.name] = s
            popped.add(p.name)
        budget = min(max_live - state["available"], bucket)
        prefetch, count = [], 0
        while trace and count < budget:
            p, s = trace.popleft()
            fetched_for[p.name] = max(fetched_for.get(p.name, -1), s)
            if p.name not in status and p.name not in prefetch:
                prefetch.append(p.name)
                count += p.numel
        if prefetch:
            gather(prefetch, f"prefetch after {m.name}")
        if m.work == "logits":
            peak.offer_head(state["live"], act, copy(m), batched is not None, m.name)
        else:
            peak.offer(state["live"], act.of(m.work), m.name, copy(m))
        # release after the forward of this module (the coordinator's step id has moved on by one)
        keep = {n for n in names if numel[n] <= persistence or fetched_for.get(n, -1) > step + 1}
        traversed = 0
        for later in mods[step + 1:]:
            if traversed >= reuse_distance:
                break
            for p in later.params:
                keep.add(p.name)
                traversed += p.numel
        for n in names:
            if n not in keep and status.get(n) == "available":
                release(n)
        if m.work == "logits" and not batched:  # transformers' loss (labels=...) runs inside the forward
            peak.offer(state["live"], act.loss + act.residual, "the loss")
    if batched:  # the closure sums each group's loss after the forward: only persistent parameters stay gathered
        persistent = sum(b for n, b in storage.items() if numel[n] <= persistence)
        peak.offer(persistent, act.loss, "the loss, after the forward")
    return ForwardReplay(peak, state["gather_bytes"], state["gathers"])
