from zo_scale.optim.base import NonFiniteLossError, StepStats, ZOOptimizer
from zo_scale.optim.fzoo import FZOO
from zo_scale.optim.helene import HELENE
from zo_scale.optim.hizoo import HiZOO
from zo_scale.optim.hizoo_l import HiZOOL
from zo_scale.optim.mezo import MeZO

__all__ = ["FZOO", "HELENE", "HiZOO", "HiZOOL", "MeZO", "NonFiniteLossError", "StepStats", "ZOOptimizer"]
