"""Tasks, prompt templates, training batches and the ZO loss (see docs/tasks.md).

    task = get_task("sst2-lmbff")                       # or "boolq", data_dir="path/to/boolq"
    train = task.examples("train", k_per_class=16, seed=13)
    batch = causal_lm_batch(tokenizer, train[:8])      # or masked_lm_batch for RoBERTa-style models
    loss_sum, n_tokens = token_loss(model, batch)      # all-reduce both, then divide

Evaluation lives in zo_scale.evaluate.
"""

from zo_scale.data.answer_metrics import exact_match, normalize_answer, token_f1
from zo_scale.data.collate import IGNORE_INDEX, causal_lm_batch, masked_lm_batch
from zo_scale.data.example import Example
from zo_scale.data.losses import token_loss, verbalizer_loss
from zo_scale.data.tasks import (
    LMBFF_K_CHOICES,
    LMBFF_SEEDS,
    LMBFF_TASKS,
    MEZO_NUM_DEV,
    MEZO_NUM_TEST,
    MEZO_NUM_TRAIN,
    MEZO_TASKS,
    TASK_NAMES,
    Task,
    get_task,
)

__all__ = [
    "IGNORE_INDEX",
    "LMBFF_K_CHOICES",
    "LMBFF_SEEDS",
    "LMBFF_TASKS",
    "MEZO_NUM_DEV",
    "MEZO_NUM_TEST",
    "MEZO_NUM_TRAIN",
    "MEZO_TASKS",
    "TASK_NAMES",
    "Example",
    "Task",
    "causal_lm_batch",
    "exact_match",
    "get_task",
    "masked_lm_batch",
    "normalize_answer",
    "token_f1",
    "token_loss",
    "verbalizer_loss",
]
