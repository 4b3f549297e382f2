"""Serving a mixed-precision compressed weight delta (Delta-CoMe) without ever building the dense delta.

    y = x W^T + b + ((x V) * sigma) U^T        V (in x k), U (out x k): dequantised on the fly from bit planes

Entry points: `delta_linear(x, weight, bias, delta)` (one PackedDelta or SlotDelta, kernels/delta_format.py) and
`delta_linear_gathered(x, weight, bias, deltas, adapter_index)` (multi-tenant batch: row or sequence i adds
deltas[adapter_index[i]], -1 adds nothing). Their plain-PyTorch twins are kernels/delta_reference.py's
`reference_delta_linear` / `reference_delta_linear_gathered`. Forward only (inference).

One copy in memory: every path reads the delta in the layout it is given and keeps nothing beside it.
  - SlotDelta (version 2; what the Delta-CoMe tuner's layers hold, converted once at load from the files' bit
    planes): decode (`delta_linear` with <= 16 rows of x, `decode_path`) runs one fused GEMV + delta kernel
    (kernels/delta_decode.py) that reads W and the compressed delta once; prefill, decode=False and the gathered
    batch run `_slot_delta_shrink_kernel` / `_slot_delta_expand_kernel` below.
  - PackedDelta (version 1, bit planes): `_delta_shrink_kernel` / `_delta_expand_kernel` at every size. Only with
    delta_linear's opt-in cache_relayout=True does its decode run the fused kernel, on a slot copy converted once
    and kept beside it (twice the memory; delta_decode.cached_relayout).
  - A gathered batch whose deltas mix the two layouts gets one launch pair per layout, each reading its own.
The design notes below describe the bit-plane kernels; the slot kernels share their grid, tables, splits,
atomic / deterministic handling and epilogues, and decode differently ("Dequantising slots" below).

Design (both entry points run the same two kernels; x, y of M rows; fp32 accumulation everywhere):

  0. cuBLAS: y = F.linear(x, W, b), the base GEMM (a GEMV at decode sizes), in x's dtype.
  1. Triton `_delta_shrink_kernel` ("shrink"): T = (x V) * sigma (M x k, fp32). Grid (row blocks, column
     tiles, splits of `in`). Per step a program dequantises a V tile of BLOCK_I rows (BLOCK_I / 32 words) x
     BLOCK_C columns and accumulates tl.dot(x tile, V tile). At the end of its split of `in` it stores its
     T tile (one split) or adds it with fp32 atomics (several splits; T zeroed first). The atomics make the
     last bits of y depend on the programs' order: with `deterministic=True`, or by default under
     `torch.use_deterministic_algorithms(True)`, each split stores its own slice of a (splits, M, k) buffer and
     one torch reduction sums them in a fixed order (in place of the memset).
  2. Triton `_delta_expand_kernel` ("expand"): y += T U^T. Grid (row blocks, blocks of BLOCK_O output rows);
     a program loops over all column tiles (all bands) of its tenant, dequantises the U tile (BLOCK_O x
     BLOCK_C) the same way and accumulates tl.dot(U tile, T tile^T) (the delta's y tile, transposed); the
     epilogue reads its y tile, adds the delta in fp32 and stores y: the add is fused into the only write of y,
     which is rounded once, as in the reference.
  -> per call: the base GEMM + 2 Triton launches (+ a memset of T, or the deterministic path's sum, when `in`
     is split), whatever the number of bands, bit widths or tenants. Both launches run on x's CUDA device
     (`dispatch.launch_device`), whichever device is current.

Dequantising bit planes (both kernels): a tile's words are loaded as a (word rows, 1, columns) tensor, i.e.
one int32 per word, plane and thread (the row->word trick: row i is bit i % 32 of word row i // 32; the
columns of a band are contiguous, so the loads are coalesced along j), and each word is expanded in registers
against the bit positions. Bits b and b + 16 are decoded together, two codes in one int32 ("lo" rows 32 w + b,
"hi" rows 32 w + 16 + b), planes from the most significant: pair = (pair << 1) | ((word >> b) & 0x10001),
3 instructions per pair and plane. A code becomes fp32 as the bits of 2^23 + code minus 2^23 (no I2F), then
value = code * scale + min with the fp16 scale / min of the row's group - one per column when the tile's rows
lie in one group (BLOCK_I, BLOCK_O dividing group_size: the fast path), else gathered per element. The lo and
hi halves are two dots (the rows of x / outputs permuted the same way). The compiler's sm_90 SASS for the
decode configs counts about 11 (shrink, BLOCK_I = 128) and 15 / 27 (expand, BLOCK_O = 64 / 32) instructions
per dequantised element of a 2-bit band, per-tile costs included (3 per pair and plane of it): at decode sizes
these kernels are likely issue-bound rather than bandwidth-bound (to be measured: benchmarks/delta.py). Static
sm_90 checks of the JIT-specialised builds (tests/kernels/test_static_sm90.py): no spills, no async copies (not
software-pipelined: the tile loop holds the runtime plane loop), >= 10 instructions per element of a 2-bit band.

Dequantising slots (`_slot_delta_shrink_kernel` / `_slot_delta_expand_kernel`): the tile entry carries the slot
width (a runtime value: one build serves every band schedule) and the word of the tile's first column in a row;
element (i, c) is word (i, w0 + c >> log2(cpw)) shifted right by (c & (cpw - 1)) * slot and masked (one gathered
int32 load per element, shared by the cpw elements of a word, and one shift and mask), then the same 2^23 trick
and scale / min. The tile is a plain (rows, columns) tile (no lo / hi halves): one dot per step. Static sm_90
compile results (tests/kernels/test_static_sm90.py, 14336 x 4096, paper bands; not timings): no spills at any
tested config, and unlike the bit-plane kernels both loops are software-pipelined (LDGSTS); bf16 decode-size
builds (BLOCK_M 16, BLOCK_I 128, BLOCK_O 64) 128-168 registers, hot loops of 1170 (shrink) / 639 (expand) SASS
instructions per thread, i.e. about 18 / 20 per dequantised element (the bit-plane kernels: about 11 / 15: the
per-element loads cost), prefill builds (BLOCK_M 64, BLOCK_I 64) 134 / 168 registers, 17 / 24 per element (spread
over 64 rows of x). fp32 inputs (exact dots on the FMA units) take 16-row shrink steps (SLOT_FP32_BLOCK_I; 32 and
64 spill). Their speed against the bit-plane kernels is unmeasured (no GPU run yet: benchmarks/delta.py has both).

Bands and bit widths in one launch: the host builds a small int32 *tile table* per band schedule (cached): one
entry per (band, run of <= BLOCK_C = 64 consecutive columns) = (bits, first column, columns, band width n_b,
word offset in v_words, word offset in u_words). Shrink program t reads entry t of its tenant; the expand
loops over its tenant's entries. The plane loop `for q in range(bits)` is a runtime loop: a 2-bit band costs
2 loads and decodes per word, an 8-bit band 8 (no padding to the widest band). Empty bands have no entries.

Tenants in one launch: a per-tenant *meta table* (int64, cached by the deltas' tensor addresses) holds the
addresses of each delta's 7 tensors (loaded in the kernels and cast to pointers, as vLLM's multi-LoRA kernels
do), its rank and its range of tile-table entries. A *block table* maps each row-block program to (tenant,
first position, end position) in the tenant-sorted row order; `delta_linear` is the one-tenant case without
a row order (rows are gathered in the kernels through `order`, never copied). The gathered path sorts rows
by tenant (argsort on the index's device) and needs the per-tenant row counts on the host to size the grid:
one host sync per call (the same sync as the range check). One launch serves one group size.

Tiles (`_config`, the same choices in the interpreter, so the tests run the GPU's code paths): decode
(<= 16 rows per tenant) BLOCK_M = 16, BLOCK_I = 128 (or the largest of 64 / 32 dividing group_size),
BLOCK_O = 64 when that still gives one expand program per SM, else 32; the shrink splits `in` until about 4
programs per SM run, so the V words are streamed by the whole GPU at once, each word read once; each word of
U is read once per row block. Prefill: BLOCK_M = 32 or 64 row blocks, no split of `in` when the grid is full
(no atomics, no memset); V and U tiles are then dequantised once per row block (re-read from L2), which costs
ALU time: dequantising the factors once into bf16 and using cuBLAS would likely be faster there (the factors,
not the dense delta). num_warps = 4 everywhere; the sm_90 builds use <= 128 (decode) / <= 246 (prefill, bf16)
registers without spills (tests/kernels compile them).

Dtypes: x / weight / bias share one dtype (fp16, bf16, fp32; under torch.autocast they are cast to the
autocast dtype first, as F.linear would). On the GPU the dequantised tiles and x are bf16/fp16 operands of
tl.dot (fp32 accumulation); fp32 dots are exact unless torch allows TF32 for CUDA matmuls. T is fp32; the
expand's dot reads it in x's dtype for bf16 (fp32's range) but in fp32 for fp16 inputs (TF32 tensor cores:
|T| may exceed fp16's 65504, `dispatch.intermediate_compute`). In the Triton interpreter every tile is fp32
(its bf16 math is wrong, dispatch.compute_dtype).

Backend (dispatch.choose_backend): Triton for CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), else the
reference; `backend="reference" | "triton"` forces one. With autograd on and x / weight / bias requiring grad,
the differentiable reference runs (the Triton path is forward-only).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .delta_format import WORD_BITS, PackedDelta, SlotDelta, slot_width, words_per_column
from .delta_decode import DECODE_MAX_ROWS, FUSED_DECODE_MIN_TRITON, fused_decode, fused_decode_supported, slot_delta
from .delta_reference import reference_delta_linear, reference_delta_linear_gathered
from .dispatch import (
    autocast_base,
    cdiv,
    check_base,
    check_same_device,
    choose_backend,
    compute_dtype,
    dot_precision,
    intermediate_compute,
    launch_device,
    lazy_jit,
    target_programs,
    tl,
)
from .reference import check_adapter_index, check_index_dtype, rows_adapter_index

__all__ = ["delta_linear", "delta_linear_gathered", "decode_path"]

# Table layouts (the kernels index them with these literals):
META_COLS = 10  # per tenant (int64): v_words, v_scales, v_mins, u_words, u_scales, u_mins, sigma, rank, tile0, tiles
TILE_COLS = 8  # per tile (int32): bits, col0, ncols, band width, v word offset, u word offset, (2 unused)
BLOCK_COLS = 4  # per row block (int32): tenant, first position, end position, (unused)
MAX_INT32 = 2**31 - 1
BLOCK_C = 64  # columns per tile-table entry (both kernels)
SLOT_FP32_BLOCK_I = 16  # the slot shrink's rows per step for fp32 inputs (32 and 64 spill at BLOCK_M = 64: tests/kernels/test_static_sm90.py)
assert WORD_BITS == 32  # the kernels' row -> word arithmetic


# ------------------------------------------------------------------------------------------------ kernels
@lazy_jit
def _delta_shrink_kernel(
    X, ORDER, BLOCKS, META, TILES, T,
    K, words_v, rows_per_split,
    stride_xm, stride_xk, stride_ts, stride_tm,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_ORDER: tl.constexpr, ATOMIC: tl.constexpr, UNIFORM_GROUP: tl.constexpr,
    COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """T[split * stride_ts + pos, col0 + c] (+)= sigma[col0 + c] * sum over this split's rows i of
    X[row(pos), i] * V[i, col0 + c], for one row block, one column tile of its tenant and one split of `in`:
    added with fp32 atomics into one zeroed T (ATOMIC), or stored into this split's own slice of T (stride_ts;
    0 with one split), summed afterwards in a fixed order (the deterministic path). BLOCK_I: a multiple of 32
    (whole words)."""
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    tenant = tl.load(BLOCKS + pid_b * 4)
    pos = tl.load(BLOCKS + pid_b * 4 + 1) + tl.arange(0, BLOCK_M)
    m_ok = pos < tl.load(BLOCKS + pid_b * 4 + 2)
    if HAS_ORDER:
        rows = tl.load(ORDER + pos, mask=m_ok, other=0).to(tl.int64)
    else:
        rows = pos.to(tl.int64)
    meta = META + tenant.to(tl.int64) * 10
    v_words = tl.load(meta + 0).to(tl.pointer_type(tl.int32))
    v_scales = tl.load(meta + 1).to(tl.pointer_type(tl.float16))
    v_mins = tl.load(meta + 2).to(tl.pointer_type(tl.float16))
    sigma = tl.load(meta + 6).to(tl.pointer_type(tl.float32))
    rank = tl.load(meta + 7).to(tl.int32)
    active = pid_t < tl.load(meta + 9).to(tl.int32)  # tenants have different numbers of tiles
    tile = TILES + (tl.load(meta + 8).to(tl.int32) + tl.where(active, pid_t, 0)) * 8
    bits = tl.load(tile + 0)
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < tl.where(active, tl.load(tile + 2), 0)  # no columns for a tile the tenant lacks
    cols = tl.load(tile + 1) + cs
    band_width = tl.load(tile + 3)
    plane = words_v * band_width
    w_base = v_words + tl.load(tile + 4) + cs[None, None, :]
    # A step covers BLOCK_I // 32 word rows. Bits b and b + 16 of a word are decoded together (two codes per
    # int32, one shift-and-mask per pair and plane): "lo" rows 32 w + b and "hi" rows 32 w + 16 + b, b < 16.
    word_in_step = tl.arange(0, BLOCK_I // 32)
    bit = tl.arange(0, 16)[None, :, None]
    lo_in_step = tl.reshape((word_in_step * 32)[:, None] + tl.arange(0, 16)[None, :], (BLOCK_I // 2,))

    acc = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    i_start = pid_s * rows_per_split
    i_end = tl.where(active, tl.minimum(i_start + rows_per_split, K), i_start)  # none for a tile the tenant lacks
    for i0 in range(i_start, i_end, BLOCK_I):
        word_row = i0 // 32 + word_in_step
        w_ptrs = w_base + word_row[:, None, None] * band_width
        w_ok = (word_row < words_v)[:, None, None] & c_ok[None, None, :]
        pair = tl.full((BLOCK_I // 32, 16, BLOCK_C), 0, tl.int32)
        for q in range(bits):  # planes from the most significant: pair = 2 pair + bits
            w = tl.load(w_ptrs + (bits - 1 - q) * plane, mask=w_ok, other=0)
            pair = (pair << 1) | ((w >> bit) & 0x10001)
        pair = tl.reshape(pair, (BLOCK_I // 2, BLOCK_C))
        i_lo = i0 + lo_in_step
        i_hi = i_lo + 16
        lo_ok = i_lo < K
        hi_ok = i_hi < K
        if UNIFORM_GROUP:  # the BLOCK_I rows lie in one group: one scale / min per column
            g = i0 // GROUP_SIZE
            s_lo = tl.load(v_scales + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            m_lo = tl.load(v_mins + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            s_hi = s_lo
            m_hi = m_lo
        else:
            off_lo = (i_lo // GROUP_SIZE)[:, None] * rank + cols[None, :]
            off_hi = (i_hi // GROUP_SIZE)[:, None] * rank + cols[None, :]
            ok_lo = lo_ok[:, None] & c_ok[None, :]
            ok_hi = hi_ok[:, None] & c_ok[None, :]
            s_lo = tl.load(v_scales + off_lo, mask=ok_lo, other=0.0).to(tl.float32)
            m_lo = tl.load(v_mins + off_lo, mask=ok_lo, other=0.0).to(tl.float32)
            s_hi = tl.load(v_scales + off_hi, mask=ok_hi, other=0.0).to(tl.float32)
            m_hi = tl.load(v_mins + off_hi, mask=ok_hi, other=0.0).to(tl.float32)
        # code -> fp32 without I2F (quarter rate): the bits of 2^23 + code, minus 2^23 (exact)
        v_lo = (((pair & 0xFFFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * s_lo + m_lo
        v_hi = (((pair >> 16) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * s_hi + m_hi
        x_ptrs = X + rows[:, None] * stride_xm
        x_lo = tl.load(x_ptrs + i_lo[None, :] * stride_xk, mask=m_ok[:, None] & lo_ok[None, :], other=0.0)
        x_hi = tl.load(x_ptrs + i_hi[None, :] * stride_xk, mask=m_ok[:, None] & hi_ok[None, :], other=0.0)
        acc = tl.dot(x_lo.to(COMPUTE), v_lo.to(COMPUTE), acc, input_precision=DOT_PRECISION)
        acc = tl.dot(x_hi.to(COMPUTE), v_hi.to(COMPUTE), acc, input_precision=DOT_PRECISION)

    acc = acc * tl.load(sigma + cols, mask=c_ok, other=0.0)[None, :]  # T = (x V) * sigma, the expand's operand
    t_ptrs = T + pid_s.to(tl.int64) * stride_ts + pos.to(tl.int64)[:, None] * stride_tm + cols[None, :]
    t_ok = m_ok[:, None] & c_ok[None, :]
    if ATOMIC:
        tl.atomic_add(t_ptrs, acc, mask=t_ok, sem="relaxed")
    else:
        tl.store(t_ptrs, acc, mask=t_ok)


@lazy_jit
def _delta_expand_kernel(
    T, ORDER, BLOCKS, META, TILES, Y,
    N, words_u,
    stride_tm, stride_ym, stride_yn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_ORDER: tl.constexpr, UNIFORM_GROUP: tl.constexpr,
    T_COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Y[row(pos), o] = Y[row(pos), o] + sum_c T[pos, c] * U[o, c] for one row block and BLOCK_O
    output rows (a multiple of 32: whole words), looping over all column tiles (all bands) of its tenant.
    T_COMPUTE: the dot's operand dtype (fp32 for fp16 inputs: T may exceed fp16's range)."""
    pid_b = tl.program_id(0)
    pid_o = tl.program_id(1)
    tenant = tl.load(BLOCKS + pid_b * 4)
    pos = tl.load(BLOCKS + pid_b * 4 + 1) + tl.arange(0, BLOCK_M)
    m_ok = pos < tl.load(BLOCKS + pid_b * 4 + 2)
    pos64 = pos.to(tl.int64)
    meta = META + tenant.to(tl.int64) * 10
    u_words = tl.load(meta + 3).to(tl.pointer_type(tl.int32))
    u_scales = tl.load(meta + 4).to(tl.pointer_type(tl.float16))
    u_mins = tl.load(meta + 5).to(tl.pointer_type(tl.float16))
    rank = tl.load(meta + 7).to(tl.int32)
    tile0 = tl.load(meta + 8).to(tl.int32)
    n_tiles = tl.load(meta + 9).to(tl.int32)

    # Output rows as the shrink's input rows: word rows w, "lo" rows 32 w + b and "hi" rows 32 w + 16 + b
    # (b < 16). The U tile is built as BLOCK_O / 2 x BLOCK_C halves (rows o, columns c: words contiguous along
    # c, one word per thread and plane, as in the shrink) and the products are transposed: acc^T = U T^T.
    o0 = pid_o * BLOCK_O
    word_row = o0 // 32 + tl.arange(0, BLOCK_O // 32)
    w_rows_ok = (word_row < words_u)[:, None, None]
    bit = tl.arange(0, 16)[None, :, None]
    o_lo = o0 + tl.reshape((tl.arange(0, BLOCK_O // 32) * 32)[:, None] + tl.arange(0, 16)[None, :], (BLOCK_O // 2,))
    o_hi = o_lo + 16
    lo_ok = o_lo < N
    hi_ok = o_hi < N
    cs = tl.arange(0, BLOCK_C)
    acc_lo = tl.full((BLOCK_O // 2, BLOCK_M), 0.0, tl.float32)
    acc_hi = tl.full((BLOCK_O // 2, BLOCK_M), 0.0, tl.float32)
    for t in range(tile0, tile0 + n_tiles):
        tile = TILES + t * 8
        bits = tl.load(tile + 0)
        cols = tl.load(tile + 1) + cs
        c_ok = cs < tl.load(tile + 2)
        band_width = tl.load(tile + 3)
        # T^T tile (x V * sigma), BLOCK_C x BLOCK_M
        tt = tl.load(T + pos64[None, :] * stride_tm + cols[:, None], mask=c_ok[:, None] & m_ok[None, :], other=0.0)
        tt = tt.to(T_COMPUTE)
        w_ptrs = u_words + tl.load(tile + 5) + cs[None, None, :] + word_row[:, None, None] * band_width
        w_ok = w_rows_ok & c_ok[None, None, :]
        plane = words_u * band_width
        pair = tl.full((BLOCK_O // 32, 16, BLOCK_C), 0, tl.int32)
        for q in range(bits):  # planes from the most significant: pair = 2 pair + bits
            w = tl.load(w_ptrs + (bits - 1 - q) * plane, mask=w_ok, other=0)
            pair = (pair << 1) | ((w >> bit) & 0x10001)
        pair = tl.reshape(pair, (BLOCK_O // 2, BLOCK_C))
        if UNIFORM_GROUP:  # the BLOCK_O rows lie in one group
            g = o0 // GROUP_SIZE
            s_lo = tl.load(u_scales + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            m_lo = tl.load(u_mins + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            s_hi = s_lo
            m_hi = m_lo
        else:
            off_lo = (o_lo // GROUP_SIZE)[:, None] * rank + cols[None, :]
            off_hi = (o_hi // GROUP_SIZE)[:, None] * rank + cols[None, :]
            ok_lo = lo_ok[:, None] & c_ok[None, :]
            ok_hi = hi_ok[:, None] & c_ok[None, :]
            s_lo = tl.load(u_scales + off_lo, mask=ok_lo, other=0.0).to(tl.float32)
            m_lo = tl.load(u_mins + off_lo, mask=ok_lo, other=0.0).to(tl.float32)
            s_hi = tl.load(u_scales + off_hi, mask=ok_hi, other=0.0).to(tl.float32)
            m_hi = tl.load(u_mins + off_hi, mask=ok_hi, other=0.0).to(tl.float32)
        u_lo = (((pair & 0xFFFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * s_lo + m_lo
        u_hi = (((pair >> 16) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * s_hi + m_hi
        acc_lo = tl.dot(u_lo.to(T_COMPUTE), tt, acc_lo, input_precision=DOT_PRECISION)
        acc_hi = tl.dot(u_hi.to(T_COMPUTE), tt, acc_hi, input_precision=DOT_PRECISION)

    if HAS_ORDER:
        rows = tl.load(ORDER + pos, mask=m_ok, other=0).to(tl.int64)
    else:
        rows = pos64
    y_rows = Y + rows[None, :] * stride_ym  # the accumulators are transposed: (output row, x row)
    ok = lo_ok[:, None] & m_ok[None, :]
    y_ptrs = y_rows + o_lo[:, None] * stride_yn
    y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc_lo).to(Y.dtype.element_ty), mask=ok)
    ok = hi_ok[:, None] & m_ok[None, :]
    y_ptrs = y_rows + o_hi[:, None] * stride_yn
    y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc_hi).to(Y.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------- the same two kernels on slots
@lazy_jit
def _slot_delta_shrink_kernel(
    X, ORDER, BLOCKS, META, TILES, T,
    K, rows_per_split,
    stride_xm, stride_xk, stride_ts, stride_tm,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_ORDER: tl.constexpr, ATOMIC: tl.constexpr, UNIFORM_GROUP: tl.constexpr,
    COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """`_delta_shrink_kernel` on the version-2 slot layout (SlotDelta.v_codes (in, row_words)): the same grid,
    tables (slot entries, `_slot_tile_rows`), split / atomic / deterministic handling and math. Code (i, c) of a
    tile is word (i, w0 + c >> log2(cpw)) shifted right by (c & (cpw - 1)) * slot and masked: the slot width is
    a runtime value of the tile entry (one build for every band schedule), each element one gathered load (the
    cpw elements of a word share it) and one shift-and-mask."""
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    tenant = tl.load(BLOCKS + pid_b * 4)
    pos = tl.load(BLOCKS + pid_b * 4 + 1) + tl.arange(0, BLOCK_M)
    m_ok = pos < tl.load(BLOCKS + pid_b * 4 + 2)
    if HAS_ORDER:
        rows = tl.load(ORDER + pos, mask=m_ok, other=0).to(tl.int64)
    else:
        rows = pos.to(tl.int64)
    meta = META + tenant.to(tl.int64) * 10
    v_codes = tl.load(meta + 0).to(tl.pointer_type(tl.int32))
    v_scales = tl.load(meta + 1).to(tl.pointer_type(tl.float16))
    v_mins = tl.load(meta + 2).to(tl.pointer_type(tl.float16))
    sigma = tl.load(meta + 6).to(tl.pointer_type(tl.float32))
    rank = tl.load(meta + 7).to(tl.int32)
    active = pid_t < tl.load(meta + 9).to(tl.int32)  # tenants have different numbers of tiles
    tile = TILES + (tl.load(meta + 8).to(tl.int32) + tl.where(active, pid_t, 0)) * 8
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < tl.where(active, tl.load(tile + 2), 0)  # no columns for a tile the tenant lacks
    cols = tl.load(tile + 1) + cs
    slot = tl.load(tile + 3)
    log_cpw = tl.load(tile + 5)
    row_words = tl.load(tile + 6).to(tl.int64)
    w_col = tl.load(tile + 4) + (cs >> log_cpw)  # the word of each column in a row
    shift = (cs & ((1 << log_cpw) - 1)) * slot
    code_mask = (1 << slot) - 1

    acc = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    i_start = pid_s * rows_per_split
    i_end = tl.where(active, tl.minimum(i_start + rows_per_split, K), i_start)  # none for a tile the tenant lacks
    for i0 in range(i_start, i_end, BLOCK_I):
        ri = i0 + tl.arange(0, BLOCK_I)
        r_ok = ri < K
        ok = r_ok[:, None] & c_ok[None, :]
        words = tl.load(v_codes + ri.to(tl.int64)[:, None] * row_words + w_col[None, :], mask=ok, other=0)
        q = (words >> shift[None, :]) & code_mask
        f = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # code -> fp32 without I2F (exact)
        if UNIFORM_GROUP:  # the BLOCK_I rows lie in one group: one scale / min per column
            g = i0 // GROUP_SIZE
            s = tl.load(v_scales + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            mn = tl.load(v_mins + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        else:
            off = (ri // GROUP_SIZE)[:, None] * rank + cols[None, :]
            s = tl.load(v_scales + off, mask=ok, other=0.0).to(tl.float32)
            mn = tl.load(v_mins + off, mask=ok, other=0.0).to(tl.float32)
        v = f * s + mn
        xt = tl.load(X + rows[:, None] * stride_xm + ri[None, :] * stride_xk, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt.to(COMPUTE), v.to(COMPUTE), acc, input_precision=DOT_PRECISION)

    acc = acc * tl.load(sigma + cols, mask=c_ok, other=0.0)[None, :]  # T = (x V) * sigma, the expand's operand
    t_ptrs = T + pid_s.to(tl.int64) * stride_ts + pos.to(tl.int64)[:, None] * stride_tm + cols[None, :]
    t_ok = m_ok[:, None] & c_ok[None, :]
    if ATOMIC:
        tl.atomic_add(t_ptrs, acc, mask=t_ok, sem="relaxed")
    else:
        tl.store(t_ptrs, acc, mask=t_ok)


@lazy_jit
def _slot_delta_expand_kernel(
    T, ORDER, BLOCKS, META, TILES, Y,
    N,
    stride_tm, stride_ym, stride_yn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_ORDER: tl.constexpr, UNIFORM_GROUP: tl.constexpr,
    T_COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """`_delta_expand_kernel` on the slot layout (SlotDelta.u_codes (out, row_words)): Y[row(pos), o] += sum_c
    T[pos, c] U[o, c] for one row block and BLOCK_O output rows, looping over all column tiles of its tenant; U
    tiles decoded as in `_slot_delta_shrink_kernel`; the add fused into the only write of y."""
    pid_b = tl.program_id(0)
    pid_o = tl.program_id(1)
    tenant = tl.load(BLOCKS + pid_b * 4)
    pos = tl.load(BLOCKS + pid_b * 4 + 1) + tl.arange(0, BLOCK_M)
    m_ok = pos < tl.load(BLOCKS + pid_b * 4 + 2)
    pos64 = pos.to(tl.int64)
    meta = META + tenant.to(tl.int64) * 10
    u_codes = tl.load(meta + 3).to(tl.pointer_type(tl.int32))
    u_scales = tl.load(meta + 4).to(tl.pointer_type(tl.float16))
    u_mins = tl.load(meta + 5).to(tl.pointer_type(tl.float16))
    rank = tl.load(meta + 7).to(tl.int32)
    tile0 = tl.load(meta + 8).to(tl.int32)
    n_tiles = tl.load(meta + 9).to(tl.int32)

    o0 = pid_o * BLOCK_O
    os_ = o0 + tl.arange(0, BLOCK_O)
    o_ok = os_ < N
    o64 = os_.to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    acc = tl.full((BLOCK_O, BLOCK_M), 0.0, tl.float32)  # (T U^T)^T = U T^T: U is the dot's A operand
    for t in range(tile0, tile0 + n_tiles):
        tile = TILES + t * 8
        cols = tl.load(tile + 1) + cs
        c_ok = cs < tl.load(tile + 2)
        slot = tl.load(tile + 3)
        log_cpw = tl.load(tile + 5)
        row_words = tl.load(tile + 6).to(tl.int64)
        w_col = tl.load(tile + 4) + (cs >> log_cpw)
        shift = (cs & ((1 << log_cpw) - 1)) * slot
        ok = o_ok[:, None] & c_ok[None, :]
        words = tl.load(u_codes + o64[:, None] * row_words + w_col[None, :], mask=ok, other=0)
        q = (words >> shift[None, :]) & ((1 << slot) - 1)
        f = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        if UNIFORM_GROUP:  # the BLOCK_O rows lie in one group
            g = o0 // GROUP_SIZE
            s = tl.load(u_scales + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            mn = tl.load(u_mins + g * rank + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        else:
            off = (os_ // GROUP_SIZE)[:, None] * rank + cols[None, :]
            s = tl.load(u_scales + off, mask=ok, other=0.0).to(tl.float32)
            mn = tl.load(u_mins + off, mask=ok, other=0.0).to(tl.float32)
        u = f * s + mn
        # T^T tile (x V * sigma), BLOCK_C x BLOCK_M
        tt = tl.load(T + pos64[None, :] * stride_tm + cols[:, None], mask=c_ok[:, None] & m_ok[None, :], other=0.0)
        acc = tl.dot(u.to(T_COMPUTE), tt.to(T_COMPUTE), acc, input_precision=DOT_PRECISION)

    if HAS_ORDER:
        rows = tl.load(ORDER + pos, mask=m_ok, other=0).to(tl.int64)
    else:
        rows = pos64
    ok = o_ok[:, None] & m_ok[None, :]
    y_ptrs = Y + rows[None, :] * stride_ym + os_[:, None] * stride_yn
    y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(Y.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------- tables
class _Tables(NamedTuple):
    meta: torch.Tensor  # int64 (L, META_COLS) on the device
    tiles: torch.Tensor  # int32 (n_tiles, TILE_COLS) on the device
    max_tiles: int  # most tiles of one tenant (the shrink grid's second dimension)
    max_rank: int


_TABLE_CACHE: "OrderedDict[tuple, _Tables]" = OrderedDict()
_TABLE_CACHE_SIZE = 256


def _tile_rows(delta, block_c: int) -> list[list[int]]:
    """The tile-table entries of one band schedule (see the module docstring); `_slot_tile_rows` for a SlotDelta."""
    if isinstance(delta, SlotDelta):
        return _slot_tile_rows(delta, block_c)
    words_v, words_u = words_per_column(delta.in_features), words_per_column(delta.out_features)
    rows, col, v_off, u_off = [], 0, 0, 0
    for bits, n in delta.bands:
        for c0 in range(0, n, block_c):
            rows.append([bits, col + c0, min(block_c, n - c0), n, v_off + c0, u_off + c0, 0, 0])
        col += n
        v_off += bits * words_v * n
        u_off += bits * words_u * n
    return rows


def _slot_tile_rows(delta: SlotDelta, block_c: int) -> list[list[int]]:
    """Slot-layout tile entries: (bits, first column, columns, slot width, first word in a row, log2(codes per
    word), row_words, 0) per (band, run of <= block_c columns). block_c is a multiple of every codes-per-word (4, 8,
    16, 32), so a run starts at a word boundary."""
    rows = []
    for bits, col, n, word0 in delta.band_layout():
        slot = slot_width(bits)
        cpw = WORD_BITS // slot
        assert block_c % cpw == 0
        for c0 in range(0, n, block_c):
            rows.append([bits, col + c0, min(block_c, n - c0), slot, word0 + c0 // cpw, cpw.bit_length() - 1, delta.row_words, 0])
    return rows


def _tables(deltas: Sequence[PackedDelta], block_c: int, device: torch.device) -> _Tables:
    """Meta and tile tables of `deltas` on `device`, cached by the deltas' tensor addresses and band schedules
    (a delta whose tensors are replaced gets new tables; in-place updates of their values need none)."""
    key = (str(device), block_c) + tuple(
        (type(d).__name__, d.out_features, d.in_features, d.bands) + tuple(t.data_ptr() for t in d.tensors().values()) for d in deltas
    )
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    meta, tiles, max_tiles = [], [], 0
    for d in deltas:
        rows = _tile_rows(d, block_c)
        names = ("v_words", "v_scales", "v_mins", "u_words", "u_scales", "u_mins", "sigma")  # META_COLS 0..6
        if isinstance(d, SlotDelta):
            names = ("v_codes", "v_scales", "v_mins", "u_codes", "u_scales", "u_mins", "sigma")
        ptrs = [getattr(d, name).data_ptr() for name in names]
        meta.append(ptrs + [d.rank, len(tiles), len(rows)])
        tiles += rows
        max_tiles = max(max_tiles, len(rows))
    tables = _Tables(
        meta=torch.tensor(meta, dtype=torch.int64).to(device),
        tiles=torch.tensor(tiles or [[0] * TILE_COLS], dtype=torch.int32).to(device),
        max_tiles=max_tiles,
        max_rank=max(d.rank for d in deltas),
    )
    _TABLE_CACHE[key] = tables
    while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return tables


def _row_blocks(segments: Sequence[tuple[int, int, int]], block_m: int) -> list[list[int]]:
    """(tenant, start, end) segments of the row order -> one (tenant, start, end, 0) entry per BLOCK_M rows."""
    blocks = []
    for tenant, start, end in segments:
        for s in range(start, end, block_m):
            blocks.append([tenant, s, min(s + block_m, end), 0])
    return blocks


# ------------------------------------------------------------------------------------------------ configs
class _Config(NamedTuple):
    block_m: int  # rows of x per program (both kernels)
    block_c: int  # columns per tile-table entry
    block_i: int  # input rows per shrink step (a multiple of 32)
    block_o: int  # output rows per expand program (32 or 64)
    splits: int  # splits of `in` in the shrink (> 1: atomics into a zeroed T)
    rows_per_split: int
    num_warps: int


def _config(rows_per_tenant: int, n_blocks: int, K: int, N: int, group_size: int, max_tiles: int, device) -> _Config:
    """Tile sizes (GPU and interpreter alike, so that the interpreter tests run the GPU's code paths).

    rows_per_tenant: the most rows one tenant has (M for delta_linear); n_blocks: row-block programs.
    block_i / block_o divide group_size when they can (then one scale / min per column and tile: cheaper);
    decode (<= 16 rows) uses block_i = 128 for fewer fixed costs per element. block_o = 64 halves the expand's
    per-tile costs but needs enough output blocks to fill the SMs, else 32. Instruction counts per element
    from the sm_90 SASS of these choices are in the module docstring; the timings are still to be taken."""
    block_m = 16 if rows_per_tenant <= 16 else 32 if rows_per_tenant <= 32 else 64
    block_i = next((b for b in ((128, 64, 32) if block_m == 16 else (64, 32)) if group_size % b == 0), 64)
    block_o = 64 if group_size % 64 == 0 else 32
    if block_o == 64 and n_blocks * cdiv(N, 64) < target_programs(device):
        block_o = 32
    # splits of `in`: until about 4 programs per SM (4 programs in the interpreter)
    target = target_programs(device, per_sm=4) if device.type == "cuda" else 4
    steps = cdiv(K, block_i)
    splits = max(1, min(steps, cdiv(target, max(1, n_blocks * max_tiles))))
    rows_per_split = cdiv(steps, splits) * block_i
    return _Config(block_m, BLOCK_C, block_i, block_o, cdiv(K, rows_per_split), rows_per_split, 4)


def _new_workspace(shape: tuple, zero: bool, device: torch.device) -> torch.Tensor:
    """An fp32 T buffer ((x V) * sigma): (rows, cols), or (splits, rows, cols) for the deterministic path's
    per-split slices. Zeroed when the shrink adds into it; tests replace this to poison it."""
    if zero:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


_BLOCK_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def _block_table(segments: Sequence[tuple[int, int, int]], block_m: int, device: torch.device) -> torch.Tensor:
    """The row-block table on the device (cached for delta_linear's one segment, which depends on M only)."""
    key = (str(device), block_m, tuple(segments)) if len(segments) == 1 else None
    if key is not None and key in _BLOCK_CACHE:
        return _BLOCK_CACHE[key]
    blocks = torch.tensor(_row_blocks(segments, block_m), dtype=torch.int32).to(device)
    if key is not None:
        _BLOCK_CACHE[key] = blocks
        while len(_BLOCK_CACHE) > _TABLE_CACHE_SIZE:
            _BLOCK_CACHE.popitem(last=False)
    return blocks


def _add_deltas(
    x2d: torch.Tensor,
    y2d: torch.Tensor,
    deltas: Sequence[PackedDelta],
    segments: Sequence[tuple[int, int, int]],
    order: Optional[torch.Tensor],
    deterministic: bool = False,
) -> None:
    """y2d[row] += delta part of the row's tenant, in place: the two Triton launches (on x2d's device).

    segments: (tenant, start, end) runs of positions; position p is row order[p] of x2d / y2d (row p when
    `order` is None). Every position in a segment holds a row of that tenant. All deltas share a group size.
    When the shrink splits `in` (decode), its splits are added with fp32 atomics into a zeroed T, in whatever
    order the programs run (the last bits of y vary from run to run); with `deterministic` each split stores its
    own slice of a (splits, M, k) buffer instead, summed in a fixed order by one torch reduction (which replaces
    the atomic path's memset: the same number of launches)."""
    segments = [s for s in segments if s[2] > s[1] and deltas[s[0]].rank > 0]
    if not segments:
        return
    device = x2d.device
    M, K = x2d.shape
    N = y2d.shape[1]
    group_size = int(deltas[0].group_size)
    rows_per_tenant = max(end - start for _, start, end in segments)
    block_m = _config(rows_per_tenant, 1, K, N, group_size, 1, device).block_m
    tables = _tables(deltas, BLOCK_C, device)
    blocks = _block_table(segments, block_m, device)
    cfg = _config(rows_per_tenant, blocks.shape[0], K, N, group_size, tables.max_tiles, device)
    slots = isinstance(deltas[segments[0][0]], SlotDelta)  # one layout per launch pair (the segments' tenants)
    if any(isinstance(deltas[s[0]], SlotDelta) != slots for s in segments):
        raise TypeError("_add_deltas serves one layout per launch pair: segments of PackedDelta or of SlotDelta tenants.")
    if slots and x2d.dtype == torch.float32 and cfg.block_i > SLOT_FP32_BLOCK_I:
        # exact fp32 dots run on the FMA units: the slot shrink's 32- and 64-row steps spill at BLOCK_M = 64 (static
        # sm_90 check); rows_per_split stays a multiple of the smaller step
        cfg = cfg._replace(block_i=SLOT_FP32_BLOCK_I)
    atomic = cfg.splits > 1 and not deterministic
    if cfg.splits > 1 and deterministic:
        t_shrink = _new_workspace((cfg.splits, M, tables.max_rank), False, device)
    else:
        t_shrink = _new_workspace((M, tables.max_rank), atomic, device)
    stride_ts = t_shrink.stride(0) if t_shrink.dim() == 3 else 0
    order_arg = order if order is not None else blocks  # a placeholder, never read without HAS_ORDER
    common = dict(
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, HAS_ORDER=order is not None,
        DOT_PRECISION=dot_precision(x2d.dtype), num_warps=cfg.num_warps,
    )  # fmt: skip
    with launch_device(x2d):
        if slots:  # the version-2 layout: the same launches, slot-decoding kernels
            _slot_delta_shrink_kernel[(blocks.shape[0], tables.max_tiles, cfg.splits)](
                x2d, order_arg, blocks, tables.meta, tables.tiles, t_shrink,
                K, cfg.rows_per_split,
                x2d.stride(0), x2d.stride(1), stride_ts, t_shrink.stride(-2),
                BLOCK_I=cfg.block_i, ATOMIC=atomic, UNIFORM_GROUP=group_size % cfg.block_i == 0,
                COMPUTE=compute_dtype(x2d.dtype), **common,
            )  # fmt: skip
            t_buf = t_shrink.sum(0) if t_shrink.dim() == 3 else t_shrink
            _slot_delta_expand_kernel[(blocks.shape[0], cdiv(N, cfg.block_o))](
                t_buf, order_arg, blocks, tables.meta, tables.tiles, y2d,
                N,
                t_buf.stride(0), y2d.stride(0), y2d.stride(1),
                BLOCK_O=cfg.block_o, UNIFORM_GROUP=group_size % cfg.block_o == 0,
                T_COMPUTE=intermediate_compute(x2d.dtype), **common,
            )  # fmt: skip
            return
        _delta_shrink_kernel[(blocks.shape[0], tables.max_tiles, cfg.splits)](
            x2d, order_arg, blocks, tables.meta, tables.tiles, t_shrink,
            K, words_per_column(K), cfg.rows_per_split,
            x2d.stride(0), x2d.stride(1), stride_ts, t_shrink.stride(-2),
            BLOCK_I=cfg.block_i, ATOMIC=atomic, UNIFORM_GROUP=group_size % cfg.block_i == 0,
            COMPUTE=compute_dtype(x2d.dtype), **common,
        )  # fmt: skip
        # splits in a fixed order; entries no program wrote (other tenants' columns) are summed but never read
        t_buf = t_shrink.sum(0) if t_shrink.dim() == 3 else t_shrink
        _delta_expand_kernel[(blocks.shape[0], cdiv(N, cfg.block_o))](
            t_buf, order_arg, blocks, tables.meta, tables.tiles, y2d,
            N, words_per_column(N),
            t_buf.stride(0), y2d.stride(0), y2d.stride(1),
            BLOCK_O=cfg.block_o, UNIFORM_GROUP=group_size % cfg.block_o == 0,
            T_COMPUTE=intermediate_compute(x2d.dtype), **common,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ checks
def check_delta(delta, in_features: int, out_features: int, device: torch.device, name: str = "delta") -> None:
    """A PackedDelta (format version 1) or SlotDelta (version 2) for this layer, consistent with its bands, on x's
    device (ValueError / TypeError)."""
    if not isinstance(delta, (PackedDelta, SlotDelta)):
        raise TypeError(f"{name} must be a PackedDelta or SlotDelta, got {type(delta).__name__}.")
    if (delta.out_features, delta.in_features) != (out_features, in_features):
        raise ValueError(
            f"{name} is for a ({delta.out_features} x {delta.in_features}) layer, but weight is "
            f"({out_features} x {in_features}) (out_features x in_features)."
        )
    if int(delta.group_size) < 1:
        raise ValueError(f"{name}.group_size must be >= 1, got {delta.group_size}.")
    delta.check(name)
    for field, t in delta.tensors().items():
        if t.device != device:
            raise ValueError(
                f"{name}.{field} is on {t.device} but x is on {device}: move the adapter to x's device with "
                f"{name} = {name}.to({str(device)!r}) (PackedDelta.to) once, not per call."
            )


def _contiguous(delta: PackedDelta) -> PackedDelta:
    """The delta with contiguous tensors (a strided view, e.g. a slice of a stacked sigma, is copied once here): the
    kernels index every tensor as contiguous."""
    fields = delta.tensors()
    if all(t.is_contiguous() for t in fields.values()):
        return delta
    return dataclasses.replace(delta, **{k: t.contiguous() for k, t in fields.items()})


def _kernel_layout_problem(deltas: Sequence[PackedDelta]) -> Optional[str]:
    """Why the kernels cannot read these deltas (they take contiguous tensors with int32 offsets), or None."""
    for j, d in enumerate(deltas):
        for field, t in d.tensors().items():
            if not t.is_contiguous():
                return f"delta {j}'s {field} is not contiguous (call .contiguous() on it once)"
            if t.numel() > MAX_INT32:
                return f"delta {j}'s {field} has more than 2^31 - 1 elements"
    return None


def _backend(x: torch.Tensor, deltas: Sequence[PackedDelta], backend: Optional[str]) -> str:
    # rank 1 for dispatch: the delta kernels tile k, so its rank limit for register tiles does not apply
    chosen = choose_backend(x, 1, backend)
    if chosen == "triton":
        problem = _kernel_layout_problem(deltas)
        if problem:
            if backend == "triton":
                raise RuntimeError(f"backend='triton' cannot run here: {problem}.")
            return "reference"
    return chosen


def _deterministic(requested: Optional[bool]) -> bool:
    return torch.are_deterministic_algorithms_enabled() if requested is None else bool(requested)


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rows(x: torch.Tensor, features: int) -> torch.Tensor:
    x2d = x.reshape(-1, features)
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _base(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """cuBLAS: y = x W^T + b in x's dtype, contiguous (M, out)."""
    with torch.autocast(x2d.device.type, enabled=False):
        return F.linear(x2d, weight, bias).contiguous()


# ------------------------------------------------------------------------------------------- entry points
def delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    delta: PackedDelta,
    backend: Optional[str] = None,
    deterministic: Optional[bool] = None,
    decode: Optional[bool] = None,
    cache_relayout: bool = False,
) -> torch.Tensor:
    """y = x W^T + b + ((x V) * sigma) U^T with U, V dequantised from `delta` on the fly (module docstring).

    The kernels read `delta` in its own layout and never keep a second copy of it:
      - a SlotDelta (version 2, what the Delta-CoMe tuner's layers hold): <= 16 rows of x (`decode_path`) run the
        fused GEMV + delta of kernels/delta_decode.py, more rows (or decode=False) the two slot kernels below;
      - a PackedDelta (version 1, bit planes): the two bit-plane kernels at every size. cache_relayout=True (opt-in)
        lets its decode run the fused kernel on a slot copy converted once and kept beside it
        (delta_decode.cached_relayout): the compressed delta is then held twice in memory. To get the fused decode
        with one copy, convert once (SlotDelta.from_packed) and keep only the SlotDelta.
    decode: None (automatic), False (never the fused decode), True (the fused decode, else a ValueError; with a
    PackedDelta it needs cache_relayout=True).

    x (..., in) fp16 / bf16 / fp32 (float64 runs on the reference), weight (out, in), bias (out,) or None,
    delta a PackedDelta of an (out x in) layer on x's device. backend: None (automatic), "triton" or
    "reference". deterministic: bitwise-reproducible output (no fp32 atomics, see `_add_deltas`); None (default)
    follows `torch.are_deterministic_algorithms_enabled()`. Raises ValueError / TypeError on bad shapes, dtypes
    or devices.
    """
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):  # autocast first, as F.linear
        x, weight, bias = autocast_base(x, weight, bias)
    in_features, out_features = check_base(x, weight, bias)
    check_same_device(x=x, weight=weight, bias=bias)
    check_delta(delta, in_features, out_features, x.device)
    delta = _contiguous(delta)
    chosen = _backend(x, [delta], backend)
    if chosen == "reference" or _needs_grad(x, weight, bias):
        return reference_delta_linear(x, weight, bias, delta)
    x2d = _rows(x, in_features)
    slots = isinstance(delta, SlotDelta)
    if decode and not (slots or cache_relayout):
        raise ValueError(
            "decode=True runs the fused decode, which reads the version-2 slot layout: pass a SlotDelta "
            "(SlotDelta.from_packed(delta), converted once) or cache_relayout=True (keeps a second, slot copy)."
        )
    if (slots or cache_relayout) and decode_path(x2d, weight, decode):
        sd = delta if slots else slot_delta(delta, cache=True)
        y2d = fused_decode(x2d, weight, None if bias is None else bias.contiguous(), sd)
        return y2d.view(*x.shape[:-1], out_features)
    y2d = _base(x2d, weight, bias)
    _add_deltas(x2d, y2d, [delta], [(0, 0, x2d.shape[0])], None, _deterministic(deterministic))
    return y2d.view(*x.shape[:-1], out_features)


def decode_path(x2d: torch.Tensor, weight: torch.Tensor, decode: Optional[bool] = None) -> bool:
    """Whether delta_linear runs the fused decode (kernels/delta_decode.py): <= 16 rows and a weight with unit
    column stride (the fused GEMV reads W rows directly; a transposed view would need a copy per call) and a Triton
    that compiles the kernel (`fused_decode_supported`: 3.3 or later), unless `decode=False`. `decode=True` when one
    of these fails raises, naming it."""
    problems = []
    if x2d.shape[0] > DECODE_MAX_ROWS:
        problems.append(f"at most {DECODE_MAX_ROWS} rows of x (got {x2d.shape[0]})")
    if weight.stride(1) != 1:
        problems.append(f"a weight with unit column stride (got strides {tuple(weight.stride())})")
    if not fused_decode_supported():
        import triton

        problems.append(f"Triton >= {'.'.join(map(str, FUSED_DECODE_MIN_TRITON))} (installed: {triton.__version__}; upgrade "
                        f"triton, or let the slot kernels serve decode)")  # fmt: skip
    if decode and problems:
        raise ValueError(f"decode=True needs {' and '.join(problems)}; pass decode=None to choose automatically.")
    return not problems if decode is None else bool(decode)


def delta_linear_gathered(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    deltas: Sequence[PackedDelta],
    adapter_index: torch.Tensor,
    backend: Optional[str] = None,
    check_index: bool = True,
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """Multi-tenant batch: row i (or sequence i) of x adds deltas[adapter_index[i]]; -1 adds nothing; the base
    GEMM runs once for all rows, the deltas in one pair of launches.

    deltas: PackedDelta and / or SlotDelta, each read in its own layout (no conversion, no copy kept): the tenants
    of each layout get one pair of launches (two pairs when the list mixes layouts).
    adapter_index: integer tensor, one per row of x (shape x.shape[:-1]) or per sequence ((x.shape[0],), x with
    >= 3 dims), on any device (a CPU index costs no device sync to sort). Every delta must be for this layer's
    (out x in) shape, and all share one group_size (their band schedules may differ). check_index: ValueError
    for an index outside [-1, len(deltas)); with check_index=False such rows come out NaN on the Triton path
    (base only on the reference). deterministic: as in `delta_linear`.
    """
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        x, weight, bias = autocast_base(x, weight, bias)
    in_features, out_features = check_base(x, weight, bias)
    check_same_device(x=x, weight=weight, bias=bias)
    if isinstance(deltas, (PackedDelta, SlotDelta)) or len(deltas) == 0:
        raise ValueError("deltas must be a non-empty sequence of PackedDelta / SlotDelta (use delta_linear for one delta).")
    deltas = list(deltas)
    for j, d in enumerate(deltas):
        check_delta(d, in_features, out_features, x.device, name=f"deltas[{j}]")
    deltas = [_contiguous(d) for d in deltas]
    group_sizes = sorted({int(d.group_size) for d in deltas})
    if len(group_sizes) > 1:
        raise ValueError(
            f"deltas have group sizes {group_sizes}; the deltas served together on one layer must share one "
            f"group_size (their band schedules may differ)."
        )
    check_index_dtype(adapter_index)
    row_index = rows_adapter_index(adapter_index, x.shape)
    L = len(deltas)
    if check_index:
        check_adapter_index(row_index, L, no_entry="no delta", entries="{count} deltas")

    chosen = _backend(x, deltas, backend)
    if chosen == "reference" or _needs_grad(x, weight, bias):
        return reference_delta_linear_gathered(x, weight, bias, deltas, row_index.view(x.shape[:-1]))

    x2d = _rows(x, in_features)
    y2d = _base(x2d, weight, bias)
    # bucket 0: no delta, 1..L: deltas, L + 1: out of range (check_index=False)
    valid = (row_index >= -1) & (row_index < L)
    bucket = torch.where(valid, row_index + 1, torch.full_like(row_index, L + 1))
    order = torch.argsort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=L + 2).tolist()  # the one host sync (sizes the grid)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    segments = [(j, starts[j + 1], starts[j + 2]) for j in range(L)]
    order_dev = order.to(device=x.device, dtype=torch.int32, non_blocking=True)
    for layout in (PackedDelta, SlotDelta):  # one launch pair per layout present (tenants keep their indices)
        mine = [s for s in segments if isinstance(deltas[s[0]], layout)]
        if mine:
            _add_deltas(x2d, y2d, deltas, mine, order_dev, _deterministic(deterministic))
    if counts[L + 1]:
        y2d.index_fill_(0, order_dev[starts[L + 1] :].long(), float("nan"))
    return y2d.view(*x.shape[:-1], out_features)
