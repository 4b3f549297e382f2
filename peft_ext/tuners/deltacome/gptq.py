"""GPTQ (Frantar et al., 2023) on the singular-vector matrices, as Delta-CoMe does, band-aware.

GPTQ quantises a linear layer's weight one input column at a time and spreads each column's rounding error over
the columns not yet quantised, weighted by the inverse Hessian H = X^T X of the layer's calibration inputs, so
that the layer's *outputs* on real inputs move least. The delta's two factors are two small linear layers:

  V side: t = V^T x, a (k x in) layer on the layer input x; H_x = sum x x^T (in x in). Its input columns are the
          rows of V; groups run along `in`, one grid per (group, singular direction), each direction with its
          band's bit width. This is textbook GPTQ with groups (block size = group size, so each group's grid is
          computed from the already error-corrected values at its start).
  U side: y = U (sigma * t), a (out x k) layer on z = sigma * (Vq^T x); H_z = diag(sigma) Vq^T H_x Vq diag(sigma)
          (k x k), computed from the *quantised* V (true-sequential). Its input columns are the singular
          directions: column j gets its own grid grouped along `out`, fitted right before it is quantised, and
          its error flows to the directions after it.

Without a Hessian (`H=None`) both sides fall back to round-to-nearest. Act-order is not used: it reorders the
columns, which with static groups would need a permutation at inference.
"""

from __future__ import annotations

from typing import Optional

import torch

from peft_ext.kernels.delta_format import MIN_SCALE, codes_on_grid, grid_for_range, quantize_rtn


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of H^-1, mask of dead columns), with H damped by damp * mean(diag). In float64, one
    (in x in) copy alive at a time besides the factor being computed (16 in^2 bytes at the peak: 1.9 GB for a 7B
    down_proj's 11,008 inputs); the damping goes onto the diagonal in place."""
    H = hessian.double()
    if H is hessian:
        H = H.clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(damp * diag.mean())
    for attempt in range(5):  # grow the damping if H is numerically indefinite
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            break
        diag.add_((10**attempt) * damp * diag.mean())
    del H, diag
    Hinv = torch.cholesky_inverse(L)
    del L
    factor = torch.linalg.cholesky(Hinv, upper=True)
    del Hinv
    return factor.float(), dead


def _band_maxq(bits_per_col: torch.Tensor) -> torch.Tensor:
    return (1 << bits_per_col.to(torch.int64)) - 1


def gptq_v_side(v: torch.Tensor, bits_per_col: torch.Tensor, group_size: int, hessian: Optional[torch.Tensor], damp: float = 0.01):
    """Quantises V (in x k). Returns (codes int64 (in, k), scales fp16 (G, k), mins fp16 (G, k), dequantised (in, k))."""
    if hessian is None:
        return _rtn_columns(v, bits_per_col, group_size)
    d, k = v.shape
    W = v.T.float().clone()  # (k rows = directions, d input columns)
    Hinv, dead = inverse_hessian_factor(hessian.to(W.device), damp)
    W[:, dead] = 0.0
    maxq = _band_maxq(bits_per_col).to(W.device).float().unsqueeze(1)  # (k, 1)
    groups = -(-d // group_size)
    codes = torch.zeros(k, d, dtype=torch.int64, device=W.device)
    deq = torch.zeros_like(W)
    scales = torch.zeros(groups, k, dtype=torch.float16, device=W.device)
    mins = torch.zeros_like(scales)
    for g, i1 in enumerate(range(0, d, group_size)):
        i2 = min(i1 + group_size, d)
        W1 = W[:, i1:i2].clone()
        lo, hi = W1.amin(dim=1), W1.amax(dim=1)
        scale, low = _grid_per_row(lo, hi, maxq.squeeze(1))
        scales[g], mins[g] = scale, low
        Err1 = torch.zeros_like(W1)
        H1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.minimum(codes_on_grid(w, scale, low, 255), maxq.squeeze(1).long())
            dq = q.float() * scale.float() + low.float()
            codes[:, i1 + i], deq[:, i1 + i] = q, dq
            err = (w - dq) / H1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes.T.contiguous(), scales, mins, deq.T.contiguous()


def gptq_u_side(u: torch.Tensor, bits_per_col: torch.Tensor, group_size: int, hessian: Optional[torch.Tensor], damp: float = 0.01, block: int = 128):
    """Quantises U (out x k), direction by direction with error feedback over H_z (k x k). Same returns as V."""
    if hessian is None:
        return _rtn_columns(u, bits_per_col, group_size)
    d, k = u.shape
    W = u.float().clone()  # (d rows = outputs, k input columns = directions)
    Hinv, dead = inverse_hessian_factor(hessian.to(W.device), damp)
    W[:, dead] = 0.0
    groups = -(-d // group_size)
    row_group = torch.arange(d, device=W.device) // group_size
    codes = torch.zeros(d, k, dtype=torch.int64, device=W.device)
    deq = torch.zeros_like(W)
    scales = torch.zeros(groups, k, dtype=torch.float16, device=W.device)
    mins = torch.zeros_like(scales)
    maxqs = _band_maxq(bits_per_col).tolist()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        H1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j, w = i1 + i, W1[:, i]
            padded = torch.zeros(groups * group_size, device=W.device)
            padded[:d] = w
            valid = torch.arange(groups * group_size, device=W.device) < d
            lo = torch.where(valid, padded, torch.inf).view(groups, group_size).amin(dim=1)
            hi = torch.where(valid, padded, -torch.inf).view(groups, group_size).amax(dim=1)
            bits = int(bits_per_col[j])
            scale, low = grid_for_range(lo, hi, bits)
            scales[:, j], mins[:, j] = scale, low
            q = codes_on_grid(w, scale[row_group], low[row_group], maxqs[j])
            dq = q.float() * scale.float()[row_group] + low.float()[row_group]
            codes[:, j], deq[:, j] = q, dq
            err = (w - dq) / H1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales, mins, deq


def _grid_per_row(lo: torch.Tensor, hi: torch.Tensor, maxq: torch.Tensor):
    scale = ((hi - lo) / maxq).clamp_min(MIN_SCALE)
    return scale.to(torch.float16), lo.to(torch.float16)


def _rtn_columns(mat: torch.Tensor, bits_per_col: torch.Tensor, group_size: int):
    """Round-to-nearest, band by band (runs of equal bit width)."""
    d, k = mat.shape
    codes = torch.zeros(d, k, dtype=torch.int64, device=mat.device)
    groups = -(-d // group_size)
    scales = torch.zeros(groups, k, dtype=torch.float16, device=mat.device)
    mins = torch.zeros_like(scales)
    bits_list = bits_per_col.tolist()
    start = 0
    while start < k:
        stop = start
        while stop < k and bits_list[stop] == bits_list[start]:
            stop += 1
        c, s, m = quantize_rtn(mat[:, start:stop], bits_list[start], group_size)
        codes[:, start:stop], scales[:, start:stop], mins[:, start:stop] = c, s, m
        start = stop
    row_group = torch.arange(d, device=mat.device) // group_size
    deq = codes.float() * scales.float()[row_group] + mins.float()[row_group]
    return codes, scales, mins, deq
