"""Training data for a run: the task's splits, the order batches are drawn in, and each rank's share.

The order is a pure function of (seed, step): step t takes examples ``[t·B, (t+1)·B)`` of an endless
stream made of one seeded permutation per epoch. A resumed run therefore needs only the step to
continue exactly where it stopped, on any number of ranks: every rank builds the same global batch
and keeps its contiguous ``B / world`` slice of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from zo_scale.config import ConfigError, RunConfig
from zo_scale.data import (MEZO_NUM_DEV, MEZO_NUM_TEST, MEZO_NUM_TRAIN, causal_lm_batch, get_task,
                           masked_lm_batch)
from zo_scale.trainer.build import model_head


def load_splits(cfg: RunConfig) -> dict[str, list]:
    """train / dev / test examples as the task section asks (k-shot, N-sample, or MeZO's sizes)."""
    t = cfg.task
    task = get_task(t.name, data_dir=t.data_dir)
    if t.k_per_class is not None:
        splits = task.sample_splits(seed=cfg.sample_seed, k_per_class=t.k_per_class)
        if t.num_test is not None:  # a fixed seeded subset of the (large) test split
            splits["test"] = task.examples("test", num=t.num_test, seed=cfg.sample_seed) if t.num_test else []
    else:
        splits = task.sample_splits(
            seed=cfg.sample_seed,
            num_train=MEZO_NUM_TRAIN if t.num_train is None else t.num_train,
            num_dev=MEZO_NUM_DEV if t.num_dev is None else t.num_dev,
            num_test=MEZO_NUM_TEST if t.num_test is None else t.num_test,
        )
        if t.num_test == 0:
            splits["test"] = []
    if not splits["train"]:
        raise ConfigError(f"task {t.name!r} gave no training examples")
    if cfg.train.batch_size > len(splits["train"]):
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} exceeds the {len(splits['train'])} training examples of the task"
        )
    return splits


class BatchOrder:
    """Which training examples each step uses (see the module doc)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}  # one epoch at a time is all a step needs (plus the next)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        out, at = [], step * self.batch_size
        while len(out) < self.batch_size:
            epoch, pos = divmod(at, self.n)
            take = self._perm(epoch)[pos : pos + self.batch_size - len(out)]
            out += take
            at += len(take)
        return out

    def position(self, step: int) -> dict:
        """Where the sampler stands before ``step`` (recorded in checkpoints)."""
        epoch, pos = divmod(step * self.batch_size, self.n)
        return {"seed": self.seed, "num_examples": self.n, "batch_size": self.batch_size, "epoch": epoch,
                "position": pos, "next_step": step}


@dataclass
class StepBatch:
    examples: list  # this rank's examples
    tensors: dict[str, torch.Tensor]  # this rank's causal-LM or masked-LM batch
    global_tokens: int  # non-padding tokens in the whole global batch (for tokens/s)


def local_batch(cfg: RunConfig, tokenizer, examples: list, rank: int, world: int) -> StepBatch:
    """Tokenize the global batch (identically on every rank) and keep this rank's rows."""
    per = len(examples) // world
    lo, hi = rank * per, (rank + 1) * per
    if model_head(cfg) == "masked":  # the config says (an arch's head, or the checkpoint's, read once)
        full = masked_lm_batch(tokenizer, examples, max_length=cfg.task.max_length)
    else:
        full = causal_lm_batch(tokenizer, examples, loss_on=cfg.task.loss_on, max_length=cfg.task.max_length)
    # per-row tensors; a masked-LM batch's verbalizer_ids [C] are shared by all rows
    mine = {k: v if k == "verbalizer_ids" else v[lo:hi] for k, v in full.items()}
    width = int(mine["attention_mask"].sum(1).max())  # right padding: drop columns no local row uses
    mine = {k: v[:, :width].contiguous() if v.dim() == 2 else v for k, v in mine.items()}
    return StepBatch(examples[lo:hi], mine, int(full["attention_mask"].sum()))
