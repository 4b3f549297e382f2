"""HFT: Half Fine-Tuning (Hui et al., 2024). Importing this package registers the peft type "HFT" with PEFT."""

from peft_ext.registry import add_peft_type, register_method

PEFT_TYPE = add_peft_type("HFT")  # before the config class exists: its __post_init__ sets peft_type to it

from .config import HftConfig  # noqa: E402
from .layer import HftLayer  # noqa: E402
from .model import HftModel  # noqa: E402
from .reset import reset_fraction  # noqa: E402

register_method("HFT", config_cls=HftConfig, model_cls=HftModel, prefix=HftModel.prefix)

__all__ = ["HftConfig", "HftLayer", "HftModel", "PEFT_TYPE", "reset_fraction"]
