from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from peft_ext.tuners.base import call_with_parameters
from peft_ext.tuners.mixed_batch import route_rows
from peft_ext.tuners.one_adapter_forward import OneAdapterForward

from .layer import DeltaComeTunerLayer, random_generator


class DeltaComeDense(OneAdapterForward, DeltaComeTunerLayer):
    """A small module the fine-tune changed (a norm, by default) stored whole: each adapter holds the fine-tune's
    values of its parameters (`deltacome_dense[adapter]`, buffers) and runs the base module with them. Unlike PEFT's
    modules_to_save, rows of a mixed batch (`adapter_names=`) each get their own adapter's values."""

    adapter_layer_names = ("deltacome_dense",)

    def update_layer(self, adapter_name: str, init_weights: bool, seed: Optional[int], name: str) -> None:
        values = {}
        g = None if init_weights else random_generator(seed, name)
        for pname, p in self.get_base_layer().named_parameters(recurse=False):
            value = p.detach().clone()
            if g is not None:  # tests: a non-identity adapter (drawn as the linear layers' contents are)
                value += (0.1 * torch.randn(value.shape, generator=g)).to(value)
            values[pname] = value
        self.deltacome_dense[adapter_name] = BufferDict(values, persistent=True)
        self.set_adapter(self.active_adapters)

    def _single_forward(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        params = {n: t.to(getattr(base, n).dtype) for n, t in self.deltacome_dense[adapter_name].items()}
        return call_with_parameters(base, params, (x, *args), kwargs)  # also under FSDP1's shadowing views

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        self._check_can_run()
        return route_rows(x, adapter_names, lambda name, rows_x: (
            self._single_forward(name, rows_x, *args, **kwargs) if name in self.deltacome_dense
            else self.base_layer(rows_x, *args, **kwargs)
        ))  # fmt: skip

    def _stacked_values(self, adapters: list[str]) -> dict[str, torch.Tensor]:
        """The first adapter's values plus each further one's change (W_i - W0): what merging them in turn writes."""
        values = dict(self.deltacome_dense[adapters[0]].items())
        for name in adapters[1:]:
            for pname, value in self.deltacome_dense[name].items():
                values[pname] = values[pname] + (value - self.original_base_value(pname).to(value))
        return values

    def _stacked_forward(self, adapters: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        params = {n: t.to(getattr(base, n).dtype) for n, t in self._stacked_values(adapters).items()}
        return call_with_parameters(base, params, (x, *args), kwargs)  # also under FSDP1's shadowing views

    def merged_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The fine-tune's values replace the module's; a further merged adapter adds its change (W - W0)."""
        if not self.merged_adapters:
            return dict(self.deltacome_dense[adapter_name].items())
        base = self.get_base_layer()
        return {
            n: getattr(base, n).detach() + (v - self.original_base_value(n).to(v))
            for n, v in self.deltacome_dense[adapter_name].items()
        }

    def __repr__(self) -> str:
        return "deltacome_dense." + nn.Module.__repr__(self)
