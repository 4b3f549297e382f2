"""Sibling projections that read the same x (q/k/v, gate/up; vLLM's "slices"): one read of x for all their shrinks.

Each projection i is y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T (W_i frozen; A_i (r_i, K), B_i (N_i, r_i)). With one
`lowrank_linear` per projection (kernels/lowrank.py) every sibling reads x twice more than the frozen base: once in
its forward shrink and once for dA_i. Here the autograd graph is split in two kinds of nodes:

  shrink node   `grouped_shrink(x, [A_1, ..., A_n])` -> [xa_1, ..., xa_n]   (`GroupedShrinkFunction`)
    forward:  the siblings' A_i concatenated (A_cat, sum r_i rows; a copy of the small factors in the compute
              dtype) and ONE `_shrink_expand_kernel` launch without the expand: xa_cat = x A_cat^T, x read once.
              The outputs xa_i are column slices of xa_cat (views, no copy). x itself is passed through as an extra
              output (`grouped_shrink_with_input`'s x_alias, same storage) that the expand nodes take as their x.
    backward: autograd runs it once it holds every d(xa_i) (None for a sibling whose output was not used: zeros)
              and the siblings' dx_i summed into x_alias's gradient. d(xa_cat) = [d(xa_1) ... d(xa_n)] (an
              M x sum r_i copy), then ONE `_wgrad_kernel` pass over x gives every dA_i = d(xa_i)^T x (fp32,
              deterministic split over M), and dx = (sum_i dx_i) + d(xa_cat) A_cat is one cuBLAS GEMM with beta=1
              (written once, as lowrank_linear's dx = dy W + dx_low).
  expand node   `lowrank_expand_linear(x, xa_i, W_i, b_i, B_i, s_i)` -> y_i   (`LowRankExpandFunction`), per sibling
    forward:  y_low = b_i + s_i xa_i B_i^T: `_shrink_expand_kernel` reading xa_i (its shrink an r x r identity,
              exact), writing y_low with lowrank_linear's bits; then the base GEMM with beta=1, y = x W_i^T + y_low,
              as `lowrank_linear` does (its epilogue reads y_low).
    backward: ONE pass over dy_i (`lowrank.dy_pass`, `_dy_pass_kernel`): d(xa_i) = s_i dy_i B_i and, where the
              bytes model says it pays (`lowrank.fuse_db_saves_bytes`), dB_i = s_i dy_i^T xa_i from per-program
              fp32 partials; otherwise dB_i by `_wgrad_kernel` (a second read of dy_i). Then dx_i = dy_i W_i on
              cuBLAS (a plain GEMM: the low-rank part of dx comes once, from the shrink node), db_i = sum of dy_i.

`grouped_lowrank_linear(x, weights, biases, lora_as, lora_bs, scales)` builds one shrink node and the n expand nodes;
peft_ext/tuners/lora_fused.py builds the same graph across the siblings' own forward calls (`accelerate_lora`'s
group_siblings). Dropout is not supported here (each PEFT sibling draws its own mask, so their inputs differ):
such layers take the per-projection path. The concatenated rank must be <= 128 for the Triton path
(`dispatch.MAX_TRITON_RANK`, the register tile); wider groups, CPU tensors without TRITON_INTERPRET=1 and float64
run the plain-PyTorch reference composition (same graph, torch ops). Dtypes follow kernels/lowrank.py: xa_i and
d(xa_i) in `intermediate_dtype` (x's dtype; fp32 for fp16 x), fp32 accumulation, dA_i / dB_i returned in the
factors' dtypes.

Bytes (a MODEL, not a measurement: `grouped_bytes_model`, each operand read or written once per launch, tiles
re-read from L2 not counted, autograd's accumulation of the siblings' dx counted as a read of both and a write per
extra contribution). At the anchor shape of design/kernels_analysis.md 2.1 (TinyLlama: K = 2048, q 2048, k/v 256,
gate/up 5632, M = 8192, r = 16, bf16 activations, fp32 adapter masters), forward + backward of one block's groups,
frozen base GEMMs included:

    q/k/v     one lowrank_linear each (dB fused by its rule)   1070.0 MB    grouped  810.0 MB   (-24.3 %)
    gate/up   one lowrank_linear each                          1622.3 MB    grouped 1493.8 MB   (-7.9 %)

For the whole block (those groups plus o_proj and down_proj on lowrank_linear), the model's traffic on top of the
frozen base's is 2399.5 MB per block before issue 16, 2237.1 MB with dB fused, 1848.6 MB with grouping too: 52.8 ->
49.2 -> 40.7 GB per step of 22 blocks (design/kernels_analysis.md 2.1 counted 51.8 GB before), 18.5 -> 17.3 ->
14.3 ms at perf.md's 2.85 TB/s copy bandwidth (a floor, not a prediction of the time).
(tests/kernels/test_lowrank_grouped.py::test_bytes_model_anchor_numbers; benchmarks/lowrank_kernels.py prints the
extra bytes over the frozen base next to measured times on a GPU). Per extra sibling, grouping saves one read of x
in the forward shrink, one in dA, and the dx_low write + beta=1 read (the low-rank dx comes once, from the shrink
node's beta=1 GEMM on the accumulated dx); it adds the small d(xa) concatenation. Each sibling's expand reads its
xa_i (M x r_i) where lowrank_linear's launch read x, and writes the same y_low.
Not measured: the time of any of this (no GPU was available when it was written).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .dispatch import (
    autocast_base,
    check_base,
    check_float,
    check_rank,
    check_same_device,
    check_scale,
    choose_backend,
    compute_dtype,
    intermediate_compute,
    intermediate_dtype,
    tl,
)
from . import lowrank as _lowrank  # launches through _lowrank.shrink_expand: the one row-block launcher
from .lowrank import (
    _compute_operand,
    _db_bytes,
    _rows,
    _wgrad_config,
    fuse_db_saves_bytes,
    lowrank_bytes_model,
    lowrank_weight_grad,
)
from .reference import lowrank_dtype

__all__ = [
    "GroupedShrinkFunction",
    "LowRankExpandFunction",
    "grouped_bytes_model",
    "grouped_lowrank_linear",
    "grouped_shrink",
    "grouped_shrink_with_input",
    "lowrank_expand_linear",
    "reference_grouped_shrink",
]


def _torch_compute(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of `compute_dtype(dtype)`: what the shrink's tiles of A are computed in (fp32 in the
    interpreter, else the inputs' dtype), so A_cat is cast once to that (as `lowrank._compute_operand`)."""
    return {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}[compute_dtype(dtype)]


# ------------------------------------------------------------------------------------------------ autograd
class GroupedShrinkFunction(torch.autograd.Function):
    """(x, xa_1, ..., xa_n), xa_i = x A_i^T for every sibling in one read of x; backward: every dA_i in one read of
    x, and dx = (the siblings' dx_i, arriving as x's gradient) + d(xa_cat) A_cat in one beta=1 GEMM. Inputs are
    already checked, autocast-resolved and on one device. Called as apply(x, *lora_as)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, *lora_as):
        K = x.shape[-1]
        x2d = _rows(x, K)
        ranks = [a.shape[0] for a in lora_as]
        need_dx = ctx.needs_input_grad[0]
        need_da = any(ctx.needs_input_grad[1:])
        with torch.autocast(x.device.type, enabled=False):
            want = _torch_compute(x2d.dtype)
            a_cat = torch.cat([a.to(want) for a in lora_as])  # (sum r_i, K): the small factors, cast once
            _, xa_cat = _lowrank.shrink_expand(x2d, a_cat, None, 1.0, store_mid=True)
        ctx.save_for_backward(x2d if need_da else None, a_cat if need_dx else None)
        ctx.set_materialize_grads(False)
        ctx.ranks, ctx.x_shape, ctx.a_dtypes = ranks, x.shape, [a.dtype for a in lora_as]
        ctx.mid_dtype, ctx.x_dtype = xa_cat.dtype, x2d.dtype
        if not need_dx:
            ctx.mark_non_differentiable(x)  # the expand nodes then compute no dx_i = dy_i W_i
        outs = torch.split(xa_cat, ranks, dim=1)
        return (x, *(o.view(*x.shape[:-1], r) for o, r in zip(outs, ranks)))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dx_in, *dxas):
        x2d, a_cat = ctx.saved_tensors
        n = len(dxas)
        if all(g is None for g in dxas):
            return (dx_in, *([None] * n))
        M = int(torch.Size(ctx.x_shape[:-1]).numel())
        device = next(g for g in dxas if g is not None).device
        parts = [
            g.reshape(M, r).to(ctx.mid_dtype) if g is not None else torch.zeros(M, r, dtype=ctx.mid_dtype, device=device)
            for g, r in zip(dxas, ctx.ranks)
        ]
        dxa_cat = torch.cat(parts, dim=1) if n > 1 else parts[0]
        dx = None
        das = [None] * n
        with torch.autocast(device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                # dx = (sum of the projections' dy_i W_i, accumulated by autograd into dx_in) + d(xa_cat) A_cat:
                # one cuBLAS GEMM with beta=1 (reads dx_in, writes dx), as lowrank_linear's dx_low.addmm_
                a_mid = a_cat.to(dxa_cat.dtype)
                if dx_in is None:
                    dx = dxa_cat.mm(a_mid).to(ctx.x_dtype)
                elif dxa_cat.dtype == ctx.x_dtype:
                    dx = torch.addmm(dx_in.reshape(M, ctx.x_shape[-1]), dxa_cat, a_mid)
                else:  # fp16 x: the intermediates are fp32 (their product is rounded to fp16 once, then added)
                    dx = dx_in.reshape(M, ctx.x_shape[-1]) + dxa_cat.mm(a_mid).to(ctx.x_dtype)
                dx = dx.view(ctx.x_shape)
            if any(ctx.needs_input_grad[1:]):
                da_cat = lowrank_weight_grad(dxa_cat, x2d, 1.0)  # (sum r_i, K) fp32, one pass over x
                for i, chunk in enumerate(torch.split(da_cat, ctx.ranks, dim=0)):
                    if ctx.needs_input_grad[1 + i]:
                        das[i] = chunk.to(ctx.a_dtypes[i])
        return (dx, *das)


class LowRankExpandFunction(torch.autograd.Function):
    """y = x W^T + b + s xa B^T for one sibling, xa from the shrink node. Inputs checked and autocast-resolved."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, xa, weight, bias, lora_b, scale):
        N, K = weight.shape
        R = lora_b.shape[1]
        x2d = _rows(x, K)
        xa2d = xa.reshape(-1, R)
        need_dx, need_dxa, need_dw, need_db, need_dbb = ctx.needs_input_grad[:5]
        with torch.autocast(x.device.type, enabled=False):
            # y_low = s (xa I) B^T + b: today's `_shrink_expand_kernel` with an r x r identity as its shrink (exact:
            # xa is already rounded to the intermediate dtype, as the fused kernel rounds its mid), so y_low has the
            # bits lowrank_linear's forward gives; then the base GEMM with beta=1, y = x W^T + y_low.
            eye = torch.eye(R, dtype=xa2d.dtype, device=xa2d.device)
            expand = _compute_operand(lora_b, intermediate_compute(x2d.dtype))
            y = torch.empty(x2d.shape[0], N, dtype=x2d.dtype, device=x2d.device)
            _lowrank.shrink_expand(xa2d, eye, expand, scale, bias=bias, store_mid=False, out=y, rules_dtype=x2d.dtype)
            y.addmm_(x2d, weight.t())  # cuBLAS base GEMM, beta=1: y = x W^T + (b + s xa B^T)
        ctx.save_for_backward(
            x2d if need_dw else None,
            weight if need_dx else None,
            lora_b if need_dxa else None,
            xa2d if need_dbb else None,
        )
        ctx.scale, ctx.x_shape, ctx.xa_shape = scale, x.shape, xa.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.b_dtype = lora_b.dtype
        return y.view(*x.shape[:-1], N)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2d, weight, lora_b, xa2d = ctx.saved_tensors
        need_dx, need_dxa, need_dw, need_db, need_dbb = ctx.needs_input_grad[:5]
        N = dy.shape[-1]
        dy2d = _rows(dy, N)
        s = ctx.scale
        dx = dxa = dw = db = dbb = None
        with torch.autocast(dy.device.type, enabled=False):
            R = ctx.xa_shape[-1]
            fuse = need_dxa and need_dbb and fuse_db_saves_bytes(dy2d.shape[0], N, R, dy2d.dtype, dy2d.device)
            if need_dxa:  # one pass over dy: d(xa) = s dy B, and dB's partials when fused
                shrink = _compute_operand(lora_b, compute_dtype(dy2d.dtype)).t()
                done = _lowrank.shrink_expand(dy2d, shrink, None, s, mid_scale=s, wgrad_of=xa2d if fuse else None)
                dxa = done[1].view(ctx.xa_shape)  # (out, mid) or, with wgrad_of / mid_scale != 1, (out, mid, dB)
                dbb = done[2] if fuse else None
            if need_dbb:
                if not fuse:  # a second pass over dy (the rule: fusing would move more bytes)
                    dbb = lowrank_weight_grad(xa2d, dy2d, s, transpose=True)
                dbb = dbb.to(ctx.b_dtype)
            if need_dx:
                dx = torch.mm(dy2d, weight).view(ctx.x_shape)  # cuBLAS: dx_i = dy_i W_i
            if need_dw:
                dw = dy2d.t().mm(x2d)
            if need_db:
                db = dy2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dxa, dw, db, dbb, None


# ------------------------------------------------------------------------------------------------ entry points
def reference_grouped_shrink(x: torch.Tensor, lora_as: Sequence[torch.Tensor]) -> list:
    """[x A_i^T] in the low-rank dtype (`reference.lowrank_dtype`: x's, fp32 for fp16 x), plain PyTorch."""
    low = lowrank_dtype(x.dtype)
    return [F.linear(x.to(low), a.to(low)) for a in lora_as]


def _check_shrink_args(x, lora_as) -> list:
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features), got a 0-d tensor.")
    if not isinstance(lora_as, (list, tuple)) or len(lora_as) == 0:
        raise TypeError(
            f"lora_as must be a non-empty list of the siblings' (r_i, in_features) factors, got {type(lora_as).__name__}"
            f"{'' if not isinstance(lora_as, (list, tuple)) else ' of length 0'}."
        )
    K = x.shape[-1] if x.dim() >= 1 else None
    ranks = []
    for i, a in enumerate(lora_as):
        check_float(f"lora_as[{i}]", a)
        if a.dim() != 2 or a.shape[1] != K or a.shape[0] < 1:
            raise ValueError(
                f"lora_as[{i}] must have shape (r, in_features={K}) with r >= 1 (in_features: x's last dimension, "
                f"x of shape {tuple(x.shape)}), got {tuple(a.shape)}."
            )
        ranks.append(a.shape[0])
    check_same_device(x=x, **{f"lora_as[{i}]": a for i, a in enumerate(lora_as)})
    return ranks


def grouped_shrink_with_input(x: torch.Tensor, lora_as: Sequence[torch.Tensor], backend: Optional[str] = None):
    """(x_alias, [xa_1, ..., xa_n]): `grouped_shrink`'s outputs and x passed through the shrink node (same values and
    storage; under torch.autocast, x in the autocast dtype). The siblings' expand nodes take x_alias as their x, so
    autograd sums their dx_i into the shrink node's incoming gradient and its backward adds d(xa) A_cat with one
    beta=1 GEMM, instead of a separate dx_shrink that autograd would add once more."""
    if isinstance(x, torch.Tensor):
        x, _, _ = autocast_base(x, x, None)
    ranks = _check_shrink_args(x, lora_as)
    if choose_backend(x, sum(ranks), backend) == "reference":
        return x, reference_grouped_shrink(x, lora_as)
    x_alias, *xas = GroupedShrinkFunction.apply(x, *lora_as)
    return x_alias, xas


def grouped_shrink(x: torch.Tensor, lora_as: Sequence[torch.Tensor], backend: Optional[str] = None) -> list:
    """[xa_1, ..., xa_n] with xa_i = x A_i^T (..., r_i), differentiable; on the Triton path one read of x forward
    and one for all dA_i backward (`GroupedShrinkFunction`, module docstring). x (..., in); lora_as: the siblings'
    (r_i, in) factors, any float dtypes. Under torch.autocast x is cast to the autocast dtype first. `backend`:
    None (automatic: the reference when the concatenated rank exceeds 128, on CPU without TRITON_INTERPRET=1, for
    float64), "triton" or "reference"."""
    return grouped_shrink_with_input(x, lora_as, backend)[1]


def lowrank_expand_linear(
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_b: torch.Tensor,
    scale: float,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """y = x W^T + b + scale * xa B^T, differentiable in x, xa, W, b, B (`LowRankExpandFunction`): xa is this
    projection's output of `grouped_shrink(x, ...)` (so x A^T), x (..., in), weight (out, in), bias (out,) or None,
    lora_b (out, r). Under torch.autocast x / weight / bias are cast as F.linear would."""
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        x, weight, bias = autocast_base(x, weight, bias)
    in_features, out_features = check_base(x, weight, bias)
    check_float("xa", xa)
    check_float("lora_b", lora_b)
    if lora_b.dim() != 2 or lora_b.shape[0] != out_features:
        raise ValueError(
            f"lora_b must have shape (out_features={out_features}, r) to match weight {tuple(weight.shape)}, "
            f"got {tuple(lora_b.shape)}."
        )
    rank = lora_b.shape[1]
    if tuple(xa.shape) != (*x.shape[:-1], rank):
        raise ValueError(
            f"xa must have shape {(*x.shape[:-1], rank)} (x's leading dimensions and r = lora_b.shape[1]): pass this "
            f"projection's output of grouped_shrink(x, ...), got {tuple(xa.shape)}."
        )
    low = lowrank_dtype(x.dtype)
    if xa.dtype != low:
        raise TypeError(f"xa has dtype {xa.dtype}; for x of dtype {x.dtype} it must be {low} (grouped_shrink's output).")
    check_rank(rank, in_features, out_features)
    scale = check_scale("scale", scale)
    check_same_device(x=x, xa=xa, weight=weight, bias=bias, lora_b=lora_b)
    if choose_backend(x, rank, backend) == "reference":
        return F.linear(x, weight, bias) + (scale * F.linear(xa, lora_b.to(low))).to(x.dtype)
    return LowRankExpandFunction.apply(x, xa, weight, bias, lora_b, scale)


def grouped_lowrank_linear(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[Optional[torch.Tensor]]],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    backend: Optional[str] = None,
) -> list:
    """[y_1, ..., y_n], y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T for sibling projections that read the same x: one
    shrink node for all (x read once forward, once for every dA_i) and one expand node each (module docstring).
    Same values and gradients as n calls of `lowrank_linear` (dropout 0) up to rounding. `biases` may be None (no
    bias anywhere) or hold None entries. Raises ValueError / TypeError naming the argument on bad shapes, dtypes or
    devices."""
    n = len(weights) if isinstance(weights, (list, tuple)) else None
    if not n:
        raise TypeError("weights must be a non-empty list of the siblings' (out_i, in_features) weights.")
    biases = [None] * n if biases is None else biases
    for name, seq in (("biases", biases), ("lora_as", lora_as), ("lora_bs", lora_bs), ("scales", scales)):
        if not isinstance(seq, (list, tuple)) or len(seq) != n:
            raise ValueError(f"{name} must be a list of {n} entries, one per weight (got {_length(seq)}).")
    _check_shrink_args(x, lora_as)
    for i in range(n):
        check_float(f"weights[{i}]", weights[i])
        if weights[i].dim() != 2:
            raise ValueError(f"weights[{i}] must have shape (out_features, in_features), got {tuple(weights[i].shape)}.")
        scale = check_scale(f"scales[{i}]", scales[i])
        if not math.isfinite(scale):
            raise ValueError(f"scales[{i}] must be a finite number, got {scale}.")
        check_float(f"lora_bs[{i}]", lora_bs[i])
        out_i = weights[i].shape[0] if isinstance(weights[i], torch.Tensor) and weights[i].dim() == 2 else None
        if lora_bs[i].dim() != 2 or tuple(lora_bs[i].shape) != (out_i, lora_as[i].shape[0]):
            raise ValueError(
                f"lora_bs[{i}] must have shape (out_features={out_i}, r={lora_as[i].shape[0]}) to match weights[{i}] and "
                f"lora_as[{i}], got {tuple(lora_bs[i].shape)}."
            )
    x_alias, xas = grouped_shrink_with_input(x, lora_as, backend)
    return [
        lowrank_expand_linear(x_alias, xa, w, b, lb, s, backend)
        for xa, w, b, lb, s in zip(xas, weights, biases, lora_bs, scales)
    ]


def _length(seq) -> str:
    return f"length {len(seq)}" if isinstance(seq, (list, tuple)) else type(seq).__name__


# ------------------------------------------------------------------------------------------------ bytes model
def grouped_bytes_model(
    M: int, K: int, Ns: Sequence[int], R: int, dtype: torch.dtype, adapter_dtype: torch.dtype, device: torch.device,
    backward: bool = True,
) -> dict:
    """A model (not a measurement) of the bytes the siblings' forward (+ backward) moves through device memory,
    grouped (this module) and per projection (one `lowrank_linear` each, `lowrank.lowrank_bytes_model`, dB fused by
    its rule in both). Same conventions as `lowrank_bytes_model`; autograd's accumulation of the several dx
    contributions into one is counted as a read of both and a write per extra contribution. Returns
    {"grouped": {part: bytes, ..., "total"}, "per_projection": {part: bytes, ..., "total"}, "saved": fraction}."""
    n = len(Ns)
    e = torch.finfo(dtype).bits // 8
    e_mid = torch.finfo(intermediate_dtype(dtype)).bits // 8
    e_ad = torch.finfo(adapter_dtype).bits // 8
    x = M * K * e
    per = {f"projection {i} (lowrank_linear)": lowrank_bytes_model(M, K, N, R, dtype, adapter_dtype, device, backward)["total"]
           for i, N in enumerate(Ns)}  # fmt: skip
    if backward:
        per["dx accumulation"] = (n - 1) * 3 * x
    per["total"] = sum(per.values())

    def wgrad(C: int, rank: int) -> int:
        _, _, splits, _ = _wgrad_config(M, C, rank, device, None)
        partials = splits * rank * C * 4
        return M * rank * e_mid + M * C * e + (partials * 2 + rank * C * 4 if splits > 1 else partials)

    RT = n * R
    cast = (e_ad + e) if e_ad > e else 2 * e  # a.to(compute) (a copy either way: .to, or cat's own copy)
    grouped = {
        "A_cat (cast + concatenate)": RT * K * cast + (RT * K * 2 * e if e_ad > e else 0),
        "grouped shrink x": x + RT * K * e + M * RT * e_mid,
    }
    for i, N in enumerate(Ns):
        y, w = M * N * e, N * K * e
        b_cast = N * R * (e_ad + e) if e_ad > e else 0  # fp32 masters cast once (_compute_operand)
        grouped[f"expand {i} (reads xa, writes y_low)"] = b_cast + M * R * e_mid + R * R * e_mid + N * R * e + y
        grouped[f"gemm {i} x W^T + y_low"] = x + w + 2 * y
    if backward:
        for i, N in enumerate(Ns):
            y, w = M * N * e, N * K * e
            fused = fuse_db_saves_bytes(M, N, R, dtype, device)
            b_cast = N * R * (e_ad + e) if e_ad > e else 0
            grouped[f"dy pass {i} (d(xa){', dB fused' if fused else ''})"] = b_cast + y + N * R * e + M * R * e_mid + _db_bytes(
                M, N, R, dtype, device, True) * fused  # fmt: skip
            if not fused:
                grouped[f"wgrad dB {i}"] = _db_bytes(M, N, R, dtype, device, False)
            grouped[f"gemm dy W {i}"] = y + w + x
        grouped["d(xa) concatenate"] = 2 * M * RT * e_mid
        grouped["wgrad dA (all siblings, one x read)"] = wgrad(K, RT)
        grouped["dx = sum dy_i W_i + d(xa) A_cat (beta=1)"] = M * RT * e_mid + RT * K * e + 2 * x
        grouped["dx accumulation"] = (n - 1) * 3 * x
    grouped["total"] = sum(grouped.values())
    return {"grouped": grouped, "per_projection": per, "saved": 1.0 - grouped["total"] / per["total"]}
