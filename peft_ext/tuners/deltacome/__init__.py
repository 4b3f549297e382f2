"""Delta-CoMe: mixed-precision compression of fine-tune deltas (Ping et al., 2024), served many-at-once.
Importing this package registers the peft type "DELTACOME" with PEFT."""

from peft_ext.registry import add_peft_type, register_method

PEFT_TYPE = add_peft_type("DELTACOME")  # before the config class exists: its __post_init__ sets peft_type to it

from .config import DeltaComeConfig  # noqa: E402
from .layer import DeltaComeLinear  # noqa: E402
from .model import DeltaComeModel  # noqa: E402

register_method("DELTACOME", config_cls=DeltaComeConfig, model_cls=DeltaComeModel, prefix=DeltaComeModel.prefix)

__all__ = ["DeltaComeConfig", "DeltaComeLinear", "DeltaComeModel", "PEFT_TYPE"]
