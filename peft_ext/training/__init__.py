"""Trainer callbacks that drive peft-ext methods over time; usable with any transformers/TRL Trainer."""

from .hft_reselect import HftReselectCallback
from .optimizer_params import swap_optimizer_params

__all__ = ["HftReselectCallback", "swap_optimizer_params"]
