"""peft-ext: recent fine-tuning methods as native PEFT tuners.

`import peft_ext` registers every method with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`, TRL's
`SFTTrainer(peft_config=...)` and friends accept peft-ext configs wherever a `LoraConfig` stood.
"""

from peft_ext.version import __version__
from peft_ext.tuners.hft import HftConfig, HftLayer, HftModel, reset_fraction
from peft_ext.registry import registered_methods

__all__ = ["HftConfig", "HftLayer", "HftModel", "__version__", "registered_methods", "reset_fraction"]
