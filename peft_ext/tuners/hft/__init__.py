"""HFT: Half Fine-Tuning (Hui et al., 2024). Importing this package registers the peft type "HFT" with PEFT."""

from peft_ext.registry import register_method

from .config import HftConfig
from .layer import HftLayer
from .model import HftModel
from .reset import reset_fraction

PEFT_TYPE = register_method("HFT", HftConfig, HftModel)

__all__ = ["HftConfig", "HftLayer", "HftModel", "reset_fraction"]
