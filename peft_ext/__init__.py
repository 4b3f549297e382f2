"""peft-ext: recent fine-tuning methods as native PEFT tuners.

`import peft_ext` registers every method with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`, TRL's
`SFTTrainer(peft_config=...)` and friends accept peft-ext configs wherever a `LoraConfig` stood. Each method is a
folder under peft_ext/tuners/ whose package registers itself; its public names (its `__all__`: `HftConfig`,
`ColaConfig`, ...) are re-exported here.
`peft_ext.register_method(NAME, ConfigCls, TunerCls)` registers a method of your own (see `peft_ext.registry`).
`peft_ext.accelerate(model)` (= `accelerate_lora`) gives an existing PEFT LoRA model the fused low-rank kernels.
`peft_ext.compress_delta(base, finetuned, out_dir)` turns a full fine-tune into a Delta-CoMe adapter on its base.
"""

from peft_ext.version import __version__
from peft_ext.registry import RegistrationError, UnknownPeftTypeError, register_method, registered_methods
from peft_ext.tuners import load_methods
from peft_ext.tuners.config_base import PeftExtConfig
from peft_ext.tuners.lora_fused import FusedLoraLinear, accelerate_lora, fused_path_report, remove_lora_acceleration
from peft_ext.compression import CompressionResult, compress_delta

_METHOD_NAMES = []
for _package in load_methods():
    for _name in getattr(_package, "__all__", ()):
        globals()[_name] = getattr(_package, _name)
        _METHOD_NAMES.append(_name)
del _package, _name

accelerate = accelerate_lora  # the short name: peft_ext.accelerate(model)

__all__ = sorted(
    [
        *_METHOD_NAMES,
        "CompressionResult",
        "FusedLoraLinear",
        "PeftExtConfig",
        "RegistrationError",
        "UnknownPeftTypeError",
        "__version__",
        "accelerate",
        "accelerate_lora",
        "compress_delta",
        "fused_path_report",
        "register_method",
        "registered_methods",
        "remove_lora_acceleration",
    ]
)
