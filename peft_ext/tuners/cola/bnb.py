"""COLA on a bitsandbytes 4-bit base layer.

Merging a link into 4-bit weights would dequantize and requantize them (lossy, and repeated at every link), so the
chain never touches the quantized weight: the merged links stay frozen low-rank factors in the adapter, as on any
base (ColaChain), and the forward adds them to the quantized layer's output in plain PyTorch (the fused kernels
take a dense weight). `merge_adapter` / `merge_and_unload` are refused; `export_as_lora` writes the chain as a LoRA
that PEFT loads onto the same 4-bit base, or onto the 16-bit model.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from .layer import ColaChain

try:  # bitsandbytes is optional
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
except ImportError:  # pragma: no cover - without bitsandbytes there is no 4-bit layer to wrap
    bnb = None
    LoraLinear4bit = None

MERGE_REFUSED = (
    "merging a COLA chain into 4-bit weights would dequantize and requantize them (lossy): keep the adapter "
    "unmerged, or write the chain as one LoRA with peft_ext.export_as_lora and merge that into a 16-bit model."
)


def is_bnb_4bit(module: nn.Module) -> bool:
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


if LoraLinear4bit is not None:

    class ColaLinear4bit(ColaChain, LoraLinear4bit):
        """A COLA chain on a `bitsandbytes.nn.Linear4bit` base: y = base4bit(x) + merged links + current link."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            # PEFT's Linear4bit.__init__, passing the module name on (the links' seeds depend on it)
            nn.Module.__init__(self)
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, target_name=kwargs.get("target_name", ""))

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            adapter_names = kwargs.pop("adapter_names", None)
            if self.disable_adapters:
                return self.base_layer(x, *args, **kwargs)
            if adapter_names is not None:
                return self._loop_mixed_forward(x, adapter_names, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            for adapter in (a for a in self.active_adapters if a in self.lora_A):
                result = result + self._delta(x, adapter).to(result.dtype)
            return result

        def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
            raise ValueError(MERGE_REFUSED)

        def unmerge(self) -> None:  # never merged
            return None

        def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names):
            if merge:
                raise ValueError(MERGE_REFUSED)
            return self.get_base_layer()

        def __repr__(self) -> str:
            return "cola." + super().__repr__()

else:  # pragma: no cover
    ColaLinear4bit = None
