"""Mixed-adapter low-rank linear: every row (token or sequence) of the batch uses its own adapter.

    y[i] = x[i] W^T + b + s_j * (x[i] A_j^T) B_j^T,   j = adapter_index[i]  (-1: no adapter, base only)

Entry point: `lowrank_linear_gathered(x, weight, bias, lora_a_stack, lora_b_stack, scales, adapter_index)` with
lora_a_stack (L, r, K), lora_b_stack (L, N, r), scales (L,) floats; adapters of smaller rank are zero-padded to
the stack's r. Twin: kernels/reference.py's `reference_lowrank_linear_gathered`. Meant for inference (forward).

Design (the segmented-gather idea of Punica's SGMV and vLLM's LoRA shrink/expand kernels, written anew):
  1. plan (`plan_adapter_segments`, a few tiny device ops, no host sync): rows are bucketed by adapter
     (bucket 0 = no adapter, 1..L = adapters, L+1 = out-of-range index when checking is off), stably sorted
     by bucket (`order`), and each bucket is cut into blocks of BLOCK_M rows. Block b's bucket is found with
     searchsorted over the buckets' cumulative block counts, so the grid size is a host-side upper bound,
     cdiv(M, BLOCK_M) + L + 2; surplus programs see an empty sentinel bucket and store nothing.
     A plan depends only on the index and M: build it once per forward and pass it to every layer.
  2. Triton `_gathered_shrink_expand_kernel`: each program takes one block (rows of one adapter), gathers its
     x rows through `order` (no copy of x), computes xa = x A_j^T in registers, then writes
     y_low[rows] = s_j xa B_j^T + b (scattered back to the original row positions). Rows without adapter skip
     the shrink and get y_low = b; rows of an out-of-range bucket get NaN (only reachable with
     check_index=False), so a bad index can never read outside the stacks.
  3. cuBLAS: y_low.addmm_(x, W^T), the base GEMM with beta=1 (as in lowrank.py).
  -> 1 Triton launch + 1 GEMM per layer, plus the plan (argsort, scatter_add, cumsums, searchsorted) unless a
     plan is passed in.

Index checking: with check_index=True (default) an index outside [-1, L) raises ValueError. For an index
tensor on the CPU that check is free; for a CUDA index it costs one host sync per call, so check once when
building the plan (`plan_adapter_segments(..., check_index=True)`) and reuse the plan.

Dtypes, devices, strides: as kernels/lowrank.py (xa rounded to x's dtype for bf16, kept in fp32 for fp16 x; the
launch runs on x's CUDA device; scales and bias are made contiguous at the launch, the stacks read through their
strides).

Gradients: the Triton path is forward-only. When autograd needs gradients (grad mode on and some input
requires grad), the call runs on the reference, which is differentiable.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import autotune
from .dispatch import (
    autocast_base,
    block_r,
    cdiv,
    check_base,
    check_float,
    check_rank,
    check_same_device,
    choose_backend,
    compute_dtype,
    dot_precision,
    intermediate_compute,
    interpret_mode,
    launch_device,
    lazy_jit,
    next_pow2,
    tl,
)
from .lowrank import gpu_rowblock_config
from .reference import check_adapter_index, check_index_dtype, reference_lowrank_linear_gathered, rows_adapter_index

__all__ = ["AdapterSegments", "lowrank_linear_gathered", "plan_adapter_segments"]


# ------------------------------------------------------------------------------------------------ kernel
@lazy_jit
def _gathered_shrink_expand_kernel(
    X, ORDER, BLOCK_SEG, SEG_BLOCK_START, SEG_ROW_START, SEG_ROW_END,
    A, B, SCALES, BIAS, Y,
    K, N, R, num_adapters, nan_value,
    stride_xm, stride_xk,
    stride_al, stride_ar, stride_ak,
    stride_bl, stride_bn, stride_br,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, MID_COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One block of rows of one adapter (see the module docstring). SCALES and BIAS: contiguous. MID_COMPUTE:
    the expand's operand dtype (fp32 for fp16 inputs: x A^T may exceed fp16's range)."""
    pid = tl.program_id(0)
    seg = tl.load(BLOCK_SEG + pid)
    pos = tl.load(SEG_ROW_START + seg) + (pid - tl.load(SEG_BLOCK_START + seg)) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = pos < tl.load(SEG_ROW_END + seg)
    rows = tl.load(ORDER + pos, mask=row_ok, other=0).to(tl.int64)
    adapter = seg - 1
    has_adapter = (adapter >= 0) & (adapter < num_adapters)
    invalid = seg == num_adapters + 1
    adapter64 = tl.where(has_adapter, adapter, 0).to(tl.int64)
    a_base = A + adapter64 * stride_al
    b_base = B + adapter64 * stride_bl
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R

    # shrink (skipped for rows without adapter: zero trip count)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    k_end = tl.where(has_adapter, K, 0)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x_ptrs = X + rows[:, None] * stride_xm + ks[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_ptrs = a_base + rs[None, :] * stride_ar + ks[:, None] * stride_ak
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x.to(COMPUTE), a.to(COMPUTE), acc, input_precision=DOT_PRECISION)
    mid = acc.to(MID_COMPUTE)  # rounded to x's dtype on the GPU (bf16), as the reference; fp32 for fp16 x
    s = tl.load(SCALES + adapter64)
    rb_ok = rs < tl.where(has_adapter, R, 0)  # no B reads for rows without adapter

    # expand: y_low[rows] = s * mid B^T + bias (bias alone without adapter, NaN for an invalid index)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        b = tl.load(
            b_base + ns[None, :] * stride_bn + rs[:, None] * stride_br,
            mask=rb_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        out = tl.dot(mid, b.to(MID_COMPUTE), input_precision=DOT_PRECISION) * s
        if HAS_BIAS:
            out += tl.load(BIAS + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = tl.where(invalid, nan_value, out)
        tl.store(
            Y + rows[:, None] * stride_ym + ns[None, :] * stride_yn,
            out.to(Y.dtype.element_ty),
            mask=row_ok[:, None] & n_ok[None, :],
        )


# -------------------------------------------------------------------------------------------------- plan
class AdapterSegments(NamedTuple):
    """Rows grouped by adapter, ready for the kernel (see the module docstring). Build with
    `plan_adapter_segments`; valid for any layer called on x of the same leading shape."""

    row_index: torch.Tensor  # (M,) int64: adapter per row of x.reshape(-1, K), -1 = none
    order: torch.Tensor  # (M,) int32: rows sorted by bucket (stable)
    block_seg: torch.Tensor  # (num_blocks,) int32: bucket of each program (L + 2 = empty sentinel)
    seg_block_start: torch.Tensor  # (L + 3,) int32: first program of each bucket
    seg_row_start: torch.Tensor  # (L + 3,) int32: first position in `order` of each bucket
    seg_row_end: torch.Tensor  # (L + 3,) int32: one past the last position
    num_adapters: int
    num_rows: int
    block_m: int
    num_blocks: int  # grid size


def _gathered_config(M: int, R: int, device: torch.device) -> dict:
    if interpret_mode():
        return dict(BLOCK_M=min(64, max(16, next_pow2(M))), BLOCK_K=64, BLOCK_N=64, BLOCK_R=block_r(R), num_warps=4)
    return gpu_rowblock_config(M, R, device)  # same tiles as the dense kernel


def plan_adapter_segments(
    adapter_index: torch.Tensor,
    num_adapters: int,
    x_shape: Sequence[int],
    *,
    device: Optional[torch.device] = None,
    check_index: bool = True,
) -> AdapterSegments:
    """Group the rows of x (shape `x_shape`) by adapter for `lowrank_linear_gathered`.

    adapter_index: one index per row (shape x_shape[:-1]) or per sequence (x_shape[0],); -1 = no adapter.
    device: where x lives (default: the index's).
    check_index: raise ValueError on an index outside [-1, num_adapters) (a host sync for a CUDA index).
    """
    check_index_dtype(adapter_index)
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}.")
    row_index = rows_adapter_index(adapter_index, x_shape)
    if check_index:
        check_adapter_index(row_index, num_adapters)
    device = torch.device(device) if device is not None else row_index.device
    row_index = row_index.to(device, non_blocking=True)
    M, L = row_index.shape[0], num_adapters
    block_m = _gathered_config(M, 1, device)["BLOCK_M"]  # depends on M (and the device) only
    valid = (row_index >= -1) & (row_index < L)
    bucket = torch.where(valid, row_index + 1, torch.full_like(row_index, L + 1))
    order = torch.argsort(bucket, stable=True).to(torch.int32)
    counts = torch.zeros(L + 2, dtype=torch.int64, device=device).scatter_add_(0, bucket, torch.ones_like(bucket))
    row_end = counts.cumsum(0)
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    num_blocks = cdiv(M, block_m) + L + 2  # >= sum(blocks): each bucket adds at most one partial block
    block_seg = torch.searchsorted(block_end, torch.arange(num_blocks, device=device), right=True)
    zero = torch.zeros(1, dtype=torch.int64, device=device)  # sentinel bucket L + 2: no rows
    return AdapterSegments(
        row_index=row_index,
        order=order,
        block_seg=block_seg.to(torch.int32),
        seg_block_start=torch.cat([block_end - blocks, zero]).to(torch.int32),
        seg_row_start=torch.cat([row_end - counts, zero]).to(torch.int32),
        seg_row_end=torch.cat([row_end, zero]).to(torch.int32),
        num_adapters=L,
        num_rows=M,
        block_m=block_m,
        num_blocks=num_blocks,
    )


# ------------------------------------------------------------------------------------------- entry point
def check_gathered_args(x, weight, bias, lora_a_stack, lora_b_stack, scales) -> tuple[int, int]:
    """Shape / dtype / device checks shared by both backends; returns (num_adapters, rank)."""
    in_features, out_features = check_base(x, weight, bias)
    check_float("lora_a_stack", lora_a_stack)
    check_float("lora_b_stack", lora_b_stack)
    if lora_a_stack.dim() != 3 or lora_a_stack.shape[2] != in_features or lora_a_stack.shape[0] < 1:
        raise ValueError(
            f"lora_a_stack must have shape (num_adapters >= 1, r, in_features={in_features}), "
            f"got {tuple(lora_a_stack.shape)}."
        )
    L, rank = lora_a_stack.shape[:2]
    if tuple(lora_b_stack.shape) != (L, out_features, rank):
        raise ValueError(
            f"lora_b_stack must have shape (num_adapters={L}, out_features={out_features}, r={rank}) to match "
            f"weight and lora_a_stack, got {tuple(lora_b_stack.shape)}."
        )
    check_rank(rank, in_features, out_features)
    n_scales = scales.numel() if isinstance(scales, torch.Tensor) else len(scales)
    if n_scales != L or (isinstance(scales, torch.Tensor) and scales.dim() != 1):
        raise ValueError(f"scales must hold one value per adapter ({L}), got {n_scales}.")
    check_same_device(x=x, weight=weight, bias=bias, lora_a_stack=lora_a_stack, lora_b_stack=lora_b_stack)
    return L, rank


def lowrank_linear_gathered(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a_stack: torch.Tensor,
    lora_b_stack: torch.Tensor,
    scales: Union[Sequence[float], torch.Tensor],
    adapter_index: Union[torch.Tensor, AdapterSegments],
    *,
    check_index: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Mixed-adapter y (see the module docstring). adapter_index: int tensor, one per row of x (shape
    x.shape[:-1]) or per sequence (x.shape[0],), -1 = no adapter; or an AdapterSegments plan.
    Raises ValueError / TypeError on bad shapes, ranks, dtypes, devices, or (check_index) an index outside
    [-1, num_adapters)."""
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):  # autocast first, as F.linear
        x, weight, bias = autocast_base(x, weight, bias)
    L, rank = check_gathered_args(x, weight, bias, lora_a_stack, lora_b_stack, scales)
    check_base(x, weight, bias)
    M = x.numel() // x.shape[-1]
    plan = adapter_index if isinstance(adapter_index, AdapterSegments) else None
    if plan is not None:
        if plan.num_adapters != L or plan.num_rows != M:
            raise ValueError(
                f"this AdapterSegments plan was built for {plan.num_adapters} adapters and {plan.num_rows} rows, "
                f"not {L} and {M}."
            )
        row_index = plan.row_index
    else:
        check_index_dtype(adapter_index)
        row_index = rows_adapter_index(adapter_index, x.shape)
        if check_index:
            check_adapter_index(row_index, L)

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a_stack, lora_b_stack)
    )
    if needs_grad or choose_backend(x, rank, backend) == "reference":
        return reference_lowrank_linear_gathered(
            x, weight, bias, lora_a_stack, lora_b_stack, scales, row_index.view(x.shape[:-1])
        )

    if plan is None:
        plan = plan_adapter_segments(row_index, L, (M, x.shape[-1]), device=x.device, check_index=False)
    elif plan.block_seg.device != x.device:
        raise ValueError(f"the AdapterSegments plan lives on {plan.block_seg.device}, x on {x.device}.")
    # the kernel reads SCALES + j and BIAS + n: a strided scales tensor or bias was read as if contiguous
    scales_t = torch.as_tensor(scales, dtype=torch.float32).to(x.device, non_blocking=True).contiguous()
    if bias is not None:
        bias = bias.contiguous()
    N, K = weight.shape
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M > 0:
        cfg = _gathered_config(M, rank, x.device)
        cfg["BLOCK_M"] = plan.block_m
        with launch_device(x2d):
            autotune.launch(_gathered_shrink_expand_kernel, "gathered", (plan.num_blocks,),
                            key=dict(M=M, K=K, N=N, R=rank, L=L), writes=("Y",))(
                x2d, plan.order, plan.block_seg, plan.seg_block_start, plan.seg_row_start, plan.seg_row_end,
                lora_a_stack, lora_b_stack, scales_t, bias if bias is not None else x2d, y,
                K, N, rank, L, float("nan"),
                x2d.stride(0), x2d.stride(1),
                lora_a_stack.stride(0), lora_a_stack.stride(1), lora_a_stack.stride(2),
                lora_b_stack.stride(0), lora_b_stack.stride(1), lora_b_stack.stride(2),
                y.stride(0), y.stride(1),
                HAS_BIAS=bias is not None,
                COMPUTE=compute_dtype(x.dtype),
                MID_COMPUTE=intermediate_compute(x.dtype),
                DOT_PRECISION=dot_precision(x.dtype),
                **cfg,
            )
    with torch.autocast(x.device.type, enabled=False):
        y.addmm_(x2d, weight.t())  # cuBLAS base GEMM, beta=1: y = x W^T + y_low
    return y.view(*x.shape[:-1], N)
