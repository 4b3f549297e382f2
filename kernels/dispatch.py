"""Backend choice, argument checks and small launch helpers shared by the kernel modules.

Which implementation runs (`choose_backend`):
  - "triton" when x is a CUDA tensor and triton imports, or when the Triton interpreter is on
    (TRITON_INTERPRET=1, the CI tests) and x is a CPU tensor;
  - "reference" (plain PyTorch, kernels/reference.py) everywhere else: CPU without the interpreter, other
    devices, float64 (the Triton kernels handle float16 / bfloat16 / float32 only), rank above MAX_TRITON_RANK.
  `backend="reference"` / `"triton"` forces one (a forced "triton" that cannot run raises).

Kernels are compiled lazily (`lazy_jit`): `triton.jit` reads TRITON_INTERPRET when it wraps a function, so a
kernel wrapped at import would be stuck in the mode of the moment of import (`import peft` already imports
triton). `lazy_jit` wraps the Python function at its first launch in each mode instead, so setting or clearing
TRITON_INTERPRET at any time before a launch takes effect (the tests set it per test). One consequence: the
kernels use only Triton builtins (tl.load/store/dot/where/full/trans/...), never triton.language's
standard-library helpers (tl.sum, tl.max, tl.zeros, tl.cdiv, tl.cumsum): those are themselves jit functions
created when triton is imported and cannot run in the interpreter if triton was imported with it off.

Launch rules shared by every kernel module: each launch runs inside `launch_device(input)` (Triton launches on
the current CUDA device, not on the device of its pointers); vectors a kernel indexes as `PTR + i` (bias,
scales) are made contiguous at the launch; intermediates of fp16 inputs are kept in fp32
(`intermediate_dtype` / `intermediate_compute`: fp16's range is too small for them under loss scaling).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types
from typing import Optional

import torch

try:  # triton is a Linux-only dependency; without it everything runs on the reference
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # lets the kernel signatures be defined (never compiled)
    HAS_TRITON = False

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_RANK = 128  # larger ranks run on the reference (register tiles are BLOCK_M x next_pow2(r))
BACKENDS = ("triton", "reference")


# ------------------------------------------------------------------------------------------------ backend
def interpret_mode() -> bool:
    """True when Triton's interpreter is on (TRITON_INTERPRET read now, the way triton.jit reads it)."""
    if HAS_TRITON and hasattr(triton, "knobs"):  # triton >= 3.4; older ones read the variable as below
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def choose_backend(x: torch.Tensor, rank: int, backend: Optional[str] = None) -> str:
    """"triton" or "reference" for an input `x` and adapter rank (see the module docstring)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}.")
        if backend == "triton":
            reason = _triton_unusable(x, rank)
            if reason:
                raise RuntimeError(f"backend='triton' cannot run here: {reason}.")
        return backend
    return "reference" if _triton_unusable(x, rank) else "triton"


def _triton_unusable(x: torch.Tensor, rank: int) -> Optional[str]:
    if not HAS_TRITON:
        return "triton is not installed"
    if x.dtype not in TRITON_DTYPES:
        return f"the Triton kernels take float16/bfloat16/float32, not {x.dtype}"
    if rank > MAX_TRITON_RANK:
        return f"rank {rank} > {MAX_TRITON_RANK}"
    if x.is_cuda:
        return None
    if x.device.type == "cpu" and interpret_mode():
        return None
    return f"x is on {x.device} (Triton runs on CUDA, or on CPU with TRITON_INTERPRET=1)"


# -------------------------------------------------------------------------------------------- lazy jit
class LazyKernel:
    """A Triton kernel that is `triton.jit`-wrapped at its first launch in each mode (GPU / interpreter)."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled = {}
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        mode = interpret_mode()
        kernel = self._compiled.get(mode)
        if kernel is None:
            kernel = self._compiled[mode] = triton.jit(self.fn)
        return kernel[grid]


def lazy_jit(fn):
    return LazyKernel(fn)


# ------------------------------------------------------------------------------------------- launch helpers
def compute_dtype(dtype: torch.dtype):
    """The Triton dtype tiles are computed in. The interpreter runs bf16/fp16 math on raw bits (wrong
    results, design/platform.md section 3), so there every tile is upcast to fp32 right after its load;
    on the GPU bf16/fp16 tiles stay as they are (tensor-core dots with fp32 accumulation)."""
    if dtype == torch.float32 or interpret_mode():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of the low-rank intermediates (LoRA's xa = x A^T and dyb = dy B) for inputs of `dtype`:
    fp32 for fp16 inputs, whose range (65504) a loss-scaled dy B or an outlier x A^T can exceed; otherwise the
    inputs' dtype (bf16 has fp32's range, and rounding xa / dyb to bf16 is the documented dtype rule)."""
    return torch.float32 if dtype == torch.float16 else dtype


def intermediate_compute(dtype: torch.dtype):
    """The Triton dtype of the dots that read an intermediate (LoRA's xa / dyb, the delta kernels' T = (x V) sigma)
    for inputs of `dtype`: fp32 for fp16 inputs, so nothing is rounded to fp16's range (on the GPU these dots run
    on TF32 tensor cores: `dot_precision` gives "tf32" for fp16 inputs, fp16's 10-bit mantissa with fp32's
    range); otherwise `compute_dtype`."""
    return tl.float32 if dtype == torch.float16 else compute_dtype(dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting: exact ("ieee") unless TF32 is allowed for CUDA matmuls.
    (Ignored for bf16/fp16 operands and by the interpreter. For fp16 inputs it is "tf32": their dots with fp32
    operands, see `intermediate_compute`, keep fp16's precision.)"""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def launch_device(t: torch.Tensor):
    """Context manager around a kernel launch: makes `t`'s CUDA device the current one (Triton launches on the
    current device and its current stream, whatever device the pointers live on), a no-op off CUDA. Every launch
    of peft_ext.kernels runs inside one, with the device of the launch's input."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def block_r(rank: int) -> int:
    """Rank padded for tl.dot (at least 16, a power of two); padded columns are masked to zero."""
    return max(16, next_pow2(rank))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device, per_sm: int = 1) -> int:
    """About how many programs fill the device: `per_sm` per SM on a GPU; 4 under the interpreter, whose
    cost grows with programs x loop steps."""
    if device.type == "cuda":
        return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------------ checks
def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{name} has dtype {t.dtype}; the low-rank kernels take floating-point tensors "
            f"(float16, bfloat16, float32; float64 runs on the reference)."
        )


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}.")


def check_rank(rank: int, in_features: int, out_features: int) -> None:
    if rank < 1:
        raise ValueError(f"adapter rank must be >= 1, got {rank}.")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"adapter rank r={rank} is larger than the layer allows: r must be <= min(in_features, out_features) "
            f"= min({in_features}, {out_features}) = {min(in_features, out_features)}."
        )


def check_base(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[int, int]:
    """Checks x (..., in) / weight (out, in) / bias (out,); returns (in_features, out_features)."""
    check_float("x", x)
    check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}.")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"x's last dimension must be in_features={in_features} (weight {tuple(weight.shape)}), "
            f"got x of shape {tuple(x.shape)}."
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}.")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"x ({x.dtype}), weight ({weight.dtype}) and bias ({None if bias is None else bias.dtype}) must have one "
            f"dtype (or run under torch.autocast); only the adapter weights may differ."
        )
    return in_features, out_features


def autocast_base(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Under torch.autocast, cast x / weight / bias to the autocast dtype, as F.linear would. The adapter
    weights are left alone (the kernels cast their tiles; the reference casts the small matrices)."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or not t.dtype.is_floating_point or t.dtype == dtype else t.to(dtype)

    return cast(x), cast(weight), cast(bias)


def check_dropout(dropout_p: float) -> float:
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}.")
    return p


def check_scale(name: str, scale) -> float:
    if isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor (pass float(scale)).")
    try:
        return float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a Python number, got {type(scale).__name__}.") from None
