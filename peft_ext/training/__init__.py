"""Trainer callbacks that drive peft-ext methods over time; usable with any transformers/TRL Trainer."""

from .cola_chain import ColaChainCallback
from .companions import attach_companions
from .finegates import FineGatesCallback, FineGatesTrainerMixin, finegates_param_groups, with_finegates
from .hft_reselect import HftReselectCallback
from .optimizer_params import reset_optimizer_state, swap_optimizer_params
from .smore_balance import SmoreCallback

__all__ = [
    "ColaChainCallback",
    "FineGatesCallback",
    "FineGatesTrainerMixin",
    "HftReselectCallback",
    "SmoreCallback",
    "attach_companions",
    "finegates_param_groups",
    "reset_optimizer_state",
    "swap_optimizer_params",
    "with_finegates",
]
