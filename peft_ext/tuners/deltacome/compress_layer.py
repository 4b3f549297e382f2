"""One layer's delta -> its compressed tensors (Delta-CoMe or a baseline at the same budget), with a report row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from peft_ext.kernels.delta_format import PackedDelta, pack_bitplanes
from peft_ext.kernels.sign_format import SignDelta

from .bands import lowrank_rank, solve_bands
from .gptq import gptq_u_side, gptq_v_side


@dataclass
class LayerResult:
    name: str
    tensors: dict  # buffer name -> tensor (what the adapter stores)
    bands: list  # (n_cols, bits) pairs as saved in the config
    nbytes: int
    dense_nbytes: int  # the fp16 dense delta
    rel_error: float  # ||dW - dW_hat||_F / ||dW||_F
    rel_output_error: Optional[float] = None  # the same on calibration inputs: tr(E H E^T) / tr(dW H dW^T), sqrt
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.nbytes / self.dense_nbytes

    def row(self) -> dict:
        return {
            "module": self.name, "bands": self.bands, "bytes": self.nbytes, "dense_fp16_bytes": self.dense_nbytes,
            "ratio": round(self.ratio, 6), "rel_error": round(self.rel_error, 6),
            "rel_output_error": None if self.rel_output_error is None else round(self.rel_output_error, 6),
        }


def compress_layer(
    name: str, delta: torch.Tensor, method: str, budget: float, schedule, group_size: int,
    hessian: Optional[torch.Tensor] = None, damp: float = 0.01,
) -> LayerResult:
    """delta: (out, in) fp32 on the device to compute on; hessian: (in, in) sum of x x^T of the layer's inputs
    (None: round-to-nearest; always None for the baselines, which have no quantisation step to calibrate)."""
    if not torch.isfinite(delta).all():
        raise ValueError(f"{name}: the fine-tuned or base weights hold NaN or inf; fix the checkpoints before compressing.")
    out_features, in_features = delta.shape
    dense_nbytes = out_features * in_features * 2
    if method == "bitdelta":
        sign = SignDelta.from_delta(delta)
        approx = sign.dense(torch.float32).to(delta.device)
        tensors, bands, nbytes = {"sign_words": sign.words, "sign_alpha": sign.alpha}, [], sign.nbytes
    elif method == "lowrank":
        r = lowrank_rank(out_features, in_features, budget)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        a, b = (s[:r, None] * vh[:r]).half().contiguous(), u[:, :r].half().contiguous()
        approx = b.float() @ a.float()
        tensors, bands, nbytes = {"lowrank_a": a, "lowrank_b": b}, [[r, 16]], (a.numel() + b.numel()) * 2
    else:
        packed = _deltacome(name, delta, budget, schedule, group_size, hessian, damp)
        approx = packed.dense(torch.float32)
        tensors, bands, nbytes = packed.tensors(), [[n, bits] for bits, n in packed.bands], packed.nbytes
    err = delta - approx
    rel = float(err.norm() / delta.norm().clamp_min(1e-30))
    rel_out = None
    if hessian is not None:
        h = hessian.to(delta.device).float()
        num = torch.einsum("oi,ij,oj->", err, h, err)
        den = torch.einsum("oi,ij,oj->", delta, h, delta).clamp_min(1e-30)
        rel_out = float((num / den).clamp_min(0).sqrt())
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return LayerResult(name, cpu, bands, nbytes, dense_nbytes, rel, rel_out)


def _deltacome(name, delta, budget, schedule, group_size, hessian, damp) -> PackedDelta:
    out_features, in_features = delta.shape
    bands = solve_bands(out_features, in_features, budget, schedule, group_size, name)
    k = sum(n for _, n in bands)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, s, v = u[:, :k], s[:k], vh[:k].T
    bits = torch.tensor([b for b, n in bands for _ in range(n)], dtype=torch.int64)
    codes_v, scales_v, mins_v, vq = gptq_v_side(v, bits, group_size, hessian, damp)
    h_z = None
    if hessian is not None:  # the U side's inputs are z = sigma * (Vq^T x): H_z = diag(s) Vq^T H_x Vq diag(s)
        vs = vq * s
        h_z = vs.T @ hessian.to(vs.device).float() @ vs
    codes_u, scales_u, mins_u, _ = gptq_u_side(u, bits, group_size, h_z, damp)
    sides = {}
    for side, codes in (("v", codes_v), ("u", codes_u)):
        words, col = [], 0
        for b, n in bands:
            words.append(pack_bitplanes(codes[:, col : col + n], b).reshape(-1))
            col += n
        sides[f"{side}_words"] = torch.cat(words) if words else torch.zeros(0, dtype=torch.int32, device=delta.device)
    return PackedDelta(
        out_features, in_features, group_size, bands, sigma=s.float().contiguous(),
        v_scales=scales_v, v_mins=mins_v, u_scales=scales_u, u_mins=mins_u, **sides,
    )
