"""delta_linear / delta_linear_gathered (Delta-CoMe compressed deltas): Triton kernels (interpreter here, CUDA in
the `gpu` tests) against the plain-PyTorch reference (kernels/delta_reference.py).

Ground truth = the reference on float64 copies of x / weight / bias (the delta's factors are dequantised in fp32
by both sides); errors are ||out - ref|| / ||ref|| (design/perf.md: <= 1e-4 fp32, <= 1e-2 bf16), on the whole
output and on the delta part alone. The kernels' fp32 workspace is poisoned with NaN wherever it is not zeroed.
Shapes are small and odd: the interpreter's cost grows with programs x loop steps.
"""


import pytest
import torch
import torch.nn.functional as F

from peft_ext.kernels import (
    PackedDelta,
    SignDelta,
    choose_backend,
    delta_linear,
    delta_linear_gathered,
    reference_delta_linear,
    reference_delta_linear_gathered,
)
from peft_ext.kernels import dispatch

from peft_ext.kernels import delta as dm
from peft_ext.kernels import delta_decode as dd

from .accuracy import BF16, FP16, FP32, FP64, TOL, rel_err


def make(lead, K, N, bands, group_size, dtype, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    delta = PackedDelta.random(N, K, bands, group_size=group_size, generator=g, sigma_scale=2.0)
    x = torch.randn(*lead, K, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(N, K, generator=g) * K**-0.5).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=g).to(device=device, dtype=dtype) if bias else None
    return x, weight, b, delta.to(device)


def f64(t):
    return None if t is None else t.detach().double()


def check_close(y, x, weight, bias, ref, dtype):
    """Whole output and delta part (y - x W^T - b) against the float64 reference."""
    base = F.linear(f64(x), f64(weight), f64(bias))
    assert rel_err(y, ref) <= TOL[dtype]
    # the delta part alone (y's rounding to bf16 is relative to |y|, so bf16 gets a looser bound here)
    assert rel_err(y.double() - base, ref - base) <= (TOL[dtype] if dtype == FP32 else 2 * TOL[dtype])


@pytest.fixture(autouse=True)
def _poison_workspace(monkeypatch):
    """The T buffer the shrink stores into without zeroing starts as NaN: every element must be written."""
    real = dm._new_workspace

    def poisoned(shape, zero, device):
        t = real(shape, zero, device)
        return t if zero else t.fill_(float("nan"))

    monkeypatch.setattr(dm, "_new_workspace", poisoned)


class Recorder:
    """Wraps a kernel: records each launch's grid and constexpr flags, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(kwargs, grid=grid))
            return self.kernel[grid](*args, **kwargs)

        return launch


class NoLaunch:
    """Stands in for a kernel that must not be launched."""

    def __getitem__(self, grid):
        raise AssertionError("the kernel must not run")


# ------------------------------------------------------------------------------------------- one delta
LAYOUTS = ["bitplanes", "slots"]  # PackedDelta (version 1) and SlotDelta (version 2: what the tuner's layers hold)
KERNELS = {"bitplanes": ("_delta_shrink_kernel", "_delta_expand_kernel"),
           "slots": ("_slot_delta_shrink_kernel", "_slot_delta_expand_kernel")}  # fmt: skip


def as_layout(delta, layout):
    from peft_ext.kernels.delta_format import SlotDelta

    return SlotDelta.from_packed(delta) if layout == "slots" else delta


def record_kernels(monkeypatch, layout):
    """Recorders on the layout's shrink and expand kernels (kernels/delta.py)."""
    shrink, expand = (Recorder(getattr(dm, name)) for name in KERNELS[layout])
    monkeypatch.setattr(dm, KERNELS[layout][0], shrink)
    monkeypatch.setattr(dm, KERNELS[layout][1], expand)
    return shrink, expand


CASES = [
    # lead, K (in), N (out), bands, group size, dtype, bias
    ((1,), 33, 100, ((8, 2), (3, 5), (1, 9)), 32, FP32, True),  # batch 1, a 1-bit band
    ((3,), 257, 100, ((8, 2), (3, 32), (2, 70)), 128, BF16, False),  # decode, a band over 2 column tiles
    ((16,), 100, 257, ((2, 70),), 64, FP32, True),  # a single band, 16 rows
    ((37,), 257, 33, ((4, 3), (2, 0), (1, 40)), 32, BF16, True),  # an empty band, 37 rows
    ((2, 19), 100, 100, ((5, 4), (6, 3), (7, 2)), 48, FP32, True),  # 3-D x, group size not a multiple of 32
    ((16,), 45, 70, tuple((b, 3) for b in range(1, 9)), 100, FP32, False),  # bits 1..8 in one launch
    ((5,), 64, 64, ((3, 16), (2, 16)), 32, FP16, True),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lead,K,N,bands,group_size,dtype,bias", CASES)
def test_matches_reference(lead, K, N, bands, group_size, dtype, bias, layout):
    """Both layouts' two-kernel path (decode=False: also at decode sizes) against the reference."""
    x, weight, b, delta = make(lead, K, N, bands, group_size, dtype, bias)
    assert choose_backend(x, 1) == "triton"
    y = delta_linear(x, weight, b, as_layout(delta, layout), decode=False)
    assert y.shape == (*lead, N) and y.dtype == dtype
    check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_x(layout):
    """x whose rows are not contiguous (a slice of a wider tensor) is read through its strides."""
    x, weight, b, delta = make((7,), 40, 50, ((3, 6), (2, 20)), 32, FP32)
    wide = torch.randn(7, 90)
    wide[:, 10:50] = x
    xs = wide[:, 10:50]
    assert not xs.is_contiguous()
    y = delta_linear(xs, weight, b, as_layout(delta, layout), decode=False)
    check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), FP32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tile_configs_are_all_exercised(monkeypatch, layout):
    """The interpreter runs the GPU's tile choices: atomics or not, 32 or 64 output rows per expand program,
    one scale per tile column or gathered per element, decode and prefill row blocks (both layouts)."""
    shrink, expand = record_kernels(monkeypatch, layout)
    for lead, K, N, bands, gs in [
        ((2,), 300, 300, ((2, 5),), 128),  # 1 tile: in split 3 ways (atomics); 5 output blocks of 64
        ((40,), 64, 40, ((2, 70), (3, 64), (1, 3), (4, 2)), 64),  # 5 tiles: no split; 32-row output blocks
        ((3,), 200, 50, ((2, 4),), 48),  # group 48: per-element scales in both kernels; in split 4 ways
    ]:
        x, weight, b, delta = make(lead, K, N, bands, gs, FP32)
        y = delta_linear(x, weight, b, as_layout(delta, layout), decode=False)  # decode sizes too: two kernels
        check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), FP32)
    s, e = shrink.launches, expand.launches
    assert [c["ATOMIC"] for c in s] == [True, False, True]
    block_i = [128, 64, 64] if layout == "bitplanes" else [dm.SLOT_FP32_BLOCK_I] * 3  # fp32 x: 16-row slot steps
    assert [c["BLOCK_I"] for c in s] == block_i and [c["BLOCK_M"] for c in s] == [16, 64, 16]
    assert [c["UNIFORM_GROUP"] for c in s] == [True, True, layout == "slots"]  # 48 % 16 == 0
    assert [c["BLOCK_O"] for c in e] == [64, 32, 32]
    assert [c["UNIFORM_GROUP"] for c in e] == [True, True, False]
    assert s[0]["grid"] == (1, 1, 3) and s[1]["grid"] == (1, 5, 1) and e[0]["grid"] == (1, 5)


def test_zero_rank_delta_is_the_base():
    x, weight, b, delta = make((4,), 33, 20, ((3, 0), (2, 0)), 32, FP32)
    assert delta.rank == 0
    torch.testing.assert_close(delta_linear(x, weight, b, delta), F.linear(x, weight, b))


def test_tables_are_cached_by_tensor_addresses():
    x, weight, b, delta = make((2,), 40, 40, ((2, 5),), 32, FP32)
    device = torch.device("cpu")
    t1 = dm._tables([delta], dm.BLOCK_C, device)
    assert dm._tables([delta], dm.BLOCK_C, device) is t1
    moved = PackedDelta(**{**delta.__dict__, "u_words": delta.u_words.clone()})  # a new tensor: new tables
    t2 = dm._tables([moved], dm.BLOCK_C, device)
    assert t2 is not t1 and t2.meta[0, 3].item() == moved.u_words.data_ptr()
    torch.testing.assert_close(delta_linear(x, weight, b, moved), delta_linear(x, weight, b, delta))


# ------------------------------------------------------------------------------------------- gathered
def make_tenants(K, N, schedules, group_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [PackedDelta.random(N, K, bands, group_size=group_size, generator=g, sigma_scale=2.0) for bands in schedules]


SCHEDULES = [((8, 2), (3, 5), (2, 40)), ((1, 7),), ((2, 0), (4, 33)), ((5, 3), (2, 66))]

GATHERED_CASES = [
    # lead, index shape (None: one per row), dtype, bias
    ((37,), None, FP32, True),
    ((16,), None, BF16, False),  # decode: 16 rows over 4 tenants and -1
    ((3, 13), (3,), BF16, True),  # one index per sequence
    ((3, 13), None, FP32, False),  # one index per token of a 3-D batch
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lead,index_shape,dtype,bias", GATHERED_CASES)
def test_gathered_matches_reference(lead, index_shape, dtype, bias, layout):
    K, N = 70, 100
    x, weight, b, _ = make(lead, K, N, ((2, 1),), 32, dtype, bias)
    deltas = make_tenants(K, N, SCHEDULES, 32)
    g = torch.Generator().manual_seed(3)
    index = torch.randint(-1, len(deltas), index_shape or lead, generator=g)
    index.view(-1)[0] = -1
    y = delta_linear_gathered(x, weight, b, [as_layout(d, layout) for d in deltas], index)
    assert y.shape == (*lead, N) and y.dtype == dtype
    ref = reference_delta_linear_gathered(f64(x), f64(weight), f64(b), deltas, index)
    check_close(y, x, weight, b, ref, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gathered_rows_equal_single_delta_calls(layout):
    """Each row of a mixed batch is what delta_linear gives for that row's delta (-1: the base)."""
    K, N = 40, 50
    x, weight, b, _ = make((9,), K, N, ((2, 1),), 32, FP32)
    deltas = [as_layout(d, layout) for d in make_tenants(K, N, SCHEDULES[:3] + [((3, 0),)], 32)]  # 3: rank 0
    index = torch.tensor([2, -1, 0, 3, 1, -1, 2, 1, 0])
    y = delta_linear_gathered(x, weight, b, deltas, index)
    for i, j in enumerate(index.tolist()):
        row = x[i : i + 1]
        expect = F.linear(row, weight, b) if j < 0 else delta_linear(row, weight, b, deltas[j])
        torch.testing.assert_close(y[i : i + 1], expect, rtol=1e-5, atol=1e-5)


def test_gathered_all_rows_without_delta_and_unused_deltas():
    x, weight, b, _ = make((6,), 40, 30, ((2, 1),), 32, FP32)
    deltas = make_tenants(40, 30, SCHEDULES, 32)
    y = delta_linear_gathered(x, weight, b, deltas, torch.full((6,), -1))
    torch.testing.assert_close(y, F.linear(x, weight, b))
    index = torch.tensor([3, 3, -1, 3, 3, 3])  # tenants 0-2 unused
    ref = reference_delta_linear_gathered(f64(x), f64(weight), f64(b), deltas, index)
    assert rel_err(delta_linear_gathered(x, weight, b, deltas, index), ref) <= TOL[FP32]


@pytest.mark.parametrize("bad", [4, -2, 100])
def test_gathered_out_of_range_index_raises(bad):
    x, weight, b, _ = make((8,), 40, 30, ((2, 1),), 32, FP32)
    deltas = make_tenants(40, 30, SCHEDULES, 32)
    index = torch.zeros(8, dtype=torch.long)
    index[5] = bad
    for backend in (None, "reference"):
        with pytest.raises(ValueError, match=rf"adapter_index out of range: got \[{bad}\].*-1 \(no delta\) and 0..3"):
            delta_linear_gathered(x, weight, b, deltas, index, backend=backend)


def test_gathered_unchecked_bad_index_gives_nan_rows_only():
    x, weight, b, _ = make((10,), 40, 30, ((2, 1),), 32, FP32)
    deltas = make_tenants(40, 30, SCHEDULES[:2], 32)
    index = torch.tensor([0, 1, -1, 5, 0, 1, -3, 1, 0, -1])
    y = delta_linear_gathered(x, weight, b, deltas, index, check_index=False)
    assert y.isnan().any(1).nonzero().flatten().tolist() == [3, 6] and y[[3, 6]].isnan().all()
    good = torch.ones(10, dtype=torch.bool)
    good[[3, 6]] = False
    ref = reference_delta_linear_gathered(f64(x), f64(weight), f64(b), deltas, index)
    assert rel_err(y[good], ref[good]) <= TOL[FP32]


def test_gathered_one_launch_pair_for_all_tenants(monkeypatch):
    shrink, expand = Recorder(dm._delta_shrink_kernel), Recorder(dm._delta_expand_kernel)
    monkeypatch.setattr(dm, "_delta_shrink_kernel", shrink)
    monkeypatch.setattr(dm, "_delta_expand_kernel", expand)
    x, weight, b, _ = make((16,), 40, 30, ((2, 1),), 32, FP32)
    deltas = make_tenants(40, 30, SCHEDULES, 32)
    delta_linear_gathered(x, weight, b, deltas, torch.arange(16) % 5 - 1)
    assert len(shrink.launches) == 1 and len(expand.launches) == 1
    assert shrink.launches[0]["grid"][0] == 4  # one row block per tenant present


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(adapter_index=torch.zeros(8)), TypeError, "integer tensor"),
        (dict(adapter_index=torch.zeros(8, dtype=torch.bool)), TypeError, "integer tensor"),
        (dict(adapter_index=torch.zeros(7, dtype=torch.long)), ValueError, "adapter_index must have shape"),
        (dict(deltas=[]), ValueError, "non-empty sequence"),
        (dict(deltas="one"), TypeError, r"deltas\[0\] must be a PackedDelta"),
        (dict(deltas=make_tenants(40, 31, SCHEDULES[:2], 32)), ValueError, r"deltas\[0\] is for a \(31 x 40\) layer"),
        (dict(deltas=make_tenants(40, 30, SCHEDULES[:1], 32) + make_tenants(40, 30, SCHEDULES[:1], 64)),
         ValueError, r"group sizes \[32, 64\]"),
        (dict(deltas=[PackedDelta.empty(30, 40, 32, ((2, 3),), device="meta")]), ValueError, r"\.to\('cpu'\)"),
    ],
)  # fmt: skip
def test_gathered_bad_inputs(change, error, match):
    x, weight, b, _ = make((8,), 40, 30, ((2, 1),), 32, FP32)
    args = dict(x=x, weight=weight, bias=b, deltas=make_tenants(40, 30, SCHEDULES[:2], 32), adapter_index=torch.zeros(8, dtype=torch.long))
    args.update(change)
    with pytest.raises(error, match=match):
        delta_linear_gathered(**args)


# ------------------------------------------------------------------------------------------- checks
def _truncated(delta):
    return PackedDelta(**{**delta.__dict__, "v_words": delta.v_words[:-1]})


def _retyped(delta):
    return PackedDelta(**{**delta.__dict__, "u_scales": delta.u_scales.float()})


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(x=torch.randn(4, 39)), ValueError, r"x's last dimension must be in_features=40"),
        (dict(weight=torch.randn(30, 41)), ValueError, r"x's last dimension must be in_features=41"),
        (dict(bias=torch.randn(29)), ValueError, r"bias must have shape \(30,\)"),
        (dict(x=torch.randn(4, 40, dtype=FP64)), TypeError, "must have one dtype"),
        (dict(weight=torch.randn(30, 40).to(BF16)), TypeError, "must have one dtype"),
        (dict(x=torch.randint(0, 3, (4, 40))), TypeError, "x has dtype torch.int64"),
        (dict(weight=torch.randn(30, 40, device="meta")), ValueError, "one device"),
        (dict(delta="nope"), TypeError, "delta must be a PackedDelta"),
        (dict(delta=PackedDelta.random(30, 41, ((2, 3),), group_size=32)), ValueError, r"delta is for a \(30 x 41\) layer"),
        (dict(delta=PackedDelta.random(30, 40, ((2, 3),), group_size=32).to("meta")), ValueError,
         r"delta\.sigma is on meta but x is on cpu: move the adapter to x's device with delta = delta\.to\('cpu'\)"),
        ("truncated", ValueError, r"delta\.v_words has shape"),
        ("retyped", TypeError, r"delta\.u_scales has dtype torch\.float32"),
    ],
)  # fmt: skip
def test_bad_inputs(change, error, match):
    x, weight, b, delta = make((4,), 40, 30, ((2, 3),), 32, FP32)
    args = dict(x=x, weight=weight, bias=b, delta=delta)
    if change == "truncated":
        change = dict(delta=_truncated(delta))
    elif change == "retyped":
        change = dict(delta=_retyped(delta))
    args.update(change)
    with pytest.raises(error, match=match):
        delta_linear(**args)


# ------------------------------------------------------------------------------------------- dispatch
def test_forced_and_automatic_backends(monkeypatch):
    x, weight, b, delta = make((5,), 40, 30, ((2, 3), (3, 2)), 32, FP32)
    ref = reference_delta_linear(x, weight, b, delta)
    with pytest.raises(ValueError, match="backend must be one of"):
        delta_linear(x, weight, b, delta, backend="cuda")
    y_triton = delta_linear(x, weight, b, delta, backend="triton")
    assert rel_err(y_triton, ref) <= TOL[FP32]

    monkeypatch.setattr(dm, "_delta_shrink_kernel", NoLaunch())
    monkeypatch.setattr(dm, "_delta_expand_kernel", NoLaunch())
    assert torch.equal(delta_linear(x, weight, b, delta, backend="reference"), ref)
    deltas, index = [delta, delta], torch.tensor([0, -1, 1, 1, 0])
    ref_g = reference_delta_linear_gathered(x, weight, b, deltas, index)
    assert torch.equal(delta_linear_gathered(x, weight, b, deltas, index, backend="reference"), ref_g)
    # float64 runs on the reference
    y64 = delta_linear(x.double(), weight.double(), b.double(), delta)
    assert torch.equal(y64, reference_delta_linear(x.double(), weight.double(), b.double(), delta))
    # a CPU tensor without the interpreter: the reference; forcing Triton there raises
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert choose_backend(x, 1) == "reference"
    assert torch.equal(delta_linear(x, weight, b, delta), ref)
    assert torch.equal(delta_linear_gathered(x, weight, b, deltas, index), ref_g)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        delta_linear(x, weight, b, delta, backend="triton")


def test_strided_delta_tensors_run_on_the_kernels():
    """Issue 11 item 28: a delta whose tensors are strided views (a column-major scales tensor, a slice of a stacked
    sigma) is made contiguous at the boundary and runs on the kernels (it used to raise, or fall back silently)."""
    x, weight, b, delta = make((5,), 40, 30, ((2, 3), (3, 2)), 32, FP32)
    scales = delta.v_scales.t().contiguous().t()  # same values, column-major
    sigma = torch.stack([delta.sigma, delta.sigma * 2], 1)[:, 0]  # same values, stride 2
    odd = PackedDelta(**{**delta.__dict__, "v_scales": scales, "sigma": sigma})
    assert not odd.v_scales.is_contiguous() and not odd.sigma.is_contiguous()
    ref = reference_delta_linear(x, weight, b, delta)
    torch.testing.assert_close(delta_linear(x, weight, b, odd, backend="triton"), ref, rtol=1e-5, atol=1e-5)
    index = torch.tensor([0, -1, 0, 0, -1])
    torch.testing.assert_close(
        delta_linear_gathered(x, weight, b, [odd], index, backend="triton"),
        delta_linear_gathered(x, weight, b, [delta], index, backend="reference"), rtol=1e-5, atol=1e-5,
    )


def test_gradients_go_through_the_reference(monkeypatch):
    """The Triton path is forward-only; with autograd on and x requiring grad, the differentiable reference runs."""
    x, weight, b, delta = make((3, 4), 40, 30, ((2, 3), (3, 2)), 32, FP32)
    monkeypatch.setattr(dm, "_delta_shrink_kernel", NoLaunch())
    monkeypatch.setattr(dm, "_delta_expand_kernel", NoLaunch())
    monkeypatch.setattr(dd, "_slot_shrink_kernel", NoLaunch())
    monkeypatch.setattr(dd, "_fused_decode_kernel", NoLaunch())
    dy = torch.randn(3, 4, 30, generator=torch.Generator().manual_seed(5))
    xg = x.clone().requires_grad_()
    delta_linear(xg, weight, b, delta).backward(dy)
    x64 = f64(x).requires_grad_()
    reference_delta_linear(x64, f64(weight), f64(b), delta).backward(dy.double())
    assert rel_err(xg.grad, x64.grad) <= TOL[FP32]
    index = torch.tensor([0, -1, 0])
    xg2 = x.clone().requires_grad_()
    delta_linear_gathered(xg2, weight, b, [delta], index).backward(dy)
    x64 = f64(x).requires_grad_()
    reference_delta_linear_gathered(x64, f64(weight), f64(b), [delta], index).backward(dy.double())
    assert rel_err(xg2.grad, x64.grad) <= TOL[FP32]
    with torch.no_grad(), pytest.raises(AssertionError, match="kernel must not run"):
        delta_linear(xg, weight, b, delta)


def test_autocast():
    x, weight, b, delta = make((6,), 40, 30, ((2, 3), (3, 2)), 32, FP32)
    with torch.autocast("cpu", dtype=BF16):
        y = delta_linear(x, weight, b, delta)
    assert y.dtype == BF16
    ref = reference_delta_linear(f64(x.to(BF16)), f64(weight.to(BF16)), f64(b.to(BF16)), delta)
    assert rel_err(y, ref) <= TOL[BF16]


def test_exports():
    import peft_ext.kernels as kernels

    for name in ("delta_linear", "delta_linear_gathered", "PackedDelta", "SignDelta", "reference_delta_linear",
                 "reference_delta_linear_gathered"):  # fmt: skip
        assert name in kernels.__all__ and getattr(kernels, name) is not None
    assert SignDelta.__name__ == "SignDelta"


# ------------------------------------------------------------------ devices, fp16 range, determinism (issue 11)
def test_launches_run_under_a_guard_for_x_device(launch_guards):
    x, weight, b, delta = make((2,), 300, 300, ((2, 5),), 128, FP32)
    from peft_ext.kernels.delta_format import SlotDelta

    sd = SlotDelta.from_packed(delta)
    delta_linear(x, weight, b, sd)  # decode: the fused kernels
    delta_linear(x, weight, b, delta, deterministic=True, decode=False)
    delta_linear_gathered(x, weight, b, [delta, delta], torch.tensor([1, 0]))
    delta_linear_gathered(x, weight, b, [sd, sd], torch.tensor([1, 0]))
    names = [name for name, _ in launch_guards.launches]
    assert names == ["_slot_shrink_kernel", "_fused_decode_kernel"] + ["_delta_shrink_kernel", "_delta_expand_kernel"] * 2 + [
        "_slot_delta_shrink_kernel", "_slot_delta_expand_kernel"]  # fmt: skip
    assert all(active == (torch.device("cpu"),) for _, active in launch_guards.launches), launch_guards.launches


def large_t_delta(K, N, seed=0):
    """A delta whose T = (x V) sigma exceeds fp16's 65504 for x ~ 2 N(0, 1) while its delta part (small U) and y
    stay in range."""
    g = torch.Generator().manual_seed(seed)
    k = 7
    u = torch.randn(N, k, generator=g) / N**0.5 * 0.03
    v = torch.randn(K, k, generator=g) / K**0.5
    sigma = torch.sort(torch.rand(k, generator=g), descending=True).values * 1e5
    return PackedDelta.from_factors(u, sigma, v, ((8, 2), (3, 5)), 32)


@pytest.mark.parametrize("lead", [(5,), (40,)], ids=["decode-split-atomic", "prefill-one-split"])
def test_fp16_large_t_stays_in_range(gpu_fp16_math, lead):
    """T is fp32 and the expand's dot reads it in fp32 for fp16 inputs (rounded to fp16 it overflowed to inf).
    Interpreter with the GPU's fp16 operand dtypes, against the fp32 reference."""
    K, N = 70, 100
    delta = large_t_delta(K, N)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*lead, K, generator=g) * 2).half()
    weight = (torch.randn(N, K, generator=g) * K**-0.5).half()
    b = torch.randn(N, generator=g).half()
    t = (x.double() @ delta.factor("v").double()) * delta.sigma.double()
    assert t.abs().max() > 65504
    y = delta_linear(x, weight, b, delta)
    assert y.isfinite().all()
    check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), FP16)
    index = torch.arange(lead[0]) % 3 - 1
    y_g = delta_linear_gathered(x, weight, b, [delta, large_t_delta(K, N, seed=2)], index)
    ref_g = reference_delta_linear_gathered(f64(x), f64(weight), f64(b), [delta, large_t_delta(K, N, seed=2)], index)
    assert y_g.isfinite().all()
    check_close(y_g, x, weight, b, ref_g, FP16)


@pytest.fixture
def deterministic_algorithms():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_algorithms_use_the_split_store_path(monkeypatch, deterministic_algorithms, layout):
    """Under torch.use_deterministic_algorithms(True) a split shrink stores each split's slice (no fp32 atomics);
    the slices are summed in a fixed order. The per-split buffer is poisoned (NaN) where not written."""
    shrink, expand = record_kernels(monkeypatch, layout)
    x, weight, b, delta = make((2,), 300, 300, ((2, 5),), 128, FP32)  # decode: `in` split 3 ways
    delta = as_layout(delta, layout)
    ys = [delta_linear(x, weight, b, delta, decode=False) for _ in range(2)]
    check_close(ys[0], x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), FP32)
    assert torch.equal(ys[0], ys[1])
    # two tenants, ranks 7 and 33: the smaller one's unused T columns stay NaN and are never read
    K, N = 300, 100
    x2, w2, b2, _ = make((16,), K, N, ((2, 1),), 32, FP32)
    deltas = [as_layout(d, layout) for d in make_tenants(K, N, SCHEDULES[1:3], 32)]
    index = torch.arange(16) % 3 - 1
    y_g = delta_linear_gathered(x2, w2, b2, deltas, index)
    check_close(y_g, x2, w2, b2, reference_delta_linear_gathered(f64(x2), f64(w2), f64(b2), deltas, index), FP32)
    assert [c["grid"][2] > 1 for c in shrink.launches] == [True] * 3  # every call split `in`
    assert [c["ATOMIC"] for c in shrink.launches] == [False] * 3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_argument_overrides_the_global_setting(monkeypatch, layout):
    shrink, _ = record_kernels(monkeypatch, layout)
    x, weight, b, delta = make((2,), 300, 300, ((2, 5),), 128, FP32)
    delta = as_layout(delta, layout)
    assert not torch.are_deterministic_algorithms_enabled()
    y_atomic = delta_linear(x, weight, b, delta, decode=False)
    y_det = delta_linear(x, weight, b, delta, deterministic=True, decode=False)
    y_g = delta_linear_gathered(x, weight, b, [delta], torch.tensor([0, -1]), deterministic=True)
    assert [c["ATOMIC"] for c in shrink.launches] == [True, False, False]
    ref = reference_delta_linear(f64(x), f64(weight), f64(b), delta)
    for y in (y_atomic, y_det):
        check_close(y, x, weight, b, ref, FP32)
    torch.testing.assert_close(y_g[0], y_det[0])


# --------------------------------------------------------------------------------------- GPU compile
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize(
    "rows,group_size,dtype,has_order",
    [(16, 128, BF16, False), (1, 128, BF16, True), (2048, 128, BF16, False), (2048, 128, FP32, True), (16, 48, BF16, False),
     (16, 128, FP16, False), (2048, 128, FP16, True)],
)  # fmt: skip
def test_kernels_compile_for_h100(compile_sm90, monkeypatch, rows, group_size, dtype, has_order):
    """The GPU tile configs compile for sm_90 (Triton IR, PTX, ptxas; no GPU needed) and fit in shared memory: the
    split shrink with atomics and with per-split stores (the deterministic path), fp16 with its fp32 T operand."""
    monkeypatch.setattr(dm, "target_programs", lambda device, per_sm=1: 132 * per_sm)  # an H100's SMs
    monkeypatch.setattr(dispatch, "interpret_mode", lambda: False)  # the GPU's dtype choices
    cfg = dm._config(rows, dm.cdiv(rows, 64), 4096, 14336, group_size, 25, torch.device("cuda"))
    t = {BF16: "bf16", FP32: "fp32", FP16: "fp16"}[dtype]
    common = dict(
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, HAS_ORDER=has_order,
        DOT_PRECISION=dispatch.dot_precision(dtype),
    )  # fmt: skip
    tables = dict(ORDER="i32", BLOCKS="i32", META="i64", TILES="i32")
    for atomic in sorted({cfg.splits > 1, False}):  # a split shrink also has its deterministic form
        shrink = compile_sm90(
            dm._delta_shrink_kernel, dict(tables, X=t, T="fp32"),
            dict(common, BLOCK_I=cfg.block_i, ATOMIC=atomic, UNIFORM_GROUP=group_size % cfg.block_i == 0,
                 COMPUTE=dispatch.compute_dtype(dtype)),
            num_warps=cfg.num_warps,
        )  # fmt: skip
        assert shrink.metadata.shared <= 227 * 1024
    expand = compile_sm90(
        dm._delta_expand_kernel, dict(tables, T="fp32", Y=t),
        dict(common, BLOCK_O=cfg.block_o, UNIFORM_GROUP=group_size % cfg.block_o == 0,
             T_COMPUTE=dispatch.intermediate_compute(dtype)),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    assert expand.metadata.shared <= 227 * 1024


# ------------------------------------------------------------------------------------------------ GPU
BENCH_SHAPES = [(4096, 4096, ((8, 2), (3, 32), (2, 968))), (14336, 4096, ((8, 2), (3, 32), (2, 1428)))]


@pytest.mark.gpu
@pytest.mark.parametrize("out_f,in_f,bands", BENCH_SHAPES)
@pytest.mark.parametrize("M", [1, 4, 16, 300])
def test_gpu_benchmark_shapes_match_reference(out_f, in_f, bands, M):
    x, weight, b, delta = make((M,), in_f, out_f, bands, 128, BF16, bias=False, device="cuda")
    assert choose_backend(x, 1) == "triton"
    with torch.no_grad():
        y = delta_linear(x, weight, b, delta)
    check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), None, delta), BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("tenants", [4, 16])
def test_gpu_gathered_decode(tenants):
    out_f, in_f, bands = BENCH_SHAPES[0]
    x, weight, b, _ = make((16,), in_f, out_f, ((2, 1),), 128, BF16, device="cuda")
    base = PackedDelta.random(out_f, in_f, bands, group_size=128, generator=torch.Generator().manual_seed(2)).to("cuda")
    deltas = [base] + [PackedDelta(**{**base.__dict__, "sigma": base.sigma * (1 + j)}) for j in range(1, tenants)]
    index = torch.arange(16, device="cuda") % (tenants + 1) - 1
    with torch.no_grad():
        y = delta_linear_gathered(x, weight, b, deltas, index)
    ref = reference_delta_linear_gathered(f64(x), f64(weight), f64(b), deltas, index)
    check_close(y, x, weight, b, ref, BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("lead", [(5,), (40,)], ids=["decode-split-atomic", "prefill-one-split"])
def test_gpu_fp16_large_t_stays_in_range(lead):
    """fp16 with |T| > 65504 on the compiled kernels (TF32 dots reading T in fp32)."""
    K, N = 70, 100
    delta = large_t_delta(K, N).to("cuda")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*lead, K, generator=g) * 2).half().cuda()
    weight = (torch.randn(N, K, generator=g) * K**-0.5).half().cuda()
    with torch.no_grad():
        y = delta_linear(x, weight, None, delta)
    assert ((x.double() @ delta.factor("v").double()) * delta.sigma.double()).abs().max() > 65504
    assert y.isfinite().all()
    check_close(y, x, weight, None, reference_delta_linear(f64(x), f64(weight), None, delta), FP16)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
def test_gpu_deterministic_path_is_bitwise_reproducible(M):
    out_f, in_f, bands = BENCH_SHAPES[0]
    x, weight, b, delta = make((M,), in_f, out_f, bands, 128, BF16, device="cuda")
    with torch.no_grad():
        ys = [delta_linear(x, weight, b, delta, deterministic=True) for _ in range(10)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    check_close(ys[0], x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), BF16)


@pytest.mark.gpu
def test_gpu_inputs_on_another_device_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    torch.cuda.set_device(0)
    out_f, in_f, bands = BENCH_SHAPES[0]
    x, weight, b, delta = make((4,), in_f, out_f, bands, 128, BF16, device="cuda:1")
    with torch.no_grad():
        y = delta_linear(x, weight, b, delta)
        y_g = delta_linear_gathered(x, weight, b, [delta, delta], torch.tensor([0, 1, -1, 0]))
    assert torch.cuda.current_device() == 0
    ref = reference_delta_linear(f64(x), f64(weight), f64(b), delta)
    check_close(y, x, weight, b, ref, BF16)
    ref_g = reference_delta_linear_gathered(f64(x), f64(weight), f64(b), [delta, delta], torch.tensor([0, 1, -1, 0]))
    check_close(y_g, x, weight, b, ref_g, BF16)
