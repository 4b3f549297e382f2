"""COLA: Chain of LoRA (Xia et al., 2024). Importing this package registers the peft type "COLA" with PEFT."""

from peft_ext.registry import register_method

from .config import ColaConfig
from .layer import ColaChain, ColaLinear  # noqa: F401  (ColaChain: the layer types' shared part)
from .bnb import ColaLinear4bit  # noqa: F401  (the 4-bit layer, for isinstance checks)
from .model import ColaModel
from .export import export_as_lora

PEFT_TYPE = register_method("COLA", ColaConfig, ColaModel)

__all__ = ["ColaConfig", "ColaLinear", "ColaModel", "export_as_lora"]
