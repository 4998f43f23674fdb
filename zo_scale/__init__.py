"""zo_scale: zeroth-order fine-tuning (HELENE, MeZO, HiZOO, HiZOO-L, FZOO, ZO-Muon, HELENE-Muon, HELENE-FZOO) on plain, FSDP2 and DeepSpeed ZeRO-3 models."""

from zo_scale.distributed import install_exit_teardown
from zo_scale.optim import FZOO, HELENE, HELENEFZOO, HELENEMuon, HiZOO, HiZOOL, MeZO, NonFiniteLossError, StepStats, ZOMuon, ZOOptimizer

install_exit_teardown()  # before the user's own init_process_group, usually: see its docstring

__version__ = "0.1.0"
__all__ = ["FZOO", "HELENE", "HELENEFZOO", "HELENEMuon", "HiZOO", "HiZOOL", "MeZO", "NonFiniteLossError", "StepStats", "ZOMuon", "ZOOptimizer", "__version__"]
