"""Static sm_90 checks of the autotuner's candidate lists (kernels/autotune.py), no GPU needed: every candidate the
tuner would try at the anchor shape (perf.md: M = 8192 tokens, K = N = 2048, bf16, r = 16 and 64; the mixed-adapter
kernel at 4096 tokens; the backward's dy pass with dB fused and without, dx expanded) is built for an H100 the way the JIT specialises it (sm90_static.py) and must spill no
register, fit the register file and shared memory. A candidate that spilled is removed from the list (by the
register budget or `autotune.SM90_SPILLS`), not just reported: the second test checks that the builds that spilled
when the budgets were chosen are not in the lists any more. These are compile results, not timings."""

import functools

import pytest
import torch

from peft_ext.kernels import autotune, dispatch
from peft_ext.kernels import lowrank as lowrank_module
from peft_ext.kernels import lowrank_gathered as gathered_module

from .sm90_static import SM90_SMEM, analyse, compile_sm90

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

BF16 = torch.bfloat16
CUDA = torch.device("cuda")
M, K, N, INFER_M = 8192, 2048, 2048, 4096


@pytest.fixture
def gpu_choices(monkeypatch):
    """The GPU's config and dtype choices (an H100: 132 SMs)."""
    monkeypatch.setattr(dispatch, "interpret_mode", lambda: False)
    for module in (lowrank_module, gathered_module):
        monkeypatch.setattr(module, "interpret_mode", lambda: False, raising=False)
    monkeypatch.setattr(lowrank_module, "target_programs", lambda device, per_sm=1: 132 * per_sm)


def anchor_candidates(name: str, R: int, elem: int = 2) -> list[dict]:
    """The candidate list the tuner builds at the anchor shape (call under gpu_choices)."""
    if name == "shrink_expand":
        return autotune.candidates(name, lowrank_module._shrink_expand_config(M, R, CUDA), None, elem)
    if name == "wgrad":
        heuristic, _, _, rows_per_split = lowrank_module._wgrad_config(M, K, R, CUDA, None)
        return autotune.candidates(name, heuristic, lambda c: rows_per_split % c["BLOCK_M"] == 0, elem)
    if name in ("dy_pass", "dy_pass_db"):  # the backward's pass over dy, with dB fused or without
        return autotune.candidates(name, lowrank_module._dy_pass_config(M, R, CUDA, name == "dy_pass_db"), None, elem)
    heuristic = gathered_module._gathered_config(INFER_M, R, CUDA)
    heuristic["BLOCK_M"] = gathered_module._gathered_config(INFER_M, 1, CUDA)["BLOCK_M"]  # the plan's
    return autotune.candidates(name, heuristic, None, elem)


@functools.lru_cache(maxsize=None)  # called under gpu_choices only
def build(name: str, R: int, cfg_items: tuple):
    cfg = dict(cfg_items)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    common = dict(COMPUTE=dispatch.compute_dtype(BF16), DOT_PRECISION=dispatch.dot_precision(BF16))
    if name == "shrink_expand":  # the forward as LowRankLinearFunction launches it (factors cast to bf16)
        kernel = compile_sm90(
            lowrank_module._shrink_expand_kernel, dict(X="bf16", A="bf16", B="bf16", BIAS="bf16", KEEP="u8", MID="bf16", Y="bf16"),
            dict(cfg, **common, HAS_BIAS=False, KEEP_MODE=0, STORE_MID=True, DO_EXPAND=True,
                 MID_COMPUTE=dispatch.intermediate_compute(BF16)),
            ints=dict(M=M, K=K, N=N, R=R, stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_bn=R, stride_br=1,
                      stride_km=0, stride_kc=0, stride_mm=R, stride_mr=1, stride_ym=N, stride_yn=1),
            num_warps=warps, num_stages=stages, float_args=("scale", "keep_scale"),
        )  # fmt: skip
    elif name == "wgrad":  # dA = s dyb^T x
        rows_per_split = lowrank_module._wgrad_config(M, K, R, CUDA, None)[3]
        kernel = compile_sm90(
            lowrank_module._wgrad_kernel, dict(L="bf16", T="bf16", KEEP="u8", P="fp32"),
            dict(cfg, HAS_KEEP=False, COMPUTE=dispatch.intermediate_compute(BF16), DOT_PRECISION=common["DOT_PRECISION"]),
            ints=dict(M=M, C=K, R=R, rows_per_split=rows_per_split, stride_lm=R, stride_lr=1, stride_tm=K, stride_tc=1,
                      stride_km=0, stride_kc=0, stride_ps=R * K, stride_pr=K, stride_pc=1),
            num_warps=warps, num_stages=stages, float_args=("scale", "keep_scale"),
        )  # fmt: skip
    elif name in ("dy_pass", "dy_pass_db"):  # the LoRA backward's dy pass (dx_low expanded; dB fused or not)
        kernel = compile_sm90(
            lowrank_module._dy_pass_kernel,
            dict(DY="bf16", B="bf16", A="bf16", XA="bf16", KEEP="u8", MID="bf16", DX="bf16", PART="fp32"),
            dict(cfg, **common, DO_DB=name == "dy_pass_db", STORE_MID=True, DO_EXPAND=True, HAS_KEEP=False,
                 MID_COMPUTE=dispatch.intermediate_compute(BF16)),
            ints=dict(M=M, N=N, K=K, R=R, stride_dm=N, stride_dn=1, stride_bn=R, stride_br=1, stride_ar=K, stride_ak=1,
                      stride_xm=R, stride_xr=1, stride_km=0, stride_kc=0, stride_mm=R, stride_mr=1, stride_om=K,
                      stride_ok=1, stride_ps=N * R, stride_pn=R, stride_pr=1),
            num_warps=warps, num_stages=stages, float_args=("scale", "mid_scale", "keep_scale"),
        )  # fmt: skip
    else:  # the mixed-adapter forward, fp32 adapter stacks (as PEFT keeps them)
        kernel = compile_sm90(
            gathered_module._gathered_shrink_expand_kernel,
            dict(X="bf16", ORDER="i32", BLOCK_SEG="i32", SEG_BLOCK_START="i32", SEG_ROW_START="i32", SEG_ROW_END="i32",
                 A="fp32", B="fp32", SCALES="fp32", BIAS="bf16", Y="bf16"),
            dict(cfg, **common, HAS_BIAS=False, MID_COMPUTE=dispatch.intermediate_compute(BF16)),
            ints=dict(K=K, N=N, R=R, num_adapters=4, stride_xm=K, stride_xk=1, stride_al=R * K, stride_ar=K, stride_ak=1,
                      stride_bl=N * R, stride_bn=R, stride_br=1, stride_ym=N, stride_yn=1),
            num_warps=warps, num_stages=stages, float_args=("nan_value",),
        )  # fmt: skip
    return analyse(kernel)


@pytest.mark.parametrize("name,R", [("shrink_expand", 16), ("shrink_expand", 64), ("wgrad", 16), ("gathered", 16),
                                    ("dy_pass_db", 16), ("dy_pass_db", 64), ("dy_pass", 16), ("dy_pass", 64)])
def test_every_candidate_builds_without_spills(gpu_choices, name, R):
    cands = anchor_candidates(name, R)
    assert len(cands) >= 4, cands  # something to choose from
    assert all(c["BLOCK_R"] == dispatch.block_r(R) for c in cands)  # every tile holds the rank
    failures = []
    for cfg in cands:
        r = build(name, R, tuple(sorted(cfg.items())))
        if r.spill_stores or r.spill_loads or r.local or r.regs > 255 or r.shared > SM90_SMEM:
            failures.append((cfg, r.summary()))
    assert not failures, failures


# builds that spilled when the budgets were chosen (sm90_static.py at the anchor shape; see autotune.SM90_SPILLS):
# (kernel, R, operand bytes, config) - each must be out of its candidate list
SPILLED = [
    ("shrink_expand", 64, 2, dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64, BLOCK_R=64, num_warps=4, num_stages=2)),
    ("shrink_expand", 128, 2, dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, BLOCK_R=128, num_warps=8, num_stages=3)),
    ("shrink_expand", 64, 4, dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, BLOCK_R=64, num_warps=4, num_stages=3)),
    ("shrink_expand", 64, 4, dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=128, BLOCK_R=64, num_warps=4, num_stages=3)),
    ("shrink_expand", 128, 4, dict(BLOCK_M=64, BLOCK_K=32, BLOCK_N=64, BLOCK_R=128, num_warps=8, num_stages=3)),
    ("shrink_expand", 128, 4, dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=128, BLOCK_R=128, num_warps=8, num_stages=3)),
    ("shrink_expand", 128, 4, dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=64, BLOCK_R=128, num_warps=4, num_stages=3)),
    ("wgrad", 32, 2, dict(BLOCK_M=128, BLOCK_C=128, BLOCK_R=32, num_warps=4, num_stages=3)),  # with dropout
    ("wgrad", 32, 2, dict(BLOCK_M=64, BLOCK_C=256, BLOCK_R=32, num_warps=4, num_stages=3)),  # with dropout
    ("wgrad", 64, 4, dict(BLOCK_M=128, BLOCK_C=128, BLOCK_R=64, num_warps=4, num_stages=3)),
    ("wgrad", 64, 4, dict(BLOCK_M=64, BLOCK_C=256, BLOCK_R=64, num_warps=4, num_stages=3)),
    # the dy pass (with dx; bf16 also without it), autotune.SM90_DY_PASS_SPILLS and the "dy_pass" budgets
    ("dy_pass_db", 128, 2, dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, BLOCK_R=128, num_warps=4, num_stages=3)),
    ("dy_pass", 128, 2, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_R=128, num_warps=8, num_stages=3)),
    ("dy_pass", 32, 2, dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=32, BLOCK_R=32, num_warps=4, num_stages=3)),  # no dx
    ("dy_pass", 32, 2, dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, BLOCK_R=32, num_warps=4, num_stages=4)),  # no dx
    ("dy_pass_db", 64, 4, dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, BLOCK_R=64, num_warps=8, num_stages=3)),
    ("dy_pass_db", 32, 4, dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, BLOCK_R=32, num_warps=8, num_stages=3)),
    ("dy_pass", 64, 4, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, BLOCK_R=64, num_warps=4, num_stages=3)),
    ("dy_pass", 128, 4, dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, BLOCK_R=128, num_warps=8, num_stages=3)),
]  # fmt: skip


def test_configs_that_spilled_are_dropped_from_the_lists(gpu_choices):
    for name, R, elem, cfg in SPILLED:
        assert cfg not in anchor_candidates(name, R, elem), (name, R, elem, cfg)
        assert not autotune.within_budget(name, cfg, elem), (name, R, elem, cfg)
