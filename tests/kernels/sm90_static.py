"""Static sm_90 analysis of peft_ext's Triton kernels, no GPU needed: compile a kernel the way the JIT
specialises it for an H100 and read facts off the compiled SASS / PTX / resource usage.

Specialisation, as `triton.runtime.jit` does at a launch (BaseBackend.get_*_specialization): every pointer argument
gets `tt.divisibility = 16` (torch allocations are 16-byte aligned), an integer argument that is a multiple of 16
gets it too, and an integer argument equal to 1 becomes the constant 1. The caller gives the integer arguments'
values of a real call (`ints`), so the build is the one a GPU run would get.

Read from the build (`analyse`):
  - regs: registers per thread (cuobjdump -res-usage), local: local-memory bytes per thread;
  - spill_stores / spill_loads: STL / LDL instructions in the SASS (register spills; Triton kernels use no other
    local memory);
  - async_copies: LDGSTS (cp.async) instructions, tma: UTMALDG / UBLKCP (TMA bulk copies) instructions in the SASS,
    cp_async_ptx: cp.async.* instructions in the PTX - software pipelining of global loads;
  - loops: every SASS loop (a backward branch to an earlier label), with its body's instruction count and the
    loops nested in it: `innermost()` / `outermost()` pick the hot loop.

`compile_sm90` skips the test (pytest.skip) only when Triton's ptxas / cuobjdump / nvdisasm are missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from typing import Optional

import pytest

SM90_SMEM = 227 * 1024


def _tool(name: str) -> Optional[str]:
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    except ImportError:  # pragma: no cover
        return None
    if os.path.exists(path):
        return path
    return shutil.which(name)


def tools_problem() -> Optional[str]:
    """Why the static sm_90 checks cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    missing = [n for n in ("ptxas", "cuobjdump", "nvdisasm") if _tool(n) is None]
    if missing:
        return f"Triton's CUDA tools {missing} are not available (triton/backends/nvidia/bin): cannot compile for sm_90"
    return None


def compile_sm90(lazy_kernel, pointers: dict, constexprs: dict, ints: Optional[dict] = None, num_warps: int = 4,
                 num_stages: int = 3, float_args=()):
    """Compile a peft_ext.kernels LazyKernel for sm_90 as the JIT specialises it (module docstring).

    pointers: {arg: "bf16" | "fp32" | "i32" | ...}; constexprs: {arg: value}; ints: {arg: value of a real call} for
    the integer arguments (unlisted ones: no specialisation); float_args: the fp32 scalar arguments."""
    problem = tools_problem()
    if problem:
        pytest.skip(problem)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(lazy_kernel.fn)  # not triton.jit: that gives the interpreter's wrapper under TRITON_INTERPRET
    ints = dict(ints or {})
    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in float_args:
            signature[name] = "fp32"
        else:
            value = ints.get(name)
            if value == 1:  # the JIT turns an integer 1 into a constant
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32"
            if value is not None and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


@dataclasses.dataclass
class Loop:
    label: str
    start: int  # index of the first instruction of the body
    end: int  # index of the backward branch
    instructions: int  # SASS instructions in the body (the branch included)
    inner: list = dataclasses.field(default_factory=list)

    def count(self, sass: "list[str]", pattern: str) -> int:
        return sum(1 for ins in sass[self.start : self.end + 1] if re.search(pattern, ins))


@dataclasses.dataclass
class StaticReport:
    name: str
    regs: int
    local: int
    shared: int
    spill_stores: int
    spill_loads: int
    async_copies: int
    tma: int
    cp_async_ptx: int
    mma: int
    instructions: int
    loops: list
    sass: list  # the instructions, one opcode line each

    def innermost(self) -> Loop:
        """The hot loop: the innermost loop with the most instructions."""
        leaves = [lp for lp in self.loops if not lp.inner]
        if not leaves:
            raise AssertionError(f"{self.name}: no loop in the SASS")
        return max(leaves, key=lambda lp: lp.instructions)

    def outermost(self) -> Loop:
        roots = [lp for lp in self.loops if not any(lp in other.inner for other in self.loops)]
        return max(roots, key=lambda lp: lp.instructions)

    def summary(self) -> str:
        loops = ", ".join(f"{lp.instructions}" for lp in self.loops)
        return (f"{self.name}: {self.regs} regs, shared {self.shared} B, local {self.local} B, spills {self.spill_stores} st / {self.spill_loads} ld, "
                f"LDGSTS {self.async_copies}, TMA {self.tma}, cp.async(ptx) {self.cp_async_ptx}, mma {self.mma}, "
                f"{self.instructions} SASS instructions, loops [{loops}]")


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def analyse(compiled) -> StaticReport:
    """The static facts of a compiled kernel (module docstring)."""
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        listing = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    sass, labels, branches = [], {}, []
    for line in listing.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(sass)
            continue
        m = _INSTR.search(line)
        if m:
            ins = m.group(2)
            b = _BRANCH.search(ins)
            if b:
                branches.append((len(sass), b.group(1)))
            sass.append(ins)
    loops = []
    for at, label in branches:
        start = labels.get(label)
        if start is not None and start <= at:  # a backward branch: a loop
            loops.append(Loop(label, start, at, at - start + 1))
    loops = _dedupe(loops)
    for lp in loops:
        lp.inner = [o for o in loops if o is not lp and lp.start <= o.start and o.end <= lp.end]

    def count(pattern):
        return sum(1 for ins in sass if re.search(pattern, ins))

    ptx = compiled.asm["ptx"]
    return StaticReport(
        name=compiled.metadata.name, regs=regs, local=local, shared=compiled.metadata.shared,
        spill_stores=count(r"\bSTL\b"), spill_loads=count(r"\bLDL\b"),
        async_copies=count(r"\bLDGSTS\b"), tma=count(r"\b(UTMALDG|UBLKCP)\b"),
        cp_async_ptx=len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)", ptx)),
        mma=count(r"\b(HMMA|HGMMA|IMMA)\b"), instructions=len(sass), loops=loops, sass=sass,
    )  # fmt: skip


def _dedupe(loops: "list[Loop]") -> "list[Loop]":
    """Several backward branches to one label (a loop with `continue`-like exits) are one loop: the widest."""
    best = {}
    for lp in loops:
        if lp.label not in best or lp.end > best[lp.label].end:
            best[lp.label] = lp
    return sorted(best.values(), key=lambda lp: lp.start)
