"""PEFT's forward protocol for a layer that runs one adapter at a time, or one adapter per row of a mixed batch.

PEFT's own tuners repeat this prologue in every layer (disabled -> base, `adapter_names=` -> mixed batch, merged ->
base, no active adapter -> base); HFT and Delta-CoMe layers share it here and supply only what differs.
"""

from __future__ import annotations

from typing import Any

import torch


class OneAdapterForward:
    """Mixin for a BaseTunerLayer whose adapters replace (rather than add up): list it before nn.Module.

    Subclasses set `method_label` (ExactMerge's default otherwise) and implement `_single_forward(adapter, x, *args, **kwargs)` and
    `_mixed_batch_forward(x, *args, adapter_names, **kwargs)`; `_check_can_run()` (PeftExtLayer's default accepts) may refuse a forward (it runs
    when an adapter is about to run). The adapters of a layer are the keys of its first `adapter_layer_names` entry.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapters = getattr(self, self.adapter_layer_names[0])
        active = [a for a in self.active_adapters if a in adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        self._check_can_run()
        if len(active) > 1:
            return self._stacked_forward(active, x, *args, **kwargs)
        return self._single_forward(active[0], x, *args, **kwargs)

    def _stacked_forward(self, adapters: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Several active adapters at once: what merging them all would compute (W0 plus the sum of their changes,
        for the layers that support it). Refused by default, naming the fix."""
        raise ValueError(
            f"{self.method_label} runs one adapter at a time, but {adapters} are active on "
            f"{type(self.get_base_layer()).__name__}: call model.set_adapter(name) with one name, or pass "
            f"adapter_names= per row for a mixed batch."
        )
