"""Exact merge / unmerge for layers that write into their base module's parameters.

Merging writes new values into the base parameters; the first write of a parameter keeps its original tensor, so
`unmerge` restores it bit for bit (PEFT's LoRA subtracts the delta again, which is not exact in 16-bit weights).
While merged this costs one extra copy of each written parameter. Used by HFT, COLA and Delta-CoMe layers.
"""

from __future__ import annotations

import torch


class KeepsBaseOriginals:
    """Mixin for a BaseTunerLayer: `write_base_value` while merging, `original_base_value` for W0, `unmerge`."""

    @property
    def base_originals(self) -> dict[str, torch.Tensor]:
        """{parameter name: its original tensor} for the base parameters written by merges (empty when unmerged)."""
        return self.__dict__.setdefault("_base_originals", {})

    def original_base_value(self, pname: str) -> torch.Tensor:
        return self.base_originals.get(pname, getattr(self.get_base_layer(), pname).data)

    def write_base_value(self, pname: str, value: torch.Tensor) -> None:
        param = getattr(self.get_base_layer(), pname)
        self.base_originals.setdefault(pname, param.data)
        param.data = value.to(param.dtype).clone()

    def unmerge(self) -> None:
        base = self.get_base_layer()
        for pname, original in self.base_originals.items():
            getattr(base, pname).data = original
        self.base_originals.clear()
        self.merged_adapters = []
