"""Delta-CoMe decode (batch 1-16): the base GEMV and the compressed delta's expand in one kernel, on the version-2
slot layout (kernels/delta_format.py `SlotDelta`).

    y = x W^T + b + ((x V) * sigma) U^T        (x: M <= 16 rows)

Launches (per call, whatever the bands):
  1. `_slot_shrink_kernel`: P[s] = (x V_s) * sigma for the rows of `in` of split s, V dequantised from its slot
     codes. Grid (column tiles of all bands, splits of `in`): the few V bytes are streamed by the whole GPU. Each
     split stores its own slice of P (no atomics: deterministic).
  2. `P.sum(0)` (torch) -> T (M x k, fp32), skipped with one split.
  3. `_fused_decode_kernel`: grid (blocks of BLOCK_O output rows, splits of the reduction). A program streams its
     W slab (BLOCK_O x in, pipelined tl.dot loop: acc += x W^T), then its part of U's tiles (acc += T U^T, U
     dequantised in registers), then writes y = acc + b once (one split), or its fp32 partial (several splits,
     summed by one torch reduction - used only when there are fewer output blocks than SMs). W and the compressed
     U are read once; x and T are L2-resident.

Memory: the kernels read the SlotDelta they are given and keep nothing; a PackedDelta is never converted behind the
caller's back (`slot_delta`: TypeError, or with delta_linear's opt-in cache_relayout=True a cached second copy).
The Delta-CoMe tuner's layers hold SlotDeltas (one compressed copy), so prefill and mixed batches read slots too
(kernels/delta.py's slot kernels).

Decoding (both kernels): a tile's words are loaded as (rows, WPT) int32 (WPT consecutive words of a row: coalesced),
expanded against the slot offsets (rows, WPT, 32 / SLOT) -> (rows, WPT * 32 / SLOT) codes, the slot width a
compile-time constant per band (SLOTS, a constexpr tuple: one specialisation per band schedule's slot widths, e.g.
(8, 4, 2) for the paper's 8/3/2-bit bands). The shrink (and the fused kernel's 8-bit bands, fp32 inputs and scale
groups that split a tile): one shift and one mask per code, the code becomes fp32 through the bits of 2^23 + code
(no I2F), then value = code * scale + min (fp32 FMA) with the group's fp16 scale / min per column. The fused
kernel's bands of 1, 2 and 4-bit slots: code j of a word becomes the fp32 number 128 + code in two instructions, a
rotation that puts it at bit 16 (SHF.R.W: inline PTX shf.r.wrap on the GPU; in the interpreter, which runs no
inline asm, the same rotation in plain Triton shifts, bit-identical) and one and-or with the exponent bits of 128
(LOP3; FMA_MAGIC is a runtime argument so that ptxas keeps it in a register); the 128 goes into the per-column min
(value = (128 + code) scale + (min - 128 scale), one FFMA: the subtraction of the 2^23 path is gone). The value
then feeds the fused kernel's dot (acc_t += U T^T) as its mma operand, or, at batch 1-2, FMAs:

Batch 1-2 (FMA_ROWS = M, `fma_rows`: when a tile's BLOCK_O rows share one scale group, the usual case) the fused
kernel's bands of 1, 2 and 4-bit slots skip the dot: no mma operand, so no layout change through shared memory.
Scale and min are folded out of the per-code work:
    sum_c T[c] (s[c] code[o, c] + m[c]) = sum_c (T[c] s[c]) (128 + code[o, c]) + sum_c T[c] (m[c] - 128 s[c])
so each code costs one FFMA per row of x into a per-(row, column) fp32 accumulator (T[c] s[c] and the second sum
are per column, shared by the rows a thread holds), reduced over the columns once per band (tl.reduce). fp32
inputs subtract the 128 per code (FMA_EXACT, one FADD: no 128-sized terms in their sums, so fp32 keeps its
accuracy); bf16 / fp16 keep the offset (its rounding, ~2^-17 of |T s| per term, is far below theirs). Batch 3-16
and the 8-bit band use the dot.

Static sm_90 compile results (JIT-specialised builds, bf16, the paper's bands; not timings; asserted in
tests/kernels/test_static_sm90.py), 4096 rows (BLOCK_O = 16) / 14336 rows (BLOCK_O = 32), SASS instructions per
thread per dequantised element of the 2-bit band of U (the bulk of U):
    batch 1:  7.3 / 5.3  (FMA path; 128 / 128 registers; WPT = 16 words per tile at BLOCK_O = 16, else 8)
    batch 2:  8.9 / 6.6  (FMA path; 125 / 128 registers)
    batch 16: 14.4 / 9.4  (dot path; 100 / 141 registers)
(fp16: the same at batch 1-2, 18.5 / 10.9 at batch 16 (T in fp32: TF32 dots). Before this decode every batch took
the dot with the 2^23 conversion: 16.0-16.1 / 10.9 with bf16 at batch 1 and 16, 19.9 / 12.6 with fp16 at batch 16;
the bit-plane expand: 27.5 / 15.2.) No spills, every loop pipelined (cp.async: 57 / 66 LDGSTS at batch 1). Of
the FMA path's 7.3 / 5.3, 3 are the decode and the FMA proper (SHF.R.W, LOP3, FFMA); the rest is the pipelining's
shared-memory reads, the per-column T s products and mins and the loop, shared by fewer rows at BLOCK_O = 16. Per
W element 3.3 / 1.9 (3.5 / 2.0 at batch 2). Issue-time model (128 thread-instructions per SM-cycle, 132 SMs,
1.755 GHz) of the whole fused kernel at batch 1: 2.9 us (4096^2) and 7.5 us (14336 x 4096) (batch 16: 3.9 / 10.5)
against 10.4 us and 36.9 us of HBM time for its bytes at 3.35 TB/s: predicted bandwidth-bound, to be measured
(benchmarks/delta.py). The shrink: 80 registers, pipelined, 10.8 instructions per V element of the 2-bit band
(issue-bound, but V is 4096 x k: about 1.5 us of issue over the whole GPU at 4096 x 4096).

Band loops are unrolled at compile time (`tl.static_range` over the bands): each band's tile loop has a constant
slot width and no inner loop, so Triton software-pipelines it (cp.async), unlike the bit-plane expand's runtime
plane loop. Everything accumulates in fp32; T is read as x's dtype (bf16) or fp32 (fp16 inputs: T may exceed
fp16's range), as in kernels/delta.py.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch

from .delta_format import WORD_BITS, SlotDelta, slot_width
from .dispatch import (
    HAS_TRITON,
    cdiv,
    compute_dtype,
    dot_precision,
    intermediate_compute,
    interpret_mode,
    launch_device,
    lazy_jit,
    target_programs,
    tl,
)

__all__ = ["fused_decode", "slot_delta", "DECODE_MAX_ROWS", "decode_config", "decode_bytes_model"]

DECODE_MAX_ROWS = 16  # rows of x the fused decode serves (BLOCK_M); larger batches use kernels/delta.py
FUSED_DECODE_MIN_TRITON = (3, 3)  # the kernel indexes its constexpr band tuples (SLOTS[b]): Triton 3.3 and later


@functools.lru_cache(maxsize=None)  # asked on every decode call (delta_linear's decode_path): parse the version once
def fused_decode_supported() -> bool:
    """Whether the installed Triton compiles `_fused_decode_kernel`: it indexes constexpr tuples (SLOTS[b], CPWS[b]),
    which Triton < 3.3 rejects ("'constexpr' object is not subscriptable"; checked 2026-12-06 with Triton 3.0.0 and
    3.2.0 for sm_90). With an older Triton, delta_linear serves decode batches with the slot kernels of
    kernels/delta.py instead (correct, not fused)."""
    try:
        import triton
    except ImportError:
        return False
    try:
        version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    except ValueError:  # a development build: assume a current one
        return True
    return version >= FUSED_DECODE_MIN_TRITON
# the FMA path's exponent bits (fp32 128.0): a runtime argument, so that ptxas holds it in a register instead of
# re-materialising it before every and-or (static sm_90: 0.5 fewer instructions per code at batch 1)
FMA_MAGIC = 0x43000000
BAND_COLS = 8  # per band (int32): first column, columns, first word in a row, first shrink tile, first column of T,
# columns rounded up to 16, (2 unused). T holds each band at a multiple of 16 columns: aligned, vectorised loads.


# ------------------------------------------------------------------------------------------------ kernels
_SUM = tl.standard._sum_combine if HAS_TRITON else None  # tl.sum's combiner (the interpreter runs it as numpy's sum)


@lazy_jit
def _slot_shrink_kernel(
    X, BANDS, V_CODES, V_SCALES, V_MINS, SIGMA, P,
    M, K, rank, row_words, rows_per_split,
    stride_xm, stride_ps, stride_pm,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, WPT: tl.constexpr,
    SLOTS: tl.constexpr, CPWS: tl.constexpr, UNIFORM_GROUP: tl.constexpr,
    COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """P[pid_s, m, col] = sigma[col] * sum over rows i of split pid_s of X[m, i] * V[i, col], for the column tile
    pid_t (counted over all bands) of WPT words x 32 / SLOT columns. BLOCK_I divides GROUP_SIZE when UNIFORM_GROUP."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    i_start = pid_s * rows_per_split
    i_end = tl.minimum(i_start + rows_per_split, K)
    for b in tl.static_range(len(SLOTS)):
        col0 = tl.load(BANDS + b * 8)
        ncols = tl.load(BANDS + b * 8 + 1)
        word0 = tl.load(BANDS + b * 8 + 2)
        tile0 = tl.load(BANDS + b * 8 + 3)
        tcol0 = tl.multiple_of(tl.load(BANDS + b * 8 + 4), 16)
        ncols16 = tl.multiple_of(tl.load(BANDS + b * 8 + 5), 16)
        n_tiles = (ncols + WPT * CPWS[b] - 1) // (WPT * CPWS[b])
        if (pid_t >= tile0) & (pid_t < tile0 + n_tiles):
            t = pid_t - tile0
            cs = t * (WPT * CPWS[b]) + tl.arange(0, WPT * CPWS[b])  # the band's columns of this tile
            c_ok = cs < ncols
            cols = col0 + cs
            ws = t * WPT + tl.arange(0, WPT)
            w_ok = ws < (ncols + CPWS[b] - 1) // CPWS[b]
            shifts = tl.arange(0, CPWS[b]) * SLOTS[b]
            acc = tl.full((BLOCK_M, WPT * CPWS[b]), 0.0, tl.float32)
            for i0 in range(i_start, i_end, BLOCK_I):
                ri = i0 + tl.arange(0, BLOCK_I)
                r_ok = ri < K
                words = tl.load(V_CODES + ri[:, None] * row_words + (word0 + ws)[None, :],
                                mask=r_ok[:, None] & w_ok[None, :], other=0)  # fmt: skip
                q = (words[:, :, None] >> shifts[None, None, :]) & ((1 << SLOTS[b]) - 1)
                q = tl.reshape(q, (BLOCK_I, WPT * CPWS[b]))
                f = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # code -> fp32 without I2F
                if UNIFORM_GROUP:
                    g = i0 // GROUP_SIZE
                    s = tl.load(V_SCALES + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
                    mn = tl.load(V_MINS + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
                else:
                    off = (ri // GROUP_SIZE)[:, None] * rank + cols[None, :]
                    ok = r_ok[:, None] & c_ok[None, :]
                    s = tl.load(V_SCALES + off, mask=ok, other=0.0).to(tl.float32)
                    mn = tl.load(V_MINS + off, mask=ok, other=0.0).to(tl.float32)
                v = f * s + mn
                xt = tl.load(X + ms[:, None].to(tl.int64) * stride_xm + ri[None, :], mask=m_ok[:, None] & r_ok[None, :],
                             other=0.0)  # fmt: skip
                acc = tl.dot(xt.to(COMPUTE), v.to(COMPUTE), acc, input_precision=DOT_PRECISION)
            acc = acc * tl.load(SIGMA + cols, mask=c_ok, other=0.0)[None, :]  # 0 in the padding columns
            p_ptrs = P + pid_s.to(tl.int64) * stride_ps + ms[:, None] * stride_pm + (tcol0 + cs)[None, :]
            tl.store(p_ptrs, acc, mask=m_ok[:, None] & (cs < ncols16)[None, :])


@lazy_jit
def _fused_decode_kernel(
    X, W, BIAS, T, BANDS, U_CODES, U_SCALES, U_MINS, Y,
    M, N, K, rank, row_words, k_per_split,
    stride_xm, stride_wn, stride_tm, stride_ym, stride_ps, magic,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    WPT: tl.constexpr, SLOTS: tl.constexpr, CPWS: tl.constexpr, SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, UNIFORM_GROUP: tl.constexpr,
    COMPUTE: tl.constexpr, T_COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FMA_ROWS: tl.constexpr, FMA_EXACT: tl.constexpr, ROTATE_ASM: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """acc[m, o] = sum_i X[m, i] W[o, i] (over split pid_s's range of `in`) + sum_c T[m, c] U[o, c] (over the
    tiles t = pid_s, pid_s + SPLITS, ... of every band) for BLOCK_O output rows; then Y[m, o] = acc + bias
    (SPLITS == 1) or Y[pid_s, m, o] = acc (fp32 partials, stride_ps). FMA_ROWS (1 or 2 = M; 0: off): the bands
    of <= 4-bit slots on the FMA path (module docstring; needs UNIFORM_GROUP), FMA_EXACT: its codes without the 128
    offset (fp32 inputs); NUM_STAGES: the band loops' software pipelining (tl.range: the FMA path's loads feed no
    dot, so Triton would not pipeline them by itself)."""
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    os_ = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = os_ < N
    o64 = os_.to(tl.int64)
    acc = tl.full((BLOCK_M, BLOCK_O), 0.0, tl.float32)

    # base: x W^T over this split's columns of W (one pipelined loop)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        xt = tl.load(X + ms[:, None] * stride_xm + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(W + o64[:, None] * stride_wn + ks[None, :], mask=o_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt.to(COMPUTE), tl.trans(wt.to(COMPUTE)), acc, input_precision=DOT_PRECISION)

    # delta: T U^T, band by band (slot width constant per band), tiles strided over the splits
    acc_t = tl.full((BLOCK_O, BLOCK_M), 0.0, tl.float32)  # (T U^T)^T = U T^T: U is the dot's A operand
    fma0 = tl.full((BLOCK_O,), 0.0, tl.float32)  # rows 0 and 1 of T U^T from the FMA bands (FMA_ROWS > 0)
    fma1 = tl.full((BLOCK_O,), 0.0, tl.float32)
    if UNIFORM_GROUP:
        g = (pid_o * BLOCK_O) // GROUP_SIZE
    for b in tl.static_range(len(SLOTS)):
        col0 = tl.load(BANDS + b * 8)
        ncols = tl.load(BANDS + b * 8 + 1)
        word0 = tl.load(BANDS + b * 8 + 2)
        tcol0 = tl.multiple_of(tl.load(BANDS + b * 8 + 4), 16)
        ncols16 = tl.multiple_of(tl.load(BANDS + b * 8 + 5), 16)
        n_words = (ncols + CPWS[b] - 1) // CPWS[b]
        n_tiles = (ncols + WPT * CPWS[b] - 1) // (WPT * CPWS[b])
        shifts = tl.arange(0, CPWS[b]) * SLOTS[b]
        rot = (shifts - 16) & 31  # rotating a word right by rot puts its code j at bit 16
        if FMA_ROWS > 0 and SLOTS[b] <= 4:
            c3 = pid_s * (WPT * CPWS[b]) + tl.arange(0, WPT)[:, None] * CPWS[b] + tl.arange(0, CPWS[b])[None, :]
            acc0 = tl.full((BLOCK_O, WPT, CPWS[b]), 0.0, tl.float32)
            off0 = tl.full((WPT, CPWS[b]), 0.0, tl.float32)
            if FMA_ROWS == 2:
                acc1 = tl.full((BLOCK_O, WPT, CPWS[b]), 0.0, tl.float32)
                off1 = tl.full((WPT, CPWS[b]), 0.0, tl.float32)
        for t in tl.range(pid_s, n_tiles, SPLITS, num_stages=NUM_STAGES):
            ws = t * WPT + tl.arange(0, WPT)
            words = tl.load(U_CODES + o64[:, None] * row_words + (word0 + ws)[None, :],
                            mask=o_ok[:, None] & (ws < n_words)[None, :], other=0)  # fmt: skip
            if SLOTS[b] <= 4 and (FMA_ROWS > 0 or (UNIFORM_GROUP and not FMA_EXACT)):
                # code j -> fp32 128 + code: one rotation (SHF.R.W) and one and-or (module docstring)
                if ROTATE_ASM:
                    x = tl.inline_asm_elementwise(
                        "shf.r.wrap.b32 $0, $1, $1, $2;", "=r,r,r",
                        [tl.broadcast_to(words[:, :, None], (BLOCK_O, WPT, CPWS[b])),
                         tl.broadcast_to(rot[None, None, :], (BLOCK_O, WPT, CPWS[b]))],
                        dtype=tl.int32, is_pure=True, pack=1,
                    )  # fmt: skip
                else:  # the same rotation in plain Triton (the interpreter runs no inline asm): bit-identical
                    wu = words.to(tl.uint32, bitcast=True)[:, :, None]
                    x = (wu >> rot[None, None, :]) | (wu << ((32 - rot) & 31)[None, None, :])
                    x = x.to(tl.int32, bitcast=True)
                u128 = ((x & (((1 << SLOTS[b]) - 1) << 16)) | magic).to(tl.float32, bitcast=True)
            if FMA_ROWS > 0 and SLOTS[b] <= 4:
                # batch 1-2: one FMA per code and row of x: acc_r[o, w, j] += (T[r, c] scale[c]) (128 + code[o, c]);
                # the mins and the 128 offset summed per column (off_r), the columns reduced once per band.
                u = u128
                if FMA_EXACT:  # fp32 inputs: the codes themselves (one FADD each), no 128 offset in the sums
                    u = u - 128.0
                c_ok = c3 < ncols
                s = tl.load(U_SCALES + g * rank + col0 + c3, mask=c_ok, other=0.0).to(tl.float32)
                mn = tl.load(U_MINS + g * rank + col0 + c3, mask=c_ok, other=0.0).to(tl.float32)
                t0 = tl.load(T + tcol0 + c3, mask=c_ok, other=0.0)
                if not FMA_EXACT:
                    mn -= 128.0 * s
                acc0 += u * (t0 * s)[None, :, :]
                off0 += t0 * mn
                if FMA_ROWS == 2:
                    t1 = tl.load(T + stride_tm + tcol0 + c3, mask=c_ok, other=0.0)  # FMA_ROWS == 2: M == 2
                    acc1 += u * (t1 * s)[None, :, :]
                    off1 += t1 * mn
                c3 += WPT * CPWS[b] * SPLITS
            else:
                cs = t * (WPT * CPWS[b]) + tl.arange(0, WPT * CPWS[b])
                c_ok = cs < ncols
                cols = col0 + cs
                if (UNIFORM_GROUP and SLOTS[b] <= 4) and not FMA_EXACT:  # Triton < 3.3 rejects chained and/or
                    f = tl.reshape(u128, (BLOCK_O, WPT * CPWS[b]))  # 128 + code; the 128 goes into the min below
                else:
                    q = (words[:, :, None] >> shifts[None, None, :]) & ((1 << SLOTS[b]) - 1)
                    q = tl.reshape(q, (BLOCK_O, WPT * CPWS[b]))
                    f = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # code -> fp32 without I2F
                if UNIFORM_GROUP:  # the BLOCK_O rows lie in one group: one scale / min per column
                    s = tl.load(U_SCALES + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
                    mn = tl.load(U_MINS + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
                    if SLOTS[b] <= 4 and not FMA_EXACT:
                        mn -= 128.0 * s  # (128 + code) s + (min - 128 s)
                else:
                    off = (os_ // GROUP_SIZE)[:, None] * rank + cols[None, :]
                    ok = o_ok[:, None] & c_ok[None, :]
                    s = tl.load(U_SCALES + off, mask=ok, other=0.0).to(tl.float32)
                    mn = tl.load(U_MINS + off, mask=ok, other=0.0).to(tl.float32)
                u = f * s + mn
                tt = tl.load(T + ms[:, None] * stride_tm + (tcol0 + cs)[None, :], mask=m_ok[:, None] & (cs < ncols16)[None, :],
                             other=0.0)  # fmt: skip
                acc_t = tl.dot(u.to(T_COMPUTE), tl.trans(tt.to(T_COMPUTE)), acc_t, input_precision=DOT_PRECISION)
        if FMA_ROWS > 0 and SLOTS[b] <= 4:
            # the band's sum over its columns (tl.reduce with triton's own sum combiner: the interpreter runs it as
            # numpy's sum, the GPU build as tl.sum does; tl.sum itself cannot run here, see dispatch.py)
            fma0 += tl.reduce(tl.reduce(acc0, 2, _SUM), 1, _SUM) + tl.reduce(tl.reduce(off0, 1, _SUM), 0, _SUM)
            if FMA_ROWS == 2:
                fma1 += tl.reduce(tl.reduce(acc1, 2, _SUM), 1, _SUM) + tl.reduce(tl.reduce(off1, 1, _SUM), 0, _SUM)

    acc += tl.trans(acc_t)
    if FMA_ROWS > 0:
        acc += tl.where(ms[:, None] == 0, fma0[None, :], 0.0)
        if FMA_ROWS == 2:
            acc += tl.where(ms[:, None] == 1, fma1[None, :], 0.0)
    ok = m_ok[:, None] & o_ok[None, :]
    if SPLITS == 1:
        if HAS_BIAS:
            acc += tl.load(BIAS + os_, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + ms[:, None] * stride_ym + os_[None, :], acc.to(Y.dtype.element_ty), mask=ok)
    else:
        tl.store(Y + pid_s.to(tl.int64) * stride_ps + ms[:, None] * stride_ym + os_[None, :], acc, mask=ok)


# ------------------------------------------------------------------------------------------------ configs
class DecodeConfig(NamedTuple):
    block_o: int  # output rows per fused program
    block_k: int  # columns of W per step
    wpt_fused: int  # words per row per U tile (tile columns = wpt * 32 / slot)
    splits: int  # splits of the fused reduction (> 1 only when the output blocks do not fill the SMs)
    k_per_split: int
    block_i: int  # shrink: rows of V per step
    wpt_shrink: int
    shrink_splits: int
    rows_per_split: int
    num_warps: int
    num_stages: int


def decode_config(
    N: int, K: int, group_size: int, n_shrink_tiles: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
    M: int = DECODE_MAX_ROWS,
) -> DecodeConfig:
    """Tile sizes, the same on the GPU and in the interpreter (the tests run the GPU's code paths).

    Fused: BLOCK_O = 32 output rows when that still gives >= 2 programs per SM (14336 rows: 448 programs on 132
    SMs), else 16 (4096 rows: 256 programs); a U tile's fixed costs (its T tile, scales) are shared by BLOCK_O rows,
    so 32 rows cost fewer instructions per dequantised element (static sm_90 counts in test_static_sm90.py). The
    reduction is split only when the output blocks do not reach one per SM. U tiles of 8 words per row (16 at
    batch M = 1 on the FMA path with BLOCK_O = 16: see below). Shrink: BLOCK_I rows of V per step
    (dividing group_size when possible: one scale per column; 32 for fp32 inputs, whose exact fp32 dots run on the
    FMA units and spill at 64: static sm_90 check), split `in` until about 2 programs per SM (each split
    writes an M x k fp32 slice, summed afterwards)."""
    cuda = device.type == "cuda"
    sms = target_programs(device) if cuda else 4
    block_o = 32 if cdiv(N, 32) >= 2 * sms else 16
    block_k = 256
    o_blocks = cdiv(N, block_o)
    k_steps = cdiv(K, block_k)
    splits = 1 if o_blocks >= sms else max(1, min(k_steps, cdiv(sms, o_blocks)))
    k_per_split = cdiv(k_steps, splits) * block_k
    splits = cdiv(K, k_per_split)
    sizes = (32, 16) if dtype == torch.float32 else (64, 32, 16)
    block_i = next((b for b in sizes if group_size % b == 0), sizes[0])
    target = target_programs(device, per_sm=2) if cuda else 4
    steps = cdiv(K, block_i)
    shrink_splits = max(1, min(steps, cdiv(target, max(1, n_shrink_tiles))))
    rows_per_split = cdiv(steps, shrink_splits) * block_i
    # batch 1 on the FMA path (fma_rows) at BLOCK_O = 16: 16-word tiles share a tile's fixed costs by twice the
    # codes (static sm_90: 7.3 instead of 7.6 instructions per 2-bit code, 128 registers instead of 96); at
    # BLOCK_O = 32 they would cost 231 registers instead of 128 (one program per SM fewer, for 4.8 instead of 5.3)
    wpt = 16 if fma_rows(M, group_size, block_o) == 1 and block_o == 16 else 8
    return DecodeConfig(block_o, block_k, wpt, splits, k_per_split, block_i, 4, cdiv(K, rows_per_split), rows_per_split, 4, 3)


# ------------------------------------------------------------------------------------------------ host side
def fma_rows(M: int, group_size: int, block_o: int) -> int:
    """The fused kernel's FMA_ROWS: M for batch 1-2 when a tile's rows share one scale per column (the FMA path of
    the bands of <= 4-bit slots), else 0 (every band through tl.dot)."""
    return M if M <= 2 and group_size % block_o == 0 else 0


_BANDS_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 256
_ATTR = "_peft_ext_relayout"  # where a converted layout is kept: on the source delta's first codes tensor


def tensors_key(delta) -> tuple:
    """Identity and contents version of a delta's tensors: their addresses and in-place version counters (a
    load_state_dict into the same buffers keeps the addresses and bumps the versions)."""
    return tuple((t.data_ptr(), _version(t)) for t in delta.tensors().values()) + (delta.bands, str(delta.device))


def _version(t: torch.Tensor) -> int:
    """t's in-place version counter; -1 for an inference tensor (made under torch.inference_mode), which has none."""
    try:
        return t._version
    except RuntimeError:
        return -1


def cached_relayout(delta, anchor: torch.Tensor, convert):
    """convert(delta), computed once per contents of `delta` and kept on `anchor` (one of its tensors): it lives and
    dies with the adapter's buffers (no global cache holding GPU memory), and an in-place change of any of the
    delta's tensors makes it stale (recomputed)."""
    key = tensors_key(delta)
    hit = getattr(anchor, _ATTR, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = convert(delta)
    setattr(anchor, _ATTR, (key, out))
    return out


def slot_delta(delta, cache: bool = False) -> SlotDelta:
    """The version-2 layout of `delta`: a SlotDelta as it is. A (version-1) PackedDelta only with cache=True (opt-in):
    converted once per contents and kept beside it (`cached_relayout`), so that its memory is held twice; without it
    a TypeError (no silent second copy). Hold a SlotDelta (SlotDelta.from_packed once) to have one copy."""
    if isinstance(delta, SlotDelta):
        return delta
    if not cache:
        raise TypeError(
            f"the fused decode reads the version-2 slot layout, got a {type(delta).__name__}: convert it once with "
            f"SlotDelta.from_packed(delta) and keep only that, or pass cache_relayout=True to delta_linear (a second, "
            f"slot copy kept beside the bit planes: twice the memory)."
        )
    return cached_relayout(delta, delta.u_words, SlotDelta.from_packed)


def _bands(delta: SlotDelta, wpt: int, device: torch.device):
    """(band table (NB, 4) int32 on the device, SLOTS, CPWS, shrink column tiles) for the non-empty bands."""
    key = (str(device), wpt, delta.bands)
    hit = _BANDS_CACHE.get(key)
    if hit is not None:
        return hit
    rows, slots, cpws, tiles, tcol = [], [], [], 0, 0
    for bits, col0, n, word0 in delta.band_layout():
        if n == 0:
            continue
        slot = slot_width(bits)
        cpw = WORD_BITS // slot
        rows.append([col0, n, word0, tiles, tcol, cdiv(n, 16) * 16, 0, 0])
        tcol += cdiv(n, 16) * 16
        slots.append(slot)
        cpws.append(cpw)
        tiles += cdiv(n, wpt * cpw)
    table = torch.tensor(rows or [[0] * BAND_COLS], dtype=torch.int32).to(device)
    hit = _BANDS_CACHE[key] = (table, tuple(slots), tuple(cpws), tiles, max(tcol, 16))
    while len(_BANDS_CACHE) > _CACHE_SIZE:
        _BANDS_CACHE.popitem(last=False)
    return hit


def _new_partials(shape: tuple, device: torch.device) -> torch.Tensor:
    """fp32 split partials (every element is written by a program); tests poison it."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def fused_decode(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], delta: SlotDelta) -> torch.Tensor:
    """y = x W^T + b + ((x V) * sigma) U^T for x2d (M <= 16, in) contiguous rows, weight (out, in) with unit column
    stride, bias contiguous or None, delta a SlotDelta on x's device (checked by the caller; a PackedDelta raises a
    TypeError: `slot_delta`)."""
    M, K = x2d.shape
    N = weight.shape[0]
    if M > DECODE_MAX_ROWS:
        raise ValueError(f"fused_decode serves at most {DECODE_MAX_ROWS} rows, got {M}.")
    sd = slot_delta(delta)
    device = x2d.device
    group_size = int(sd.group_size)
    compute = compute_dtype(x2d.dtype)
    t_compute = intermediate_compute(x2d.dtype)
    precision = dot_precision(x2d.dtype)
    rank = sd.rank
    table, slots, cpws, n_tiles, t_cols = _bands(sd, 4, device) if rank else (None, (), (), 0, 16)
    cfg = decode_config(N, K, group_size, n_tiles, device, x2d.dtype, M)
    fused_table = _bands(sd, cfg.wpt_fused, device)[0] if rank else torch.zeros(1, BAND_COLS, dtype=torch.int32, device=device)
    with launch_device(x2d):
        if rank:
            # rows of T padded to 16 columns: aligned, vectorised loads of T in the fused kernel
            p = _new_partials((cfg.shrink_splits, M, t_cols), device)
            _slot_shrink_kernel[(n_tiles, cfg.shrink_splits)](
                x2d, table, sd.v_codes, sd.v_scales, sd.v_mins, sd.sigma, p,
                M, K, rank, sd.row_words, cfg.rows_per_split,
                x2d.stride(0), p.stride(0), p.stride(1),
                GROUP_SIZE=group_size, BLOCK_M=DECODE_MAX_ROWS, BLOCK_I=cfg.block_i, WPT=4, SLOTS=slots, CPWS=cpws,
                UNIFORM_GROUP=group_size % cfg.block_i == 0, COMPUTE=compute, DOT_PRECISION=precision,
                num_warps=cfg.num_warps,
            )  # fmt: skip
            t = p[0] if cfg.shrink_splits == 1 else p.sum(0)
        else:
            t = torch.zeros(M, 16, dtype=torch.float32, device=device)
        y = torch.empty(M, N, dtype=x2d.dtype, device=device)
        out = y if cfg.splits == 1 else _new_partials((cfg.splits, M, N), device)
        _fused_decode_kernel[(cdiv(N, cfg.block_o), cfg.splits)](
            x2d, weight, bias if bias is not None else x2d, t, fused_table, sd.u_codes, sd.u_scales, sd.u_mins, out,
            M, N, K, max(rank, 1), sd.row_words, cfg.k_per_split,
            x2d.stride(0), weight.stride(0), t.stride(0), out.stride(-2), out.stride(0) if cfg.splits > 1 else 0,
            FMA_MAGIC, GROUP_SIZE=group_size, BLOCK_M=DECODE_MAX_ROWS, BLOCK_O=cfg.block_o, BLOCK_K=cfg.block_k,
            WPT=cfg.wpt_fused, SLOTS=slots if rank else (), CPWS=cpws if rank else (), SPLITS=cfg.splits,
            HAS_BIAS=bias is not None, UNIFORM_GROUP=group_size % cfg.block_o == 0,
            COMPUTE=compute, T_COMPUTE=t_compute, DOT_PRECISION=precision,
            FMA_ROWS=fma_rows(M, group_size, cfg.block_o), FMA_EXACT=x2d.dtype == torch.float32,
            ROTATE_ASM=not interpret_mode(),
            NUM_STAGES=cfg.num_stages,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if cfg.splits > 1:
            acc = out.sum(0)
            if bias is not None:
                acc += bias.float()
            y.copy_(acc)
    return y


# ------------------------------------------------------------------------------------------- bytes model
def decode_bytes_model(M: int, delta, dtype_bytes: int = 2, path: str = "fused") -> dict:
    """A model of the HBM bytes one call moves (not a measurement): what the benchmarks divide by the measured time
    to give the fraction of the bandwidth floor reached. delta: a PackedDelta or SlotDelta (its shape and bands);
    path: "base" (the base GEMV alone), "fused" (this module) or "bitplanes" (kernels/delta.py's decode: cuBLAS,
    memset of T, shrink with fp32 atomics, expand's read-modify-write of y). Every operand is counted once at its
    first touch from HBM (x, T and the small tables are L2-resident after it); returns the parts and their "total"."""
    N, K = delta.out_features, delta.in_features
    k = sum(n for _, n in delta.bands)
    parts = {"W": N * K * dtype_bytes, "x": M * K * dtype_bytes, "y": M * N * dtype_bytes}
    if path == "base" or k == 0:
        parts["total"] = sum(parts.values())
        return parts
    groups_in, groups_out = cdiv(K, delta.group_size), cdiv(N, delta.group_size)
    scales = 2 * 2 * k * (groups_in + groups_out) + 4 * k  # fp16 scales and mins of both sides, fp32 sigma
    if path == "fused":
        row_words = sum(cdiv(n, WORD_BITS // slot_width(b)) for b, n in delta.bands if n)
        t_cols = sum(cdiv(n, 16) * 16 for _, n in delta.bands)
        sm = 132  # an H100's SMs, for the shrink's split count (decode_config's choice)
        tiles = sum(cdiv(n, 4 * (WORD_BITS // slot_width(b))) for b, n in delta.bands if n)
        splits = max(1, min(cdiv(K, 64), cdiv(2 * sm, max(1, tiles))))
        # T: the shrink's split slices written and summed (likely L2-resident: an upper bound), T read
        parts.update(codes=4 * row_words * (K + N), scales=scales, T=4 * M * t_cols * (2 * splits + 2))
    elif path == "bitplanes":
        bit_cols = sum(b * n for b, n in delta.bands)
        parts.update(
            codes=4 * bit_cols * (cdiv(K, WORD_BITS) + cdiv(N, WORD_BITS)), scales=scales,
            T=4 * M * k * 3,  # memset, atomics (read-modify-write in L2: counted once), expand's read
            y_rmw=2 * M * N * dtype_bytes,  # the expand reads y back and writes it again
        )  # fmt: skip
    else:
        raise ValueError(f"path must be 'base', 'fused' or 'bitplanes', got {path!r}.")
    parts["total"] = sum(parts.values())
    return parts
