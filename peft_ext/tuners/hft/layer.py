from __future__ import annotations

import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from peft_ext.tuners.base import PeftExtLayer, output_dim
from peft_ext.tuners.mixed_batch import route_rows
from peft_ext.tuners.one_adapter_forward import OneAdapterForward


class HftLayer(OneAdapterForward, PeftExtLayer):
    """Wraps one selected module. Each adapter owns trainable copies of the module's own parameters
    (`hft_weight[adapter]["weight"]`, `["bias"]`), used in place of the frozen base parameters: one matmul,
    as in full fine-tuning. The base module stays untouched, so disabling, unloading and several adapters
    are exact. With strategy="param" the adapter owns only some output rows (`hft_index[adapter]["rows"]`).
    """

    adapter_layer_names = ("hft_weight", "hft_index")
    method_label = "HFT"
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        # PEFT's own switch for copies that stay frozen: modules trained in an earlier stage only
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}

    # ----------------------------------------------------------------------------------------------- state
    def update_layer(
        self, adapter_name: str, trainable: bool, row_fraction: Optional[float], seed: int, name: str, init_weights=True
    ) -> None:
        """Create the adapter's copies of this module's parameters (or of `row_fraction` of its output rows)."""
        base = self.get_base_layer()
        rows = None
        if row_fraction is not None:
            n_out = self._n_out(base)
            k = min(n_out, max(1, int(row_fraction * n_out + 0.5)))
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            rows = torch.randperm(n_out, generator=generator)[:k].sort().values.to(base.weight.device)
            self.hft_index[adapter_name] = BufferDict({"rows": rows}, persistent=True)
        copies = nn.ParameterDict()
        for pname, p in base.named_parameters(recurse=False):
            if not p.is_floating_point():
                continue
            value = p.detach() if rows is None else p.detach().index_select(self._row_dim(pname, p), rows)
            value = value.clone()
            if not init_weights:  # a non-identity start, for tests
                generator = torch.Generator().manual_seed(seed + zlib.crc32(f"{name}.{pname}".encode()))
                noise = torch.randn(value.shape, generator=generator).to(value)
                value += noise * (0.1 * value.float().std().nan_to_num(0.0).clamp(min=1e-2)).to(value.dtype)
            copies[pname] = nn.Parameter(value, requires_grad=trainable)
        if not len(copies):
            raise ValueError(f"{name} ({type(base).__name__}) has no floating-point parameters for HFT to train.")
        self.hft_weight[adapter_name] = copies
        self.set_trainable(adapter_name, trainable)

    def set_trainable(self, adapter_name: str, trainable: bool) -> None:
        """Freeze (an earlier stage's selection) or unfreeze this module's copies for `adapter_name`."""
        frozen = {k: v for k, v in self.frozen_peft_weight_names.items() if k != adapter_name}
        if not trainable:
            frozen[adapter_name] = ("hft_weight",)
        self.frozen_peft_weight_names = frozen
        self.set_adapter(self.active_adapters)

    def is_trainable(self, adapter_name: str) -> bool:
        return adapter_name in self.hft_weight and adapter_name not in self.frozen_peft_weight_names

    def _n_out(self, base: nn.Module) -> int:
        return base.weight.shape[self._row_dim("weight", base.weight)]

    def _row_dim(self, pname: str, p: torch.Tensor) -> int:
        return output_dim(self.get_base_layer(), pname, p)

    def adapted_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors the module computes with under `adapter_name` (name -> tensor, autograd-connected)."""
        copies = self.hft_weight[adapter_name]
        if adapter_name not in self.hft_index:
            return dict(copies.items())
        base = self.get_base_layer()
        rows = self.hft_index[adapter_name]["rows"]
        out = {}
        for pname, value in copies.items():
            original = getattr(base, pname)
            out[pname] = original.index_copy(self._row_dim(pname, original), rows, value.to(original.dtype))
        return out

    def original_values(self, adapter_name: str, pname: str, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The pre-trained values that `hft_weight[adapter_name][pname]` replaces (only its rows for strategy
        "param"; `rows` overrides the adapter's own, e.g. a checkpoint's), even while an adapter is merged."""
        original = self.original_base_value(pname).detach()
        if rows is None and adapter_name in self.hft_index:
            rows = self.hft_index[adapter_name]["rows"]
        if rows is None:
            return original
        return original.index_select(self._row_dim(pname, original), rows.to(original.device))

    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """W_adapter - W_base for each trained parameter of this module."""
        base_values = {n: self.original_base_value(n) for n in self.hft_weight[adapter_name]}
        return {n: (t - base_values[n]).detach() for n, t in self.adapted_parameters(adapter_name).items()}

    # --------------------------------------------------------------------------------------------- forward
    def _call_with(self, params: dict[str, torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any):
        base = self.get_base_layer()
        # fp32 masters of an fp16 base compute in fp16 (a no-op cast otherwise)
        params = {n: t.to(getattr(base, n).dtype) for n, t in params.items()}
        if isinstance(base, nn.Linear) and not args and not kwargs:  # the hot path: one matmul
            return F.linear(x, params.get("weight", base.weight), params.get("bias", base.bias))
        return torch.func.functional_call(base, params, (x, *args), kwargs)

    def _single_forward(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._call_with(self.adapted_parameters(adapter_name), x, *args, **kwargs)

    def _mixed_batch_forward(self, x, *args, adapter_names: list[str], **kwargs):
        """Rows of one batch under different adapters: one call per adapter on its rows."""

        def run(name, rows_x):
            if name in self.hft_weight:
                return self._call_with(self.adapted_parameters(name), rows_x, *args, **kwargs)
            return self.base_layer(rows_x, *args, **kwargs)  # "__base__", or an adapter that left this module frozen

        return route_rows(x, adapter_names, run)

    # ----------------------------------------------------------------------------------------------- merge
    def merged_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The first merged adapter replaces the base values exactly; a further one adds its delta."""
        new = {n: t.detach() for n, t in self.adapted_parameters(adapter_name).items()}
        if self.merged_adapters:  # stack: W0 + sum of deltas
            base = self.get_base_layer()
            new = {n: getattr(base, n) + (t - self.original_base_value(n)) for n, t in new.items()}
        return new

