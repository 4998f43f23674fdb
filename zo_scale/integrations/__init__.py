"""Entry points for other training frameworks: ``ZOTrainer`` for ``transformers.Trainer``."""

from zo_scale.integrations.hf_trainer import ZO_STATE_DIR, LrHolder, ZOTrainer

__all__ = ["ZO_STATE_DIR", "LrHolder", "ZOTrainer"]
