"""Static sm_90 checks (no GPU) of the kernels issue 16 added: `_dy_pass_kernel` (kernels/lowrank.py: the backward's
one pass over dy, dB fused in as one fp32 partial per program) as the LoRA backward and the grouped projections'
backward (kernels/lowrank_grouped.py) launch it, and the grouped shrink (`_shrink_expand_kernel` with the siblings'
factors concatenated, no expand). Each is compiled for an H100 the way the JIT specialises it (sm90_static.py) and
checked for: no register spills, within shared memory, and software pipelining (cp.async) of the streamed operand
where the docstrings claim it. Compile results, not timings."""

import functools

import pytest
import torch

from peft_ext.kernels import dispatch
from peft_ext.kernels import lowrank as lowrank_module

from .sm90_static import SM90_SMEM, analyse, compile_sm90

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CUDA = torch.device("cuda")
T = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}


@pytest.fixture
def gpu_choices(monkeypatch):
    """The GPU's config and dtype choices (an H100: 132 SMs)."""
    monkeypatch.setattr(dispatch, "interpret_mode", lambda: False)
    monkeypatch.setattr(lowrank_module, "target_programs", lambda device, per_sm=1: 132 * per_sm, raising=False)
    monkeypatch.setattr(lowrank_module, "interpret_mode", lambda: False, raising=False)


@functools.lru_cache(maxsize=None)  # called under the gpu_choices fixture only
def dy_pass_build(dtype, R: int, fuse_db: bool, expand: bool, keep: bool, M=8192, N=2048, K=2048):
    """`_dy_pass_kernel` as `dy_pass` launches it at the anchor shape (fp32 factors cast to the compute dtype by
    `_compute_operand`, contiguous operands)."""
    cfg = lowrank_module._dy_pass_config(M, R, CUDA, fuse_db)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    t = T[dtype]
    mid_t = T[dispatch.intermediate_dtype(dtype)]
    factor_t = "fp32" if dtype == FP16 else t  # fp16: the dots reading intermediates take fp32 operands
    kernel = compile_sm90(
        lowrank_module._dy_pass_kernel,
        dict(DY=t, B=t, A=factor_t, XA=mid_t, KEEP="u8", MID=mid_t, DX=t, PART="fp32"),
        dict(cfg, DO_DB=fuse_db, STORE_MID=True, DO_EXPAND=expand, HAS_KEEP=keep,
             COMPUTE=dispatch.compute_dtype(dtype), MID_COMPUTE=dispatch.intermediate_compute(dtype),
             DOT_PRECISION=dispatch.dot_precision(dtype)),
        ints=dict(M=M, N=N, K=K, R=R, stride_dm=N, stride_dn=1, stride_bn=R, stride_br=1, stride_ar=K, stride_ak=1,
                  stride_xm=R, stride_xr=1, stride_km=K if keep else 0, stride_kc=1 if keep else 0, stride_mm=R,
                  stride_mr=1, stride_om=K, stride_ok=1, stride_ps=N * R, stride_pn=R, stride_pr=1),
        num_warps=warps, num_stages=stages, float_args=("scale", "mid_scale", "keep_scale"),
    )  # fmt: skip
    return analyse(kernel)


DY_CASES = [  # dtype, r, dB fused, dx_low expand, dropout keep-mask
    (BF16, 16, True, True, False),  # the LoRA backward at the anchor (r = 16: fused)
    (BF16, 16, True, False, False),  # the grouped projections' backward: d(xa) and dB, no dx_low
    (BF16, 16, True, True, True),  # with dropout
    (FP16, 16, True, True, False),  # fp32 intermediates
    (FP32, 16, True, True, False),
    (BF16, 64, True, True, False),  # the widest fused config (the rule fuses r = 64 only for fp32)
    (FP32, 32, True, True, False),
    (BF16, 64, False, False, False),  # grouped backward, not fused (r >= 32, bf16)
    (BF16, 128, False, True, False),
]


@pytest.mark.parametrize("dtype,R,fuse_db,expand,keep", DY_CASES)
def test_dy_pass_kernel_no_spills_and_pipelined(gpu_choices, dtype, R, fuse_db, expand, keep):
    """The dy pass streams dy through cp.async (LDGSTS) in its N loop and spills nothing, with and without the fused
    dB partials (the 128-row program of `_dy_pass_config` holds a 128 x r accumulator, a 128 x 64 tile of dy and a
    64 x r partial)."""
    r = dy_pass_build(dtype, R, fuse_db, expand, keep)
    assert r.spill_stores == 0 and r.spill_loads == 0 and r.local == 0, r.summary()
    assert r.shared <= SM90_SMEM and r.regs <= 255, r.summary()
    assert r.async_copies > 0 and r.cp_async_ptx > 0, r.summary()
    n_loop = [lp for lp in r.loops if lp.instructions > 1][0]  # the first loop in the SASS: over N (dy's columns)
    assert n_loop.count(r.sass, r"\bLDGSTS\b") > 0, r.summary()


@pytest.mark.parametrize("dtype,R", [(BF16, 48), (BF16, 32), (FP16, 48), (BF16, 96)])
def test_grouped_shrink_no_spills_and_pipelined(gpu_choices, dtype, R):
    """The grouped shrink (q/k/v: 3 x r = 48 rows of A at r = 16, block 64; gate/up: 32; r = 32 q/k/v: 96, block 128):
    `_shrink_expand_kernel` without the expand, as kernels/lowrank_grouped.py launches it: x streamed by cp.async,
    no spills."""
    M, K = 8192, 2048
    cfg = lowrank_module._shrink_expand_config(M, R, CUDA)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    t = T[dtype]
    mid_t = T[dispatch.intermediate_dtype(dtype)]
    kernel = compile_sm90(
        lowrank_module._shrink_expand_kernel, dict(X=t, A=t, B=t, BIAS=t, KEEP="u8", MID=mid_t, Y=t),
        dict(cfg, HAS_BIAS=False, KEEP_MODE=0, STORE_MID=True, DO_EXPAND=False, COMPUTE=dispatch.compute_dtype(dtype),
             MID_COMPUTE=dispatch.intermediate_compute(dtype), DOT_PRECISION=dispatch.dot_precision(dtype)),
        ints=dict(M=M, K=K, N=0, R=R, stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_bn=0, stride_br=0,
                  stride_km=0, stride_kc=0, stride_mm=R, stride_mr=1, stride_ym=0, stride_yn=0),
        num_warps=warps, num_stages=stages, float_args=("scale", "keep_scale"),
    )  # fmt: skip
    r = analyse(kernel)
    assert r.spill_stores == 0 and r.spill_loads == 0 and r.local == 0, r.summary()
    assert r.shared <= SM90_SMEM and r.async_copies > 0 and r.cp_async_ptx > 0, r.summary()


@pytest.mark.parametrize("dtype,R,N", [(BF16, 16, 2048), (BF16, 16, 256), (FP16, 16, 5632), (BF16, 64, 5632)])
def test_grouped_expand_no_spills(gpu_choices, dtype, R, N):
    """Each sibling's forward expand: `_shrink_expand_kernel` reading xa (K = r) with an r x r identity as its shrink,
    then y_low = s xa B^T + b, as `LowRankExpandFunction` launches it (the x operand is xa in the intermediate dtype:
    fp32 for fp16 x, read on TF32 dots as lowrank_linear's expand; y_low in x's dtype). No spills, within shared
    memory, and the expand's dots on the tensor cores (fp16: TF32). (Not claimed pipelined: its K loop runs once
    over r columns.)"""
    M = 8192
    cfg = lowrank_module._shrink_expand_config(M, R, CUDA)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    mid = dispatch.intermediate_dtype(dtype)
    mid_t, factor_t = T[mid], T[mid] if dtype != FP16 else "fp32"
    kernel = compile_sm90(
        lowrank_module._shrink_expand_kernel, dict(X=mid_t, A=mid_t, B=factor_t, BIAS=T[dtype], KEEP="u8", MID=mid_t, Y=T[dtype]),
        dict(cfg, HAS_BIAS=True, KEEP_MODE=0, STORE_MID=False, DO_EXPAND=True,
             COMPUTE=dispatch.intermediate_compute(dtype), MID_COMPUTE=dispatch.intermediate_compute(dtype),
             DOT_PRECISION=dispatch.dot_precision(dtype)),  # rules_dtype=x's dtype
        ints=dict(M=M, K=R, N=N, R=R, stride_xm=R, stride_xk=1, stride_ar=R, stride_ak=1, stride_bn=R, stride_br=1,
                  stride_km=0, stride_kc=0, stride_mm=0, stride_mr=0, stride_ym=N, stride_yn=1),
        num_warps=warps, num_stages=stages, float_args=("scale", "keep_scale"),
    )  # fmt: skip
    r = analyse(kernel)
    assert r.spill_stores == 0 and r.spill_loads == 0 and r.local == 0, r.summary()
    assert r.shared <= SM90_SMEM and r.regs <= 255, r.summary()
    assert r.mma > 0, r.summary()
