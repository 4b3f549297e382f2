"""Plain-PyTorch references for the low-rank kernels: the tests' ground truth and the CPU path.

    y = x @ W^T + b + s * (dropout(x) @ A^T) @ B^T          W: (out, in)  A: (r, in)  B: (out, r)

Dtype rule (the same in the kernels): the product runs in x's dtype with the adapter matrices cast to it
(they may be fp32 master weights while x is bf16: the small A and B are cast, x is never upcast), so the
low-rank intermediate xa = dropout(x) @ A^T is rounded to x's dtype, as under torch.autocast. Except for fp16
x: fp16's range (65504) is too small for the intermediates (xa with outlier activations; in the backward
dyb = dy B under loss scaling), so the low-rank branch runs in fp32 (`lowrank_dtype`) and only its result
s * xa B^T is rounded to fp16. The result has x's dtype. With float64 inputs this is exact math (gradcheck).

Dropout (PEFT LoRA's convention): only the low-rank branch sees dropout(x); the base product sees x.
The keep-mask is drawn by `dropout_keep_mask` from torch's RNG (an optional torch.Generator makes it
reproducible); the Triton path draws it with the same function, so a kernel run and a reference run given
generators in the same state use the same mask.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F


def dropout_keep_mask(
    x: torch.Tensor, dropout_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Bool tensor shaped like x: True where an element is kept (probability 1 - dropout_p)."""
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - dropout_p, generator=generator)


def lowrank_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the low-rank branch (x A^T, then its product with B^T) runs in for inputs of `dtype`: fp32 for
    fp16 (range), else the inputs' own (the kernels' `dispatch.intermediate_dtype`)."""
    return torch.float32 if dtype == torch.float16 else dtype


def apply_dropout_mask(x: torch.Tensor, keep: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """x * keep / (1 - p), in x's dtype (inverted dropout, as torch.nn.functional.dropout)."""
    return x * keep.to(x.dtype) * (1.0 / (1.0 - dropout_p))


def reference_lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: Optional[torch.Generator] = None,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x W^T + b + scale * (dropout(x) A^T) B^T, differentiable in every tensor argument.

    Dropout is applied when `training` and `dropout_p > 0`: with `dropout_mask` (bool, shaped like x) if given,
    else a mask drawn by `dropout_keep_mask(x, dropout_p, generator)`.
    """
    y = F.linear(x, weight, bias)
    xd = x
    if training and dropout_p > 0.0:
        keep = dropout_mask if dropout_mask is not None else dropout_keep_mask(x, dropout_p, generator)
        xd = apply_dropout_mask(x, keep, dropout_p)
    low = lowrank_dtype(x.dtype)
    xa = F.linear(xd.to(low), lora_a.to(low))
    return y + (scale * F.linear(xa, lora_b.to(low))).to(x.dtype)


def rows_adapter_index(adapter_index: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """The adapter index per row of x.reshape(-1, in_features), as int64 on adapter_index's device.

    adapter_index is either shaped like x.shape[:-1] (one index per token / row) or, for x with 3 or more
    dimensions, (x.shape[0],) (one index per sequence, repeated over its tokens).
    """
    lead = tuple(x_shape[:-1])
    index = adapter_index.long()
    if tuple(index.shape) == lead:
        return index.reshape(-1)
    if len(lead) >= 2 and index.dim() == 1 and index.shape[0] == lead[0]:
        return index[:, None].expand(lead[0], int(torch.Size(lead[1:]).numel())).reshape(-1)
    raise ValueError(
        f"adapter_index must have shape {lead} (one per row of x) or ({lead[0] if lead else '?'},) "
        f"(one per sequence, for x with >= 3 dims); got {tuple(adapter_index.shape)} for x of shape {tuple(x_shape)}."
    )


def check_index_dtype(adapter_index) -> None:
    """TypeError unless adapter_index is an integer tensor (the gathered kernels' per-row index)."""
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index must be an integer tensor, got {type(adapter_index).__name__}.")
    dt = adapter_index.dtype
    if dt.is_floating_point or dt.is_complex or dt == torch.bool:
        raise TypeError(f"adapter_index must be an integer tensor (int32/int64), got {dt}.")


def check_adapter_index(
    row_index: torch.Tensor, count: int, no_entry: str = "no adapter", entries: str = "a stack of {count} adapters"
) -> None:
    """ValueError if some index is outside [-1, count). Syncs when row_index is on a GPU. `no_entry` and `entries`
    name what the index selects in the message (-1 = `no_entry`; `entries` formatted with count)."""
    bad = (row_index < -1) | (row_index >= count)
    if bool(bad.any()):
        values = sorted(set(row_index[bad].tolist()))[:8]
        raise ValueError(
            f"adapter_index out of range: got {values} (showing up to 8); valid values are -1 ({no_entry}) and "
            f"0..{count - 1} for {entries.format(count=count)}."
        )


def reference_lowrank_linear_gathered(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a_stack: torch.Tensor,
    lora_b_stack: torch.Tensor,
    scales: Union[Sequence[float], torch.Tensor],
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """Mixed-adapter batch: row i of x (or sequence i) uses adapter adapter_index[i]; -1 means none.

    y[i] = x[i] W^T + b + scales[j] * (x[i] A_j^T) B_j^T  with j = adapter_index[i],
    A_j = lora_a_stack[j] (r, in), B_j = lora_b_stack[j] (out, r). Adapters of smaller rank are zero-padded
    to the stack's r. Plain loop over the adapters present (as PEFT's adapter_names path); differentiable.
    Indices are not range-checked here (the entry point does that).
    """
    in_features = x.shape[-1]
    y = F.linear(x, weight, bias)
    rows = rows_adapter_index(adapter_index.to(x.device), x.shape)
    x2 = x.reshape(-1, in_features)
    delta = torch.zeros(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    for j in range(lora_a_stack.shape[0]):
        sel = (rows == j).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        s = float(scales[j])
        low = lowrank_dtype(x.dtype)
        xa = F.linear(x2.index_select(0, sel).to(low), lora_a_stack[j].to(low))
        delta = delta.index_add(0, sel, (s * F.linear(xa, lora_b_stack[j].to(low))).to(x.dtype))
    return y + delta.reshape(y.shape)
