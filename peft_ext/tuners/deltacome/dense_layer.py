from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from peft_ext.tuners.base_originals import KeepsBaseOriginals
from peft_ext.tuners.mixed_batch import route_rows
from peft_ext.tuners.one_adapter_forward import OneAdapterForward

from .layer import INFERENCE_ONLY, DeltaComeTunerLayer


class DeltaComeDense(OneAdapterForward, nn.Module, KeepsBaseOriginals, DeltaComeTunerLayer):
    """A small module the fine-tune changed (a norm, by default) stored whole: each adapter holds the fine-tune's
    values of its parameters (`deltacome_dense[adapter]`, buffers) and runs the base module with them. Unlike PEFT's
    modules_to_save, rows of a mixed batch (`adapter_names=`) each get their own adapter's values."""

    adapter_layer_names = ("deltacome_dense",)
    method_label = "Delta-CoMe"
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltacome_dense = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, init_weights: bool, seed: int) -> None:
        values = {}
        for pname, p in self.get_base_layer().named_parameters(recurse=False):
            value = p.detach().clone()
            if not init_weights:  # tests: a non-identity adapter
                g = torch.Generator().manual_seed(seed)
                value += (0.1 * torch.randn(value.shape, generator=g)).to(value)
            values[pname] = value
        self.deltacome_dense[adapter_name] = BufferDict(values, persistent=True)
        self.set_adapter(self.active_adapters)

    def _check_can_run(self) -> None:
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(INFERENCE_ONLY.format(name=type(self.get_base_layer()).__name__))

    def _single_forward(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        params = {n: t.to(getattr(base, n).dtype) for n, t in self.deltacome_dense[adapter_name].items()}
        return torch.func.functional_call(base, params, (x, *args), kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        self._check_can_run()
        return route_rows(x, adapter_names, lambda name, rows_x: (
            self._single_forward(name, rows_x, *args, **kwargs) if name in self.deltacome_dense
            else self.base_layer(rows_x, *args, **kwargs)
        ))  # fmt: skip

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.deltacome_dense:
                continue
            values = dict(self.deltacome_dense[name].items())
            if safe_merge and not all(torch.isfinite(v).all() for v in values.values()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken.")
            for pname, value in values.items():
                self.write_base_value(pname, value)
            self.merged_adapters.append(name)

    def __repr__(self) -> str:
        return "deltacome_dense." + super().__repr__()
