"""Trainer callbacks that drive peft-ext methods over time; usable with any transformers/TRL Trainer."""

from .cola_chain import ColaChainCallback
from .companions import attach_companions
from .hft_reselect import HftReselectCallback
from .optimizer_params import reset_optimizer_state, swap_optimizer_params
from .smore_balance import SmoreCallback

__all__ = [
    "ColaChainCallback",
    "HftReselectCallback",
    "SmoreCallback",
    "attach_companions",
    "reset_optimizer_state",
    "swap_optimizer_params",
]
