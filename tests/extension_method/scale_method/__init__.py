"""SCALE: a throwaway method built only in this test folder, to prove that a user's own package can add a PEFT
method with peft-ext's public extension API: one folder (this one) and one `peft_ext.register_method` call.

Each targeted linear layer learns a per-output-channel scale: y = base(x) * (1 + s), s initialised to 0."""

import peft_ext

from .config import ScaleConfig
from .layer import ScaleLayer
from .model import ScaleModel

PEFT_TYPE = peft_ext.register_method("SCALE", ScaleConfig, ScaleModel)

__all__ = ["ScaleConfig", "ScaleLayer", "ScaleModel"]
