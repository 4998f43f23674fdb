from zo_scale.optim.base import NonFiniteLossError, StepStats, ZOOptimizer
from zo_scale.optim.fzoo import FZOO
from zo_scale.optim.helene import HELENE
from zo_scale.optim.helene_fzoo import HELENEFZOO
from zo_scale.optim.helene_muon import HELENEMuon
from zo_scale.optim.hizoo import HiZOO
from zo_scale.optim.hizoo_l import HiZOOL
from zo_scale.optim.mezo import MeZO
from zo_scale.optim.zo_muon import ZOMuon

__all__ = ["FZOO", "HELENE", "HELENEFZOO", "HELENEMuon", "HiZOO", "HiZOOL", "MeZO", "NonFiniteLossError", "StepStats", "ZOMuon", "ZOOptimizer"]
