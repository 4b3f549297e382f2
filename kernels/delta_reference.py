"""Plain-PyTorch references for the compressed-delta linear: the tests' ground truth and the CPU path.

    y = x W^T + b + ((x V) * sigma) U^T         U, V: the dequantised factors of a PackedDelta or SlotDelta
                                                (both have `factor` and `sigma`: the same values)

The delta part runs in fp32 (factors dequantised to fp32, x upcast once) and is added to the base product in
x's dtype; the dense delta U diag(sigma) V^T is never formed. Mixed batches (`reference_delta_linear_gathered`)
run the base GEMM once and add each row's own delta (-1: none).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .delta_format import PackedDelta
from .reference import rows_adapter_index


def reference_delta_part(x: torch.Tensor, delta: PackedDelta) -> torch.Tensor:
    """((x V) * sigma) U^T in fp32, shaped (..., out_features)."""
    t = x.float() @ delta.factor("v")
    return (t * delta.sigma) @ delta.factor("u").T


def reference_delta_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], delta: PackedDelta
) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return (y.float() + reference_delta_part(x, delta)).to(y.dtype)


def reference_delta_linear_gathered(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    deltas: Sequence[PackedDelta],
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """Row i (or sequence i) of x adds deltas[adapter_index[i]]; -1 adds nothing. The base GEMM runs once."""
    y = F.linear(x, weight, bias)
    rows = rows_adapter_index(adapter_index.to(x.device), x.shape)
    x2 = x.reshape(-1, x.shape[-1])
    out = y.reshape(-1, y.shape[-1]).float()
    for j, delta in enumerate(deltas):
        sel = (rows == j).nonzero().squeeze(1)
        if sel.numel():
            out = out.index_add(0, sel, reference_delta_part(x2.index_select(0, sel), delta))
    return out.to(y.dtype).reshape(y.shape)
