"""peft-ext: recent fine-tuning methods as native PEFT tuners.

`import peft_ext` registers every method with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`, TRL's
`SFTTrainer(peft_config=...)` and friends accept peft-ext configs wherever a `LoraConfig` stood.
`peft_ext.accelerate(model)` (= `accelerate_lora`) gives an existing PEFT LoRA model the fused low-rank kernels.
`peft_ext.compress_delta(base, finetuned, out_dir)` turns a full fine-tune into a Delta-CoMe adapter on its base.
"""

from peft_ext.version import __version__
from peft_ext.tuners.hft import HftConfig, HftLayer, HftModel, reset_fraction
from peft_ext.tuners.cola import ColaConfig, ColaLinear, ColaModel, export_as_lora
from peft_ext.tuners.deltacome import DeltaComeConfig, DeltaComeLinear, DeltaComeModel
from peft_ext.tuners.lora_fused import FusedLoraLinear, accelerate_lora, fused_path_report, remove_lora_acceleration
from peft_ext.registry import registered_methods
from peft_ext.compression import CompressionResult, compress_delta

accelerate = accelerate_lora  # the short name: peft_ext.accelerate(model)

__all__ = [
    "ColaConfig",
    "CompressionResult",
    "ColaLinear",
    "ColaModel",
    "DeltaComeConfig",
    "DeltaComeLinear",
    "DeltaComeModel",
    "FusedLoraLinear",
    "HftConfig",
    "HftLayer",
    "HftModel",
    "__version__",
    "accelerate",
    "accelerate_lora",
    "compress_delta",
    "export_as_lora",
    "fused_path_report",
    "registered_methods",
    "remove_lora_acceleration",
    "reset_fraction",
]
