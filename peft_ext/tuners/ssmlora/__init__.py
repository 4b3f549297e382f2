"""SSMLoRA: LoRA modules linked by a state-space recurrence (Yu et al., NAACL 2025). Importing this package registers
the peft type "SSMLORA" with PEFT."""

from peft_ext.registry import register_method

from .config import SsmLoraConfig
from .layer import SsmLoraLayer
from .model import SsmLoraModel

PEFT_TYPE = register_method("SSMLORA", SsmLoraConfig, SsmLoraModel)

__all__ = ["SsmLoraConfig", "SsmLoraLayer", "SsmLoraModel"]
