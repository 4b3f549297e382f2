"""Fused low-rank linear: y = x W^T + b + s * (dropout(x) A^T) B^T, forward and backward (W frozen).

Shapes: x (..., K), W (N, K), b (N,), A = lora_a (r, K), B = lora_b (N, r), s = scale (a Python float).
Entry point: `lowrank_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=False)`; its
plain-PyTorch twin is kernels/reference.py's `reference_lowrank_linear` (same dtype rules, same dropout mask).

Design (x, dy of M rows; bf16/fp16/fp32 compute, fp32 accumulation everywhere):

  forward   1. Triton `_shrink_expand_kernel`: one program per BLOCK_M rows reads its x rows once,
               xa = dropout(x) A^T (BLOCK_M x r, fp32 accumulator in registers), stores xa for the backward,
               then writes y_low = s * xa B^T + b for those rows, looping over N.        (x read once, y written once)
            2. cuBLAS: y_low.addmm_(x, W^T), i.e. y = x W^T + y_low, the base GEMM with beta=1: its epilogue
               reads y_low, so the adapter adds no extra pass over y and no second output buffer.
            -> 2 launches (the no-adapter layer does 1 GEMM).
  backward  1. the same `_shrink_expand_kernel` on dy: dyb = dy B (stored), dx_low = s * (dyb A) * keep/(1-p);
            2. cuBLAS: dx_low.addmm_(dy, W), i.e. dx = dy W + dx_low;
            3. `_wgrad_kernel`: dA = s * dyb^T dropout(x)  (reads x once; split over M, fp32 partials);
            4. `_wgrad_kernel`: dB = s * dy^T xa           (reads dy a second time; split over M);
            5. the fp32 partial sums of 3 and 4 (one torch .sum each, deterministic, skipped when one split).
            -> 4 to 6 launches. W gets a gradient (cuBLAS dy^T x) only if it requires one; same for b.
  Why not one big Triton GEMM: cuBLAS is hard to beat on the base GEMM, so the base stays on cuBLAS and only
  the rank-r work is Triton; the kernels are bandwidth-bound (r is small) and read each of x and dy at most
  twice per step. A deterministic reduction is used for dA/dB (no atomics).

Dtypes: x and W share one dtype (fp16/bf16/fp32; under torch.autocast they are cast to the autocast dtype
first, as F.linear would). The adapter weights may be another dtype (typically fp32 masters with bf16 x): the
kernels cast every tile they load to the dtype they compute in; the autograd function casts a factor wider than
that once per call (`_compute_operand`, forward and backward: an r x K and an N x r copy) so that the programs,
which all re-read the whole factor, read half the bytes; the values are the ones the in-register cast gives
(both round to nearest even). x is never upcast or copied. xa and
dyb are rounded to x's dtype (as autocast does) for bf16 and fp32 x; for fp16 x they are kept in fp32
(`dispatch.intermediate_dtype`: under loss scaling dyb = dy B, or xa with outlier activations, can exceed fp16's
65504) and the dots that read them take fp32 operands (TF32 tensor cores on the GPU: fp16's precision, fp32's
range). dA / dB are accumulated in fp32 and returned in the adapter weights' dtype. fp32 dots are exact
("ieee") unless torch.backends.cuda.matmul.allow_tf32 is set.

Devices and strides: every launch runs under `dispatch.launch_device` (x's CUDA device made current: Triton
launches on the current device, so a tensor on cuda:1 while cuda:0 is current would be read through foreign
pointers); the bias is made contiguous at the launch (the kernel reads BIAS + n), the other operands are read
through their strides.

Dropout (only on the low-rank branch, as PEFT LoRA): the keep-mask is drawn with torch
(`reference.dropout_keep_mask`, honours a torch.Generator) and passed to the kernels as a bool tensor, which
also serves the backward (dx_low and dA). So kernel and reference use one mask and can be compared exactly;
the cost is one byte per element of x, saved for the backward (the dropout-free path saves nothing extra).
With dropout_p == 0 or training=False no mask exists and the kernels skip that code (constexpr). Under
activation checkpointing the recomputed forward draws the same mask when the mask comes from torch's default
generator (checkpoint restores its state); a caller-supplied generator is not restored.

Dispatch (kernels/dispatch.py): Triton for CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), else the
reference. Interpreter note: bf16/fp16 tiles are upcast to fp32 right after their loads (the interpreter's
bf16 math is wrong); on the GPU they stay bf16/fp16.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dispatch import (
    autocast_base,
    block_r,
    cdiv,
    check_base,
    check_dropout,
    check_float,
    check_rank,
    check_same_device,
    check_scale,
    choose_backend,
    compute_dtype,
    dot_precision,
    intermediate_compute,
    intermediate_dtype,
    interpret_mode,
    launch_device,
    lazy_jit,
    next_pow2,
    target_programs,
    tl,
)
from .reference import dropout_keep_mask, reference_lowrank_linear

__all__ = ["LowRankLinearFunction", "lowrank_linear", "shrink_expand", "lowrank_weight_grad"]


# ------------------------------------------------------------------------------------------------ kernels
@lazy_jit
def _shrink_expand_kernel(
    X, A, B, BIAS, KEEP, MID, Y,
    M, K, N, R,
    stride_xm, stride_xk,
    stride_ar, stride_ak,  # shrink operand viewed as (R, K)
    stride_bn, stride_br,  # expand operand viewed as (N, R)
    stride_km, stride_kc,  # keep-mask: like X (KEEP_MODE 1) or like Y (KEEP_MODE 2)
    stride_mm, stride_mr,
    stride_ym, stride_yn,
    scale, keep_scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, KEEP_MODE: tl.constexpr, STORE_MID: tl.constexpr, DO_EXPAND: tl.constexpr,
    COMPUTE: tl.constexpr, MID_COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """MID = X' A^T (X' = X * keep / (1-p) if KEEP_MODE == 1) and Y = s * MID B^T (+ bias) (* keep / (1-p) if
    KEEP_MODE == 2) for BLOCK_M rows per program; MID stays in registers between the two loops. BIAS: contiguous.
    MID_COMPUTE: the expand's operand dtype (fp32 for fp16 inputs: MID may exceed fp16's range)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R

    # shrink: acc = X[rows] A^T, K in steps of BLOCK_K
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xm = row_ok[:, None] & k_ok[None, :]
        x = tl.load(X + rows64[:, None] * stride_xm + ks[None, :] * stride_xk, mask=xm, other=0.0)
        if KEEP_MODE == 1:
            keep = tl.load(KEEP + rows64[:, None] * stride_km + ks[None, :] * stride_kc, mask=xm, other=0)
            x = tl.where(keep != 0, x.to(tl.float32) * keep_scale, 0.0)
        a_ptrs = A + rs[None, :] * stride_ar + ks[:, None] * stride_ak
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x.to(COMPUTE), a.to(COMPUTE), acc, input_precision=DOT_PRECISION)

    if STORE_MID:
        mid_ptrs = MID + rows64[:, None] * stride_mm + rs[None, :] * stride_mr
        tl.store(mid_ptrs, acc.to(MID.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])

    # expand: Y[rows] = s * mid B^T (+ bias), N in steps of BLOCK_N
    if DO_EXPAND:
        mid = acc.to(MID_COMPUTE)  # rounded to x's dtype on the GPU (bf16), as the reference; fp32 for fp16 x
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_ok = ns < N
            b_ptrs = B + ns[None, :] * stride_bn + rs[:, None] * stride_br
            b = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            out = tl.dot(mid, b.to(MID_COMPUTE), input_precision=DOT_PRECISION) * scale
            if HAS_BIAS:
                out += tl.load(BIAS + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            ym = row_ok[:, None] & n_ok[None, :]
            if KEEP_MODE == 2:
                keep = tl.load(KEEP + rows64[:, None] * stride_km + ns[None, :] * stride_kc, mask=ym, other=0)
                out = tl.where(keep != 0, out * keep_scale, 0.0)
            tl.store(Y + rows64[:, None] * stride_ym + ns[None, :] * stride_yn, out.to(Y.dtype.element_ty), mask=ym)


@lazy_jit
def _wgrad_kernel(
    L, T, KEEP, P,
    M, C, R, rows_per_split,
    stride_lm, stride_lr,
    stride_tm, stride_tc,
    stride_km, stride_kc,
    stride_ps, stride_pr, stride_pc,
    scale, keep_scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_KEEP: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """P[split, r, c] = s * sum over this split's rows m of L[m, r] * T'[m, c]  (T' = T * keep / (1-p) if
    HAS_KEEP). Grid: (column blocks, splits of M); the splits are summed by the caller. COMPUTE: the dot's
    operand dtype (fp32 when L is an fp32 intermediate of fp16 inputs)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    m_start = pid_s * rows_per_split
    acc = tl.full((BLOCK_R, BLOCK_C), 0.0, tl.float32)
    for m0 in range(0, rows_per_split, BLOCK_M):
        ms = m_start + m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < M
        ms64 = ms.to(tl.int64)
        l_ptrs = L + ms64[:, None] * stride_lm + rs[None, :] * stride_lr
        lt = tl.load(l_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        tm = m_ok[:, None] & c_ok[None, :]
        t = tl.load(T + ms64[:, None] * stride_tm + cs[None, :] * stride_tc, mask=tm, other=0.0)
        if HAS_KEEP:
            keep = tl.load(KEEP + ms64[:, None] * stride_km + cs[None, :] * stride_kc, mask=tm, other=0)
            t = tl.where(keep != 0, t.to(tl.float32) * keep_scale, 0.0)
        acc = tl.dot(tl.trans(lt.to(COMPUTE)), t.to(COMPUTE), acc, input_precision=DOT_PRECISION)
    tl.store(
        P + pid_s * stride_ps + rs[:, None] * stride_pr + cs[None, :] * stride_pc,
        acc * scale,
        mask=r_ok[:, None] & c_ok[None, :],
    )


# ------------------------------------------------------------------------------------------- launch code
def gpu_rowblock_config(M: int, R: int, device: torch.device) -> dict:
    """Tiles for the row-block kernels (this one and the gathered one) on a GPU. They are bandwidth-bound
    (r is small): BLOCK_M = 32 when that still gives one program per SM, else 16; the K / N tiles shrink
    as r grows to keep the register tiles (BLOCK_M x r accumulator, BLOCK_M x BLOCK_N output) without
    spills. Chosen from ptxas register / shared-memory counts for sm_90 (tests/kernels compile them);
    the timings are to be checked with benchmarks/lowrank_kernels.py."""
    br = block_r(R)
    block_m = 32 if cdiv(M, 32) >= target_programs(device) else 16
    if br <= 32:
        return dict(BLOCK_M=block_m, BLOCK_K=128, BLOCK_N=64, BLOCK_R=br, num_warps=4, num_stages=3)
    if br <= 64:
        return dict(BLOCK_M=block_m, BLOCK_K=64, BLOCK_N=64, BLOCK_R=br, num_warps=4, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_K=32, BLOCK_N=64, BLOCK_R=br, num_warps=8, num_stages=3)


def _shrink_expand_config(M: int, R: int, device: torch.device) -> dict:
    if interpret_mode():  # fewest programs x loop steps
        return dict(BLOCK_M=min(64, max(16, next_pow2(M))), BLOCK_K=64, BLOCK_N=64, BLOCK_R=block_r(R), num_warps=4)
    return gpu_rowblock_config(M, R, device)


def shrink_expand(
    x2d: torch.Tensor,
    shrink: torch.Tensor,
    expand: Optional[torch.Tensor],
    scale: float,
    *,
    bias: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    keep_on_output: bool = False,
    dropout_p: float = 0.0,
    store_mid: bool = True,
    out: Optional[torch.Tensor] = None,
    mid: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """mid = x' shrink^T (M, r) and out = scale * mid expand^T (+ bias) (M, N), one Triton launch.

    x2d (M, K) in the compute dtype; shrink (r, K) and expand (N, r) of any float dtype and strides (e.g. the
    transposed views lora_b.t() / lora_a.t() in the backward); bias (N,) of any stride. `keep` (bool, like x2d,
    or like out when keep_on_output) applies inverted dropout with `dropout_p` to the input or to the output.
    `expand=None` computes mid only. Returns (out, mid); a buffer not asked for is None. `out` / `mid` may be
    given. mid is stored in `intermediate_dtype(x2d.dtype)` (fp32 for fp16 x: a loss-scaled dy B overflows
    fp16), out in x2d's dtype. The launch runs on x2d's device (`launch_device`).
    """
    M, K = x2d.shape
    R = shrink.shape[0]
    N = expand.shape[0] if expand is not None else 0
    if out is None and expand is not None:
        out = torch.empty(M, N, dtype=x2d.dtype, device=x2d.device)
    if mid is None and store_mid:
        mid = torch.empty(M, R, dtype=intermediate_dtype(x2d.dtype), device=x2d.device)
    if M == 0:
        return out, mid
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads BIAS + n (a strided bias was read as if contiguous)
    cfg = _shrink_expand_config(M, R, x2d.device)
    mid_arg = mid if mid is not None else x2d  # placeholders are never dereferenced (constexpr flags)
    out_arg = out if out is not None else mid_arg
    exp_arg = expand if expand is not None else shrink
    keep_arg = keep.view(torch.uint8) if keep is not None else x2d
    keep_strides = keep.stride() if keep is not None else (0, 0)
    grid = (cdiv(M, cfg["BLOCK_M"]),)
    with launch_device(x2d):
        _shrink_expand_kernel[grid](
            x2d, shrink, exp_arg, bias if bias is not None else x2d, keep_arg, mid_arg, out_arg,
            M, K, N, R,
            x2d.stride(0), x2d.stride(1),
            shrink.stride(0), shrink.stride(1),
            exp_arg.stride(0), exp_arg.stride(1),
            keep_strides[0], keep_strides[1],
            mid_arg.stride(0), mid_arg.stride(1),
            out_arg.stride(0), out_arg.stride(1),
            float(scale), 1.0 / (1.0 - dropout_p),
            HAS_BIAS=bias is not None,
            KEEP_MODE=0 if keep is None else (2 if keep_on_output else 1),
            STORE_MID=mid is not None,
            DO_EXPAND=expand is not None,
            COMPUTE=compute_dtype(x2d.dtype),
            MID_COMPUTE=intermediate_compute(x2d.dtype),
            DOT_PRECISION=dot_precision(x2d.dtype),
            **cfg,
        )
    return out, mid


def _wgrad_config(M: int, C: int, R: int, device: torch.device, splits: Optional[int]) -> dict:
    br = block_r(R)
    if interpret_mode():
        cfg = dict(BLOCK_M=32, BLOCK_C=64, BLOCK_R=br, num_warps=4)
    elif br <= 16:
        cfg = dict(BLOCK_M=64, BLOCK_C=64, BLOCK_R=br, num_warps=4, num_stages=3)
    elif br <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_C=128, BLOCK_R=br, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_C=64, BLOCK_R=br, num_warps=8, num_stages=3)
    col_blocks = cdiv(C, cfg["BLOCK_C"])
    if splits is None:  # split M until the grid fills the device (2 programs per SM)
        splits = cdiv(target_programs(device, per_sm=2), col_blocks)
    splits = max(1, min(splits, cdiv(M, cfg["BLOCK_M"])))
    rows_per_split = cdiv(cdiv(M, splits), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    return cfg, col_blocks, cdiv(M, rows_per_split), rows_per_split


def lowrank_weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    *,
    keep: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    transpose: bool = False,
    splits: Optional[int] = None,
) -> torch.Tensor:
    """fp32 scale * left^T right' of shape (r, C), or its transpose (C, r) when `transpose`.

    left (M, r): an intermediate (xa or dyb, `intermediate_dtype` of right's dtype, or right's dtype); right
    (M, C); right' = right * keep / (1 - p) when `keep` is given. M is split into `splits` chunks (default:
    enough programs to fill the device) whose fp32 partials are summed here (deterministic: no atomics). The
    dot runs in `intermediate_compute(right.dtype)` (fp32 for fp16: left may exceed fp16's range).
    """
    M, R = left.shape
    C = right.shape[1]
    shape = (C, R) if transpose else (R, C)
    if M == 0:
        return torch.zeros(shape, dtype=torch.float32, device=left.device)
    cfg, col_blocks, n_splits, rows_per_split = _wgrad_config(M, C, R, left.device, splits)
    partial = torch.empty((n_splits, *shape), dtype=torch.float32, device=left.device)
    # partial[s] is (r, C), or (C, r) when transposed: the kernel's (r, c) element goes to [r, c] or [c, r]
    stride_pr, stride_pc = (partial.stride(2), partial.stride(1)) if transpose else (partial.stride(1), partial.stride(2))
    keep_arg = keep.view(torch.uint8) if keep is not None else right
    keep_strides = keep.stride() if keep is not None else (0, 0)
    with launch_device(left):
        _wgrad_kernel[(col_blocks, n_splits)](
            left, right, keep_arg, partial,
            M, C, R, rows_per_split,
            left.stride(0), left.stride(1),
            right.stride(0), right.stride(1),
            keep_strides[0], keep_strides[1],
            partial.stride(0), stride_pr, stride_pc,
            float(scale), 1.0 / (1.0 - dropout_p),
            HAS_KEEP=keep is not None,
            COMPUTE=intermediate_compute(right.dtype),
            DOT_PRECISION=dot_precision(right.dtype),
            **cfg,
        )
    return partial[0] if n_splits == 1 else partial.sum(0)


def _rows(t: torch.Tensor, features: int) -> torch.Tensor:
    """(..., features) -> (M, features) with unit stride along features (a view whenever possible)."""
    t2 = t.reshape(-1, features)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _compute_operand(factor: torch.Tensor, compute) -> torch.Tensor:
    """`factor` in `compute` (the Triton dtype a kernel computes its tiles of it in) when that is narrower, else as
    is. Every program of the shrink/expand kernel loads the whole factor; an fp32 master read by bf16 programs was
    re-read (from L2) in fp32 and cast in registers in each of them."""
    want = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}.get(compute, factor.dtype)
    return factor.to(want) if factor.element_size() > want.itemsize else factor


# ------------------------------------------------------------------------------------------------ autograd
class LowRankLinearFunction(torch.autograd.Function):
    """Autograd for the Triton path. Inputs are already checked, autocast-resolved and on one device."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, keep, dropout_p):
        N, K = weight.shape
        x2d = _rows(x, K)
        need_dx, need_dw, need_db, need_da, need_dbb = ctx.needs_input_grad[:5]
        keep = None if keep is None else keep.reshape(x2d.shape)  # the kernels index the mask like x2d
        with torch.autocast(x.device.type, enabled=False):
            shrink = _compute_operand(lora_a, compute_dtype(x2d.dtype))
            expand = _compute_operand(lora_b, intermediate_compute(x2d.dtype))
            y, xa = shrink_expand(
                x2d, shrink, expand, scale, bias=bias, keep=keep, dropout_p=dropout_p, store_mid=need_dbb
            )
            y.addmm_(x2d, weight.t())  # cuBLAS base GEMM, beta=1: y = x W^T + (s xa B^T + b)
        ctx.save_for_backward(
            x2d if (need_da or need_dw) else None,
            weight if need_dx else None,
            lora_a if need_dx else None,
            lora_b if (need_dx or need_da) else None,
            xa,
            keep if (need_dx or need_da) else None,
        )
        ctx.scale, ctx.dropout_p, ctx.x_shape = scale, dropout_p, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], N)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, xa, keep = ctx.saved_tensors
        need_dx, need_dw, need_db, need_da, need_dbb = ctx.needs_input_grad[:5]
        N = dy.shape[-1]
        dy2d = _rows(dy, N)
        s, p = ctx.scale, ctx.dropout_p
        dx = dw = db = da = dbb = None
        with torch.autocast(dy.device.type, enabled=False):
            if need_dx or need_da:
                # dyb = dy B (kept for dA); dx_low = s * (dyb A) * keep / (1 - p)
                shrink = _compute_operand(lora_b, compute_dtype(dy2d.dtype)).t()
                expand = _compute_operand(lora_a, intermediate_compute(dy2d.dtype)).t() if need_dx else None
                dx, dyb = shrink_expand(
                    dy2d, shrink, expand, s,
                    keep=keep, keep_on_output=True, dropout_p=p, store_mid=need_da,
                )
                if need_dx:
                    dx.addmm_(dy2d, weight)  # cuBLAS: dx = dy W + dx_low
                    dx = dx.view(ctx.x_shape)
                if need_da:
                    da = lowrank_weight_grad(dyb, x2d, s, keep=keep, dropout_p=p).to(ctx.a_dtype)
            if need_dbb:
                dbb = lowrank_weight_grad(xa, dy2d, s, transpose=True).to(ctx.b_dtype)
            if need_dw:
                dw = dy2d.t().mm(x2d)
            if need_db:
                db = dy2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, db, da, dbb, None, None, None


# ------------------------------------------------------------------------------------------------ entry point
def check_lowrank_args(x, weight, bias, lora_a, lora_b) -> int:
    """Shape / dtype / device checks shared by both backends; returns the rank."""
    in_features, out_features = check_base(x, weight, bias)
    check_float("lora_a", lora_a)
    check_float("lora_b", lora_b)
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features:
        raise ValueError(f"lora_a must have shape (r, in_features={in_features}), got {tuple(lora_a.shape)}.")
    rank = lora_a.shape[0]
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(
            f"lora_b must have shape (out_features={out_features}, r={rank}) to match weight and lora_a, "
            f"got {tuple(lora_b.shape)}."
        )
    check_rank(rank, in_features, out_features)
    check_same_device(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    return rank


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """y = x W^T + b + scale * (dropout(x) lora_a^T) lora_b^T, differentiable (see the module docstring).

    x (..., in), weight (out, in), bias (out,) or None, lora_a (r, in), lora_b (out, r), 1 <= r <= min(in, out).
    Dropout with probability dropout_p applies to the low-rank branch only and only when `training`; its mask
    comes from torch's RNG (`generator` if given, on x's device). `backend`: None (automatic), "triton" or
    "reference". Raises ValueError / TypeError on bad shapes, ranks, dtypes or devices.
    """
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):  # autocast first, as F.linear: bf16 x, fp32 W
        x, weight, bias = autocast_base(x, weight, bias)
    rank = check_lowrank_args(x, weight, bias, lora_a, lora_b)
    scale = check_scale("scale", scale)
    dropout_p = check_dropout(dropout_p)
    check_base(x, weight, bias)
    keep = dropout_keep_mask(x, dropout_p, generator) if training and dropout_p > 0.0 else None
    if choose_backend(x, rank, backend) == "reference":
        training = keep is not None
        return reference_lowrank_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, dropout_mask=keep)
    return LowRankLinearFunction.apply(x, weight, bias, lora_a, lora_b, scale, keep, dropout_p)


# ------------------------------------------------------------------------------------------------ bytes model
def lowrank_bytes_model(
    M: int, K: int, N: int, R: int, dtype: torch.dtype, adapter_dtype: torch.dtype, device: torch.device,
    backward: bool = False, adapter: bool = True,
) -> dict[str, int]:
    """A model (not a measurement) of the bytes one `lowrank_linear` call moves through device memory, the
    bandwidth floor its time is compared with (benchmarks/lowrank_kernels.py prints the fraction reached). Per
    launch of the design in the module docstring, each operand read or written once per launch (tiles re-read
    from L2 not counted); `adapter=False`: the frozen base alone (x W^T; backward dx = dy W). Keys: one per
    launch, and "total". Forward, then with `backward` the backward of dx, dA and dB (no dropout, no bias)."""
    e = torch.finfo(dtype).bits // 8
    e_mid = torch.finfo(intermediate_dtype(dtype)).bits // 8
    e_ad = torch.finfo(adapter_dtype).bits // 8
    w, x, y = N * K * e, M * K * e, M * N * e
    if not adapter:
        parts = {"gemm x W^T": x + w + y}
        if backward:
            parts["gemm dy W"] = y + w + x
        return {**parts, "total": sum(parts.values())}
    a = R * K * e
    b = N * R * e
    cast = (R * K + N * R) * (e_ad + e) if e_ad > e else 0  # fp32 masters cast once per call (_compute_operand)
    parts = {
        "factor casts": cast,
        "shrink/expand x": x + a + b + M * R * e_mid + y,  # reads x, A, B; writes xa and y_low
        "gemm x W^T + y_low": x + w + y + y,  # beta=1: reads y_low, writes y
    }
    if backward:

        def wgrad(C: int) -> int:  # reads the intermediate and the (M, C) operand, writes and sums fp32 partials
            _, _, splits, _ = _wgrad_config(M, C, R, device, None)
            partials = splits * R * C * 4
            return M * R * e_mid + M * C * e + (partials * 2 + R * C * 4 if splits > 1 else partials)

        parts.update({
            "factor casts (backward)": cast,
            "shrink/expand dy": y + a + b + M * R * e_mid + x,  # reads dy, B, A; writes dyb and dx_low
            "gemm dy W + dx_low": y + w + x + x,
            "wgrad dA": wgrad(K),
            "wgrad dB": wgrad(N),
        })  # fmt: skip
    return {**parts, "total": sum(parts.values())}
