from __future__ import annotations

import hashlib
import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from peft_ext.tuners.base import PeftExtLayer, call_with_parameters, output_dim
from peft_ext.tuners.mixed_batch import route_rows
from peft_ext.tuners.one_adapter_forward import OneAdapterForward


class HftLayer(OneAdapterForward, PeftExtLayer):
    """Wraps one selected module. Each adapter owns trainable copies of the module's own parameters
    (`hft_weight[adapter]["weight"]`, `["bias"]`), used in place of the frozen base parameters: one matmul,
    as in full fine-tuning. The base module stays untouched, so disabling, unloading and several adapters
    are exact. With strategy="param" the adapter owns only some output rows (`hft_index[adapter]["rows"]`).

    The pre-trained parameters are not read while an adapter runs, so they can be kept off the accelerator
    (`offload_originals`, CPU and pinned): a forward that needs them (adapters disabled, a module the active adapter
    does not train, `"__base__"` rows) copies them to the input's device for that call, and merging, unloading, a new
    strategy="param" adapter and `onload_originals` put them back for good.
    """

    adapter_layer_names = ("hft_weight", "hft_index")
    method_label = "HFT"
    other_param_names = ("hft_init_noise",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        # init_weights=False: the seeds each adapter's noise was drawn from (adapter name -> key)
        self.hft_init_noise: dict[str, str] = {}
        # PEFT's own switch for copies that stay frozen: modules trained in an earlier stage only
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        # offload_originals: the device the module computes on while its pre-trained parameters are elsewhere
        self.hft_compute_device: Optional[torch.device] = None
        self._hft_in_base_call = False

    # ----------------------------------------------------------------------------------------------- state
    def update_layer(
        self, adapter_name: str, trainable: bool, row_fraction: Optional[float], seed: int, name: str, init_weights=True
    ) -> None:
        """Create the adapter's copies of this module's parameters (or of `row_fraction` of its output rows).

        `init_weights=False` adds noise drawn from torch's seed (`torch.manual_seed`, read as `torch.initial_seed()`),
        the config's `seed` and the module's name; an adapter whose seeds equal those of another adapter of this
        layer also mixes in its own name, so two adapters built from one config start differently. The noise does
        not depend on what was drawn before (an adapter equals the same adapter in a model that holds only it)."""
        base = self.get_base_layer()
        rows = None
        if row_fraction is not None:
            self.onload_originals()  # strategy "param" computes with the pre-trained rows in every forward
            n_out = self._n_out(base)
            k = min(n_out, max(1, int(row_fraction * n_out + 0.5)))
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            rows = torch.randperm(n_out, generator=generator)[:k].sort().values.to(base.weight.device)
            self.hft_index[adapter_name] = BufferDict({"rows": rows}, persistent=True)
        noise_key = None
        if not init_weights:
            noise_key = _noise_key(seed, self.hft_init_noise, adapter_name)
            self.hft_init_noise[adapter_name] = noise_key
        copies = nn.ParameterDict()
        for pname, p in base.named_parameters(recurse=False):
            if not p.is_floating_point():
                continue
            value = p.detach() if rows is None else p.detach().index_select(self._row_dim(pname, p), rows)
            value = value.to(self.hft_compute_device or value.device, copy=True)
            if not init_weights:  # a non-identity start, for tests
                generator = torch.Generator().manual_seed(_noise_seed(noise_key, f"{name}.{pname}"))
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
        rows = self.hft_index[adapter_name]["rows"]
        out = {}
        for pname, value in copies.items():
            # the rows this adapter does not own are W0, also while another adapter is merged into the base
            original = self.original_base_value(pname)
            out[pname] = original.index_copy(self._row_dim(pname, original), rows, value.to(original.dtype))
        return out

    def original_values(
        self, adapter_name: str, pname: str, rows: Optional[torch.Tensor] = None, original: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The pre-trained values that `hft_weight[adapter_name][pname]` replaces (only its rows for strategy
        "param"; `rows` overrides the adapter's own, e.g. a checkpoint's), even while an adapter is merged.
        `original`: W0 of the whole base parameter, read elsewhere (a gathered state dict's), instead of the module's."""
        original = (self.original_base_value(pname) if original is None else original).detach()
        if rows is None and adapter_name in self.hft_index:
            rows = self.hft_index[adapter_name]["rows"]
        if rows is None:
            return original
        return original.index_select(self._row_dim(pname, original), rows.to(original.device))

    def _holds_original(self, pname: str) -> bool:
        """Whether W0 of `pname` is kept aside (an adapter is merged into the base parameter)."""
        holder = self._modules.get(self._ORIGINALS)
        return holder is not None and pname in holder._buffers

    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """W_adapter - W_base for each trained parameter of this module."""
        base_values = {n: self.original_base_value(n) for n in self.hft_weight[adapter_name]}
        return {n: (t - base_values[n].to(t.device)).detach() for n, t in self.adapted_parameters(adapter_name).items()}

    # --------------------------------------------------------------------------------- offloaded originals
    def offload_originals(self, device: torch.device | str = "cpu", pin_memory: Optional[bool] = None) -> int:
        """Move this module's pre-trained parameters to `device` (pinned CPU memory by default when they sit on an
        accelerator); the copies stay where they are. Returns the bytes moved. Refused while merged, and skipped for
        a layer holding a strategy="param" adapter (it reads the pre-trained rows every forward)."""
        if self.merged:
            raise ValueError(
                "HFT: unmerge the adapter before offloading the pre-trained weights (merged, they are in use)."
            )
        if any(a in self.hft_index for a in self.hft_weight):
            return 0
        device = torch.device(device)
        base, moved = self.get_base_layer(), 0
        for pname, p in list(base.named_parameters(recurse=False)):
            if p.device == device:
                continue
            compute = self.hft_compute_device or p.device
            pin = compute.type != "cpu" if pin_memory is None else pin_memory
            value = p.detach().to(device)
            _replace_parameter(base, pname, value.pin_memory() if pin and device.type == "cpu" else value)
            self.hft_compute_device = compute
            moved += p.numel() * p.element_size()
        return moved

    def onload_originals(self) -> int:
        """Put offloaded pre-trained parameters back on the device the module computes on; returns the bytes moved."""
        device, moved = self.hft_compute_device, 0
        if device is None:
            return 0
        base = self.get_base_layer()
        for pname, p in list(base.named_parameters(recurse=False)):
            if p.device != device:
                _replace_parameter(base, pname, p.detach().to(device))
                moved += p.numel() * p.element_size()
        self.hft_compute_device = None
        return moved

    def _reads_originals(self, kwargs: dict) -> bool:
        if kwargs.get("adapter_names") is not None or self.disable_adapters or self.merged:
            return True
        return not any(a in self.hft_weight for a in self.active_adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.hft_compute_device is None or self._hft_in_base_call or not self._reads_originals(kwargs):
            return super().forward(x, *args, **kwargs)
        # offloaded and the pre-trained parameters are needed: this call computes with copies on x's device
        originals = self.base_layer.named_parameters(recurse=False)
        params = {f"base_layer.{n}": p.to(x.device, non_blocking=True) for n, p in originals}
        self._hft_in_base_call = True
        try:
            return call_with_parameters(self, params, (x, *args), kwargs, strict=False)
        finally:
            self._hft_in_base_call = False

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self.onload_originals()  # the merged weights live where the module computes
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]):
        self.onload_originals()
        return super().unload_and_optionally_merge_module(merge, safe_merge, adapter_names)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device or self.hft_compute_device)

    # --------------------------------------------------------------------------------------------- forward
    def _call_with(self, params: dict[str, torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any):
        base = self.get_base_layer()
        # fp32 masters of an fp16 base compute in fp16 (a no-op cast otherwise)
        params = {n: t.to(getattr(base, n).dtype) for n, t in params.items()}
        if isinstance(base, nn.Linear) and not args and not kwargs:  # the hot path: one matmul
            return F.linear(x, params.get("weight", base.weight), params.get("bias", base.bias))
        return call_with_parameters(base, params, (x, *args), kwargs)

    def _single_forward(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._call_with(self.adapted_parameters(adapter_name), x, *args, **kwargs)

    def _stacked_forward(self, adapters: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Several active adapters: W0 plus each adapter's change, in the order merging would write them (the first
        adapter's values, then + (W_i - W0) for each further one), so the forward equals the merged layer."""
        params = {n: t for n, t in self.adapted_parameters(adapters[0]).items()}
        for name in adapters[1:]:
            for pname, value in self.adapted_parameters(name).items():
                original = self.original_base_value(pname)
                params[pname] = params[pname] + (value - original.to(value.device, value.dtype))
        return self._call_with(params, x, *args, **kwargs)

    def _mixed_batch_forward(self, x, *args, adapter_names: list[str], **kwargs):
        """Rows of one batch under different adapters: one call per adapter on its rows."""

        def run(name, rows_x):
            if name in self.hft_weight:
                return self._call_with(self.adapted_parameters(name), rows_x, *args, **kwargs)
            return self.base_layer(rows_x, *args, **kwargs)  # "__base__", or an adapter that left this module frozen

        return route_rows(x, adapter_names, run)

    # ----------------------------------------------------------------------------------------------- merge
    def merged_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The first merged adapter replaces the base values exactly; a further one adds its delta W_adapter - W0
        (zero on the rows a strategy="param" adapter does not own), so the merged weights are W0 + the sum of the
        merged adapters' deltas."""
        new = {n: t.detach() for n, t in self.adapted_parameters(adapter_name).items()}
        if self.merged_adapters:  # stack: W0 + sum of deltas
            base = self.get_base_layer()
            new = {n: getattr(base, n) + (t - self.original_base_value(n)) for n, t in new.items()}
        return new


def _replace_parameter(module: nn.Module, pname: str, value: torch.Tensor) -> None:
    """A new frozen Parameter holding `value` (a move between devices of any kind, meta included)."""
    module._parameters[pname] = nn.Parameter(value, requires_grad=module._parameters[pname].requires_grad)


def _noise_key(seed: int, taken: dict[str, str], adapter_name: str) -> str:
    """The seeds of an adapter's init noise: torch's seed and the config's; the adapter's name joins them when
    another adapter of the layer was drawn from the same seeds."""
    key = f"{torch.initial_seed()}:{seed}"
    others = {v for k, v in taken.items() if k != adapter_name}
    return f"{key}:{adapter_name}" if key in others else key


def _noise_seed(key: str, tensor_name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}:{tensor_name}".encode(), digest_size=8).digest(), "little") >> 1


def offload_originals(model: nn.Module, device: torch.device | str = "cpu", pin_memory: Optional[bool] = None) -> int:
    """Keep the pre-trained weights of every HFT-wrapped module off the accelerator (on `device`, CPU pinned memory
    by default) while training: an active adapter computes with its own copies only, so the originals are needed
    only to disable the adapter (a forward then copies them over one module at a time), to unload or merge, and to
    save deltas. Call it after moving the model to its device (`model.to(...)` moves them back too); modules wrapped
    later (a re-selection) stay where they are until it is called again. Layers holding a strategy="param" adapter
    keep theirs (that forward reads them). Returns the bytes moved off the device. Undo: `onload_originals(model)`.
    """
    return sum(m.offload_originals(device, pin_memory) for m in model.modules() if isinstance(m, HftLayer))


def onload_originals(model: nn.Module) -> int:
    """Put back every pre-trained weight that `offload_originals` moved; returns the bytes moved."""
    return sum(m.onload_originals() for m in model.modules() if isinstance(m, HftLayer))
