"""An adapter's tensors per method (the buffer names saved in adapter_model.safetensors) and their views.

    deltacome: sigma, v_words, v_scales, v_mins, u_words, u_scales, u_mins   (kernels/delta_format.py)
               in the files (format version 1, bit planes); a layer holds them in the version-2 slot layout
               (sigma, v_codes, v_scales, v_mins, u_codes, u_scales, u_mins: SlotDelta), converted on load and
               back on save by the layer's state-dict hooks (layer.py), one copy in memory
    bitdelta:  sign_words (ceil(in/32), out) int32, sign_alpha (1,) fp32       (kernels/sign_format.py)
    lowrank:   lowrank_a (r, in) fp16 = diag(sigma) V^T, lowrank_b (out, r) fp16 = U
"""

from __future__ import annotations

from typing import Optional

import torch

from peft_ext.kernels.delta_format import SLOT_TENSOR_FIELDS, TENSOR_FIELDS, PackedDelta, SlotDelta
from peft_ext.kernels.sign_format import SignDelta


def lowrank_of(bands) -> int:
    return sum(n for _, n in bands)


def empty_tensors(method: str, out_features: int, in_features: int, bands, group_size: int) -> dict[str, torch.Tensor]:
    """A zero delta of the right shapes (what a state dict fills); deltacome in the slot layout a layer holds."""
    if method == "deltacome":
        return SlotDelta.empty(out_features, in_features, group_size, bands).tensors()
    if method == "bitdelta":
        sign = SignDelta.empty(out_features, in_features)
        return {"sign_words": sign.words, "sign_alpha": sign.alpha}
    r = lowrank_of(bands)
    return {
        "lowrank_a": torch.zeros(r, in_features, dtype=torch.float16),
        "lowrank_b": torch.zeros(out_features, r, dtype=torch.float16),
    }


def random_tensors(
    method: str, out_features: int, in_features: int, bands, group_size: int, generator: torch.Generator, weight: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Random contents of about 10 % of the base weight's scale (tests: a non-trivial adapter)."""
    scale = 0.1 * float(weight.detach().float().std().nan_to_num(0.0).clamp(min=1e-2)) * (out_features * in_features) ** 0.5
    if method == "deltacome":
        rank = max(1, lowrank_of(bands))
        packed = PackedDelta.random(out_features, in_features, bands, group_size, generator, sigma_scale=scale / rank**0.5)
        return SlotDelta.from_packed(packed).tensors()  # what a layer holds (the same values as the bit planes)
    delta = torch.randn(out_features, in_features, generator=generator) * scale / (out_features * in_features) ** 0.5
    if method == "bitdelta":
        sign = SignDelta.from_delta(delta)
        return {"sign_words": sign.words, "sign_alpha": sign.alpha}
    r = lowrank_of(bands)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return {"lowrank_a": (s[:r, None] * vh[:r]).half().contiguous(), "lowrank_b": u[:, :r].half().contiguous()}


def build_packed(out_features: int, in_features: int, bands, group_size: int, tensors: dict) -> PackedDelta:
    return PackedDelta(out_features, in_features, group_size, tuple(tuple(b) for b in bands), **{k: tensors[k] for k in TENSOR_FIELDS})


def build_slots(out_features: int, in_features: int, bands, group_size: int, tensors: dict) -> SlotDelta:
    return SlotDelta(out_features, in_features, group_size, tuple(tuple(b) for b in bands), **{k: tensors[k] for k in SLOT_TENSOR_FIELDS})


def build_sign(out_features: int, in_features: int, tensors: dict) -> SignDelta:
    return SignDelta(out_features, in_features, tensors["sign_words"], tensors["sign_alpha"])


def method_bands(method: str, out_features: int, in_features: int, config, name: str, stored: Optional[list]) -> tuple:
    """(bits, n_cols) bands of one layer: as stored by the compressor, else solved from the config's budget."""
    from .bands import lowrank_rank, solve_bands

    if stored is not None:
        return tuple((int(bits), int(n)) for n, bits in stored)
    if method == "lowrank":
        return ((16, lowrank_rank(out_features, in_features, config.budget_fraction)),)
    if method == "bitdelta":
        return ()
    return solve_bands(out_features, in_features, config.budget_fraction, config.bands, config.group_size, name)
