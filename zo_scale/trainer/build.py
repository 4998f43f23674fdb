"""Build what a run trains: model and tokenizer, PEFT adapter, trainable subset, backend, optimizer.

Backends, the way their users set them up:

* ``none``: the plain module on this rank's device (one process; with several ranks every rank
  holds the whole model and applies the same update).
* ``fsdp2``: ``fully_shard`` on every decoder layer (the model's ``_no_split_modules`` classes), then
  on the root, the way torchtitan does it: only rank 0 loads the model (on CPU); the other ranks build
  it on the meta device from rank 0's config (no storage), every rank shards its copy, and
  ``set_model_state_dict(broadcast_from_rank0=True)`` fills each rank's shards from rank 0's weights,
  one tensor at a time. Host memory: the whole model once (rank 0), not once per rank.
* ``deepspeed``: ``HfDeepSpeedConfig`` is alive while transformers loads the model, so
  ``from_pretrained`` builds it under ``deepspeed.zero.Init``: weights are partitioned as they load
  and no rank ever holds the whole model. ``deepspeed.initialize`` then returns the engine (no
  DeepSpeed optimizer: the ZO optimizer edits the partitions itself).
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass

import torch

from zo_scale.config import ConfigError, RunConfig, check_masked_lm, optimizer_class
from zo_scale.distributed import DistInfo


@dataclass
class Built:
    model: torch.nn.Module  # what runs forwards and what the optimizer is given (module or DeepSpeed engine)
    module: torch.nn.Module  # the (possibly PEFT-wrapped) transformers model inside
    tokenizer: object
    backend: str
    is_peft: bool
    ds_config: dict | None = None
    _keepalive: object = None  # HfDeepSpeedConfig must outlive from_pretrained
    # bytes of real (non-meta) parameter and buffer storage this rank held before the backend sharded the
    # model: 0 on FSDP2's ranks other than 0 (meta skeletons)
    loaded_bytes: int = 0


def model_spec(cfg: RunConfig) -> dict:
    """The ``zo_scale.models.load_model_and_tokenizer`` spec of the model section."""
    spec = source_spec(cfg)
    m = cfg.model
    if m.tokenizer == "offline":
        from zo_scale.data.tokenizer_tools import OFFLINE_VOCAB_SIZE, build_offline_tokenizer

        # a masked LM reads "<s> text </s>" (RoBERTa), a causal LM "<s> text"
        spec["tokenizer"] = build_offline_tokenizer(style="mlm" if model_head(cfg) == "masked" else "causal")
        if m.arch is not None:
            spec["config"].setdefault("vocab_size", OFFLINE_VOCAB_SIZE)
    elif m.tokenizer is not None:
        spec["tokenizer"] = m.tokenizer
    return spec


def source_spec(cfg: RunConfig) -> dict:
    """Where the weights come from (the model spec without its tokenizer)."""
    m = cfg.model
    if m.arch is not None:
        return {"arch": m.arch, "config": dict(m.config), "seed": m.init_seed}
    if m.gguf is not None:
        return {"gguf": m.gguf}
    if m.package is not None:
        return {"package": m.package}
    return {"name_or_path": m.name_or_path, "head": m.head, "kwargs": dict(m.from_pretrained)}


def model_head(cfg: RunConfig) -> str:
    """"masked" or "causal": known from the config, or read from the checkpoint's config.json (cached)."""
    from zo_scale.models import model_head as head_of_spec

    try:
        return head_of_spec(source_spec(cfg))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model: {_one_line(e)}") from None


def deepspeed_config(cfg: RunConfig, world: int) -> dict:
    """The user's DeepSpeed section completed with what follows from the rest of the config: batch
    sizes (one micro-batch per step, no accumulation) and the precision of model.dtype."""
    ds = copy.deepcopy(cfg.deepspeed or {})
    per_rank = cfg.train.batch_size // world
    for key, value in (("train_micro_batch_size_per_gpu", per_rank), ("gradient_accumulation_steps", 1),
                       ("train_batch_size", cfg.train.batch_size)):
        if ds.get(key, value) not in (value, "auto"):
            raise ConfigError(f"deepspeed.{key} is {ds[key]} but train.batch_size {cfg.train.batch_size} on "
                              f"{world} ranks means {value}: drop it or make them agree")
        ds[key] = value
    if cfg.model.dtype == "bfloat16":
        ds.setdefault("bf16", {"enabled": True})
    elif cfg.model.dtype == "float16":
        ds.setdefault("fp16", {"enabled": True})
    ds.setdefault("steps_per_print", 1 << 30)  # DeepSpeed's own step logging is meaningless without its optimizer
    return ds


def build(cfg: RunConfig, info: DistInfo) -> Built:
    """Model and tokenizer, adapter or trainable subset, then the backend around them."""
    masked = model_head(cfg) == "masked"
    if masked:  # checked by the config already unless the checkpoint's config.json had to say
        check_masked_lm(cfg)
    ds_config = deepspeed_config(cfg, info.world_size) if cfg.backend == "deepspeed" else None
    model, tokenizer, keepalive = load(cfg, info, ds_config)
    if masked and tokenizer.mask_token is None:
        raise ConfigError("model.tokenizer has no mask token, which a masked LM needs")
    is_peft = cfg.peft is not None
    if is_peft:
        model = apply_peft(cfg, model, masked)
    elif cfg.model.trainable is not None:
        select_trainable(model, cfg.model.trainable)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")
    loaded_bytes = storage_bytes(model)
    module = model
    if cfg.backend == "fsdp2":
        model = module = wrap_fsdp2(model, cfg, info)
    elif cfg.backend == "deepspeed":
        import deepspeed

        model, *_ = deepspeed.initialize(model=model, config=ds_config)
        module = model.module
    model.eval()  # ZO forwards run without dropout
    return Built(model, module, tokenizer, cfg.backend, is_peft, ds_config, keepalive, loaded_bytes)


def load(cfg: RunConfig, info: DistInfo, ds_config: dict | None):
    """(model, tokenizer, HfDeepSpeedConfig or None). A load failure (missing file, no network, bad
    GGUF) is bad input: one line, exit code 2."""
    keepalive = None
    if ds_config is not None:
        import deepspeed
        import torch.distributed as dist
        from transformers.integrations import HfDeepSpeedConfig

        # zero.Init reads the world size through deepspeed.comm: attach it to our process group first
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        if cfg.model.arch is None:  # pretrained weights load straight into their partitions
            keepalive = HfDeepSpeedConfig(ds_config)
    if cfg.backend == "fsdp2" and info.world_size > 1:
        model, tokenizer = _load_on_rank0(cfg, info)
    else:
        model, tokenizer = _load_here(cfg, info.device if cfg.backend == "none" else None)
    if ds_config is not None and keepalive is None:
        # A random-init (test-sized) model is built whole, as for the other backends, so its initial weights
        # are the same whatever the backend; deepspeed.initialize partitions it.
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)
    return model, tokenizer, keepalive


def _load_here(cfg: RunConfig, device):
    from zo_scale.models import load_model_and_tokenizer

    try:
        return load_model_and_tokenizer(model_spec(cfg), getattr(torch, cfg.model.dtype), device=device)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"model: {_one_line(e)}") from None


def _load_on_rank0(cfg: RunConfig, info: DistInfo):
    """FSDP2 on several ranks: rank 0 loads the model on CPU and sends its config and tokenizer; the
    others build the same model on the meta device (shapes, no storage) for wrap_fsdp2 to fill. Every
    model source works so: a GGUF file's config, known only once dequantised, comes from rank 0 too."""
    import torch.distributed as dist

    from zo_scale.models import build_skeleton

    model, sent = None, [None]
    if info.rank == 0:
        try:
            model, tokenizer = _load_here(cfg, None)
            sent = [(model.config, tokenizer)]
        except ConfigError as e:
            sent = [e]  # the other ranks stop with the same one line instead of waiting for weights
    dist.broadcast_object_list(sent, src=0)
    if isinstance(sent[0], ConfigError):
        raise sent[0]
    if model is None:
        config, tokenizer = sent[0]
        model = build_skeleton(config, model_head(cfg), getattr(torch, cfg.model.dtype))
    return model, tokenizer


def storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of real (non-meta) storage behind ``model``'s parameters and buffers, each storage once."""
    sizes = {}
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_meta:
            storage = t.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def apply_peft(cfg: RunConfig, model, masked: bool):
    """Wrap with a peft adapter: only the adapter's parameters have requires_grad, so ZO touches only them.
    Its random init (LoRA's A) is seeded from the run seed: the same on every rank and every run.
    peft has no masked-LM task type; without one, LoRA wraps the model in a plain PeftModel whose forward
    is the model's (MLM logits and all)."""
    import peft

    options = dict(cfg.peft)
    method = options.pop("method")
    cls = {"lora": peft.LoraConfig, "prefix": peft.PrefixTuningConfig}[method]
    try:
        peft_config = cls(task_type=None if masked else "CAUSAL_LM", **options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = peft.get_peft_model(model, peft_config)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"peft: {_one_line(e)}") from None
    model.eval()
    return model


def select_trainable(model, patterns: list[str]) -> None:
    """requires_grad only for parameters whose name matches one of the regexes (re.search)."""
    from zo_scale.shards import canonical_name

    compiled = [re.compile(p) for p in patterns]
    names = []
    for name, p in model.named_parameters():
        name = canonical_name(name)
        names.append(name)
        p.requires_grad_(any(c.search(name) for c in compiled))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.trainable {patterns} matches no parameter; names look like {names[0]!r}, {names[-1]!r}")


def wrap_fsdp2(model, cfg: RunConfig, info: DistInfo):
    """fully_shard every decoder layer (the classes transformers marks as not to be split), then the root.
    fully_shard moves what it shards to the device one unit at a time, so no device holds the whole model.
    On several ranks, rank 0's weights then fill every rank's shards (the other ranks' models are meta
    skeletons, see load): the same initial weights as one process loading the model."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    broadcast, full = dist.get_world_size() > 1, {}
    if broadcast and info.rank == 0:  # the loaded weights, detached: they stay on CPU when fully_shard moves them
        with _each_module_once(model):
            full = model.state_dict()
    reshard = cfg.fsdp2.reshard_after_forward if cfg.fsdp2 else True
    encoders = getattr(model, "prompt_encoder", None)
    on_meta = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if encoders is not None and not on_meta:
        encoders.to(info.device)  # fully_shard moves only what it manages
    apply_fully_shard(model, reshard_after_forward=reshard)
    if broadcast:
        if on_meta:  # allocate this rank's shards (and the replicated rest): uninitialised until filled
            model.to_empty(device=info.device)
        # In place (not assign=True), so tied weights (OPT's and RoBERTa's embeddings/LM head) stay one tensor.
        with _each_module_once(model):
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        # Non-persistent buffers (Llama's rotary inv_freq, RoBERTa's position_ids) are not in a state dict:
        # copy rank 0's, which the modules computed from the config when it was loaded. Exact and the same
        # for every architecture (re-running each module's own init would need per-model code); they are small.
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if name in module._non_persistent_buffers_set:
                    dist.broadcast(buffer, src=0)
    return model


def apply_fully_shard(model, reshard_after_forward: bool = True) -> None:
    """The sharding policy of every FSDP2 run (and of ``zo_scale.dryrun``): fully_shard each decoder layer (the
    classes transformers marks as not to be split), then the root."""
    from torch.distributed.fsdp import fully_shard

    opts = {"reshard_after_forward": reshard_after_forward}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    # A unit holding a tied parameter (RoBERTa's embeddings share theirs with the LM head) is left to the
    # root: FSDP2 needs every user of a parameter in one group.
    tied = _tied_parameters(model)
    layers = [m for m in model.modules()
              if type(m).__name__ in layer_classes and not any(id(p) in tied for p in m.parameters())]
    if not layers:
        raise ConfigError(f"backend fsdp2: cannot find the decoder layers of {type(base).__name__} (_no_split_modules)")
    for layer in layers:
        fully_shard(layer, **opts)
    # peft's prompt encoder (prefix tuning) runs outside the root's unshard: keep it replicated (it is tiny)
    encoders = getattr(model, "prompt_encoder", None)
    ignored = {p for p in encoders.parameters()} if encoders is not None else None
    fully_shard(model, ignored_params=ignored, **opts)


@contextlib.contextmanager
def _each_module_once(model):
    """Unregister, while the block runs, every further name of a module registered under several (peft's
    prefix tuning keeps the input embeddings as ``word_embeddings`` too): set_model_state_dict fills each
    module once, under its first name, and load_state_dict would then miss the weights of the others."""
    seen, children_of = set(), {}

    def walk(module):  # depth first, the order in which set_model_state_dict names the modules
        seen.add(module)
        for name, child in list(module._modules.items()):
            if child in seen:
                children_of.setdefault(module, dict(module._modules))
                del module._modules[name]
            elif child is not None:
                walk(child)

    walk(model)
    try:
        yield
    finally:
        for module, children in children_of.items():  # back, in their order
            module._modules.clear()
            module._modules.update(children)


def _tied_parameters(model) -> set[int]:
    """ids of parameters registered under more than one name."""
    seen, tied = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied


def build_optimizer(cfg: RunConfig, built: Built):
    options = cfg.optimizer_options
    if "state_dtype" in options:
        options["state_dtype"] = getattr(torch, options["state_dtype"])
    try:
        return optimizer_class(cfg.optimizer["name"])(
            built.model, seed=cfg.seed, on_nonfinite=cfg.train.on_nonfinite, **options
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer: {_one_line(e).removeprefix('zo_scale: ')}") from None
