"""Shared pieces of the sharded-backend checks: tiny models, one global batch, the closure, the
optimizers' settings, and how to read full parameters back from each backend.

Imported by the worker (``zo_worker.py``, one process per rank) and by the single-process
reference run, so every run builds bit-identical initial weights and batches.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

K_STEPS = 4  # steps per trajectory
RESUME_AT = 2  # the checkpoint test saves after this many steps
FUSED_STEPS = 2  # steps through the Triton interpreter (slow on CPU)
GLOBAL_BATCH = 6  # sequences; split evenly over 1, 2 or 3 ranks
SEQ = 12
LENGTHS = [12, 5, 9, 3, 11, 7]  # unequal token counts per rank: the weighted mean matters
OPTIMIZERS = ("MeZO", "HiZOO", "HELENE", "FZOO", "ZOMuon", "HELENEMuon", "HELENEFZOO")
ARCHS = ("opt", "llama")
MORE_ARCHS = ("gemma", "roberta")  # batched probes only (check_probes)

OPT_HPARAMS = {
    "MeZO": dict(lr=2e-3, eps=1e-3, weight_decay=0.01),
    "HiZOO": dict(lr=2e-3, eps=1e-3, hessian_smooth=1e-6),
    "HELENE": dict(lr=2e-3, eps=1e-3, anneal_horizon=4.0, clip_lambda=0.5),
    "FZOO": dict(lr=2e-3, eps=1e-3, n_directions=3, weight_decay=0.01),  # 4 forwards a step keeps CI short
    # rank 8 (capped at m: temp is 1×3, P a 1×1 sign), P resampled at step 3 — after the resume at
    # RESUME_AT = 2, so the resumed runs cross a resample; N = 2 (3 forwards a step) keeps CI short
    "ZOMuon": dict(lr=2e-3, eps=1e-3, n_directions=2, rank=8, resample_every=3, lr_1d=2e-3, weight_decay=0.01),
    "HELENEMuon": dict(lr=2e-3, eps=1e-3, n_directions=2, rank=8, resample_every=3, lr_1d=2e-3, anneal_horizon=4.0),
    "HELENEFZOO": dict(lr=2e-3, eps=1e-3, n_directions=2, anneal_horizon=4.0, weight_decay=0.01),
    # not in OPTIMIZERS (its own launches: test_hizoo_l_sharded.py); α large so the factors move
    "HiZOOL": dict(lr=2e-3, eps=1e-3, hessian_smooth=1e-3),
}


class LogitScale(torch.nn.Module):
    """Two tiny parameters that scale the logits (so they matter):
    ``temp`` (1, 3): dim0 = 1 < world, so FSDP2 gives ranks 1..W-1 an EMPTY shard;
    ``gain`` (1,): one element, so ZeRO-3 gives ranks 1..W-1 an empty partition.
    A module of their own (a leaf), as Hugging Face models keep every parameter: batched probes then
    run the model once with each layer gathered once (``zo_scale.probes``)."""

    def __init__(self):
        super().__init__()
        self.temp = torch.nn.Parameter(torch.tensor([[0.1, -0.2, 0.05]]))
        self.gain = torch.nn.Parameter(torch.tensor([0.02]))

    def forward(self, logits):
        return logits * (1.0 + self.temp.mean() + self.gain[0])


class TinyLM(torch.nn.Module):
    """A tiny HF causal LM and a ``LogitScale`` (parameters ``scale.temp``, ``scale.gain``)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.scale = LogitScale()

    def forward(self, input_ids, attention_mask):
        return self.scale(self.lm(input_ids=input_ids, attention_mask=attention_mask).logits)

    def layers(self):
        if hasattr(self.lm, "roberta"):
            return self.lm.roberta.encoder.layer
        return self.lm.model.decoder.layers if hasattr(self.lm.model, "decoder") else self.lm.model.layers


def build_model(arch: str, dtype=torch.float32, seed: int = 0) -> TinyLM:
    """Sizes chosen so most dim0 / numel are not divisible by 2 or 3 (uneven shards)."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if arch == "opt":
        cfg = OPTConfig(vocab_size=127, hidden_size=35, word_embed_proj_dim=35, num_hidden_layers=2,
                        num_attention_heads=5, ffn_dim=71, max_position_embeddings=37, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1)
        lm = OPTForCausalLM(cfg)  # lm_head tied to embed_tokens
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=127, hidden_size=40, intermediate_size=77, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False, pad_token_id=0)
        lm = LlamaForCausalLM(cfg)
    elif arch == "gemma":  # tied embeddings, (1 + w) RMSNorm, scaled embedding
        from transformers import GemmaConfig, GemmaForCausalLM

        cfg = GemmaConfig(vocab_size=127, hidden_size=40, intermediate_size=77, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=64,
                          pad_token_id=0)
        lm = GemmaForCausalLM(cfg)
    elif arch == "roberta":  # encoder; the MLM decoder's weight and bias tied (bias held by a container)
        from transformers import RobertaConfig, RobertaForMaskedLM

        cfg = RobertaConfig(vocab_size=127, hidden_size=40, intermediate_size=77, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, pad_token_id=1)
        lm = RobertaForMaskedLM(cfg)
    else:
        raise ValueError(arch)
    model = TinyLM(lm)
    with torch.no_grad():  # HF initialises norms to exactly 1 / biases to 0: make them non-trivial
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    return model.to(dtype)


def global_batch(seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 127, (GLOBAL_BATCH, SEQ), generator=g)
    mask = torch.zeros(GLOBAL_BATCH, SEQ, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 1)
    return ids, mask


def local_batch(rank: int, world: int):
    ids, mask = global_batch()
    per = GLOBAL_BATCH // world
    return ids[rank * per : (rank + 1) * per], mask[rank * per : (rank + 1) * per]


def make_closure(model, rank: int, world: int, per_sequence: bool = True):
    """(summed token cross-entropy, token count) of this rank's part of the global batch.

    ``per_sequence``: one forward per sequence, summed in fp64, so each sequence's loss is
    bit-identical whatever the split (a batched forward's matmuls round differently for batch 2
    and 6); only the fp64 sum order differs between world sizes. See test_sharded.py for why.

    ``closure(groups)`` (batched probes) runs the rows repeated ``groups`` times along dim 0 and
    returns one (sum, count) per group; ``closure()`` is the plain contract."""
    from zo_scale.probes import group_sums, replicate

    ids, mask = local_batch(rank, world)

    def loss_of(i, m, groups):
        i, m = replicate(i, groups), replicate(m, groups)
        logits = model(input_ids=i, attention_mask=m).float()
        labels = i.masked_fill(m == 0, -100)[:, 1:]
        per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                    ignore_index=-100, reduction="none")
        return group_sums(per_token.double(), groups), group_sums(labels != -100, groups)

    def closure(groups=None):
        g = groups or 1
        if not per_sequence:
            sums, counts = loss_of(ids, mask, g)
        else:
            sums, counts = torch.zeros(g, dtype=torch.float64), 0
            for j in range(ids.size(0)):
                s, c = loss_of(ids[j : j + 1], mask[j : j + 1], g)
                sums, counts = sums + s, counts + c
        return (sums, counts) if groups else (sums[0], counts[0])

    return closure


def make_optimizer(name: str, model, **overrides):
    from zo_scale.optim import FZOO, HELENE, HELENEFZOO, HELENEMuon, HiZOO, HiZOOL, MeZO, ZOMuon

    cls = {"MeZO": MeZO, "HiZOO": HiZOO, "HELENE": HELENE, "FZOO": FZOO, "HiZOOL": HiZOOL, "ZOMuon": ZOMuon,
           "HELENEMuon": HELENEMuon, "HELENEFZOO": HELENEFZOO}[name]
    kw = dict(OPT_HPARAMS[name], seed=7)
    kw.update(overrides)
    return cls(model, **kw)


def step_record(opt) -> list:
    """The step's reduced losses (None where an optimizer has no such probe) and FZOO's σ."""
    s = opt.last_stats
    minus = None if math.isnan(s.loss_minus) else s.loss_minus
    return [s.loss_plus, minus, s.loss_zero, s.extra.get("sigma")]


def full_params(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter in full, by canonical name, read back through the engine's own
    gather (FSDP2 ``full_tensor``, DeepSpeed ``GatheredParameters``) — never through our views."""
    from zo_scale.backends import is_deepspeed_engine
    from zo_scale.shards import trainable_named_parameters

    if is_deepspeed_engine(model):
        import deepspeed

        offload = getattr(model.optimizer, "parameter_offload", model.optimizer)  # with a DeepSpeed optimizer: inside it
        offload.get_param_coordinator().release_and_reset_all(model.module)
        named = trainable_named_parameters(model.module)
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone().float() for n, p in named}
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    out = {}
    for n, p in trainable_named_parameters(model):
        out[n] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().float()
    return out


def wrap_fsdp2(model, keep_layers: bool = False, mesh=None):
    """Layers then root, default settings (the root stays unsharded after a forward without
    backward). ``keep_layers``: layers with reshard_after_forward=False and explicit forward
    prefetch of the next layer — every layer then stays gathered after a forward."""
    from torch.distributed.fsdp import fully_shard

    layers = list(model.layers())
    kw = {} if mesh is None else {"mesh": mesh}
    for layer in layers:
        fully_shard(layer, reshard_after_forward=False if keep_layers else None, **kw)
    fully_shard(model, **kw)
    if keep_layers:
        for a, b in zip(layers, layers[1:]):
            a.set_modules_to_forward_prefetch([b])
    return model


def ds_config(threshold: int | None = 0, bf16: bool = False, **zero) -> dict:
    z = {"stage": 3, **zero}
    if threshold is not None:  # None: DeepSpeed's default persistence threshold (1e5 elements)
        z["stage3_param_persistence_threshold"] = threshold
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": z, "steps_per_print": 10**9}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def wrap_zero3(model, **cfg_kw):
    deepspeed = import_deepspeed()

    engine, *_ = deepspeed.initialize(model=model, config=ds_config(**cfg_kw))
    return engine


def quiet():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def import_deepspeed():
    """Import DeepSpeed for CPU tests without its JIT ops: DeepSpeed's comm backend otherwise builds
    (or waits on another process building) its shared-memory all-reduce extension at the first
    ``deepspeed.initialize``, which can take minutes and is not used by ZeRO-3 on gloo."""
    import collections

    quiet()
    import deepspeed
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):  # probing would run compilers too
        deepspeed.ops.__compatible_ops__ = collections.defaultdict(bool)
    return deepspeed
