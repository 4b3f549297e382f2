"""S'MoRE: Structural Mixture of Residual Experts (Zeng et al., NeurIPS 2025). Importing this package registers the
peft type "SMORE" with PEFT."""

from peft_ext.registry import register_method

from .config import SmoreConfig
from .layer import SmoreLayer
from .model import SmoreModel

PEFT_TYPE = register_method("SMORE", SmoreConfig, SmoreModel)

__all__ = ["SmoreConfig", "SmoreLayer", "SmoreModel"]
