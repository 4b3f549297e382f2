from __future__ import annotations

import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from peft_ext.kernels import delta_linear, delta_linear_gathered, lowrank_linear
from peft_ext.kernels.delta_format import PackedDelta, SlotDelta, slot_codes_from_words
from peft_ext.kernels.delta_reference import reference_delta_part
from peft_ext.kernels.sign_format import SignDelta, sign_delta_part
from peft_ext.tuners.base import PeftExtLayer, is_conv1d, logical_weight
from peft_ext.tuners.one_adapter_forward import OneAdapterForward

from .representation import build_sign, build_slots, empty_tensors, random_tensors

INFERENCE_ONLY = (
    "Delta-CoMe adapters are compressed, frozen deltas for inference: they cannot be trained (a forward in "
    "training mode with gradients on reached {name}). Fine-tune the full model (or use LoRA / HFT) and compress "
    "the result with `peft-ext compress` / peft_ext.compress_delta; call model.eval() to run this adapter."
)


def base_probes(base: nn.Module, n: int = 16) -> list[float]:
    """A fingerprint of a base weight: n values at fixed evenly spaced positions (fp32, as plain floats)."""
    w = logical_weight(base)
    flat = torch.linspace(0, w.numel() - 1, n).round().long()
    rows, cols = flat // w.shape[1], flat % w.shape[1]
    return [float(v) for v in w.detach()[rows.to(w.device), cols.to(w.device)].float().cpu()]


def random_generator(seed: Optional[int], name: str) -> torch.Generator:
    """The generator of an adapter's random contents (init_weights=False) in the layer `name`: with seed None, seeded
    from torch's RNG (one draw: torch.manual_seed reproduces the contents, and every adapter built after another gets
    its own); with an int, from that seed and the layer's name alone (the same contents whatever torch's RNG and the
    adapter's name)."""
    if seed is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64)))
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


PROBE_FLOOR = 2.0**-14  # fp16's smallest normal: below it a weight loaded in fp16 keeps less relative precision


def delta_probes(base_weight: torch.Tensor, delta: torch.Tensor, n: int = 16) -> list[list]:
    """Where a fine-tune can be told from its base: the n positions of the (out, in) weight where the fine-tune differs
    most from the base relative to the weight there, |dW| / max(|W_base|, |W_ft|, 2^-14) (floating point keeps
    relative precision, so these are the positions that stay distinguishable in any precision the base may be loaded
    in), as [row, col, base value, delta value]. Positions the fine-tune did not change are never probes."""
    base_weight, delta = base_weight.detach().float(), delta.detach().float()
    scale = torch.maximum(base_weight.abs(), (base_weight + delta).abs()).clamp_min(PROBE_FLOOR)
    score = (delta.abs() / scale).flatten()
    k = min(n, int((score > 0).sum()))
    if k == 0:
        return []
    flat = torch.topk(score, k).indices
    rows, cols = flat // delta.shape[1], flat % delta.shape[1]
    b, d = base_weight[rows, cols].cpu(), delta[rows, cols].cpu()
    return [[int(r), int(c), float(bv), float(dv)] for r, c, bv, dv in zip(rows.tolist(), cols.tolist(), b, d)]


def probes_closer_to_the_finetune(weight: torch.Tensor, probes: list) -> tuple[int, int]:
    """(decisive probes, of those the ones where `weight` (out, in) holds the fine-tune's value rather than the
    base's). A probe is decisive when the delta there exceeds twice what rounding to `weight`'s dtype can move a value
    (a base loaded in bf16 is then still nearer its base value, a fine-tune in bf16 nearer its own)."""
    if not probes:
        return 0, 0
    info = torch.finfo(weight.dtype)
    rows = torch.tensor([p[0] for p in probes], device=weight.device)
    cols = torch.tensor([p[1] for p in probes], device=weight.device)
    actual = weight.detach()[rows, cols].double().cpu()
    b = torch.tensor([p[2] for p in probes], dtype=torch.float64)
    d = torch.tensor([p[3] for p in probes], dtype=torch.float64)
    rounding = info.eps / 2 * torch.maximum(b.abs(), (b + d).abs()) + info.smallest_normal * info.eps
    decisive = d.abs() > 2 * rounding
    finetune = decisive & ((actual - (b + d)).abs() < (actual - b).abs())
    return int(decisive.sum()), int(finetune.sum())


class DeltaComeTunerLayer(PeftExtLayer):
    """What every Delta-CoMe layer is (the tuner's `tuner_layer_cls`: set_adapter / delete_adapter reach all).

    The inference-only guard: a forward that would train, i.e. one in training mode with autograd recording, raises.
    The mode is the model's: layers added by get_peft_model / add_adapter / load_adapter take the mode of the layer
    they wrap (DeltaComeModel.inject_adapter), so a model put in eval mode runs with autograd on, and gradients
    through a frozen adapter in eval mode (to its inputs, or to buffers a caller made require grad) are allowed.
    Under torch.no_grad / inference_mode any mode runs."""

    method_label = "Delta-CoMe"

    def _check_can_run(self) -> None:
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(INFERENCE_ONLY.format(name=type(self.get_base_layer()).__name__))


SIDES = (("v", "in_features"), ("u", "out_features"))


def _load_bitplanes(module: "DeltaComeLinear", state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: a plain `load_state_dict` given version-1 bit planes (`v_words` / `u_words`, the files' layout)
    stores the slot codes the layer holds (lossless), checked against the layer's bands first: a mismatched tensor
    raises a ValueError naming the field. (PEFT's and transformers' loaders convert earlier: DeltaComeModel.)"""
    for adapter, (method, bands, _) in module.delta_meta.items():
        if method != "deltacome":
            continue
        for side, features in SIDES:
            key = f"{prefix}deltacome_delta.{adapter}.{side}_words"
            if key in state_dict:
                d = getattr(module, features)
                state_dict[f"{prefix}deltacome_delta.{adapter}.{side}_codes"] = slot_codes_from_words(state_dict.pop(key), d, bands, key)


class DeltaComeLinear(OneAdapterForward, DeltaComeTunerLayer):
    """Wraps one linear layer (nn.Linear or Conv1D). Each adapter is a compressed delta held in buffers
    (`deltacome_delta[adapter]`; or a baseline's tensors) and added to the frozen base: y = base(x) + delta(x), the
    delta never built densely.

    One compressed copy per Delta-CoMe adapter: the buffers hold the version-2 slot layout (sigma, v_codes, v_scales,
    v_mins, u_codes, u_scales, u_mins: kernels/delta_format.py SlotDelta), which every kernel path reads as it is -
    the fused decode (<= 16 rows), prefill and mixed batches (kernels/delta.py's slot kernels). The adapter files
    stay version 1 (bit planes `v_words` / `u_words`): DeltaComeModel converts at the file boundary (saving:
    `_get_adapter_state_dict`; loading: `_remap_adapter_state_dict_for_load`, `state_dict_for_transformers`), so old
    folders load and a save after a load writes the same bits; `model.state_dict()` shows the buffers as held."""

    adapter_layer_names = ("deltacome_delta",)
    other_param_names = ("delta_meta",)  # per adapter: delete_adapter drops its entry with its buffers

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        self.delta_meta: dict[str, tuple[str, tuple, int]] = {}  # adapter -> (method, (bits, n) bands, group_size)
        self._register_load_state_dict_pre_hook(_load_bitplanes, with_module=True)

    # ----------------------------------------------------------------------------------------------- state
    def update_layer(
        self, adapter_name: str, method: str, bands, group_size: int, init_weights: bool, seed: Optional[int], name: str
    ) -> None:
        weight = logical_weight(self.get_base_layer())
        if init_weights:
            tensors = empty_tensors(method, self.out_features, self.in_features, bands, group_size)
        else:
            generator = random_generator(seed, name)
            tensors = random_tensors(method, self.out_features, self.in_features, bands, group_size, generator, weight)
        self.deltacome_delta[adapter_name] = BufferDict({k: t.to(weight.device) for k, t in tensors.items()}, persistent=True)
        self.delta_meta[adapter_name] = (method, tuple(tuple(b) for b in bands), group_size)
        self.set_adapter(self.active_adapters)

    def _apply(self, fn, recurse=True):
        """`model.to(torch.bfloat16)` converts every floating buffer; a compressed delta's are a storage format (fp16
        scales and mins, fp32 sigma, int32 codes) that the kernels read as such: they move device, never dtype (a
        round trip through bf16 would also lose the fp16 scales' precision)."""
        deltas = self._modules.pop("deltacome_delta")
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._modules["deltacome_delta"] = deltas
        for buffers in deltas.values():
            for key, tensor in list(buffers._buffers.items()):
                moved = fn(tensor)
                if moved.dtype != tensor.dtype:
                    moved = tensor.to(moved.device)
                buffers._buffers[key] = moved
        return result

    def delta(self, adapter_name: str):
        """The adapter as a SlotDelta / SignDelta / (A, B) pair over the current buffers (no copy)."""
        method, bands, group_size = self.delta_meta[adapter_name]
        tensors = dict(self.deltacome_delta[adapter_name].items())
        if method == "deltacome":
            return build_slots(self.out_features, self.in_features, bands, group_size, tensors)
        if method == "bitdelta":
            return build_sign(self.out_features, self.in_features, tensors)
        return tensors["lowrank_a"], tensors["lowrank_b"]

    def delta_part(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """delta(x) alone, in fp32 (reference math; used for mixed batches of baseline adapters)."""
        d = self.delta(adapter_name)
        if isinstance(d, (PackedDelta, SlotDelta)):
            return reference_delta_part(x, d)
        if isinstance(d, SignDelta):
            return sign_delta_part(x, d)
        a, b = d
        return F.linear(F.linear(x.float(), a.float()), b.float())

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta (out, in) in fp32: for merging only."""
        d = self.delta(adapter_name)
        if isinstance(d, (PackedDelta, SlotDelta, SignDelta)):
            return d.dense(torch.float32)
        a, b = d
        return b.float() @ a.float()

    # --------------------------------------------------------------------------------------------- forward
    def _base_weight_bias(self):
        base = self.get_base_layer()
        return logical_weight(base), base.bias

    def _adapted(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        weight, bias = self._base_weight_bias()
        d = self.delta(adapter_name)
        if isinstance(d, (PackedDelta, SlotDelta)):
            return delta_linear(x, weight, bias, d)
        if isinstance(d, SignDelta):
            y = F.linear(x, weight, bias)
            return (y.float() + sign_delta_part(x, d)).to(y.dtype)
        a, b = d
        return lowrank_linear(x, weight, bias, a, b, 1.0)

    def _single_forward(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(f"{type(self.get_base_layer()).__name__} takes only x here, got extra arguments.")
        return self._adapted(x, adapter_name)

    def _stacked_forward(self, adapters: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Several active tenants at once: the base plus the sum of their deltas (what merging them all writes)."""
        if args or kwargs:
            raise TypeError(f"{type(self.get_base_layer()).__name__} takes only x here, got extra arguments.")
        weight, bias = self._base_weight_bias()
        y = F.linear(x, weight, bias)
        return (y.float() + sum(self.delta_part(name, x) for name in adapters)).to(y.dtype)

    def _mixed_batch_forward(self, x, *args, adapter_names: list[str], **kwargs):
        """Rows of one batch under different deltas: the base GEMM once, then each row's own delta."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows.")
        self._check_can_run()
        names = [a for a in dict.fromkeys(adapter_names) if a in self.deltacome_delta]
        packed = [a for a in names if self.delta_meta[a][0] == "deltacome"]
        if packed:  # one kernel launch serves one group size: the most common; other tenants' rows come after
            sizes = [self.delta_meta[a][2] for a in packed]
            packed = [a for a in packed if self.delta_meta[a][2] == max(set(sizes), key=sizes.count)]
        index = torch.tensor([packed.index(a) if a in packed else -1 for a in adapter_names], device=x.device)
        weight, bias = self._base_weight_bias()
        if packed:
            y = delta_linear_gathered(x, weight, bias, [self.delta(a) for a in packed], index)
        else:
            y = F.linear(x, weight, bias)
        for name in names:  # baselines (bitdelta / lowrank), other group sizes: their rows get their delta here
            if name in packed:
                continue
            rows = torch.tensor([i for i, a in enumerate(adapter_names) if a == name], device=x.device)
            y[rows] = (y[rows].float() + self.delta_part(name, x[rows])).to(y.dtype)
        return y

    # ----------------------------------------------------------------------------------------------- merge
    def merged_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The base weight plus the dense delta (built only for merging)."""
        base = self.get_base_layer()
        delta = self.get_delta_weight(adapter_name)
        if is_conv1d(base):
            delta = delta.T
        return {"weight": (base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype)}

    def __repr__(self) -> str:
        return "deltacome." + nn.Module.__repr__(self)
