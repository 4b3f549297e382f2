from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from peft_ext.tuners.base import PeftExtLayer, is_conv1d


class Vector(nn.Module):
    """One adapter's scale (a module, so that its parameter is named `scale_vector.<adapter>.weight`)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(value)


class ScaleLayer(PeftExtLayer):
    adapter_layer_names = ("scale_vector",)
    method_label = "Scale"

    def update_layer(self, adapter_name: str, init_weights: bool, seed: int, name: str) -> None:
        value = torch.zeros(self.out_features)
        if not init_weights:
            g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
            value = 0.1 * torch.randn(self.out_features, generator=g)
        self.scale_vector[adapter_name] = Vector(value.to(self.get_base_layer().weight.device))
        self.set_adapter(self.active_adapters)

    def _factor(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        return (1.0 + self.scale_vector[adapter_name].weight).to(dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if len(adapter_names) != x.shape[0]:
                raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows.")
            ones = result.new_ones(self.out_features)
            factors = torch.stack([self._factor(a, result.dtype) if a in self.scale_vector else ones for a in adapter_names])
            return result * factors.view(x.shape[0], *([1] * (result.dim() - 2)), self.out_features)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter in self.scale_vector:
                result = result * self._factor(adapter, result.dtype)
        return result

    def merged_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        factor = self._factor(adapter_name, torch.float32).detach()
        weight = base.weight.float() * (factor[None, :] if is_conv1d(base) else factor[:, None])
        new = {"weight": weight}
        if base.bias is not None:
            new["bias"] = base.bias.float() * factor
        return new
