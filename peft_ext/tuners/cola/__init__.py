"""COLA: Chain of LoRA (Xia et al., 2024). Importing this package registers the peft type "COLA" with PEFT."""

from peft_ext.registry import add_peft_type, register_method

PEFT_TYPE = add_peft_type("COLA")  # before the config class exists: its __post_init__ sets peft_type to it

from .config import ColaConfig  # noqa: E402
from .layer import ColaChain, ColaLinear  # noqa: E402
from .bnb import ColaLinear4bit  # noqa: E402
from .model import ColaModel  # noqa: E402
from .export import export_as_lora  # noqa: E402

register_method("COLA", config_cls=ColaConfig, model_cls=ColaModel, prefix=ColaModel.prefix)

__all__ = ["ColaChain", "ColaConfig", "ColaLinear", "ColaLinear4bit", "ColaModel", "PEFT_TYPE", "export_as_lora"]
