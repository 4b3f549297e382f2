"""kernels/lowrank_grouped.py (sibling projections sharing one read of x) and lowrank.py's dy pass with dB fused,
in Triton's interpreter against the plain-PyTorch reference (kernels/reference.py) in float64: ||out - ref|| / ||ref||
<= 1e-4 for fp32, 1e-2 for bf16 (design/perf.md), every output and gradient (x, A_i, B_i, biases). Groups of 2 and 3
siblings of different widths (q 64 -> 64, k/v 64 -> 16), rows not a multiple of the row block, empty batches, bad
inputs; the bytes model at the anchor shape."""

import pytest
import torch

from peft_ext.kernels import dispatch, grouped_lowrank_linear, grouped_shrink, lowrank_expand_linear
from peft_ext.kernels import lowrank as lowrank_module
from peft_ext.kernels import lowrank_grouped as grouped_module
from peft_ext.kernels.lowrank import dy_pass, fuse_db_saves_bytes
from peft_ext.kernels.reference import reference_lowrank_linear

from .accuracy import BF16, FP16, FP32, TOL, rel_err


def make_group(M, K, Ns, ranks, dtype, adapter_dtype, bias=(True,), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    n = len(Ns)
    bias = tuple(bias) * n if len(bias) == 1 else bias
    return dict(
        x=rnd(*M, K),
        weights=[rnd(N, K, scale=K**-0.5) for N in Ns],
        biases=[rnd(N) if b else None for N, b in zip(Ns, bias)],
        lora_as=[rnd(r, K, scale=K**-0.5, dt=adapter_dtype) for r in ranks],
        lora_bs=[rnd(N, r, scale=r**-0.5, dt=adapter_dtype) for N, r in zip(Ns, ranks)],
        scales=[1.0, 2.0, 0.5][:n],  # s = 1: the dy pass then stores d(xa) = dy B unscaled
    )


def leaves_of(group, double=False):
    """Fresh leaves (x, A_i, B_i, biases require grad; W frozen), optionally in float64."""

    def leaf(t):
        t = t.detach().double() if double else t.detach().clone()
        return t.requires_grad_()

    return dict(
        x=leaf(group["x"]),
        weights=[w.double() if double else w for w in group["weights"]],
        biases=[None if b is None else leaf(b) for b in group["biases"]],
        lora_as=[leaf(a) for a in group["lora_as"]],
        lora_bs=[leaf(b) for b in group["lora_bs"]],
        scales=group["scales"],
    )


def grads(ys, leaves, seed=7):
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(y.shape, generator=g).to(y) for y in ys]
    flat = [leaves["x"], *leaves["lora_as"], *leaves["lora_bs"], *[b for b in leaves["biases"] if b is not None]]
    names = ["x"] + [f"A{i}" for i in range(len(ys))] + [f"B{i}" for i in range(len(ys))]
    names += [f"b{i}" for i, b in enumerate(leaves["biases"]) if b is not None]
    return dict(zip(names, torch.autograd.grad(ys, flat, [d.to(y.dtype) for d, y in zip(dys, ys)])))


def reference(group):
    leaves = leaves_of(group, double=True)
    ys = [
        reference_lowrank_linear(leaves["x"], w, b, a, bb, s)
        for w, b, a, bb, s in zip(leaves["weights"], leaves["biases"], leaves["lora_as"], leaves["lora_bs"], leaves["scales"])
    ]  # fmt: skip
    return ys, grads(ys, leaves)


def grouped(group):
    leaves = leaves_of(group)
    ys = grouped_lowrank_linear(**leaves)
    return ys, grads(ys, leaves)


@pytest.fixture
def poison(monkeypatch):
    """Every float buffer torch.empty allocates (the kernels' outputs, partials, intermediates) starts as NaN: an
    element a kernel fails to write shows up in the results."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture(params=["fused", "two-pass"])
def db_path(request, monkeypatch):
    """Both backward paths for dB: fused into the dy pass, or its own pass (the rule forced either way)."""
    fused = request.param == "fused"
    calls = []

    def rule(*args):
        calls.append(fused)
        return fused

    monkeypatch.setattr(lowrank_module, "fuse_db_saves_bytes", rule)
    monkeypatch.setattr(grouped_module, "fuse_db_saves_bytes", rule)
    return calls


CASES = [  # rows (lead shape), K, N_i, r_i, dtype, adapter dtype, bias per sibling
    ((37,), 64, (64, 16, 16), (4, 4, 4), FP32, FP32, (True, False, True)),  # q/k/v; 37 rows: not a block multiple
    ((2, 19), 64, (48, 48), (8, 8), BF16, FP32, (False,)),  # gate/up, 3-D x, fp32 masters
    ((37,), 64, (64, 16, 16), (4, 2, 6), BF16, BF16, (True,)),  # different ranks
    ((70,), 40, (24, 40), (4, 4), FP16, FP32, (True,)),  # fp16: fp32 intermediates; 2 row blocks
]


@pytest.mark.parametrize("lead,K,Ns,ranks,dtype,adapter_dtype,bias", CASES)
def test_grouped_forward_and_grads_match_reference(poison, db_path, lead, K, Ns, ranks, dtype, adapter_dtype, bias):
    group = make_group(lead, K, Ns, ranks, dtype, adapter_dtype, bias)
    ys, g = grouped(group)
    ys_ref, g_ref = reference(group)
    assert len(db_path) == len(Ns)  # each expand node asked the rule (forced here) in its backward
    for y, y_ref in zip(ys, ys_ref):
        assert y.dtype == dtype and y.shape == y_ref.shape
        assert rel_err(y, y_ref) <= TOL[dtype]
    for name in g_ref:
        assert g[name].shape == g_ref[name].shape, name
        want = dtype if name == "x" or name.startswith("b") else adapter_dtype
        assert g[name].dtype == want, name
        assert rel_err(g[name], g_ref[name]) <= TOL[dtype], (name, rel_err(g[name], g_ref[name]))


def test_grouped_equals_per_projection_lowrank_linear_fp32():
    """Same values as one lowrank_linear per projection (today's path), fp32: to float rounding."""
    group = make_group((45,), 64, (64, 16, 16), (4, 4, 4), FP32, FP32)
    ys, g = grouped(group)
    leaves = leaves_of(group)
    ys_own = [
        lowrank_module.lowrank_linear(leaves["x"], w, b, a, bb, s)
        for w, b, a, bb, s in zip(leaves["weights"], leaves["biases"], leaves["lora_as"], leaves["lora_bs"], leaves["scales"])
    ]  # fmt: skip
    g_own = grads(ys_own, leaves)
    for y, y_own in zip(ys, ys_own):
        assert rel_err(y, y_own) <= 1e-6
    for name in g_own:
        assert rel_err(g[name], g_own[name]) <= 1e-5, name


def test_grouped_shrink_outputs_and_partial_use():
    """grouped_shrink alone: xa_i = x A_i^T; a sibling whose output is not used gets a zero d(xa) (no dA from it)."""
    group = make_group((33,), 64, (64, 16), (4, 8), FP32, FP32)
    x = group["x"].clone().requires_grad_()
    a0, a1 = (a.clone().requires_grad_() for a in group["lora_as"])
    xa0, xa1 = grouped_shrink(x, [a0, a1])
    assert xa0.shape == (33, 4) and xa1.shape == (33, 8)
    assert rel_err(xa0, group["x"].double() @ a0.double().T) <= 1e-6
    assert rel_err(xa1, group["x"].double() @ a1.double().T) <= 1e-6
    dxa = torch.randn(33, 4, generator=torch.Generator().manual_seed(3))
    dx, da0, da1 = torch.autograd.grad(xa0, (x, a0, a1), dxa, allow_unused=True)
    assert rel_err(dx, dxa.double() @ a0.double()) <= 1e-6
    assert rel_err(da0, dxa.double().T @ group["x"].double()) <= 1e-6
    assert da1 is not None and torch.count_nonzero(da1) == 0


def test_empty_batch():
    group = make_group((0,), 64, (64, 16), (4, 4), FP32, FP32)
    leaves = leaves_of(group)
    ys = grouped_lowrank_linear(**leaves)
    assert [tuple(y.shape) for y in ys] == [(0, 64), (0, 16)]
    sum(y.sum() for y in ys).backward()
    assert leaves["x"].grad.shape == (0, 64)
    assert all(torch.count_nonzero(a.grad) == 0 for a in leaves["lora_as"] + leaves["lora_bs"])


def test_interpreter_runs_the_kernels(monkeypatch):
    """The Triton path is taken here (not the reference): the grouped shrink and the dy pass launch."""
    launched = []
    launch = dispatch.LazyKernel.__getitem__
    monkeypatch.setattr(dispatch.LazyKernel, "__getitem__", lambda k, grid: launched.append(k.fn.__name__) or launch(k, grid))
    grouped(make_group((20,), 64, (64, 16, 16), (4, 4, 4), FP32, FP32))
    assert launched.count("_dy_pass_kernel") == 3  # one pass over each dy
    assert launched.count("_shrink_expand_kernel") == 1 + 3  # one grouped shrink, one expand per sibling
    assert launched.count("_wgrad_kernel") in (1, 4)  # every dA in one pass over x (+ dB's when not fused)


def test_every_launch_runs_under_a_guard_for_x_device(launch_guards):
    """The grouped path launches through kernels/lowrank.py's launchers, each inside a `launch_device` guard for the
    input's device (Triton launches on the current CUDA device)."""
    grouped(make_group((20,), 64, (64, 16), (4, 4), FP32, FP32))
    names = [name for name, _ in launch_guards.launches]
    assert "_dy_pass_kernel" in names and "_shrink_expand_kernel" in names and "_wgrad_kernel" in names, names
    assert all(active == (torch.device("cpu"),) for _, active in launch_guards.launches), launch_guards.launches


# --------------------------------------------------------------------------------------- dy pass (part 1)
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("M", [1, 37, 130])
def test_dy_pass_against_float64(poison, M, keep):
    """dy_pass: mid = mid_scale dy B, dx_low = s (dy B) A * keep / (1-p), dB = s dy^T xa (from per-program fp32
    partials), outputs poisoned by torch.empty; M = 130: several programs, rows not a block multiple."""
    g = torch.Generator().manual_seed(M)
    N, K, R, s, p = 70, 45, 6, 0.7, 0.25
    dy, b, a, xa = (torch.randn(*shape, generator=g) for shape in ((M, N), (N, R), (R, K), (M, R)))
    mask = torch.rand(M, K, generator=g) > p if keep else None
    dx, mid, db = dy_pass(dy, b, a, xa, s, mid_scale=1.5, keep=mask, dropout_p=p if keep else 0.0)
    dyb = dy.double() @ b.double()
    dx_ref = s * dyb @ a.double()
    if keep:
        dx_ref = dx_ref * mask.double() / (1 - p)
    assert rel_err(mid, 1.5 * dyb) <= 1e-6 and rel_err(dx, dx_ref) <= 1e-6
    assert db.dtype == FP32 and rel_err(db, s * dy.double().T @ xa.double()) <= 1e-6
    _, mid_only, none = dy_pass(dy, b, None, None, s)
    assert none is None and rel_err(mid_only, dyb) <= 1e-6


def test_lowrank_linear_db_fused_equals_two_pass(poison, monkeypatch):
    """lowrank_linear's backward with dB fused into the dy pass gives the two-pass path's gradients (fp32)."""
    from .test_lowrank import make_layer, run

    layer = make_layer((2, 41), 45, 70, 6, FP32, FP32)
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(lowrank_module, "fuse_db_saves_bytes", lambda *a, fused=fused: fused)
        out[fused] = run(layer, ("x", "lora_a", "lora_b", "bias"), scale=0.5)[1]
    for name in out[True]:
        assert rel_err(out[True][name], out[False][name]) <= 1e-6, name


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype,adapter_dtype", [(BF16, FP32), (FP16, FP32), (FP32, FP32)])
def test_gpu_grouped_matches_reference(monkeypatch, fused, dtype, adapter_dtype):
    """The compiled kernels (q/k/v-like widths, 3 x 341 rows, r = 16), both dB paths."""
    monkeypatch.setattr(grouped_module, "fuse_db_saves_bytes", lambda *args: fused)
    monkeypatch.setattr(lowrank_module, "fuse_db_saves_bytes", lambda *args: fused)
    group = make_group((3, 341), 512, (512, 128, 128), (16, 16, 16), dtype, adapter_dtype)
    group = {k: ([t.cuda() if t is not None else None for t in v] if isinstance(v, list) and k != "scales" else v)
             for k, v in group.items()}  # fmt: skip
    group["x"] = group["x"].cuda()
    ys, g = grouped(group)
    cpu = {k: ([t.cpu() if t is not None else None for t in v] if k != "scales" else v) if isinstance(v, list) else v.cpu()
           for k, v in group.items()}  # fmt: skip
    ys_ref, g_ref = reference(cpu)
    for y, y_ref in zip(ys, ys_ref):
        assert rel_err(y.cpu(), y_ref) <= TOL[dtype]
    for name in g_ref:
        assert rel_err(g[name].cpu(), g_ref[name]) <= TOL[dtype], name


# --------------------------------------------------------------------------------------------- bad inputs
def bad(change):
    group = make_group((5,), 16, (16, 8), (2, 2), FP32, FP32)
    change(group)
    return group


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda g: g["lora_as"].__setitem__(1, torch.randn(2, 15)), ValueError, r"lora_as\[1\] must have shape \(r, in_features=16\)"),
        (lambda g: g["lora_bs"].__setitem__(0, torch.randn(16, 3)), ValueError, r"lora_bs\[0\] must have shape \(out_features=16, r=2\)"),
        (lambda g: g["lora_as"].__setitem__(0, torch.ones(2, 16, dtype=torch.int32)), TypeError, r"lora_as\[0\] has dtype torch.int32"),
        (lambda g: g["weights"].__setitem__(1, torch.randn(8, 16, dtype=BF16)), TypeError, r"must have one dtype"),
        (lambda g: g["biases"].__setitem__(0, torch.randn(15)), ValueError, r"bias must have shape \(16,\)"),
        (lambda g: g["scales"].pop(), ValueError, r"scales must be a list of 2 entries"),
        (lambda g: g.__setitem__("lora_as", []), ValueError, r"lora_as must be a list of 2 entries"),
        (lambda g: g["lora_as"].__setitem__(0, torch.randn(2, 16, device="meta")), ValueError, r"one device.*lora_as\[0\] on meta"),
        (lambda g: g["weights"].__setitem__(0, torch.randn(16)), ValueError, r"weights\[0\] must have shape \(out_features, in_features\)"),
        (lambda g: g["scales"].__setitem__(1, "two"), TypeError, r"scales\[1\] must be a Python number"),
        (lambda g: g["scales"].__setitem__(0, float("nan")), ValueError, r"scales\[0\] must be a finite number"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_field(change, error, match):
    with pytest.raises(error, match=match):
        grouped_lowrank_linear(**bad(change))


def test_bad_expand_and_shrink_inputs():
    group = make_group((5,), 16, (16,), (2,), FP32, FP32)
    x, w, b, a, bb = group["x"], group["weights"][0], group["biases"][0], group["lora_as"][0], group["lora_bs"][0]
    with pytest.raises(ValueError, match=r"xa must have shape \(5, 2\).*output of grouped_shrink"):
        lowrank_expand_linear(x, torch.randn(5, 3), w, b, bb, 1.0)
    with pytest.raises(TypeError, match=r"xa has dtype torch.bfloat16; for x of dtype torch.float32 it must be torch.float32"):
        lowrank_expand_linear(x, torch.randn(5, 2, dtype=BF16), w, b, bb, 1.0)
    with pytest.raises(TypeError, match=r"scale must be a Python number"):
        lowrank_expand_linear(x, torch.randn(5, 2), w, b, bb, torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"lora_as must be a non-empty list"):
        grouped_shrink(x, a)
    with pytest.raises(ValueError, match=r"x must have at least one dimension"):
        grouped_shrink(torch.tensor(1.0), [a])
    with pytest.raises(TypeError, match=r"weights must be a non-empty list"):
        grouped_lowrank_linear(x, [], None, [a], [bb], [1.0])


# -------------------------------------------------------------------------------------------- bytes model
@pytest.fixture
def h100(monkeypatch):
    """The GPU's config choices (an H100: 132 SMs) for the bytes model."""
    monkeypatch.setattr(dispatch, "interpret_mode", lambda: False)
    monkeypatch.setattr(lowrank_module, "interpret_mode", lambda: False)
    monkeypatch.setattr(lowrank_module, "target_programs", lambda device, per_sm=1: 132 * per_sm)
    return torch.device("cuda")


def test_fuse_rule(h100):
    """Fuse dB where its partials (128-row programs: 8 r / 128 bytes per element of dy) cost less than re-reading dy
    (2 bytes per element for bf16) and the second pass's own partials: r = 16 fused, r = 64 not (bf16, q/o and
    gate/up widths); fp32 dy (4 bytes) fuses r = 32 too; the boundaries lowrank.py's docstring states."""
    M = 8192
    assert fuse_db_saves_bytes(M, 2048, 16, BF16, h100) and fuse_db_saves_bytes(M, 5632, 16, BF16, h100)
    assert not fuse_db_saves_bytes(M, 2048, 64, BF16, h100) and not fuse_db_saves_bytes(M, 5632, 64, BF16, h100)
    assert fuse_db_saves_bytes(M, 2048, 32, FP32, h100)
    # fp32 dy above a padded rank of 32: the 128-row fused tile spills at sm_90 (bf16 does not, up to r = 128)
    assert not fuse_db_saves_bytes(M, 256, 33, FP32, h100) and fuse_db_saves_bytes(M, 256, 32, FP32, h100)
    assert not fuse_db_saves_bytes(0, 2048, 16, BF16, h100)
    last = {N: max(r for r in range(1, 129) if fuse_db_saves_bytes(M, N, r, BF16, h100)) for N in (2048, 5632, 256)}
    assert last == {2048: 42, 5632: 35, 256: 128}
    model = lowrank_module.lowrank_bytes_model(M, 2048, 2048, 16, BF16, FP32, h100, backward=True)
    assert "dy pass (dyb, dx_low, dB partials)" in model and "wgrad dB" not in model
    two = lowrank_module.lowrank_bytes_model(M, 2048, 2048, 16, BF16, FP32, h100, backward=True, fuse_db=False)
    # fusing: dy (33.6 MB) not re-read, 64 programs x 2048 x 16 fp32 partials written and read (8.4 MB each)
    assert two["total"] - model["total"] == (M * 2048 * 2 + 2 * 9 * 2048 * 16 * 4) - 2 * 64 * 2048 * 16 * 4


def test_bytes_model_anchor_numbers(h100):
    """The numbers of kernels/lowrank_grouped.py's docstring (a model: TinyLlama shape, M = 8192, r = 16, bf16
    activations, fp32 adapter masters, forward + backward of one block's q/k/v and gate/up)."""
    qkv = grouped_module.grouped_bytes_model(8192, 2048, [2048, 256, 256], 16, BF16, FP32, h100)
    gate_up = grouped_module.grouped_bytes_model(8192, 2048, [5632, 5632], 16, BF16, FP32, h100)
    assert round(qkv["per_projection"]["total"] / 1e6, 1) == 1070.0 and round(qkv["grouped"]["total"] / 1e6, 1) == 810.0
    assert round(gate_up["per_projection"]["total"] / 1e6, 1) == 1622.3 and round(gate_up["grouped"]["total"] / 1e6, 1) == 1493.8
    assert qkv["saved"] > 0.2 and gate_up["saved"] > 0.05


def test_bytes_model_whole_block(h100):
    """lowrank_grouped.py's docstring: a TinyLlama block's traffic over the frozen base (a model), before issue 16,
    with dB fused, with grouping too."""
    from peft_ext.kernels.lowrank import lowrank_bytes_model

    M, H, F, R = 8192, 2048, 5632, 16
    layers = [(H, H), (H, 256), (H, 256), (H, H), (H, F), (H, F), (F, H)]  # q, k, v, o, gate, up, down (in, out)

    def per_layer(fuse, adapter=True):
        return sum(lowrank_bytes_model(M, K, N, R, BF16, FP32, h100, True, adapter, fuse)["total"] for K, N in layers)

    accumulate = (2 + 1) * 3 * M * H * 2  # autograd sums q/k/v's dx (2 adds) and gate/up's (1), in every variant
    base = per_layer(False, adapter=False) + accumulate
    before, fused = per_layer(False) + accumulate, per_layer(None) + accumulate
    qkv = grouped_module.grouped_bytes_model(M, H, [H, 256, 256], R, BF16, FP32, h100)["grouped"]["total"]
    gate_up = grouped_module.grouped_bytes_model(M, H, [F, F], R, BF16, FP32, h100)["grouped"]["total"]
    grouped = qkv + gate_up + lowrank_bytes_model(M, H, H, R, BF16, FP32, h100, True)["total"]
    grouped += lowrank_bytes_model(M, F, H, R, BF16, FP32, h100, True)["total"]
    extra = [round((v - base) / 1e6, 1) for v in (before, fused, grouped)]
    assert extra == [2399.5, 2237.1, 1848.6]
    assert [round(22 * e / 1e3, 1) for e in extra] == [52.8, 49.2, 40.7]
