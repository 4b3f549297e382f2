"""lowrank_linear_gathered (mixed adapters per row): Triton kernel vs the plain-PyTorch reference.

Ground truth = the reference in float64; errors are ||out - ref|| / ||ref|| (design/perf.md tolerances).
"""

import pytest
import torch
import torch.nn.functional as F

from peft_ext.kernels import (
    AdapterSegments,
    choose_backend,
    lowrank_linear_gathered,
    plan_adapter_segments,
    reference_lowrank_linear,
    reference_lowrank_linear_gathered,
)
from peft_ext.kernels import dispatch
from peft_ext.kernels import lowrank as lowrank_module
from peft_ext.kernels import lowrank_gathered as gathered_module

from .accuracy import BF16, FP16, FP32, FP64, TOL, rel_err


def make_batch(lead, K, N, R, L, dtype, adapter_dtype, bias=True, device="cpu", seed=0, index_shape=None):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    index_shape = lead if index_shape is None else index_shape
    index = torch.randint(-1, L, index_shape, generator=g)
    index.view(-1)[0] = -1  # at least one row without adapter
    return dict(
        x=rnd(*lead, K),
        weight=rnd(N, K, scale=K**-0.5),
        bias=rnd(N) if bias else None,
        lora_a_stack=rnd(L, R, K, scale=K**-0.5, dt=adapter_dtype),
        lora_b_stack=rnd(L, N, R, scale=R**-0.5, dt=adapter_dtype),
        scales=[0.5 + j for j in range(L)],
        adapter_index=index.to(device),
    )


def fp64(batch):
    return {
        k: v.detach().double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v
        for k, v in batch.items()
    }


CASES = [
    # lead, K, N, r, adapters, dtype, adapter dtype, index shape (None = one per row)
    ((37,), 45, 29, 8, 3, FP32, FP32, None),
    ((37,), 45, 29, 16, 4, BF16, FP32, None),
    ((37,), 45, 29, 1, 1, FP16, FP16, None),
    ((3, 13), 45, 29, 8, 5, BF16, BF16, (3,)),  # one adapter per sequence
    ((3, 13), 45, 29, 8, 5, FP32, FP32, None),  # one adapter per token of a 3-D batch
    ((150,), 100, 70, 16, 16, FP32, FP32, None),  # 16 adapters, several blocks per adapter
    ((20,), 130, 129, 128, 2, BF16, FP32, None),  # rank 128
]


@pytest.mark.parametrize("lead,K,N,R,L,dtype,adapter_dtype,index_shape", CASES)
def test_matches_reference(lead, K, N, R, L, dtype, adapter_dtype, index_shape):
    batch = make_batch(lead, K, N, R, L, dtype, adapter_dtype, index_shape=index_shape)
    assert choose_backend(batch["x"], R) == "triton"
    assert (batch["adapter_index"] == -1).any()  # some rows without adapter
    y = lowrank_linear_gathered(**batch)
    ref = reference_lowrank_linear_gathered(**fp64(batch))
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype]


def test_reference_agrees_with_the_single_adapter_reference():
    """Each row of the gathered reference equals the dense reference with that row's adapter (or the base)."""
    batch = fp64(make_batch((11,), 12, 9, 3, 3, FP64, FP64))
    y = reference_lowrank_linear_gathered(**batch)
    for i, j in enumerate(batch["adapter_index"].tolist()):
        row = batch["x"][i : i + 1]
        if j < 0:
            expect = F.linear(row, batch["weight"], batch["bias"])
        else:
            expect = reference_lowrank_linear(
                row, batch["weight"], batch["bias"], batch["lora_a_stack"][j], batch["lora_b_stack"][j], batch["scales"][j]
            )
        torch.testing.assert_close(y[i : i + 1], expect)


def test_all_rows_without_adapter_give_the_base():
    batch = make_batch((37,), 45, 29, 8, 3, FP32, FP32)
    batch["adapter_index"] = torch.full((37,), -1)
    y = lowrank_linear_gathered(**batch)
    assert rel_err(y, F.linear(batch["x"].double(), batch["weight"].double(), batch["bias"].double())) <= TOL[FP32]


def test_single_row_and_unused_adapters():
    batch = make_batch((1,), 45, 29, 8, 6, FP32, FP32)
    batch["adapter_index"] = torch.tensor([4])
    y = lowrank_linear_gathered(**batch)
    assert rel_err(y, reference_lowrank_linear_gathered(**fp64(batch))) <= TOL[FP32]


def test_plan_covers_every_row_once():
    """Simulate the kernel's schedule from a plan: each program's rows share one bucket, all rows appear once."""
    g = torch.Generator().manual_seed(1)
    L, M = 7, 300
    index = torch.randint(-1, L, (M,), generator=g)
    index[index == 2] = 5  # adapter 2 unused
    plan = plan_adapter_segments(index, L, (M, 8))
    seen = []
    for pid in range(plan.num_blocks):
        seg = int(plan.block_seg[pid])
        start = int(plan.seg_row_start[seg]) + (pid - int(plan.seg_block_start[seg])) * plan.block_m
        stop = min(start + plan.block_m, int(plan.seg_row_end[seg]))
        rows = plan.order[start:stop].long() if stop > start else torch.empty(0, dtype=torch.long)
        if rows.numel():
            assert torch.all(index[rows] == seg - 1), pid  # bucket 0 = no adapter
        seen.append(rows)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(M))


def test_plan_reuse():
    batch = make_batch((37,), 45, 29, 8, 3, FP32, FP32)
    plan = plan_adapter_segments(batch["adapter_index"], 3, batch["x"].shape)
    assert isinstance(plan, AdapterSegments)
    y_index = lowrank_linear_gathered(**batch)
    y_plan = lowrank_linear_gathered(**dict(batch, adapter_index=plan))
    assert torch.equal(y_index, y_plan)
    with pytest.raises(ValueError, match="built for 3 adapters and 37 rows"):
        lowrank_linear_gathered(**dict(batch, x=batch["x"][:30], adapter_index=plan))


# -------------------------------------------------------------------------------------- bad indices
@pytest.mark.parametrize("bad", [3, -2, 100])
def test_out_of_range_index_raises(bad):
    batch = make_batch((37,), 45, 29, 8, 3, FP32, FP32)
    batch["adapter_index"][5] = bad
    with pytest.raises(ValueError, match=rf"adapter_index out of range: got \[{bad}\].*-1 \(no adapter\) and 0..2"):
        lowrank_linear_gathered(**batch)
    with pytest.raises(ValueError, match="adapter_index out of range"):
        plan_adapter_segments(batch["adapter_index"], 3, batch["x"].shape)


def test_unchecked_bad_index_gives_nan_rows_only():
    """check_index=False skips the (host-syncing) check; a bad row then reads nothing and comes out NaN."""
    batch = make_batch((37,), 45, 29, 8, 3, FP32, FP32)
    batch["adapter_index"][[5, 9]] = torch.tensor([3, -7])
    y = lowrank_linear_gathered(**batch, check_index=False)
    bad_rows = y.isnan().any(1).nonzero().flatten().tolist()
    assert bad_rows == [5, 9] and y[[5, 9]].isnan().all()
    good = torch.ones(37, dtype=torch.bool)
    good[[5, 9]] = False
    ref = reference_lowrank_linear_gathered(**fp64(batch))
    assert rel_err(y[good], ref[good]) <= TOL[FP32]


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(adapter_index=torch.zeros(37)), TypeError, "integer tensor"),
        (dict(adapter_index=torch.zeros(37, dtype=torch.bool)), TypeError, "integer tensor"),
        (dict(adapter_index=torch.zeros(36, dtype=torch.long)), ValueError, "adapter_index must have shape"),
        (dict(lora_a_stack=torch.randn(3, 8, 44)), ValueError, "lora_a_stack must have shape"),
        (dict(lora_b_stack=torch.randn(2, 29, 8)), ValueError, "lora_b_stack must have shape"),
        (dict(lora_a_stack=torch.randn(3, 30, 45), lora_b_stack=torch.randn(3, 29, 30)), ValueError, "rank r=30 is larger"),
        (dict(scales=[1.0, 2.0]), ValueError, "one value per adapter"),
        (dict(x=torch.randint(0, 3, (37, 45))), TypeError, "x has dtype torch.int64"),
        (dict(lora_b_stack=torch.ones(3, 29, 8, dtype=torch.int8)), TypeError, "lora_b_stack has dtype torch.int8"),
        (dict(weight=torch.randn(29, 45, dtype=FP16)), TypeError, "must have one dtype"),
        (dict(lora_a_stack=torch.randn(3, 8, 45, device="meta")), ValueError, "one device"),
    ],
)
def test_bad_inputs(change, error, match):
    batch = make_batch((37,), 45, 29, 8, 3, FP32, FP32)
    batch.update(change)
    with pytest.raises(error, match=match):
        lowrank_linear_gathered(**batch)


# ------------------------------------------------------------------------------------------- dispatch
class NoLaunch:
    """Stands in for a kernel that must not be launched."""

    def __getitem__(self, grid):
        raise AssertionError("the kernel must not run")


def test_gradients_go_through_the_reference(monkeypatch):
    """The Triton path is forward-only; with autograd on, the differentiable reference runs."""
    batch = make_batch((3, 13), 45, 29, 8, 3, FP32, FP32)

    monkeypatch.setattr(gathered_module, "_gathered_shrink_expand_kernel", NoLaunch())
    x = batch["x"].clone().requires_grad_()
    a = batch["lora_a_stack"].clone().requires_grad_()
    y = lowrank_linear_gathered(**dict(batch, x=x, lora_a_stack=a))
    y.sum().backward()
    ref64 = fp64(batch)
    x64, a64 = ref64["x"].requires_grad_(), ref64["lora_a_stack"].requires_grad_()
    reference_lowrank_linear_gathered(**ref64).sum().backward()
    assert rel_err(x.grad, x64.grad) <= TOL[FP32] and rel_err(a.grad, a64.grad) <= TOL[FP32]
    with torch.no_grad(), pytest.raises(AssertionError, match="kernel must not run"):
        lowrank_linear_gathered(**dict(batch, x=x, lora_a_stack=a))


@pytest.mark.parametrize("lead,index_shape", [((37,), None), ((3, 13), (3,)), ((3, 13), None)])
def test_cpu_without_interpreter_uses_reference(monkeypatch, lead, index_shape):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    batch = make_batch(lead, 45, 29, 8, 3, FP32, FP32, index_shape=index_shape)
    assert choose_backend(batch["x"], 8) == "reference"

    monkeypatch.setattr(gathered_module, "_gathered_shrink_expand_kernel", NoLaunch())
    assert torch.equal(lowrank_linear_gathered(**batch), reference_lowrank_linear_gathered(**batch))
    plan = plan_adapter_segments(batch["adapter_index"], 3, batch["x"].shape)
    assert torch.equal(lowrank_linear_gathered(**dict(batch, adapter_index=plan)), reference_lowrank_linear_gathered(**batch))
    with pytest.raises(ValueError, match="adapter_index out of range"):  # checked on every backend
        lowrank_linear_gathered(**dict(batch, adapter_index=torch.full_like(batch["adapter_index"], 3)))


def test_autocast():
    batch = make_batch((37,), 45, 29, 8, 3, FP32, FP32)
    with torch.autocast("cpu", dtype=BF16):
        y = lowrank_linear_gathered(**batch)
    assert y.dtype == BF16
    cast = dict(batch, **{k: batch[k].to(BF16) for k in ("x", "weight", "bias")})
    assert rel_err(y, reference_lowrank_linear_gathered(**fp64(cast))) <= TOL[BF16]


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("R,dtype", [(16, BF16), (128, BF16), (16, FP16), (128, FP16)])
def test_kernel_compiles_for_h100(compile_sm90, monkeypatch, R, dtype):
    monkeypatch.setattr(lowrank_module, "target_programs", lambda device, per_sm=1: 132 * per_sm)
    monkeypatch.setattr(gathered_module, "interpret_mode", lambda: False)
    monkeypatch.setattr(dispatch, "interpret_mode", lambda: False)  # the GPU's dtype choices
    cfg = gathered_module._gathered_config(4096, R, torch.device("cuda"))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    index_ptrs = dict.fromkeys(("ORDER", "BLOCK_SEG", "SEG_BLOCK_START", "SEG_ROW_START", "SEG_ROW_END"), "i32")
    t = {BF16: "bf16", FP16: "fp16"}[dtype]
    kernel = compile_sm90(
        gathered_module._gathered_shrink_expand_kernel,
        dict(index_ptrs, X=t, A="fp32", B="fp32", SCALES="fp32", BIAS=t, Y=t),
        dict(cfg, HAS_BIAS=True, COMPUTE=dispatch.compute_dtype(dtype),
             MID_COMPUTE=dispatch.intermediate_compute(dtype), DOT_PRECISION=dispatch.dot_precision(dtype)),
        num_warps=warps, num_stages=stages, float_args=("nan_value",),
    )  # fmt: skip
    assert kernel.metadata.shared <= 227 * 1024


# ------------------------------------------------------------------ devices, strides, fp16 range (issue 11)
def test_launch_runs_under_a_guard_for_x_device(launch_guards):
    batch = make_batch((37,), 45, 29, 8, 3, FP32, FP32)
    lowrank_linear_gathered(**batch)
    assert [name for name, _ in launch_guards.launches] == ["_gathered_shrink_expand_kernel"]
    assert launch_guards.launches[0][1] == (torch.device("cpu"),)


@pytest.mark.parametrize("which", ["scales", "bias", "both"])
def test_strided_scales_and_bias(which):
    """The kernel reads SCALES + j and BIAS + n: strided views are made contiguous at the launch (they were read as
    if contiguous: relative error 1.95 for the scales, 0.17 for the bias)."""
    batch = make_batch((37,), 45, 29, 8, 3, FP32, FP32)
    if which in ("scales", "both"):
        batch["scales"] = torch.tensor([0.5, 9.0, 1.5, 9.0, 2.5, 9.0])[::2]
    if which in ("bias", "both"):
        batch["bias"] = torch.stack([batch["bias"], torch.full_like(batch["bias"], 1e3)], dim=1)[:, 0]
    assert not (batch["scales"].is_contiguous() if which == "scales" else batch["bias"].is_contiguous())
    y = lowrank_linear_gathered(**batch)
    assert rel_err(y, reference_lowrank_linear_gathered(**fp64(batch))) <= TOL[FP32]


def test_fp16_outlier_activations_keep_xa_in_range(gpu_fp16_math):
    """x A_j^T beyond fp16's range while y stays in range: xa stays fp32 for the expand (GPU fp16 operand dtypes)."""
    g = torch.Generator().manual_seed(1)
    M, K, N, R, L = 37, 45, 100, 8, 3
    batch = dict(
        x=(1500 + 100 * torch.randn(M, K, generator=g)).half(),
        weight=(torch.randn(N, K, generator=g) * K**-0.5).half(),
        bias=None,
        lora_a_stack=torch.rand(L, R, K, generator=g) + 0.5,
        lora_b_stack=torch.randn(L, N, R, generator=g) * 1e-3,
        scales=[0.5, 1.0, 0.25],
        adapter_index=torch.arange(M) % (L + 1) - 1,
    )
    assert (batch["x"].double() @ batch["lora_a_stack"][0].double().T).abs().max() > 65504
    y = lowrank_linear_gathered(**batch)
    assert y.isfinite().all() and rel_err(y, reference_lowrank_linear_gathered(**fp64(batch))) <= TOL[FP16]


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 4, 16])
@pytest.mark.parametrize("R", [8, 16, 64, 128])
def test_gpu_matches_reference(L, R):
    batch = make_batch((8, 125), 520, 392, R, L, BF16, FP32, device="cuda", index_shape=(8,))
    assert choose_backend(batch["x"], R) == "triton"
    with torch.no_grad():
        y = lowrank_linear_gathered(**batch)
        plan = plan_adapter_segments(batch["adapter_index"], L, batch["x"].shape, device="cuda")
        y_plan = lowrank_linear_gathered(**dict(batch, adapter_index=plan))
    ref = reference_lowrank_linear_gathered(**fp64(batch))
    assert rel_err(y, ref) <= TOL[BF16]
    assert torch.equal(y, y_plan)


@pytest.mark.gpu
def test_gpu_decode_batch():
    """Decode-sized batch: one token per sequence, every sequence its own adapter."""
    batch = make_batch((16,), 1024, 1024, 16, 16, BF16, FP32, device="cuda")
    batch["adapter_index"] = torch.arange(16, device="cuda") - 1
    with torch.no_grad():
        y = lowrank_linear_gathered(**batch)
    assert rel_err(y, reference_lowrank_linear_gathered(**fp64(batch))) <= TOL[BF16]


@pytest.mark.gpu
def test_gpu_inputs_on_another_device_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    torch.cuda.set_device(0)
    batch = make_batch((8, 125), 520, 392, 16, 4, BF16, FP32, device="cuda:1", index_shape=(8,))
    with torch.no_grad():
        y = lowrank_linear_gathered(**batch)
    assert torch.cuda.current_device() == 0
    assert rel_err(y, reference_lowrank_linear_gathered(**fp64(batch))) <= TOL[BF16]
