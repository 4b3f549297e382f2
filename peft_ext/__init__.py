"""peft-ext: recent fine-tuning methods as native PEFT tuners.

`import peft_ext` registers every method with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`, TRL's
`SFTTrainer(peft_config=...)` and friends accept peft-ext configs wherever a `LoraConfig` stood. Each method is a
folder under peft_ext/tuners/ whose package registers itself; its public names (its `__all__`: `HftConfig`,
`ColaConfig`, ...) are re-exported here.
`peft_ext.register_method(NAME, ConfigCls, TunerCls)` registers a method of your own (see `peft_ext.registry`); a
package that declares an entry point in the group "peft_ext.methods" is imported (and so registered) here.
`peft_ext.accelerate(model)` (= `accelerate_lora`) gives an existing PEFT LoRA model the fused low-rank kernels.
`peft_ext.recompute_adapter_inputs(model)` rebuilds adapter inputs in the backward instead of saving them (memory).
`peft_ext.compress_delta(base, finetuned, out_dir)` turns a full fine-tune into a Delta-CoMe adapter on its base.
"""

def _source_tree_kernels() -> None:
    """In a source checkout, `kernels/` (the package peft_ext.kernels) sits beside `peft_ext/`: the wheel and the
    editable install map it; a Python started in the checkout's root with a non-editable install imports this
    folder's peft_ext instead, and then finds the kernels here."""
    import importlib.util
    import os
    import sys

    if "peft_ext.kernels" in sys.modules or importlib.util.find_spec("peft_ext.kernels") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location("peft_ext.kernels", init, submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules["peft_ext.kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["peft_ext.kernels"]
            raise


_source_tree_kernels()

from peft_ext.version import __version__  # noqa: E402
from peft_ext.registry import (  # noqa: E402
    RegistrationError,
    UnknownPeftTypeError,
    load_entry_point_methods,
    register_method,
    registered_methods,
)
from peft_ext.tuners import load_methods  # noqa: E402
from peft_ext.tuners.config_base import PeftExtConfig  # noqa: E402
from peft_ext.tuners.lora_fused import FusedLoraLinear, accelerate_lora, fused_path_report, remove_lora_acceleration  # noqa: E402
from peft_ext.compression import CompressionResult, compress_delta  # noqa: E402
from peft_ext.tuners.recompute import LiveActivationBytes, RecomputeReport, SavedTensorsCounter, recompute_adapter_inputs, remove_adapter_input_recompute  # noqa: E402

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
        "LiveActivationBytes",
        "recompute_adapter_inputs",
        "RecomputeReport",
        "SavedTensorsCounter",
        "remove_adapter_input_recompute",
        "register_method",
        "registered_methods",
        "remove_lora_acceleration",
    ]
)

load_entry_point_methods()  # last: a method package imports peft_ext (complete by now) to register itself
