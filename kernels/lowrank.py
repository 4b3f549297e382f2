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
  backward  1. one pass over dy, `_dy_pass_kernel` (dB fused) or `_shrink_expand_kernel` (not fused), see below:
               dyb = dy B (stored), dx_low = s * (dyb A) * keep/(1-p), and when fused dB's partials;
            2. cuBLAS: dx_low.addmm_(dy, W), i.e. dx = dy W + dx_low;
            3. `_wgrad_kernel`: dA = s * dyb^T dropout(x)  (reads x once; split over M, fp32 partials);
            4. not fused: `_wgrad_kernel`: dB = s * dy^T xa (reads dy a second time; split over M);
            5. the fp32 partial sums (one torch .sum each, deterministic, no atomics; skipped for one split/program).
            -> 4 to 6 launches. W gets a gradient (cuBLAS dy^T x) only if it requires one; same for b.
  dB fused into the dy pass (`dy_pass`, issue 16): each program of `_dy_pass_kernel` owns BLOCK_M rows; in the same N
  loop that accumulates dyb = dy B it multiplies the dy tile it already holds by its rows of xa and stores
  s * dy_blk^T xa_blk, its fp32 N x r partial of dB; one torch .sum over the programs gives dB. The rule
  (`fuse_db_saves_bytes`, a bytes model): fusing saves the second read of dy (M x N x e bytes) and costs the partials
  (programs x N x r x 4 bytes written, then read by the sum), so with 128-row programs it pays roughly when
  r < 128 e / 8 (32 for bf16/fp16 dy, 64 for fp32 - but fp32 never above a padded rank of 32, where the fused tile spills), plus what the second pass's own split partials cost: the model's
  boundary at M = 8192, bf16, is r <= 42 for N = 2048, r <= 35 for N = 5632 and every r <= 128 for N = 256 (k/v);
  at larger ranks the two-pass path above is kept. At the anchor
  (M = 8192, N = 2048, r = 16, bf16) the model gives 17.2 MB for fused dB against 36.3 MB for the second pass.
  The 128-row programs (8 warps) hold a 128 x r accumulator, a 128 x 64 dy tile and a 64 x r partial without
  spills at sm_90 and stream dy with cp.async (tests/kernels/test_static_sm90_lowrank_grouped.py); they give
  64 programs at M = 8192, fewer than the 132 SMs: whether that grid still reaches the copy bandwidth is to be
  measured (benchmarks/lowrank_kernels.py prints "dB 2-pass" and "dB fused" rows side by side).
  Sibling projections reading one x (q/k/v, gate/up) can share their shrinks and dA: kernels/lowrank_grouped.py.
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

from . import autotune
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

__all__ = [
    "LowRankLinearFunction", "dy_pass", "fuse_db_saves_bytes", "lowrank_bytes_model", "lowrank_linear", "lowrank_weight_grad",
    "shrink_expand",
]


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


@lazy_jit
def _dy_pass_kernel(
    DY, B, A, XA, KEEP, MID, DX, PART,
    M, N, K, R,
    stride_dm, stride_dn,
    stride_bn, stride_br,  # B (N, R)
    stride_ar, stride_ak,  # A (R, K)
    stride_xm, stride_xr,  # xa (M, R)
    stride_km, stride_kc,  # keep-mask, like DX
    stride_mm, stride_mr,
    stride_om, stride_ok,
    stride_ps, stride_pn, stride_pr,
    scale, mid_scale, keep_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DO_DB: tl.constexpr, STORE_MID: tl.constexpr, DO_EXPAND: tl.constexpr, HAS_KEEP: tl.constexpr,
    COMPUTE: tl.constexpr, MID_COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The backward's one pass over dy, BLOCK_M rows per program:
    MID = mid_scale * DY B (BLOCK_M x R, fp32 in registers over the N loop); with DO_DB, for each N tile of the
    same loop PART[pid, n, :] = scale * DY[rows, n]^T XA[rows] (this program's fp32 partial of dB, summed over
    the programs by the caller); with DO_EXPAND, DX = scale * (DY B) A (* keep / (1-p) if HAS_KEEP), K in steps
    of BLOCK_K. COMPUTE: the dtype of the dot reading DY and B; MID_COMPUTE: of the dots reading the
    intermediates (XA, DY B): fp32 for fp16 inputs."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    if DO_DB:
        xa = tl.load(XA + rows64[:, None] * stride_xm + rs[None, :] * stride_xr,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(MID_COMPUTE)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        dy = tl.load(DY + rows64[:, None] * stride_dm + ns[None, :] * stride_dn,
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(B + ns[:, None] * stride_bn + rs[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dy.to(COMPUTE), b.to(COMPUTE), acc, input_precision=DOT_PRECISION)
        if DO_DB:
            part = tl.dot(tl.trans(dy.to(MID_COMPUTE)), xa, input_precision=DOT_PRECISION) * scale
            tl.store(PART + pid.to(tl.int64) * stride_ps + ns[:, None] * stride_pn + rs[None, :] * stride_pr, part,
                     mask=n_ok[:, None] & r_ok[None, :])
    if STORE_MID:
        mid_ptrs = MID + rows64[:, None] * stride_mm + rs[None, :] * stride_mr
        tl.store(mid_ptrs, (acc * mid_scale).to(MID.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])
    if DO_EXPAND:
        mid = acc.to(MID_COMPUTE)  # dyb rounded to dy's dtype on the GPU (bf16), as the two-pass path stores it
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(A + rs[:, None] * stride_ar + ks[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            out = tl.dot(mid, a.to(MID_COMPUTE), input_precision=DOT_PRECISION) * scale
            om = row_ok[:, None] & k_ok[None, :]
            if HAS_KEEP:
                keep = tl.load(KEEP + rows64[:, None] * stride_km + ks[None, :] * stride_kc, mask=om, other=0)
                out = tl.where(keep != 0, out * keep_scale, 0.0)
            tl.store(DX + rows64[:, None] * stride_om + ks[None, :] * stride_ok, out.to(DX.dtype.element_ty), mask=om)


# ------------------------------------------------------------------------------------------- launch code
def gpu_rowblock_config(M: int, R: int, device: torch.device) -> dict:
    """Tiles for the row-block kernels (this one and the gathered one) on a GPU. They are bandwidth-bound
    (r is small): BLOCK_M = 32 when that still gives one program per SM, else 16; the K / N tiles shrink
    as r grows to keep the register tiles (BLOCK_M x r accumulator, BLOCK_M x BLOCK_N output) without
    spills. Chosen from ptxas register / shared-memory counts for sm_90 (tests/kernels compile them);
    the timings are to be checked with benchmarks/lowrank_kernels.py. These heuristics (and `_wgrad_config`'s) are the
    starting point and fallback of kernels/autotune.py, which tunes around them at the launch (PEFT_EXT_AUTOTUNE)."""
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
    wgrad_of: Optional[torch.Tensor] = None,
    mid_scale: float = 1.0,
    rules_dtype: Optional[torch.dtype] = None,
) -> tuple:
    """mid = x' shrink^T (M, r) and out = scale * mid expand^T (+ bias) (M, N), one Triton launch.

    Every row-block launch of the low-rank kernels goes through here. With `wgrad_of` (M, r) or `mid_scale` != 1 it is
    the backward's pass over dy (`dy_pass`, `_dy_pass_kernel`): mid = mid_scale * x shrink^T, out as above (keep on
    the output only, no bias, no given buffers) and, with `wgrad_of`, the weight gradient scale * x^T wgrad_of
    (N, r) fp32 fused into the same pass; it then returns (out, mid, wgrad). `rules_dtype`: x2d is an intermediate
    (xa) of inputs of this dtype: its dots take `intermediate_compute(rules_dtype)` operands and that dtype's
    precision (fp16 inputs: fp32 xa on TF32 dots, as the expand of lowrank_linear's forward).

    x2d (M, K) in the compute dtype; shrink (r, K) and expand (N, r) of any float dtype and strides (e.g. the
    transposed views lora_b.t() / lora_a.t() in the backward); bias (N,) of any stride. `keep` (bool, like x2d,
    or like out when keep_on_output) applies inverted dropout with `dropout_p` to the input or to the output.
    `expand=None` computes mid only. Returns (out, mid); a buffer not asked for is None. `out` / `mid` may be
    given. mid is stored in `intermediate_dtype(x2d.dtype)` (fp32 for fp16 x: a loss-scaled dy B overflows
    fp16), out in x2d's dtype. The launch runs on x2d's device (`launch_device`).
    """
    if wgrad_of is not None or mid_scale != 1.0:
        if (keep is not None and not keep_on_output) or bias is not None or out is not None or mid is not None:
            raise ValueError(
                "shrink_expand(wgrad_of=..., mid_scale=...) runs the dy-pass kernel: its keep-mask applies to the output "
                "(keep_on_output=True), and it takes no bias and no out= / mid= buffers."
            )
        expand_t = None if expand is None else expand.t()
        return dy_pass(
            x2d, shrink.t(), expand_t, wgrad_of, scale, mid_scale=mid_scale, store_mid=store_mid, keep=keep,
            dropout_p=dropout_p,
        )  # fmt: skip
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
    grid = lambda c: (cdiv(M, c["BLOCK_M"]),)  # noqa: E731  (a function of the config: the autotuner varies BLOCK_M)
    writes = [name for name, t in (("MID", mid), ("Y", out)) if t is not None]
    with launch_device(x2d):
        autotune.launch(_shrink_expand_kernel, "shrink_expand", grid, key=dict(M=M, K=K, N=N, R=R), writes=writes)(
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
            COMPUTE=compute_dtype(x2d.dtype) if rules_dtype is None else intermediate_compute(rules_dtype),
            MID_COMPUTE=intermediate_compute(x2d.dtype if rules_dtype is None else rules_dtype),
            DOT_PRECISION=dot_precision(x2d.dtype if rules_dtype is None else rules_dtype),
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
    grid = lambda c: (cdiv(C, c["BLOCK_C"]), n_splits)  # noqa: E731  (the autotuner keeps n_splits, rows_per_split)
    with launch_device(left):
        autotune.launch(_wgrad_kernel, "wgrad", grid, key=dict(M=M, C=C, R=R), writes=("P",))(
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


def _dy_pass_config(M: int, R: int, device: torch.device, fuse_db: bool) -> dict:
    """Tiles of `_dy_pass_kernel`. Without dB it is the row-block kernel of `gpu_rowblock_config`. With dB every
    program writes an N x r fp32 partial, so the row block is as tall as the registers allow (128 rows, 8 warps:
    the BLOCK_M x r accumulator, a BLOCK_M x BLOCK_N tile of dy and a BLOCK_N x r partial, no spills at sm_90,
    tests/kernels/test_static_sm90_lowrank_grouped.py): programs x N x r x 4 bytes of partials against the
    M x N x 2 bytes of dy that fusing saves (`fuse_db_saves_bytes`)."""
    br = block_r(R)
    if interpret_mode():  # fewest programs x loop steps
        return dict(BLOCK_M=min(64, max(16, next_pow2(M))), BLOCK_N=64, BLOCK_K=64, BLOCK_R=br, num_warps=4)
    if not fuse_db:
        cfg = gpu_rowblock_config(M, R, device)
        return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_K"], BLOCK_K=cfg["BLOCK_N"], BLOCK_R=br,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])  # fmt: skip
    if br <= 32:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, BLOCK_R=br, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, BLOCK_R=br, num_warps=8, num_stages=3)


def _db_bytes(M: int, N: int, R: int, dtype: torch.dtype, device: torch.device, fused: bool) -> int:
    """Bytes (a model) the weight gradient dB = s dy^T xa adds to the backward: fused into the dy pass (xa read,
    one fp32 N x r partial per program written, then summed by one torch reduction), or as its own
    `_wgrad_kernel` launch (xa and dy read again, its split partials written and summed)."""
    e = torch.finfo(dtype).bits // 8
    e_mid = torch.finfo(intermediate_dtype(dtype)).bits // 8
    if fused:
        programs = cdiv(M, _dy_pass_config(M, R, device, True)["BLOCK_M"])
        partials = programs * N * R * 4
        return M * R * e_mid + (partials * 2 + N * R * 4 if programs > 1 else partials)
    _, _, splits, _ = _wgrad_config(M, N, R, device, None)
    partials = splits * R * N * 4
    return M * R * e_mid + M * N * e + (partials * 2 + R * N * 4 if splits > 1 else partials)


def fuse_db_saves_bytes(M: int, N: int, R: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The rule for fusing dB into the dy pass: fuse when the bytes model says it moves fewer bytes
    (`_db_bytes`). Roughly: partials of 8 r / BLOCK_M bytes per element of dy (written, then read by the sum)
    against the e bytes per element of dy that the second pass re-reads (plus its own split partials), i.e. fuse
    when r < BLOCK_M e / 8 or a little more: with 128-row programs at M = 8192, bf16, r <= 42 (N = 2048), r <= 35
    (N = 5632), any r for N = 256; always when one program holds every row. A model, not a measurement.
    Never for fp32 dy at a padded rank above 32: the 128-row fused tile spills at sm_90 there (static builds:
    16 spilled registers at r = 64, 11285 at r = 128; fp32 r <= 32 and bf16 / fp16 up to r = 128 build without)."""
    if M == 0 or (dtype == torch.float32 and block_r(R) > 32):
        return False
    return _db_bytes(M, N, R, dtype, device, True) < _db_bytes(M, N, R, dtype, device, False)


def dy_pass(
    dy2d: torch.Tensor,
    lora_b: torch.Tensor,
    lora_a: Optional[torch.Tensor],
    xa: Optional[torch.Tensor],
    scale: float,
    *,
    mid_scale: float = 1.0,
    store_mid: bool = True,
    keep: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One pass over dy (M, N), one Triton launch: returns (dx_low, mid, dB) where

        mid = mid_scale * dy B                          (M, r), `intermediate_dtype`; when `store_mid`
        dx_low = scale * (dy B) A * keep / (1 - p)      (M, K), dy's dtype; when `lora_a` (r, K) is given
        dB = scale * dy^T xa                            (N, r), fp32; when `xa` (M, r) is given

    lora_b (N, r) / lora_a (r, K) of any float dtype and strides; `keep` (bool, like dx_low) drops dx_low's
    elements. dB is summed from one fp32 partial per program (`partial.sum(0)`, deterministic, no atomics);
    callers fuse it only where `fuse_db_saves_bytes` says so. The launch runs on dy's device."""
    M, N = dy2d.shape
    R = lora_b.shape[1]
    K = lora_a.shape[1] if lora_a is not None else 0
    dev = dy2d.device
    mid = torch.empty(M, R, dtype=intermediate_dtype(dy2d.dtype), device=dev) if store_mid else None
    dx = torch.empty(M, K, dtype=dy2d.dtype, device=dev) if lora_a is not None else None
    if M == 0:
        return dx, mid, (torch.zeros(N, R, dtype=torch.float32, device=dev) if xa is not None else None)
    cfg = _dy_pass_config(M, R, dev, xa is not None)
    programs = cdiv(M, cfg["BLOCK_M"])
    part = torch.empty(programs, N, R, dtype=torch.float32, device=dev) if xa is not None else None
    mid_arg = mid if mid is not None else dy2d  # placeholders are never dereferenced (constexpr flags)
    dx_arg = dx if dx is not None else dy2d
    a_arg = lora_a if lora_a is not None else lora_b
    xa_arg = xa if xa is not None else dy2d
    part_arg = part if part is not None else dy2d
    part_strides = part.stride() if part is not None else (0, 0, 0)
    keep_arg = keep.view(torch.uint8) if keep is not None else dy2d
    keep_strides = keep.stride() if keep is not None else (0, 0)
    # the partials' layout fixes BLOCK_M with dB ("dy_pass_db": the tuner keeps it); without dB the tuner may vary it
    grid = lambda c: (cdiv(M, c["BLOCK_M"]),)  # noqa: E731
    writes = [name for name, t in (("MID", mid), ("DX", dx), ("PART", part)) if t is not None]
    name = "dy_pass_db" if xa is not None else "dy_pass"
    with launch_device(dy2d):
        autotune.launch(_dy_pass_kernel, name, grid, key=dict(M=M, N=N, K=K, R=R), writes=writes)(
            dy2d, lora_b, a_arg, xa_arg, keep_arg, mid_arg, dx_arg, part_arg,
            M, N, K, R,
            dy2d.stride(0), dy2d.stride(1),
            lora_b.stride(0), lora_b.stride(1),
            a_arg.stride(0), a_arg.stride(1),
            xa_arg.stride(0), xa_arg.stride(1),
            keep_strides[0], keep_strides[1],
            mid_arg.stride(0), mid_arg.stride(1),
            dx_arg.stride(0), dx_arg.stride(1),
            part_strides[0], part_strides[1], part_strides[2],
            float(scale), float(mid_scale), 1.0 / (1.0 - dropout_p),
            DO_DB=xa is not None, STORE_MID=mid is not None, DO_EXPAND=lora_a is not None, HAS_KEEP=keep is not None,
            COMPUTE=compute_dtype(dy2d.dtype),
            MID_COMPUTE=intermediate_compute(dy2d.dtype),
            DOT_PRECISION=dot_precision(dy2d.dtype),
            **cfg,
        )  # fmt: skip
    db = None if part is None else (part[0] if programs == 1 else part.sum(0))
    return dx, mid, db


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
            fuse = (need_dx or need_da) and need_dbb and fuse_db_saves_bytes(*dy2d.shape, xa.shape[1], dy2d.dtype, dy2d.device)
            if need_dx or need_da:
                # one pass over dy: dyb = dy B (kept for dA), dx_low = s * (dyb A) * keep / (1 - p), and when `fuse`
                # dB = s * dy^T xa too (shrink_expand then returns it third)
                shrink = _compute_operand(lora_b, compute_dtype(dy2d.dtype)).t()
                expand = _compute_operand(lora_a, intermediate_compute(dy2d.dtype)).t() if need_dx else None
                done = shrink_expand(
                    dy2d, shrink, expand, s,
                    keep=keep, keep_on_output=True, dropout_p=p, store_mid=need_da, wgrad_of=xa if fuse else None,
                )
                dx, dyb = done[:2]
                if fuse:
                    dbb = done[2].to(ctx.b_dtype)
                if need_dx:
                    dx.addmm_(dy2d, weight)  # cuBLAS: dx = dy W + dx_low
                    dx = dx.view(ctx.x_shape)
                if need_da:
                    da = lowrank_weight_grad(dyb, x2d, s, keep=keep, dropout_p=p).to(ctx.a_dtype)
            if need_dbb and not fuse:
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
    backward: bool = False, adapter: bool = True, fuse_db: Optional[bool] = None,
) -> dict[str, int]:
    """A model (not a measurement) of the bytes one `lowrank_linear` call moves through device memory, the
    bandwidth floor its time is compared with (benchmarks/lowrank_kernels.py prints the fraction reached). Per
    launch of the design in the module docstring, each operand read or written once per launch (tiles re-read
    from L2 not counted); `adapter=False`: the frozen base alone (x W^T; backward dx = dy W). Keys: one per
    launch, and "total". Forward, then with `backward` the backward of dx, dA and dB (no dropout, no bias); dB fused
    into the dy pass (`dy_pass`: keys "dy pass (dyb, dx_low, dB partials)" and "dB partial sum") or in its own
    `_wgrad_kernel` launch ("shrink/expand dy", "wgrad dB") as `fuse_db` says (None: the backward's rule,
    `fuse_db_saves_bytes`, which compares the two with this model)."""
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

        if fuse_db is None:
            fuse_db = fuse_db_saves_bytes(M, N, R, dtype, device)
        dy_pass_bytes = y + a + b + M * R * e_mid + x  # reads dy, B, A; writes dyb and dx_low
        parts["factor casts (backward)"] = cast
        if fuse_db:  # + reads xa, writes one fp32 N x r partial per program; the sum reads them, writes dB
            programs = cdiv(M, _dy_pass_config(M, R, device, True)["BLOCK_M"])
            parts["dy pass (dyb, dx_low, dB partials)"] = dy_pass_bytes + M * R * e_mid + programs * N * R * 4
            parts["dB partial sum"] = programs * N * R * 4 + N * R * 4 if programs > 1 else 0
        else:
            parts["shrink/expand dy"] = dy_pass_bytes
        parts.update({"gemm dy W + dx_low": y + w + x + x, "wgrad dA": wgrad(K)})
        if not fuse_db:
            parts["wgrad dB"] = wgrad(N)
    return {**parts, "total": sum(parts.values())}
