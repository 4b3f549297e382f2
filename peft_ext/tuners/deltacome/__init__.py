"""Delta-CoMe: mixed-precision compression of fine-tune deltas (Ping et al., 2024), served many-at-once.
Importing this package registers the peft type "DELTACOME" with PEFT."""

from peft_ext.registry import register_method

from .config import DeltaComeConfig
from .layer import DeltaComeLinear
from .model import DeltaComeModel

PEFT_TYPE = register_method("DELTACOME", DeltaComeConfig, DeltaComeModel)

__all__ = ["DeltaComeConfig", "DeltaComeLinear", "DeltaComeModel"]
