"""lowrank_linear: Triton kernels (interpreter here, CUDA in the `gpu` tests) against the plain-PyTorch reference.

Ground truth = the reference evaluated in float64 on the same inputs; errors are ||out - ref|| / ||ref||
(design/perf.md: <= 1e-2 for bf16 operands, <= 1e-4 for fp32). Shapes are tiny and odd on purpose: the
interpreter's cost grows with programs x loop steps.
"""

import contextlib
import types

import pytest
import torch
import torch.nn.functional as F

from peft_ext.kernels import (
    LowRankLinearFunction,
    choose_backend,
    dropout_keep_mask,
    lowrank_linear,
    reference_lowrank_linear,
)
from peft_ext.kernels import dispatch
from peft_ext.kernels import lowrank as lowrank_module
from peft_ext.kernels.lowrank import lowrank_weight_grad, shrink_expand

from .accuracy import BF16, FP16, FP32, FP64, TOL, rel_err


def make_layer(lead, K, N, R, dtype, adapter_dtype, bias=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    return dict(
        x=rnd(*lead, K),
        weight=rnd(N, K, scale=K**-0.5),
        bias=rnd(N) if bias else None,
        lora_a=rnd(R, K, scale=K**-0.5, dt=adapter_dtype),
        lora_b=rnd(N, R, scale=R**-0.5, dt=adapter_dtype),
    )


def fp64(layer):
    return {k: (None if v is None else v.detach().double()) for k, v in layer.items()}


def run(layer, grads, dy=None, **kw):
    """Output and gradients (for the names in `grads`) of lowrank_linear on `layer`."""
    leaves = {k: v.detach().clone().requires_grad_(k in grads) if v is not None else None for k, v in layer.items()}
    fn = kw.pop("fn", lowrank_linear)
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], **kw)
    if not grads:
        return y, {}
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y) if dy is None else dy
    y.backward(dy)
    return y, {k: leaves[k].grad for k in grads}


# ------------------------------------------------------------------------------------------- forward
FORWARD_CASES = [
    # lead shape, K, N, r, x/weight dtype, adapter dtype, bias
    ((37,), 45, 29, 1, FP32, FP32, True),
    ((37,), 45, 29, 8, BF16, BF16, False),
    ((37,), 45, 29, 16, BF16, FP32, True),  # fp32 adapter masters with bf16 activations
    ((2, 19), 45, 29, 16, FP16, FP32, True),  # 3-D x
    ((100,), 150, 70, 8, FP32, FP32, True),  # 2 row blocks, 3 K steps, 2 N steps
    ((20,), 130, 129, 128, BF16, FP32, True),  # rank 128
]


@pytest.mark.parametrize("lead,K,N,R,dtype,adapter_dtype,bias", FORWARD_CASES)
def test_forward_matches_reference(lead, K, N, R, dtype, adapter_dtype, bias):
    layer = make_layer(lead, K, N, R, dtype, adapter_dtype, bias)
    assert choose_backend(layer["x"], R) == "triton"
    y = lowrank_linear(**layer, scale=0.75)
    ref = reference_lowrank_linear(**fp64(layer), scale=0.75)
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype]
    # the low-rank term itself is right (not hidden by the base product)
    delta = y.double() - F.linear(*[fp64(layer)[k] for k in ("x", "weight", "bias")])
    delta_ref = ref - F.linear(*[fp64(layer)[k] for k in ("x", "weight", "bias")])
    assert rel_err(delta, delta_ref) <= 5 * TOL[dtype]


def test_forward_strided_inputs():
    """Non-contiguous x (last-dim stride 2) and transposed views as adapter weights."""
    layer = make_layer((23,), 40, 33, 8, FP32, FP32)
    wide = torch.randn(23, 80)
    layer["x"] = wide[:, ::2]
    layer["lora_a"] = layer["lora_a"].t().contiguous().t()  # (r, K) with strides (1, r)
    layer["lora_b"] = layer["lora_b"].t().contiguous().t()
    y = lowrank_linear(**layer, scale=2.0)
    assert rel_err(y, reference_lowrank_linear(**fp64(layer), scale=2.0)) <= TOL[FP32]


def test_empty_batch():
    layer = make_layer((0,), 45, 29, 4, FP32, FP32)
    y, g = run(layer, ("x", "lora_a", "lora_b"), scale=1.0)
    assert y.shape == (0, 29)
    assert g["x"].shape == (0, 45) and torch.count_nonzero(g["lora_a"]) == 0 and torch.count_nonzero(g["lora_b"]) == 0


def random_case(seed):
    """An odd random shape: M in [1, 150], K and N in [r, 200], rank from 1..128 (mostly small)."""
    g = torch.Generator().manual_seed(1000 + seed)
    R = [1, 2, 3, 8, 16, 17, 32, 64, 128][int(torch.randint(0, 9, (1,), generator=g))]
    M = int(torch.randint(1, 151, (1,), generator=g))
    K, N = (int(torch.randint(R, max(R, 200) + 1, (1,), generator=g)) for _ in range(2))
    dtype, adapter_dtype = [(FP32, FP32), (BF16, FP32), (BF16, BF16), (FP16, FP32)][seed % 4]
    return M, K, N, R, dtype, adapter_dtype


@pytest.mark.parametrize("seed", range(24))
def test_random_shapes_forward_backward(seed):
    M, K, N, R, dtype, adapter_dtype = random_case(seed)
    layer = make_layer((M,), K, N, R, dtype, adapter_dtype, bias=seed % 3 != 0, seed=seed)
    names = ("x", "lora_a", "lora_b")
    y, g = run(layer, names, scale=16.0 / R)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    y_ref, g_ref = run(fp64(layer), names, dy=dy.double(), scale=16.0 / R, fn=reference_lowrank_linear)
    assert rel_err(y, y_ref) <= TOL[dtype], (M, K, N, R, dtype)
    for name in names:
        assert rel_err(g[name], g_ref[name]) <= TOL[dtype], (name, M, K, N, R, dtype)


# ------------------------------------------------------------------------------------------ backward
BACKWARD_CASES = [
    ((37,), 45, 29, 1, FP32, FP32),
    ((37,), 45, 29, 16, BF16, FP32),
    ((3, 13), 45, 29, 8, FP16, FP16),
    ((70,), 100, 90, 16, FP32, FP32),  # 2 row blocks; dA / dB split over M
    ((20,), 130, 129, 128, BF16, FP32),
]


@pytest.mark.parametrize("lead,K,N,R,dtype,adapter_dtype", BACKWARD_CASES)
def test_backward_matches_reference(lead, K, N, R, dtype, adapter_dtype):
    layer = make_layer(lead, K, N, R, dtype, adapter_dtype)
    names = ("x", "lora_a", "lora_b")
    y, g = run(layer, names, scale=0.5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    _, g_ref = run(fp64(layer), names, dy=dy.double(), scale=0.5, fn=reference_lowrank_linear)
    for name in names:
        assert g[name].dtype == layer[name].dtype and g[name].shape == layer[name].shape
        assert rel_err(g[name], g_ref[name]) <= TOL[dtype], name


@pytest.mark.parametrize(
    "names",
    [("x",), ("lora_a", "lora_b"), ("lora_b",), ("lora_a",), ("x", "weight", "bias", "lora_a", "lora_b")],
    ids=["x-only", "adapter-only", "B-only", "A-only", "everything"],
)
def test_backward_subsets(names):
    """Only the gradients asked for are computed; a trainable base weight / bias also gets a gradient."""
    layer = make_layer((37,), 45, 29, 8, FP32, FP32)
    y, g = run(layer, names, scale=1.5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    _, g_ref = run(fp64(layer), names, dy=dy.double(), scale=1.5, fn=reference_lowrank_linear)
    for name in names:
        assert rel_err(g[name], g_ref[name]) <= TOL[FP32], name


def test_reference_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(*s, generator=g, dtype=FP64, requires_grad=True) for s in ((2, 3, 6), (4, 6), (4,), (2, 6), (4, 2))]
    assert torch.autograd.gradcheck(lambda *t: reference_lowrank_linear(*t, scale=0.7), args)
    keep = dropout_keep_mask(args[0], 0.4, torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(
        lambda *t: reference_lowrank_linear(*t, scale=0.7, dropout_p=0.4, training=True, dropout_mask=keep), args
    )


# ------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("lead", [(37,), (3, 13)])  # 3-D x: the mask must be indexed like the flattened rows
def test_dropout_matches_reference_with_same_generator(lead):
    layer = make_layer(lead, 45, 29, 8, BF16, FP32)
    names = ("x", "lora_a", "lora_b")
    kw = dict(scale=1.0, dropout_p=0.3, training=True)
    y, g = run(layer, names, generator=torch.Generator().manual_seed(11), **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    keep = dropout_keep_mask(layer["x"], 0.3, torch.Generator().manual_seed(11))
    assert 0 < keep.sum() < keep.numel()
    y_ref, g_ref = run(fp64(layer), names, dy=dy.double(), dropout_mask=keep, fn=reference_lowrank_linear, **kw)
    assert rel_err(y, y_ref) <= TOL[BF16]
    for name in names:
        assert rel_err(g[name], g_ref[name]) <= TOL[BF16], name
    y_nodrop = reference_lowrank_linear(**fp64(layer), scale=1.0)
    assert rel_err(y_ref, y_nodrop) > 10 * TOL[BF16]  # the mask did something


def test_autocast_accepts_bf16_x_with_fp32_base_weights():
    """Under autocast the base is cast as F.linear would, before any dtype check (bf16 x, fp32 W)."""
    layer = make_layer((5, 7), 45, 29, 8, FP32, FP32)
    x_bf16 = layer["x"].to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank_linear(**{**layer, "x": x_bf16}, scale=1.0)
    assert y.dtype == torch.bfloat16
    y_ref = reference_lowrank_linear(**fp64({**layer, "x": x_bf16.float()}), scale=1.0)
    assert rel_err(y, y_ref) <= TOL[BF16]


def test_dropout_is_deterministic_given_a_generator():
    layer = make_layer((37,), 45, 29, 8, FP32, FP32)
    kw = dict(scale=1.0, dropout_p=0.5, training=True)
    y1 = lowrank_linear(**layer, generator=torch.Generator().manual_seed(5), **kw)
    y2 = lowrank_linear(**layer, generator=torch.Generator().manual_seed(5), **kw)
    y3 = lowrank_linear(**layer, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    # eval mode: no dropout, no RNG draw
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    y_eval = lowrank_linear(**layer, scale=1.0, dropout_p=0.5, training=False, generator=gen)
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(y_eval, lowrank_linear(**layer, scale=1.0))


def test_dropout_only_touches_the_lowrank_branch():
    layer = make_layer((37,), 45, 29, 8, FP32, FP32)
    layer["lora_b"] = torch.zeros_like(layer["lora_b"])
    y = lowrank_linear(**layer, scale=1.0, dropout_p=0.9, training=True, generator=torch.Generator().manual_seed(0))
    assert rel_err(y, F.linear(layer["x"], layer["weight"], layer["bias"])) <= 1e-6


# ------------------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("keep_mode", [None, "input", "output"])
def test_shrink_expand_writes_every_output(keep_mode):
    """Poisoned (NaN) output buffers are entirely overwritten with the right values."""
    g = torch.Generator().manual_seed(0)
    M, K, N, R, p = 41, 70, 66, 5, 0.25
    x, A, B, b = (torch.randn(*s, generator=g) for s in ((M, K), (R, K), (N, R), (N,)))
    keep = None
    if keep_mode:
        keep = torch.rand(M, N if keep_mode == "output" else K, generator=g) > p
    out, mid = torch.full((M, N), float("nan")), torch.full((M, R), float("nan"))
    shrink_expand(x, A, B, 0.3, bias=b, keep=keep, keep_on_output=keep_mode == "output", dropout_p=p, out=out, mid=mid)
    xd = x.double() * keep.double() / (1 - p) if keep_mode == "input" else x.double()
    mid_ref = xd @ A.double().T
    out_ref = 0.3 * mid_ref @ B.double().T + b.double()
    if keep_mode == "output":
        out_ref = out_ref * keep.double() / (1 - p)
    assert rel_err(mid, mid_ref) <= 1e-5 and rel_err(out, out_ref) <= 1e-5


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("transpose", [False, True])
def test_weight_grad_splits(splits, transpose):
    g = torch.Generator().manual_seed(0)
    M, C, R, p = 75, 70, 6, 0.5
    left, right = torch.randn(M, R, generator=g), torch.randn(M, C, generator=g)
    keep = torch.rand(M, C, generator=g) > p
    out = lowrank_weight_grad(left, right, 0.5, keep=keep, dropout_p=p, transpose=transpose, splits=splits)
    ref = 0.5 * left.double().T @ (right.double() * keep.double() / (1 - p))
    assert out.dtype == FP32
    assert rel_err(out, ref.T if transpose else ref) <= 1e-5


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype,R", [(BF16, 16), (BF16, 64), (BF16, 128), (FP32, 16), (FP16, 16), (FP16, 128)])
def test_kernels_compile_for_h100(compile_sm90, monkeypatch, R, dtype):
    """The GPU tile configs compile for sm_90 (PTX + ptxas, no GPU needed) and fit in shared memory; fp16 with
    its fp32 intermediates (xa / dyb stored in fp32, TF32 dots reading them)."""
    monkeypatch.setattr(lowrank_module, "target_programs", lambda device, per_sm=1: 132 * per_sm)
    monkeypatch.setattr(lowrank_module, "interpret_mode", lambda: False)
    monkeypatch.setattr(dispatch, "interpret_mode", lambda: False)  # the GPU's dtype choices
    cuda = torch.device("cuda")
    t = {BF16: "bf16", FP32: "fp32", FP16: "fp16"}[dtype]
    tl_dtype = dispatch.compute_dtype(dtype)
    mid_dtype = dispatch.intermediate_compute(dtype)
    assert mid_dtype == (dispatch.tl.float32 if dtype == FP16 else tl_dtype)
    mid_t = {torch.float32: "fp32", BF16: "bf16"}[dispatch.intermediate_dtype(dtype)]
    precision = dispatch.dot_precision(dtype)
    cfg = lowrank_module._shrink_expand_config(8192, R, cuda)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    pointers = dict(X=t, A="fp32", B="fp32", BIAS=t, KEEP="u8", MID=mid_t, Y=t)
    for flags in (
        dict(HAS_BIAS=True, KEEP_MODE=0, STORE_MID=True, DO_EXPAND=True),  # forward
        dict(HAS_BIAS=False, KEEP_MODE=1, STORE_MID=True, DO_EXPAND=True),  # forward with dropout
        dict(HAS_BIAS=False, KEEP_MODE=2, STORE_MID=True, DO_EXPAND=True),  # backward dy -> dyb, dx_low
        dict(HAS_BIAS=False, KEEP_MODE=0, STORE_MID=True, DO_EXPAND=False),  # backward, x needs no grad
    ):
        kernel = compile_sm90(
            lowrank_module._shrink_expand_kernel, pointers,
            dict(cfg, **flags, COMPUTE=tl_dtype, MID_COMPUTE=mid_dtype, DOT_PRECISION=precision),
            num_warps=warps, num_stages=stages, float_args=("scale", "keep_scale"),
        )
        assert kernel.metadata.shared <= 227 * 1024
    cfg, *_ = lowrank_module._wgrad_config(8192, 2048, R, cuda, None)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    for has_keep in (False, True):
        kernel = compile_sm90(
            lowrank_module._wgrad_kernel, dict(L=mid_t, T=t, KEEP="u8", P="fp32"),
            dict(cfg, HAS_KEEP=has_keep, COMPUTE=mid_dtype, DOT_PRECISION=precision),
            num_warps=warps, num_stages=stages, float_args=("scale", "keep_scale"),
        )
        assert kernel.metadata.shared <= 227 * 1024


# ------------------------------------------------------------------------------------------ autocast
def test_autocast_bf16_fp32_layer():
    """Under autocast, x / weight / bias are cast like F.linear; fp32 adapters keep fp32 gradients."""
    layer = make_layer((37,), 45, 29, 8, FP32, FP32)
    names = ("x", "lora_a", "lora_b")
    with torch.autocast("cpu", dtype=BF16):
        y, g = run(layer, names, scale=1.0)
    assert y.dtype == BF16
    cast = {k: v.to(BF16) if k in ("x", "weight", "bias") else v for k, v in layer.items()}
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    y_ref, g_ref = run(fp64(cast), names, dy=dy.double(), scale=1.0, fn=reference_lowrank_linear)
    assert rel_err(y, y_ref) <= TOL[BF16]
    for name in names:
        assert g[name].dtype == FP32 and rel_err(g[name], g_ref[name]) <= TOL[BF16], name


# ------------------------------------------------------------------------------------------ dispatch
def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = make_layer((37,), 45, 29, 8, FP32, FP32)
    assert choose_backend(layer["x"], 8) == "reference"

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path must not run")

    monkeypatch.setattr(LowRankLinearFunction, "apply", boom)
    y, g = run(layer, ("x", "lora_a"), scale=0.5)
    y_ref, g_ref = run(layer, ("x", "lora_a"), scale=0.5, fn=reference_lowrank_linear)
    assert torch.equal(y, y_ref) and torch.equal(g["lora_a"], g_ref["lora_a"])
    with pytest.raises(RuntimeError, match="cannot run here"):
        lowrank_linear(**layer, scale=0.5, backend="triton")


def test_interpreter_uses_the_kernels(monkeypatch):
    layer = make_layer((37,), 45, 29, 8, FP32, FP32)
    assert dispatch.interpret_mode() and choose_backend(layer["x"], 8) == "triton"

    def boom(*args, **kwargs):
        raise AssertionError("the reference must not run")

    monkeypatch.setattr(lowrank_module, "reference_lowrank_linear", boom)
    lowrank_linear(**layer, scale=0.5)
    with pytest.raises(AssertionError, match="reference must not run"):
        lowrank_linear(**layer, scale=0.5, backend="reference")


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), (None, False)])
def test_interpret_mode_without_triton_knobs(monkeypatch, value, expected):
    """Triton < 3.4 (torch 2.4 to 2.7) has no triton.knobs: the mode is read from TRITON_INTERPRET instead."""
    monkeypatch.delattr(dispatch.triton, "knobs", raising=False)
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert dispatch.interpret_mode() is expected


def test_float64_and_large_rank_go_to_the_reference():
    layer = make_layer((5,), 140, 135, 8, FP64, FP64)
    assert choose_backend(layer["x"], 8) == "reference"
    assert torch.equal(lowrank_linear(**layer, scale=1.0), reference_lowrank_linear(**layer, scale=1.0))
    big = make_layer((5,), 140, 135, dispatch.MAX_TRITON_RANK + 1, FP32, FP32)
    assert choose_backend(big["x"], dispatch.MAX_TRITON_RANK + 1) == "reference"
    assert torch.equal(lowrank_linear(**big, scale=1.0), reference_lowrank_linear(**big, scale=1.0))


# -------------------------------------------------------------------------------------------- errors
def test_rank_larger_than_layer():
    layer = make_layer((4,), 45, 29, 30, FP32, FP32)
    with pytest.raises(ValueError, match=r"rank r=30 is larger than the layer allows.*min\(45, 29\)"):
        lowrank_linear(**layer, scale=1.0)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(x=torch.randn(4, 44)), ValueError, "last dimension must be in_features=45"),
        (dict(lora_a=torch.randn(8, 44)), ValueError, "lora_a must have shape"),
        (dict(lora_b=torch.randn(29, 7)), ValueError, "lora_b must have shape"),
        (dict(lora_b=torch.randn(28, 8)), ValueError, "lora_b must have shape"),
        (dict(bias=torch.randn(28)), ValueError, "bias must have shape"),
        (dict(weight=torch.randn(29, 45, 1)), ValueError, "weight must be 2-D"),
        (dict(lora_a=torch.randn(0, 45), lora_b=torch.randn(29, 0)), ValueError, "rank must be >= 1"),
        (dict(x=torch.randint(0, 5, (4, 45))), TypeError, "x has dtype torch.int64"),
        (dict(lora_a=torch.randint(0, 5, (8, 45), dtype=torch.int32)), TypeError, "lora_a has dtype torch.int32"),
        (dict(weight=torch.randn(29, 45, dtype=BF16)), TypeError, "must have one dtype"),
        (dict(bias=torch.randn(29, dtype=FP16)), TypeError, "must have one dtype"),
        (dict(lora_a=torch.randn(8, 45, device="meta")), ValueError, "one device"),
    ],
)
def test_bad_inputs(change, error, match):
    layer = make_layer((4,), 45, 29, 8, FP32, FP32)
    layer.update(change)
    with pytest.raises(error, match=match):
        lowrank_linear(**layer, scale=1.0)


def test_bad_scalars():
    layer = make_layer((4,), 45, 29, 8, FP32, FP32)
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout_p"):
            lowrank_linear(**layer, scale=1.0, dropout_p=p, training=True)
    with pytest.raises(TypeError, match="scale must be a Python number"):
        lowrank_linear(**layer, scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="backend must be one of"):
        lowrank_linear(**layer, scale=1.0, backend="cuda")


# ------------------------------------------------------------------ devices, strides, fp16 range (issue 11)
@pytest.mark.parametrize("fuse_db", [False, True])
def test_every_launch_runs_under_a_guard_for_x_device(launch_guards, monkeypatch, fuse_db):
    """Triton launches on the *current* CUDA device: every launch (forward and backward) must sit inside a
    `launch_device` guard for x's device, or a tensor on cuda:1 is read through cuda:0's context. Backward with dB
    in its own pass (shrink/expand on dy, two weight-gradient launches) or fused into the dy pass (one launch
    for dyb, dx_low and dB's partials, one weight-gradient launch for dA)."""
    monkeypatch.setattr(lowrank_module, "fuse_db_saves_bytes", lambda *args: fuse_db)
    layer = make_layer((37,), 45, 29, 8, FP32, FP32)
    run(layer, ("x", "lora_a", "lora_b"), scale=0.5)
    names = [name for name, _ in launch_guards.launches]
    if fuse_db:
        assert names == ["_shrink_expand_kernel", "_dy_pass_kernel", "_wgrad_kernel"], names
    else:
        assert names.count("_shrink_expand_kernel") == 2 and names.count("_wgrad_kernel") == 2, names
    assert all(active == (torch.device("cpu"),) for _, active in launch_guards.launches), launch_guards.launches


def test_launch_device_is_the_inputs_cuda_device():
    """On CUDA the guard is torch.cuda.device(x.device) (built here without a GPU, not entered); elsewhere none."""
    guard = dispatch.launch_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(dispatch.launch_device(torch.empty(1)), contextlib.nullcontext)


@pytest.mark.parametrize("kind", ["stride-2", "expanded"])
def test_strided_bias(kind):
    """The kernel reads BIAS + n: a bias that is a strided view (or an expanded scalar) is made contiguous at the
    launch (it was read as if contiguous: relative error 0.17)."""
    layer = make_layer((37,), 45, 29, 8, FP32, FP32)
    if kind == "stride-2":
        layer["bias"] = torch.stack([layer["bias"], torch.full_like(layer["bias"], 1e3)], dim=1)[:, 0]
    else:
        layer["bias"] = torch.tensor(0.7).expand(29)
    assert not layer["bias"].is_contiguous()
    y = lowrank_linear(**layer, scale=0.5)
    assert rel_err(y, reference_lowrank_linear(**fp64(layer), scale=0.5)) <= TOL[FP32]


def loss_scaled_fp16_layer():
    """fp16 x and base, fp32 adapter masters, and dy as a 2^16 loss scale makes it: dyb = dy B reaches ~2e5
    (fp16's largest value is 65504) while dx, y and every gradient stay in range."""
    g = torch.Generator().manual_seed(0)
    M, K, N, R = 37, 45, 100, 8
    layer = dict(
        x=torch.randn(M, K, generator=g).half(),
        weight=(torch.randn(N, K, generator=g) * K**-0.5).half(),
        bias=torch.randn(N, generator=g).half(),
        lora_a=torch.randn(R, K, generator=g) * K**-0.5 * 0.1,
        lora_b=torch.rand(N, R, generator=g) + 0.5,
    )
    dy = (torch.rand(M, N, generator=g) * 0.05 * 2**16).half()
    assert (dy.double() @ layer["lora_b"].double()).abs().max() > 2 * 65504
    return layer, dy


def test_fp16_loss_scaled_backward_keeps_dyb_in_range(gpu_fp16_math):
    """fp16 inputs under loss scaling: dyb = dy B is kept in fp32 (stored in fp16 it overflowed to inf and dx / dA
    came out NaN). Checked against the fp64 reference with the GPU's fp16 operand dtypes."""
    layer, dy = loss_scaled_fp16_layer()
    names = ("x", "lora_a", "lora_b")
    y, g = run(layer, names, dy=dy, scale=0.5)
    y_ref, g_ref = run(fp64(layer), names, dy=dy.double(), scale=0.5, fn=reference_lowrank_linear)
    assert rel_err(y, y_ref) <= TOL[FP16]
    for name in names:
        assert g[name].isfinite().all(), name
        assert rel_err(g[name], g_ref[name]) <= TOL[FP16], name


def test_fp16_outlier_activations_keep_xa_in_range(gpu_fp16_math):
    """x A^T beyond fp16's range (outlier activations) while y stays in range: xa is kept in fp32 for the expand
    (and stored in fp32 for dB)."""
    g = torch.Generator().manual_seed(1)
    M, K, N, R = 37, 45, 100, 8
    layer = dict(
        x=(1500 + 100 * torch.randn(M, K, generator=g)).half(),
        weight=(torch.randn(N, K, generator=g) * K**-0.5).half(),
        bias=None,
        lora_a=torch.rand(R, K, generator=g) + 0.5,
        lora_b=torch.randn(N, R, generator=g) * 1e-3,
    )
    assert (layer["x"].double() @ layer["lora_a"].double().T).abs().max() > 65504
    names = ("lora_b",)
    y, g_ = run(layer, names, scale=0.5)
    y_ref, g_ref = run(fp64(layer), names, dy=torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).double(),
                       scale=0.5, fn=reference_lowrank_linear)  # fmt: skip
    assert y.isfinite().all() and rel_err(y, y_ref) <= TOL[FP16]
    assert g_["lora_b"].isfinite().all() and rel_err(g_["lora_b"], g_ref["lora_b"]) <= TOL[FP16]


def test_reference_fp16_loss_scaled_backward():
    """The reference (the CPU path, and CUDA's for ranks above 128) keeps fp16's low-rank branch in fp32 too."""
    layer, dy = loss_scaled_fp16_layer()
    names = ("x", "lora_a", "lora_b")
    _, g = run(layer, names, dy=dy, scale=0.5, fn=reference_lowrank_linear)
    _, g_ref = run(fp64(layer), names, dy=dy.double(), scale=0.5, fn=reference_lowrank_linear)
    for name in names:
        assert rel_err(g[name], g_ref[name]) <= TOL[FP16], name


def test_intermediate_dtypes():
    """fp16 keeps its intermediates in fp32; bf16 (fp32's range) and fp32 keep theirs."""
    assert dispatch.intermediate_dtype(FP16) == FP32
    assert dispatch.intermediate_dtype(BF16) == BF16 and dispatch.intermediate_dtype(FP32) == FP32
    assert dispatch.intermediate_compute(FP16) == dispatch.tl.float32


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("R", [1, 16, 64, 128])
@pytest.mark.parametrize("dtype,adapter_dtype", [(BF16, FP32), (BF16, BF16), (FP16, FP32), (FP32, FP32)])
def test_gpu_matches_reference(R, dtype, adapter_dtype):
    layer = make_layer((3, 341), 520, 392, R, dtype, adapter_dtype, device="cuda")
    assert choose_backend(layer["x"], R) == "triton"
    names = ("x", "lora_a", "lora_b")
    y, g = run(layer, names, scale=0.5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    y_ref, g_ref = run(fp64(layer), names, dy=dy.double(), scale=0.5, fn=reference_lowrank_linear)
    tol = 2e-3 if dtype == FP32 else TOL[dtype]  # fp32 base GEMM may use TF32 on the GPU
    assert rel_err(y, y_ref) <= tol
    for name in names:
        assert rel_err(g[name], g_ref[name]) <= tol, name


@pytest.mark.gpu
def test_gpu_dropout_matches_reference():
    layer = make_layer((1000,), 512, 384, 16, BF16, FP32, device="cuda")
    names = ("x", "lora_a", "lora_b")
    kw = dict(scale=2.0, dropout_p=0.1, training=True)
    y, g = run(layer, names, generator=torch.Generator("cuda").manual_seed(3), **kw)
    keep = dropout_keep_mask(layer["x"], 0.1, torch.Generator("cuda").manual_seed(3))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    y_ref, g_ref = run(fp64(layer), names, dy=dy.double(), dropout_mask=keep, fn=reference_lowrank_linear, **kw)
    assert rel_err(y, y_ref) <= TOL[BF16]
    for name in names:
        assert rel_err(g[name], g_ref[name]) <= TOL[BF16], name


@pytest.mark.gpu
def test_gpu_fp16_loss_scaled_backward():
    """The compiled kernels' fp16 path (fp32 dyb, TF32 dots reading it) under a 2^16 loss scale."""
    layer, dy = loss_scaled_fp16_layer()
    layer = {k: None if v is None else v.cuda() for k, v in layer.items()}
    names = ("x", "lora_a", "lora_b")
    y, g = run(layer, names, dy=dy.cuda(), scale=0.5)
    y_ref, g_ref = run(fp64(layer), names, dy=dy.cuda().double(), scale=0.5, fn=reference_lowrank_linear)
    assert rel_err(y, y_ref) <= TOL[FP16]
    for name in names:
        assert g[name].isfinite().all() and rel_err(g[name], g_ref[name]) <= TOL[FP16], name


@pytest.mark.gpu
def test_gpu_inputs_on_another_device_than_the_current_one():
    """x on cuda:1 while cuda:0 is current: the launches follow x (forward and backward)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    torch.cuda.set_device(0)
    layer = make_layer((3, 41), 520, 392, 16, BF16, FP32, device="cuda:1")
    names = ("x", "lora_a", "lora_b")
    y, g = run(layer, names, scale=0.5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    y_ref, g_ref = run(fp64(layer), names, dy=dy.double(), scale=0.5, fn=reference_lowrank_linear)
    assert torch.cuda.current_device() == 0 and y.device == torch.device("cuda", 1)
    assert rel_err(y, y_ref) <= TOL[BF16]
    for name in names:
        assert rel_err(g[name], g_ref[name]) <= TOL[BF16], name


# ------------------------------------------------------------------------------------- factor casts
def _cast_once_vs_per_tile(layer, monkeypatch):
    """(outputs with the factors cast once per call, the same with the kernels casting each tile, the dtypes the
    kernels were handed): the once-per-call cast must change nothing, bit for bit."""
    names = ("x", "lora_a", "lora_b")
    handed = []
    real, real_dy = lowrank_module.shrink_expand, lowrank_module.dy_pass

    def spy(x2d, shrink, expand, *args, **kwargs):
        handed.append((shrink.dtype, None if expand is None else expand.dtype))
        return real(x2d, shrink, expand, *args, **kwargs)

    def spy_dy(dy2d, lora_b, lora_a, *args, **kwargs):  # the backward's dy pass when dB is fused into it
        handed.append((lora_b.dtype, None if lora_a is None else lora_a.dtype))
        return real_dy(dy2d, lora_b, lora_a, *args, **kwargs)

    monkeypatch.setattr(lowrank_module, "shrink_expand", spy)
    monkeypatch.setattr(lowrank_module, "dy_pass", spy_dy)
    once = run(layer, names, scale=0.5)
    monkeypatch.setattr(lowrank_module, "_compute_operand", lambda factor, compute: factor)
    per_tile = run(layer, names, scale=0.5)
    return once, per_tile, handed[:2]


@pytest.mark.parametrize("fuse_db", [False, True])
def test_fp32_factors_are_cast_once_with_the_kernels_values(gpu_fp16_math, monkeypatch, fuse_db):
    """fp16 inputs with fp32 masters (the GPU's fp16 tile dtypes, see gpu_fp16_math): the shrink factor (A forward,
    B backward) is handed to the kernel in fp16, the expand factor stays fp32 (fp16 inputs expand in fp32), and
    output and gradients equal the kernels' own per-tile casts exactly; the backward with dB in its own pass or
    fused into the dy pass."""
    monkeypatch.setattr(lowrank_module, "fuse_db_saves_bytes", lambda *args: fuse_db)
    layer = make_layer((3, 37), 45, 70, 8, FP16, FP32)
    (y, g), (y_tile, g_tile), handed = _cast_once_vs_per_tile(layer, monkeypatch)
    assert handed == [(FP16, FP32), (FP16, FP32)], handed  # forward (A, B), backward (B^T, A^T)
    assert torch.equal(y, y_tile)
    for name in g:
        assert torch.equal(g[name], g_tile[name]), name


def test_factors_in_the_compute_dtype_are_handed_as_they_are(monkeypatch):
    """fp32 masters with fp32 inputs (and every dtype in the interpreter, which computes in fp32): no copy."""
    layer = make_layer((2, 9), 24, 40, 4, FP32, FP32)
    (y, g), (y_tile, g_tile), handed = _cast_once_vs_per_tile(layer, monkeypatch)
    assert handed == [(FP32, FP32), (FP32, FP32)]
    assert torch.equal(y, y_tile) and all(torch.equal(g[n], g_tile[n]) for n in g)


@pytest.mark.gpu
def test_gpu_bf16_inputs_fp32_factors_cast_once_exactly(monkeypatch):
    layer = make_layer((3, 341), 520, 392, 16, BF16, FP32, device="cuda")
    (y, g), (y_tile, g_tile), handed = _cast_once_vs_per_tile(layer, monkeypatch)
    assert handed == [(BF16, BF16), (BF16, BF16)], handed
    assert torch.equal(y, y_tile)
    for name in g:
        assert torch.equal(g[name], g_tile[name]), name


def test_bytes_model_counts_what_each_shrink_expand_launch_reads_and_writes(monkeypatch):
    """`lowrank_bytes_model` (the floor benchmarks/lowrank_kernels.py compares times with) against the tensors the
    forward and backward shrink/expand launches are really handed and return, and the cuBLAS GEMMs' operands."""
    from peft_ext.kernels.lowrank import lowrank_bytes_model

    M, K, N, R = 48, 40, 56, 4
    layer = make_layer((2, M // 2), K, N, R, FP32, FP32, bias=False)
    launches = []
    real = lowrank_module.shrink_expand

    def spy(x2d, shrink, expand, *args, **kwargs):
        out, mid = real(x2d, shrink, expand, *args, **kwargs)
        launches.append(sum(t.numel() * t.element_size() for t in (x2d, shrink, expand, out, mid) if t is not None))
        return out, mid

    monkeypatch.setattr(lowrank_module, "shrink_expand", spy)
    monkeypatch.setattr(lowrank_module, "fuse_db_saves_bytes", lambda *args: False)  # dB in its own pass
    run(layer, ("x", "lora_a", "lora_b"), scale=0.5)
    model = lowrank_bytes_model(M, K, N, R, FP32, FP32, torch.device("cpu"), backward=True, fuse_db=False)
    assert launches == [model["shrink/expand x"], model["shrink/expand dy"]]
    e = 4
    assert model["gemm x W^T + y_low"] == (M * K + N * K + 2 * M * N) * e  # x, W, y_low read (beta=1), y written
    assert model["gemm dy W + dx_low"] == (M * N + N * K + 2 * M * K) * e
    assert model["factor casts"] == 0 and model["total"] == sum(v for k, v in model.items() if k != "total")
    base = lowrank_bytes_model(M, K, N, R, FP32, FP32, torch.device("cpu"), backward=True, adapter=False)
    assert base["total"] == 2 * (M * K + N * K + M * N) * e
    bf16 = lowrank_bytes_model(M, K, N, R, BF16, FP32, torch.device("cpu"))
    assert bf16["factor casts"] == (R * K + N * R) * (4 + 2)  # fp32 masters read, bf16 copies written


@pytest.mark.parametrize("M", [48, 150])
def test_bytes_model_counts_what_the_fused_dy_pass_reads_and_writes(monkeypatch, M):
    """With dB fused: the dy pass's model entry against the tensors it is handed and returns plus its fp32 partials
    (one N x r per program), the partial sum against those partials, and the rule's choice between the two models.
    M = 150: several programs (the interpreter's 64-row blocks), so the partials are summed."""
    from peft_ext.kernels.lowrank import _dy_pass_config, fuse_db_saves_bytes, lowrank_bytes_model

    K, N, R = 40, 56, 4
    layer = make_layer((M,), K, N, R, FP32, FP32, bias=False)
    launches = []
    real = lowrank_module.dy_pass

    def spy(dy2d, lora_b, lora_a, xa, *args, **kwargs):
        dx, mid, db = real(dy2d, lora_b, lora_a, xa, *args, **kwargs)
        programs = -(-M // _dy_pass_config(M, R, dy2d.device, True)["BLOCK_M"])
        launches.append((sum(t.numel() * t.element_size() for t in (dy2d, lora_b, lora_a, xa, dx, mid)), programs))
        return dx, mid, db

    monkeypatch.setattr(lowrank_module, "dy_pass", spy)
    monkeypatch.setattr(lowrank_module, "fuse_db_saves_bytes", lambda *args: True)
    run(layer, ("x", "lora_a", "lora_b"), scale=0.5)
    monkeypatch.setattr(lowrank_module, "fuse_db_saves_bytes", fuse_db_saves_bytes)  # the rule again
    cpu = torch.device("cpu")
    model = lowrank_bytes_model(M, K, N, R, FP32, FP32, cpu, backward=True, fuse_db=True)
    (handed, programs), = launches
    assert programs == (1 if M == 48 else 3)
    assert model["dy pass (dyb, dx_low, dB partials)"] == handed + programs * N * R * 4
    assert model["dB partial sum"] == (programs * N * R * 4 + N * R * 4 if programs > 1 else 0)
    assert "wgrad dB" not in model and "shrink/expand dy" not in model
    two_pass = lowrank_bytes_model(M, K, N, R, FP32, FP32, cpu, backward=True, fuse_db=False)
    assert fuse_db_saves_bytes(M, N, R, FP32, cpu) == (model["total"] < two_pass["total"])
    assert lowrank_bytes_model(M, K, N, R, FP32, FP32, cpu, backward=True)["total"] == min(model["total"], two_pass["total"])
