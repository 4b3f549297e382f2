"""Static sm_90 checks (no GPU): each kernel compiled for an H100 the way the JIT specialises it (sm90_static.py),
and the properties its design relies on asserted on the compiled SASS / PTX: no register spills, software
pipelining (cp.async / LDGSTS) where a docstring claims it, SASS instructions per dequantised element under a
bound. These are compile results, not timings.

Instructions per dequantised element = per-thread SASS instructions of one pass of the hot loop (one tile) x
threads / elements dequantised by that pass: the issue-rate cost (an SM issues 4 warp-instructions = 128 thread-
instructions per cycle), so at 1.755 GHz and 132 SMs, 1 instruction per element costs 1 / 29.7 T elements/s.
"""

import functools

import pytest
import torch

from peft_ext.kernels import delta as dm
from peft_ext.kernels import delta_decode as dd
from peft_ext.kernels import dispatch
from peft_ext.kernels import lowrank as lowrank_module

from .sm90_static import SM90_SMEM, analyse, compile_sm90

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

BF16 = torch.bfloat16
CUDA = torch.device("cuda")
# the benchmark shapes (out, in, rank, tiles of 64 columns) of benchmarks/delta.py, paper schedules
SHAPES = {"4096x4096": (4096, 4096, 1002, 18), "14336x4096": (14336, 4096, 1462, 25)}


@pytest.fixture
def gpu_choices(monkeypatch):
    """The GPU's config and dtype choices (an H100: 132 SMs)."""
    monkeypatch.setattr(dispatch, "interpret_mode", lambda: False)
    monkeypatch.setattr(dm, "target_programs", lambda device, per_sm=1: 132 * per_sm)
    monkeypatch.setattr(dd, "target_programs", lambda device, per_sm=1: 132 * per_sm)
    monkeypatch.setattr(lowrank_module, "target_programs", lambda device, per_sm=1: 132 * per_sm, raising=False)
    monkeypatch.setattr(lowrank_module, "interpret_mode", lambda: False, raising=False)


@functools.lru_cache(maxsize=None)  # called under the gpu_choices fixture only
def old_delta_builds(shape: str):
    """Today's two-kernel decode (bit planes), batch 1, bf16, as delta_linear launches it."""
    N, K, rank, tiles = SHAPES[shape]
    cfg = dm._config(1, 1, K, N, 128, tiles, CUDA)
    common = dict(GROUP_SIZE=128, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, HAS_ORDER=False,
                  DOT_PRECISION=dispatch.dot_precision(BF16))  # fmt: skip
    tables = dict(ORDER="i32", BLOCKS="i32", META="i64", TILES="i32")
    shrink = compile_sm90(
        dm._delta_shrink_kernel, dict(tables, X="bf16", T="fp32"),
        dict(common, BLOCK_I=cfg.block_i, ATOMIC=cfg.splits > 1, UNIFORM_GROUP=True, COMPUTE=dispatch.compute_dtype(BF16)),
        ints=dict(K=K, words_v=K // 32, rows_per_split=cfg.rows_per_split, stride_xm=K, stride_xk=1, stride_ts=0,
                  stride_tm=rank),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    expand = compile_sm90(
        dm._delta_expand_kernel, dict(tables, T="fp32", Y="bf16"),
        dict(common, BLOCK_O=cfg.block_o, UNIFORM_GROUP=True, T_COMPUTE=dispatch.intermediate_compute(BF16)),
        ints=dict(N=N, words_u=N // 32, stride_tm=rank, stride_ym=N, stride_yn=1), num_warps=cfg.num_warps,
    )  # fmt: skip
    return cfg, analyse(shrink), analyse(expand)


def old_expand_instructions_per_element(cfg, expand, bits: int = 2) -> float:
    """The bit-plane expand's hot loop is the tile loop with the plane loop inside (run `bits` times): per-thread
    instructions of one tile of a `bits`-bit band over the tile's BLOCK_O x BLOCK_C elements per 128 threads. Where
    ptxas split the plane loop into an unrolled loop and a remainder loop, the shorter body is counted per plane:
    the lower (conservative) estimate."""
    outer = expand.outermost()
    inner = [lp for lp in outer.inner if lp.instructions > 1]
    per_tile = outer.instructions - sum(lp.instructions for lp in inner) + bits * min(lp.instructions for lp in inner)
    return per_tile * cfg.num_warps * 32 / (cfg.block_o * cfg.block_c)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bitplane_delta_kernels_static(gpu_choices, shape):
    """Today's decode kernels: no spills and within shared memory; they are not software-pipelined (no async copies:
    the tile loop holds a runtime plane loop) and cost >= 10 instructions per dequantised element of a 2-bit band
    (kernels_analysis.md 2.4) - the facts the new decode (kernels/delta_decode.py) is measured against."""
    cfg, shrink, expand = old_delta_builds(shape)
    for r in (shrink, expand):
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.local == 0, r.summary()
        assert r.shared <= SM90_SMEM
        assert r.regs <= 255
        assert r.async_copies == 0 and r.tma == 0 and r.cp_async_ptx == 0, r.summary()  # no pipelining
    assert old_expand_instructions_per_element(cfg, expand) >= 10


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_lowrank_shrink_expand_is_pipelined_without_spills(gpu_choices, dtype):
    """kernels/lowrank.py's forward kernel at the anchor shape (M = 8192, K = N = 2048, r = 16, fp32 adapters, as
    PEFT keeps them): the specialised build streams x with cp.async (software pipelining) and spills nothing."""
    M, K, N, R = 8192, 2048, 2048, 16
    t = {BF16: "bf16", torch.float16: "fp16"}[dtype]
    mid_t = {torch.float32: "fp32", BF16: "bf16"}[dispatch.intermediate_dtype(dtype)]
    cfg = lowrank_module._shrink_expand_config(M, R, CUDA)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    kernel = compile_sm90(
        lowrank_module._shrink_expand_kernel, dict(X=t, A="fp32", B="fp32", BIAS=t, KEEP="u8", MID=mid_t, Y=t),
        dict(cfg, HAS_BIAS=False, KEEP_MODE=0, STORE_MID=True, DO_EXPAND=True, COMPUTE=dispatch.compute_dtype(dtype),
             MID_COMPUTE=dispatch.intermediate_compute(dtype), DOT_PRECISION=dispatch.dot_precision(dtype)),
        ints=dict(M=M, K=K, N=N, R=R, stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_bn=R, stride_br=1,
                  stride_km=0, stride_kc=0, stride_mm=R, stride_mr=1, stride_ym=N, stride_yn=1),
        num_warps=warps, num_stages=stages, float_args=("scale", "keep_scale"),
    )  # fmt: skip
    r = analyse(kernel)
    assert r.spill_stores == 0 and r.spill_loads == 0 and r.local == 0, r.summary()
    assert r.async_copies > 0 and r.cp_async_ptx > 0, r.summary()
    assert r.shared <= SM90_SMEM


# --------------------------------------------------------------------------------- the fused decode (version 2)
H100_ISSUE = 132 * 128 * 1.755e9  # thread-instructions per second (132 SMs x 4 schedulers x 32 lanes, 1.755 GHz)
H100_BW = 3.35e12  # HBM3 bytes per second (datasheet; perf.md's measured copy ceiling is 2.85e12)
PAPER_BANDS = {"4096x4096": ((8, 2), (3, 32), (2, 968)), "14336x4096": ((8, 2), (3, 32), (2, 1428))}


@functools.lru_cache(maxsize=None)  # called under the gpu_choices fixture only
def new_decode_builds(shape: str, M: int = 1, dtype=BF16, group_size: int = 128):
    """The fused decode's two kernels for the benchmark shape, batch M, as fused_decode launches them."""
    from peft_ext.kernels.delta_format import PackedDelta, SlotDelta

    N, K, _, _ = SHAPES[shape]
    sd = SlotDelta.from_packed(PackedDelta.empty(N, K, group_size, PAPER_BANDS[shape]))
    _, slots, cpws, n_tiles, t_cols = dd._bands(sd, 4, torch.device("cpu"))
    cfg = dd.decode_config(N, K, group_size, n_tiles, CUDA, dtype, M)
    t = {BF16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    common = dict(GROUP_SIZE=group_size, BLOCK_M=dd.DECODE_MAX_ROWS, SLOTS=slots, CPWS=cpws,
                  COMPUTE=dispatch.compute_dtype(dtype), DOT_PRECISION=dispatch.dot_precision(dtype))  # fmt: skip
    fused = compile_sm90(
        dd._fused_decode_kernel,
        dict(X=t, W=t, BIAS=t, T="fp32", BANDS="i32", U_CODES="i32", U_SCALES="fp16", U_MINS="fp16", Y=t),
        dict(common, BLOCK_O=cfg.block_o, BLOCK_K=cfg.block_k, WPT=cfg.wpt_fused, SPLITS=cfg.splits, HAS_BIAS=False,
             UNIFORM_GROUP=group_size % cfg.block_o == 0,
             T_COMPUTE=dispatch.intermediate_compute(dtype), FMA_ROWS=dd.fma_rows(M, group_size, cfg.block_o),
             FMA_EXACT=dtype == torch.float32, ROTATE_ASM=True, NUM_STAGES=cfg.num_stages),
        ints=dict(M=M, N=N, K=K, rank=sd.rank, row_words=sd.row_words, k_per_split=cfg.k_per_split, stride_xm=K,
                  stride_wn=K, stride_tm=t_cols, stride_ym=N, stride_ps=0, magic=dd.FMA_MAGIC),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    shrink = compile_sm90(
        dd._slot_shrink_kernel,
        dict(X=t, BANDS="i32", V_CODES="i32", V_SCALES="fp16", V_MINS="fp16", SIGMA="fp32", P="fp32"),
        dict(common, BLOCK_I=cfg.block_i, WPT=cfg.wpt_shrink, UNIFORM_GROUP=group_size % cfg.block_i == 0),
        ints=dict(M=M, K=K, rank=sd.rank, row_words=sd.row_words, rows_per_split=cfg.rows_per_split, stride_xm=K,
                  stride_ps=M * t_cols, stride_pm=t_cols),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return cfg, sd, slots, cpws, analyse(fused), analyse(shrink)


def loop_bodies(report):
    """The kernel's loops in program order, the 1-instruction trap loop at the end left out."""
    return [lp for lp in report.loops if lp.instructions > 1]


def fused_instructions_per_element(shape: str, M: int = 1):
    """(W loop, [per band loop]) per-thread SASS instructions per element: per W element and per dequantised U
    element. Loop order in the SASS: the W loop, then one loop per band (the static_range unrolls the bands)."""
    cfg, sd, slots, cpws, fused, _ = new_decode_builds(shape, M)
    loops = loop_bodies(fused)
    assert len(loops) == 1 + len(slots), fused.summary()
    threads = cfg.num_warps * 32
    per_w = loops[0].instructions * threads / (cfg.block_o * cfg.block_k)
    per_u = [lp.instructions * threads / (cfg.block_o * cfg.wpt_fused * cpw) for lp, cpw in zip(loops[1:], cpws)]
    return cfg, sd, fused, per_w, per_u


# bounds on the instructions per dequantised element of the 2-bit band (measured: see delta_decode's docstring)
U_BOUNDS = {("4096x4096", 1): 8, ("14336x4096", 1): 6, ("4096x4096", 2): 9.5, ("14336x4096", 2): 7,
            ("4096x4096", 16): 15, ("14336x4096", 16): 10}  # fmt: skip


@pytest.mark.parametrize("M", [1, 2, 16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_decode_static(gpu_choices, shape, M):
    """The fused decode as built for an H100 (static sm_90 compile results, not timings):
    - no spills, within shared memory and the register file;
    - software-pipelined: the W loop and the band loops stream through cp.async (LDGSTS), which the bit-plane
      kernels never do;
    - batch 1-2: the <= 4-bit bands take the FMA path (no mma in their loops), batch 16 the dot path (mma);
    - instructions per dequantised element of the 2-bit band (the bulk of U) under a bound (U_BOUNDS: batch 1
      8 at BLOCK_O = 16 (4096 rows) and 6 at BLOCK_O = 32 (14336 rows), batch 2 9.5 / 7, batch 16 15 / 10),
      below today's expand at the same shape;
    - why that bound suffices: in one kernel W and U share the issue slots, and the whole kernel's issue time
      (W elements x their cost + U elements x theirs, at 128 thread-instructions per SM-cycle) stays under half of
      the time HBM needs for its bytes (W + compressed U), so it is predicted bandwidth-bound (a model, to be
      measured: benchmarks/delta.py)."""
    cfg, sd, fused, per_w, per_u = fused_instructions_per_element(shape, M)
    _, _, shrink = new_decode_builds(shape, M)[3:]
    for r in (fused, shrink):
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.local == 0, r.summary()
        assert r.shared <= SM90_SMEM and r.regs <= 255
        assert r.async_copies > 0 and r.cp_async_ptx > 0, r.summary()
    loops = loop_bodies(fused)
    assert all(lp.count(fused.sass, r"\bLDGSTS\b") > 0 for lp in loops), "every loop is pipelined"
    slots = new_decode_builds(shape, M)[2]
    for lp, slot in zip(loops[1:], slots):
        uses_mma = lp.count(fused.sass, r"\bHMMA\b") > 0
        assert uses_mma == (M > 2 or slot > 4), (M, slot)
        codes = cfg.block_o * cfg.wpt_fused * (32 // slot) // (cfg.num_warps * 32)  # per thread and tile
        if slot <= 4:  # code -> 128 + code: one rotation (SHF.R.W) per code, on both paths
            assert lp.count(fused.sass, r"\bSHF\.R\.W") == codes, (M, slot)
        if not uses_mma:  # the FMA path: one FFMA per code and row of x
            assert lp.count(fused.sass, r"\bFFMA\b") >= M * codes
    assert per_u[-1] <= U_BOUNDS[shape, M], (per_u, fused.summary())
    old_cfg, _, old_expand = old_delta_builds(shape)
    assert per_u[-1] < old_expand_instructions_per_element(old_cfg, old_expand)
    N, K = sd.out_features, sd.in_features
    widths = [n for _, n in sd.bands]
    issue = (N * K * per_w + sum(N * n * c for n, c in zip(widths, per_u))) / H100_ISSUE
    memory = (2 * N * K + sd.u_codes.numel() * 4 + 2 * sd.u_scales.numel() * 2) / H100_BW
    assert issue <= 0.5 * memory, (issue, memory)


def test_missing_cuda_tools_skip_with_the_reason(monkeypatch):
    from . import sm90_static

    monkeypatch.setattr(sm90_static, "_tool", lambda name: None)
    assert "ptxas" in sm90_static.tools_problem()
    with pytest.raises(pytest.skip.Exception, match=r"\['ptxas', 'cuobjdump', 'nvdisasm'\] are not available"):
        compile_sm90(dm._delta_expand_kernel, {}, {})


@pytest.mark.parametrize("M,dtype,group_size", [(16, BF16, 128), (5, torch.float16, 128), (3, torch.float32, 128), (1, BF16, 100)])
def test_fused_decode_other_batches_and_dtypes_static(gpu_choices, M, dtype, group_size):
    """Batch 16 (the largest the fused decode serves), fp16 (T read in fp32: TF32 dots), fp32 (exact dots on the FMA
    units; the shrink then takes 32-row steps: 64 spilled) and a group size no tile divides (scales gathered per
    element) at 14336 x 4096 (BLOCK_O = 32): still no spills, pipelined, within shared memory."""
    *_, fused, shrink = new_decode_builds("14336x4096", M, dtype, group_size)
    for r in (fused, shrink):
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.local == 0, r.summary()
        assert r.shared <= SM90_SMEM and r.async_copies > 0, r.summary()


# ------------------------------------------------------------- prefill / mixed batches on slots (kernels/delta.py)
SLOT_CASES = [  # rows per tenant, group size, dtype, has_order (the gathered path), deterministic
    (16, 128, BF16, False, False), (1, 128, BF16, True, False), (1, 128, BF16, True, True), (2048, 128, BF16, False, False),
    (2048, 128, torch.float16, True, False), (2048, 128, torch.float32, True, False), (16, 48, BF16, False, False),
]  # fmt: skip


@functools.lru_cache(maxsize=None)  # called under the gpu_choices fixture only
def slot_delta_builds(rows: int, group_size: int, dtype, has_order: bool, deterministic: bool):
    """kernels/delta.py's slot shrink and expand (the tuner's prefill and mixed batches) for 14336 x 4096 with the
    paper's bands, as _add_deltas launches them."""
    N, K, rank, tiles = SHAPES["14336x4096"]
    cfg = dm._config(rows, dm.cdiv(rows, 64), K, N, group_size, tiles, CUDA)
    if dtype == torch.float32:
        cfg = cfg._replace(block_i=min(cfg.block_i, dm.SLOT_FP32_BLOCK_I))  # as _add_deltas does
    t = {BF16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    common = dict(GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, HAS_ORDER=has_order,
                  DOT_PRECISION=dispatch.dot_precision(dtype))  # fmt: skip
    tables = dict(ORDER="i32", BLOCKS="i32", META="i64", TILES="i32")
    shrink = compile_sm90(
        dm._slot_delta_shrink_kernel, dict(tables, X=t, T="fp32"),
        dict(common, BLOCK_I=cfg.block_i, ATOMIC=cfg.splits > 1 and not deterministic,
             UNIFORM_GROUP=group_size % cfg.block_i == 0, COMPUTE=dispatch.compute_dtype(dtype)),
        ints=dict(K=K, rows_per_split=cfg.rows_per_split, stride_xm=K, stride_xk=1,
                  stride_ts=rows * rank if deterministic and cfg.splits > 1 else 0, stride_tm=rank),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    expand = compile_sm90(
        dm._slot_delta_expand_kernel, dict(tables, T="fp32", Y=t),
        dict(common, BLOCK_O=cfg.block_o, UNIFORM_GROUP=group_size % cfg.block_o == 0,
             T_COMPUTE=dispatch.intermediate_compute(dtype)),
        ints=dict(N=N, stride_tm=rank, stride_ym=N, stride_yn=1), num_warps=cfg.num_warps,
    )  # fmt: skip
    return cfg, analyse(shrink), analyse(expand)


@pytest.mark.parametrize("rows,group_size,dtype,has_order,deterministic", SLOT_CASES)
def test_slot_prefill_and_gathered_kernels_static(gpu_choices, rows, group_size, dtype, has_order, deterministic):
    """The slot-layout shrink / expand (what the tuner's layers run at prefill and in mixed batches, one compressed
    copy) as built for an H100: no spills, within shared memory and the register file (static compile results,
    not timings; their speed against the bit-plane kernels is unmeasured)."""
    _, shrink, expand = slot_delta_builds(rows, group_size, dtype, has_order, deterministic)
    for r in (shrink, expand):
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.local == 0, r.summary()
        assert r.shared <= SM90_SMEM and r.regs <= 255, r.summary()
