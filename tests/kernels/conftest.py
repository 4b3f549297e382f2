"""Kernel tests: Triton's interpreter on the CPU; `gpu`-marked tests run the compiled kernels on CUDA.

TRITON_INTERPRET=1 is set before anything else here, when the variable is unset, no CUDA device is present
and triton has not been imported yet (e.g. `pytest tests/kernels`): then triton itself starts in interpreter
mode. That is not required by peft_ext.kernels, which wraps its kernels with triton.jit lazily at their first
launch in each mode and uses Triton builtins only (see kernels/dispatch.py), so the variable only has to be
set before a launch. In a whole-suite run triton is usually imported earlier (`import peft` imports it), so
the autouse fixture below is what makes every test of this folder run on the interpreter: it sets the
variable for each non-`gpu` test and clears it for `gpu` tests, and monkeypatch restores it afterwards, so
test folders collected in the same session keep their own setting. Works with --import-mode=importlib:
pytest imports this conftest before the test modules of this folder.
"""

import contextlib
import os
import sys

if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run peft_ext's kernels, or None. Seen here: Triton 3.1's interpreter
    rejects tl.arange of constexpr arguments; Triton 3.2 to 3.6's fails on loops with tensor bounds under
    numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python scalars"). Compiled kernels are not
    affected (the sm_90 compile tests pass with Triton 3.0 to 3.9)."""
    import numpy
    import triton

    triton_v = tuple(int(v) for v in triton.__version__.split(".")[:2])
    numpy_v = tuple(int(v) for v in numpy.__version__.split(".")[:2])
    if triton_v < (3, 2):
        return f"Triton {triton.__version__}'s interpreter cannot run these kernels: use triton >= 3.2 for CPU tests"
    if triton_v < (3, 7) and numpy_v >= (2, 4):
        return (
            f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (loops with tensor "
            f"bounds): use triton >= 3.7 or numpy < 2.4 for CPU kernel tests, or run only `-m gpu` on a GPU"
        )
    return None


@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels on CUDA
    else:
        problem = _interpreter_problem()
        if problem:
            pytest.fail(problem, pytrace=False)  # not a skip: this environment cannot check the kernels
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def compile_sm90():
    """Compile a peft_ext.kernels LazyKernel for an H100 (sm_90) with Triton's ahead-of-time path: Triton IR,
    PTX and ptxas, no GPU needed. Catches what the interpreter cannot (constexpr / type errors of the GPU
    compiler, shared memory over the limit). Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if triton.__version__.startswith(("3.4.", "3.5.")) and hasattr(triton.language.core.tensor, "__index__"):
        # their interpreter patches triton.language for good: a compile after an interpreted launch fails
        pytest.fail(
            f"Triton {triton.__version__}'s interpreter has run in this process and left triton.language patched; "
            "run the compile tests apart: pytest -n 0 -k compile tests/kernels",
            pytrace=False,
        )

    def compile_kernel(lazy_kernel, pointer_types, constexprs, num_warps=4, num_stages=3, float_args=()):
        fn = JITFunction(lazy_kernel.fn)  # not triton.jit: that gives the interpreter's wrapper here
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in pointer_types:
                signature[name] = "*" + pointer_types[name]
            else:
                signature[name] = "fp32" if name in float_args else "i32"
        src = ASTSource(fn, signature, dict(constexprs))
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))

    return compile_kernel


@pytest.fixture
def gpu_fp16_math(monkeypatch):
    """The GPU's fp16 dtype choices in the interpreter. The interpreter upcasts every tile to fp32
    (`dispatch.compute_dtype`: its bf16 math is wrong), which hides what rounding an operand to fp16 does on the
    GPU (65504 overflows to inf). Its fp16 math is right (numpy float16), so with this fixture fp16 tiles stay
    fp16 as on the GPU, and a kernel that rounds an out-of-range intermediate to fp16 fails here as it would
    there. bf16 and fp32 keep the interpreter's fp32."""
    import torch

    from peft_ext.kernels import delta, delta_decode, dispatch, lowrank, lowrank_gathered

    def gpu_compute_dtype(dtype):
        return dispatch.tl.float16 if dtype == torch.float16 else dispatch.tl.float32

    for module in (dispatch, lowrank, lowrank_gathered, delta, delta_decode):
        monkeypatch.setattr(module, "compute_dtype", gpu_compute_dtype)
    yield


class LaunchGuards:
    """Records, for every kernel launch, the devices of the `launch_device` guards active at that moment."""

    def __init__(self):
        self.active, self.entered, self.launches = [], [], []

    def guard(self, t):
        @contextlib.contextmanager
        def entered():
            self.entered.append(t.device)
            self.active.append(t.device)
            try:
                yield
            finally:
                self.active.pop()

        return entered()


@pytest.fixture
def launch_guards(monkeypatch):
    """Replaces `launch_device` in every kernel module by a recorder (raising=False: the name need not exist, so
    a module that launches without a guard fails the test's assertions, not its set-up) and records each launch's
    active guards."""
    from peft_ext.kernels import delta, delta_decode, dispatch, lowrank, lowrank_gathered

    guards = LaunchGuards()
    for module in (dispatch, lowrank, lowrank_gathered, delta, delta_decode):
        monkeypatch.setattr(module, "launch_device", guards.guard, raising=False)
    launch = dispatch.LazyKernel.__getitem__

    def recorded(kernel, grid):
        guards.launches.append((kernel.fn.__name__, tuple(guards.active)))
        return launch(kernel, grid)

    monkeypatch.setattr(dispatch.LazyKernel, "__getitem__", recorded)
    return guards
