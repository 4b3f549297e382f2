"""What the kernel tests share: dtype names, perf.md's error bounds per dtype, the relative error they are checked with."""

import torch

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
TOL = {FP32: 1e-4, FP16: 3e-3, BF16: 1e-2}  # ||out - ref|| / ||ref|| (design/perf.md)


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
