"""Autotuned launch configs for the LoRA-family kernels (lowrank.py's shrink/expand, weight-gradient and dy-pass
kernels, lowrank_gathered.py's mixed-adapter kernel), timed on the real arguments and cached in memory and on disk.

How a launch goes (`launch`, called by the kernel modules in place of `kernel[grid](...)`):
  1. the heuristic config (`gpu_rowblock_config` / `_shrink_expand_config` / `_wgrad_config` / `_gathered_config`,
     passed in the launch's keyword arguments as today) is the starting point and the fallback;
  2. key: the kernel's name, M bucketed to the next power of two (the tuned config of the first M seen serves the
     whole bucket), the exact K / N / R / C / number of adapters, every tensor argument's dtype and layout (which
     dimension has unit stride), the integer arguments' Triton specialisation (== 1, multiple of 16) and every
     constexpr flag (HAS_BIAS, KEEP_MODE, COMPUTE, DOT_PRECISION, ...), plus the tile sizes a kernel cannot change
     (BLOCK_R = the padded rank; the gathered kernel's BLOCK_M, fixed by its AdapterSegments plan; the dy pass's
     BLOCK_M with dB fused, "dy_pass_db": one fp32 partial per program, the buffer sized by the heuristic's grid);
  3. a key met before: its config (memory, else the disk file); a new key, with tuning on: a short list of
     candidates around the heuristic (`candidates`: the heuristic, then one tile or launch setting changed at a
     time: BLOCK_M / BLOCK_K / BLOCK_N / BLOCK_C halved or doubled, the other num_warps, num_stages 2 / 4; never a
     BLOCK_R other than the heuristic's, so every tile holds the rank; none over the register / shared-memory budget
     or in the list of sm_90 builds that spilled, `within_budget`, tests/kernels/test_static_sm90_autotune.py) is run
     on the real inputs; on CUDA a candidate whose build reports spilled registers is rejected too;
  4. correctness guard: each candidate's outputs are compared with the heuristic's (same inputs, outputs poisoned
     with NaN first): same NaN / inf positions and ||cand - heur|| / ||heur|| <= `guard_tolerance(dtype)`
     (2 eps of the output dtype, 1e-5 for fp32: a different tiling changes the summation order, so the rounding,
     nothing else). A candidate that fails to build or launch, or differs beyond that, is rejected;
  5. the accepted ones are timed (`triton.testing.do_bench`, median, on CUDA; wall clock elsewhere) and the fastest
     is kept. Tuning writes only to scratch copies of the outputs (`writes`: OUT / MID / partials), so the caller's
     buffers are written exactly once, by the final launch with the chosen config, and inputs are only read.

Switch: PEFT_EXT_AUTOTUNE = "0" (off: the heuristic config exactly, no cache read), "1" (tune every new key, also
on the CPU under TRITON_INTERPRET=1, timed by wall clock), unset or "auto" (the default): tune on CUDA with compiled
kernels only if `AUTO_ON_CUDA` is True, never on the interpreter / CPU, and not when
torch.use_deterministic_algorithms(True) is set (a config picked by timing could differ between a run with an empty
cache and one with a warm cache, so results could differ in their last bits between those runs; with the switch at
"1" it tunes anyway). `AUTO_ON_CUDA` is False today, so tuning is opt-in: no GPU has run this code yet (its CUDA-only
paths - do_bench, the spill check of a build, the graph-capture test - are untested on hardware), and what it costs is
not small on a first run: the candidates' builds (the sm_90 builds of the static test take 0.6 to 1.3 s each on a
CPU; one build serves every shape with the same flags, so a training run builds a few dozen in all; not measured on a
GPU host) plus their timings (do_bench: 10 ms warm-up + 40 ms each), on every rank of a distributed run. Both caches
(this one and Triton's) are on disk, so that is paid once per machine; a call whose key is known costs a dictionary
look-up. benchmarks/autotune.py measures heuristic vs tuned side by side: if tuning pays on a GPU, AUTO_ON_CUDA
becomes True. Under CUDA graph capture or torch.compile tracing nothing is tuned: a cached config or the heuristic.

Numerics: a tuned config changes results only within the guard (summation order). Distributed training: each rank
tunes alone and may pick a different config (timings are noisy), so ranks may round differently in the last bits;
tuning runs no collective, so it cannot deadlock, and DDP's all-reduce keeps the parameters identical on every
rank. Ranks that start together with an empty cache all tune and all write (merged, last writer wins per key); each
keeps its own choice for the run. To have every rank use the same configs, warm the cache once with one process on
that kind of GPU (a short run): ranks then read the file and tune nothing. Or set PEFT_EXT_AUTOTUNE=0 everywhere.

Cache: in memory per process (per device name) and on disk, one JSON file per device name + Triton version +
peft-ext version, in $PEFT_EXT_CACHE/autotune/ if set, else ~/.cache/peft-ext/autotune/ (the root the offline
model's copy uses). File format: {"format": 1, "device": ..., "triton": ..., "peft_ext": ..., "entries": {key: {
"config": {...}, "ms": tuned median, "heuristic_ms": ..., "heuristic": {...}, "candidates": [...], "timed": how
many were timed, "rejected": [{"config": ..., "reason": ...}], "M": the M it was tuned on}}}. Each write re-reads the file under an advisory lock (fcntl, where available),
merges its new entry and replaces the file atomically (a temporary file in the same folder + os.replace), so
several processes can share the folder and a reader never sees half a file. A file that does not parse is ignored,
with one warning per file, and rewritten at the next write; an entry whose config is not a dict of positive integer
tile / launch settings is dropped; a cached config that does not fit the call (e.g. a weight-gradient BLOCK_M that does
not divide this M's rows per split) gives the heuristic for that call.

Public API:
  cache_info() -> dict   mode, the cache folder, every cache file of this peft-ext version in it with the entries it
                         holds on disk now (whether this process used it or not), the devices this process looked up,
                         entries in memory, tuning / timing counts (a bad PEFT_EXT_AUTOTUNE shows as mode "invalid")
  clear_cache(disk=False) -> list  forget the in-memory entries (and, with disk=True, delete this peft-ext version's
                         files in the cache folder, not their .lock files); returns the paths deleted
  get_tuner() / set_tuner(tuner)  the process-wide `Autotuner` (set_tuner returns the previous one; tests install
                           their own with `Autotuner(cache_dir=..., timer=..., max_candidates=...)`)
  launch(kernel, name, grid, key=..., writes=...)(*args, **kwargs)  what the kernel modules call
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import json
import math
import os
import re
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .dispatch import interpret_mode

try:
    import triton
except ImportError:  # pragma: no cover - the kernels never launch without triton
    triton = None

__all__ = [
    "Autotuner",
    "cache_info",
    "candidates",
    "clear_cache",
    "get_tuner",
    "guard_tolerance",
    "launch",
    "within_budget",
    "mode",
    "set_tuner",
]

ENV_SWITCH = "PEFT_EXT_AUTOTUNE"
AUTO_ON_CUDA = False  # what unset / "auto" means for compiled kernels on CUDA (module docstring, "Switch")
ENV_CACHE_DIR = "PEFT_EXT_CACHE"  # the root of every peft-ext cache (offline_model.py uses it too)
FORMAT = 1
TUNABLE = ("BLOCK_M", "BLOCK_K", "BLOCK_N", "BLOCK_C", "BLOCK_R", "num_warps", "num_stages")

# what a kernel may change (the rest of the heuristic's keys stay fixed and are part of the key)
KERNELS = {
    "shrink_expand": ("BLOCK_M", "BLOCK_K", "BLOCK_N", "num_warps", "num_stages"),
    "gathered": ("BLOCK_K", "BLOCK_N", "num_warps", "num_stages"),  # BLOCK_M: the plan's
    "wgrad": ("BLOCK_M", "BLOCK_C", "num_warps", "num_stages"),  # BLOCK_M must divide rows_per_split
    # lowrank.py's `_dy_pass_kernel` (the backward's one pass over dy): "dy_pass_db" with dB fused (DO_DB): one
    # N x r fp32 partial per program, grid cdiv(M, BLOCK_M) = the partial buffer's first dimension, so BLOCK_M is
    # fixed (part of the key); "dy_pass" without dB tunes BLOCK_M too (its grid is a function of the config)
    "dy_pass": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"),
    "dy_pass_db": ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"),
}
TILE_RANGE = {"BLOCK_M": (16, 128), "BLOCK_K": (32, 256), "BLOCK_N": (32, 256), "BLOCK_C": (32, 256)}
WARPS = (4, 8)
STAGES = (2, 3, 4)
# Register budgets (`register_words`: fp32 words per thread of a config's register tiles), by kernel kind and operand
# size, and the configs whose sm_90 builds spilled within those budgets: candidates over a budget or in SM90_SPILLS
# are never tried. From static sm_90 builds (ptxas, tests/kernels/sm90_static.py) of every one-step neighbour of the
# heuristics at M = 8192, K = N = 2048, r in {16, 32, 64, 128}: all three kernels in bf16 and fp32, the dense two in
# fp16 and in bf16 with dropout. Spilled: fp32 row-block tiles of 80 words and more, weight-gradient tiles of 112
# and more (with dropout; 256 without), and the row-block configs listed (1 to 3 spilled registers, ptxas capping
# them at 80). Two heuristics spill too: (32, 64, 64, 64, 4, 3) in fp16 and in bf16 with dropout; a heuristic is
# always kept (it is the reference and what runs untuned). tests/kernels/test_static_sm90_autotune.py builds the
# anchor's candidate lists. On CUDA a candidate whose build reports spills (CompiledKernel.n_spills) is rejected as
# well (`Autotuner._tune`), whatever the GPU.
MAX_REGISTER_WORDS = {("rowblock", 2): 80, ("rowblock", 4): 64, ("wgrad", 2): 96, ("wgrad", 4): 96}
SM90_SPILLS = (  # (BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, num_warps, num_stages) of the row-block kernels
    (32, 64, 64, 64, 4, 2),  # bf16 (1-2 spilled registers at regs = 80), also with dropout
    (32, 64, 64, 64, 4, 4),  # fp16; bf16 with dropout
    (32, 32, 32, 128, 8, 3),  # bf16
    (32, 32, 64, 128, 8, 2),  # bf16 with dropout
    (32, 32, 128, 128, 8, 3),  # fp16
    (32, 32, 64, 128, 4, 3),  # fp16
    (32, 128, 128, 16, 4, 3),  # fp16
)
# `_dy_pass_kernel` ("dy_pass", "dy_pass_db"): from static sm_90 builds (tests/kernels/sm90_static.py) of every one-step
# neighbour of its heuristics (`lowrank._dy_pass_config`) at M = 8192, N = K = 2048, r in {16, 32, 64, 128}, with dB
# and without: dx expanded in bf16, fp16 and fp32, in bf16 with dropout and in bf16 without dx (335 builds; spills
# counted as STL + LDL instructions). Spilled at 2-byte operands: 256 words ((128, 32, 32, 128) on 4 warps with dB:
# 31 to 238; every other build up to 160 words spills nothing, 234 registers at most, except those listed below); at
# fp32: 96 words and more (16 to 24670, most r = 64 / 128 builds with dB; up to 80 words nothing spills, 251 registers
# at most, except the two fp32 builds listed below; 7 builds of 88 to 136 words that did not spill are dropped with
# them). Three heuristics spill too (kept, as above): with dB in fp32 at r = 64 (16) and r = 128 (11285), and without
# dB or dx in bf16 at r = 32, (32, 128, 64, 32, 4, 3) (2 at regs = 56).
MAX_REGISTER_WORDS.update({("dy_pass", 2): 160, ("dy_pass", 4): 80})
SM90_DY_PASS_SPILLS = (  # (name, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, num_warps, num_stages) of `_dy_pass_kernel`
    ("dy_pass", 32, 32, 32, 128, 8, 3),  # bf16 with dx (2 spilled at regs = 64)
    ("dy_pass", 32, 128, 32, 32, 4, 3),  # bf16 without dx (2 spilled at regs = 56, as its heuristic)
    ("dy_pass", 32, 128, 128, 32, 4, 3),  # bf16 without dx
    ("dy_pass", 32, 128, 64, 32, 4, 2),  # bf16 without dx
    ("dy_pass", 32, 128, 64, 32, 4, 4),  # bf16 without dx
    ("dy_pass", 32, 32, 64, 64, 4, 3),  # fp32 with dx (8)
    ("dy_pass", 64, 32, 64, 128, 8, 3),  # fp32 with dx (302)
)
SM90_SHARED = 227 * 1024


# ------------------------------------------------------------------------------------------------ switch
def mode() -> str:
    """PEFT_EXT_AUTOTUNE read now: "off", "on" or "auto" (see the module docstring)."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value in ("0", "off", "false", "no"):
        return "off"
    raise ValueError(f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is not understood: set it to 0 (heuristic configs "
                     f"only), 1 (tune every new shape) or auto / unset (the default: heuristic configs today, AUTO_ON_CUDA).")  # fmt: skip


def _tracing() -> bool:
    """True under torch.compile tracing or CUDA graph capture: no tuning (no timing, no scratch allocations)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------------- candidates
def register_words(name: str, cfg: dict, elem: int = 2) -> float:
    """fp32 words per thread of a config's register tiles (accumulator + operand tiles), the spill proxy used to
    drop candidates (MAX_REGISTER_WORDS). elem: bytes of an operand element (2 for bf16 / fp16, 4 for fp32)."""
    threads = 32 * cfg.get("num_warps", 4)
    r = cfg["BLOCK_R"]
    w = elem / 4
    if name == "wgrad":
        m, c = cfg["BLOCK_M"], cfg["BLOCK_C"]
        words = r * c + w * (m * r + m * c)
    elif name in ("dy_pass", "dy_pass_db"):
        m, n, k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        loop = w * (m * n + n * r)  # the N loop: a tile of dy and one of B
        if name == "dy_pass_db":
            loop += w * m * r + n * r  # xa's rows (held over the loop) and the fp32 N x r partial
        words = m * r + max(loop, m * k + w * r * k)  # the accumulator; the N loop, then the expand loop
    else:
        m, k, n = cfg["BLOCK_M"], cfg["BLOCK_K"], cfg["BLOCK_N"]
        words = m * r + max(w * (m * k + k * r), m * n + w * r * n)  # the shrink loop, then the expand loop
    return words / threads


def shared_bytes(name: str, cfg: dict, elem: int = 2) -> int:
    """Shared memory of the software-pipelined operand tiles (num_stages buffers of each loop's loads)."""
    stages = cfg.get("num_stages", 1)
    r = cfg["BLOCK_R"]
    if name == "wgrad":
        tile = cfg["BLOCK_M"] * (r + cfg["BLOCK_C"])
    elif name in ("dy_pass", "dy_pass_db"):
        tile = max(cfg["BLOCK_M"] * cfg["BLOCK_N"] + cfg["BLOCK_N"] * r, r * cfg["BLOCK_K"])
    else:
        tile = max(cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * r, r * cfg["BLOCK_N"])
    return stages * tile * elem


def within_budget(name: str, cfg: dict, elem: int = 2) -> bool:
    """False for a config over its register / shared-memory budget or known to spill at sm_90 (MAX_REGISTER_WORDS,
    SM90_SPILLS, SM90_DY_PASS_SPILLS)."""
    kind = "wgrad" if name == "wgrad" else ("dy_pass" if name in ("dy_pass", "dy_pass_db") else "rowblock")
    if register_words(name, cfg, elem) > MAX_REGISTER_WORDS[kind, 4 if elem >= 4 else 2]:
        return False
    if shared_bytes(name, cfg, elem) > SM90_SHARED:
        return False
    if kind == "rowblock":
        tiles = tuple(cfg.get(k) for k in ("BLOCK_M", "BLOCK_K", "BLOCK_N", "BLOCK_R", "num_warps", "num_stages"))
        return tiles not in SM90_SPILLS
    if kind == "dy_pass":
        tiles = tuple(cfg.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "num_warps", "num_stages"))
        return (name, *tiles) not in SM90_DY_PASS_SPILLS
    return True


def candidates(name: str, heuristic: dict, valid: Optional[Callable[[dict], bool]] = None, elem: int = 2,
               compiled: bool = True) -> list[dict]:
    """The heuristic first, then each variation of one setting (module docstring, step 3), without duplicates, in
    a fixed order. `valid(cfg)`: an extra per-call constraint (the weight-gradient kernel's BLOCK_M must divide its
    rows per split). `compiled`: drop candidates over the register / shared-memory budgets (GPU builds; the
    interpreter has neither)."""
    if name not in KERNELS:
        raise ValueError(f"autotune: unknown kernel name {name!r}; known: {sorted(KERNELS)}.")
    out = [dict(heuristic)]
    for field in KERNELS[name]:
        if field not in heuristic:
            continue  # e.g. num_stages on the interpreter
        value = heuristic[field]
        if field == "num_warps":
            options = [w for w in WARPS if w != value]
        elif field == "num_stages":
            options = [s for s in STAGES if s != value]
        else:
            lo, hi = TILE_RANGE[field]
            options = [v for v in (value // 2, value * 2) if lo <= v <= hi]
        for v in options:
            cand = dict(heuristic, **{field: v})
            if cand in out:
                continue
            if cand.get("BLOCK_R", 0) != heuristic.get("BLOCK_R", 0):
                continue  # never: the tiles must hold the rank
            if compiled and not within_budget(name, cand, elem):
                continue
            if valid is not None and not valid(cand):
                continue
            out.append(cand)
    return out


def guard_tolerance(dtype: torch.dtype) -> float:
    """Largest ||candidate - heuristic|| / ||heuristic|| accepted for an output of `dtype`: 2 eps (bf16 1.6e-2,
    fp16 2e-3), 1e-5 for fp32 (summation order only)."""
    if dtype == torch.float32 or dtype == torch.float64:
        return 1e-5
    return 2 * torch.finfo(dtype).eps


def outputs_match(ref: torch.Tensor, out: torch.Tensor) -> Optional[str]:
    """None when `out` equals `ref` within the guard, else why not."""
    ref_nan, out_nan = torch.isnan(ref), torch.isnan(out)
    if not torch.equal(ref_nan, out_nan):
        return "NaN positions differ (an output element not written, or a wrong result)"
    ref_inf, out_inf = torch.isinf(ref), torch.isinf(out)
    if not torch.equal(ref_inf, out_inf) or not torch.equal(ref[ref_inf], out[out_inf]):
        return "inf positions differ"
    finite = ~(ref_nan | ref_inf)
    r, o = ref[finite].double(), out[finite].double()
    den = r.norm().item()
    err = (o - r).norm().item() / den if den > 0 else (o - r).norm().item()
    tol = guard_tolerance(ref.dtype)
    if not err <= tol:
        return f"relative difference {err:.2e} > {tol:.1e}"
    return None


# ------------------------------------------------------------------------------------------------- keys
_SIGNATURES: dict = {}


def _arg_names(kernel) -> list[str]:
    fn = getattr(kernel, "fn", kernel)
    names = _SIGNATURES.get(fn)
    if names is None:
        names = _SIGNATURES[fn] = list(inspect.signature(fn).parameters)
    return names


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _layout(t: torch.Tensor) -> str:
    """Which dimension has unit stride ("-" if none): the access pattern the build and its speed depend on."""
    for dim in range(t.dim() - 1, -1, -1):
        if t.stride(dim) == 1 and t.size(dim) > 1:
            return str(dim)
    return "-"


def _int_spec(v: int) -> str:
    return "1" if v == 1 else ("16" if v % 16 == 0 else "n")


def bucket_m(m: int) -> int:
    """M's bucket: the next power of two (at least 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, m))))


def make_key(name: str, names: Sequence[str], args: Sequence, flags: dict, fixed: dict, shape: dict) -> str:
    """The cache key (module docstring, step 2), a readable string."""
    parts = [name]
    for k, v in shape.items():
        parts.append(f"{k}={bucket_m(int(v)) if k == 'M' else int(v)}")
    for k in sorted(fixed):
        parts.append(f"{k}={fixed[k]}")
    for arg_name, v in zip(names, args):
        if isinstance(v, torch.Tensor):
            parts.append(f"{arg_name}:{_dtype_name(v.dtype)}/{_layout(v)}")
        elif isinstance(v, int) and not isinstance(v, bool) and arg_name not in shape:
            parts.append(f"{arg_name}:{_int_spec(v)}")
    for k in sorted(flags):
        parts.append(f"{k}={flags[k]}")
    return "|".join(parts)


# ------------------------------------------------------------------------------------------------ timers
def _cuda_timer(fn, warmup_ms: float, rep_ms: float) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def wall_clock_timer(fn, reps: int = 1) -> float:
    """Median wall-clock ms of `reps` calls (the interpreter / CPU timer)."""
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------- cache files
def default_cache_dir() -> Path:
    """$PEFT_EXT_CACHE/autotune, else ~/.cache/peft-ext/autotune: the root the offline model's copy uses too
    (peft_ext/data/offline_model.py), so one variable moves every cache of peft-ext."""
    root = os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "peft-ext"
    return Path(root).expanduser() / "autotune"


def _versions() -> tuple[str, str]:
    triton_v = getattr(triton, "__version__", "none")
    try:
        ours = importlib.metadata.version("peft-ext")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree without an install
        ours = "unknown"
    return triton_v, ours


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    return f"{device.type}-interpreter" if interpret_mode() else device.type


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "device"


@contextlib.contextmanager
def _file_lock(path: Path):
    """An advisory lock on `path`.lock (fcntl; a no-op where fcntl is missing): serialises read-merge-write."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(str(path) + ".lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _valid_config(cfg) -> bool:
    return (isinstance(cfg, dict) and bool(cfg) and all(k in TUNABLE for k in cfg)
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in cfg.values()))  # fmt: skip


class _CacheFile:
    """One device's JSON file: entries read lazily (and re-read when the file changed), merged writes."""

    def __init__(self, path: Path, device: str, versions: tuple[str, str], warn: Callable[[str], None]):
        self.path, self.device, self.versions, self._warn = path, device, versions, warn
        self.entries: dict = {}
        self._stamp = None

    def _read(self) -> dict:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._warn(f"cannot read the autotune cache file {self.path} ({e}); tuning without it")
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not an autotune cache of format {FORMAT}")
        except ValueError as e:
            self._warn(f"ignoring the corrupt autotune cache file {self.path} ({e}); it is rewritten at the next "
                       f"tuning (delete it, or call peft_ext.kernels.autotune.clear_cache(disk=True), to do so now)")
            return {}
        return {k: v for k, v in data["entries"].items() if isinstance(v, dict) and _valid_config(v.get("config"))}

    def refresh(self) -> None:
        """Re-read the file if it changed since the last read (another process may have tuned)."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self.entries = self._read() if stamp is not None else {}

    def store(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path):
                merged = self._read()
                merged[key] = entry
                data = {"format": FORMAT, "device": self.device, "triton": self.versions[0],
                        "peft_ext": self.versions[1], "entries": merged}  # fmt: skip
                fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=str(self.path.parent))
                try:
                    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: a folder shared by users stays readable
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            self.entries = merged
            st = self.path.stat()
            self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as e:
            self._warn(f"cannot write the autotune cache file {self.path} ({e}); tuned configs stay in memory only "
                       f"(set {ENV_CACHE_DIR} to a writable folder: the files go to its autotune/ subfolder)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ the tuner
class Autotuner:
    """Chooses launch configs (module docstring). One per process serves every launch (`get_tuner`).

    cache_dir: the folder of the JSON files (default: $PEFT_EXT_CACHE/autotune, else ~/.cache/peft-ext/autotune, read
        at each first use of a device). timer: fn -> ms, overriding do_bench (CUDA) / wall clock (elsewhere).
    warmup_ms / rep_ms: do_bench's budgets per candidate. cpu_reps: wall-clock calls per candidate off CUDA.
    max_candidates: keep only the first n candidates (the heuristic is always the first)."""

    def __init__(self, cache_dir: Optional[Union[str, os.PathLike]] = None, timer: Optional[Callable] = None,
                 warmup_ms: float = 10.0, rep_ms: float = 40.0, cpu_reps: int = 1, max_candidates: Optional[int] = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.timer, self.warmup_ms, self.rep_ms, self.cpu_reps = timer, warmup_ms, rep_ms, cpu_reps
        self.max_candidates = max_candidates
        self._files: dict = {}  # device name -> _CacheFile
        self._memory: dict = {}  # (device name, key) -> config
        self._fast: dict = {}  # memo of exact calls (`choose`) -> config
        self._lock = threading.RLock()
        self._warned: set = set()
        self.stats = dict(tuned=0, timed=0, rejected=0, memory_hits=0, disk_hits=0, heuristic=0)
        self.history: list = []  # one dict per tuning of this tuner: key and cache entry (heuristic, config, times)

    # ------------------------------------------------------------------------------------------ cache
    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _file(self, device: torch.device) -> _CacheFile:
        name = device_name(device)
        cache = self._files.get(name)
        if cache is None:
            versions = _versions()
            folder = self.cache_dir or default_cache_dir()
            path = folder / f"{_slug(name)}__triton-{_slug(versions[0])}__peft_ext-{_slug(versions[1])}.json"
            cache = self._files[name] = _CacheFile(path, name, versions, self._warn)
        return cache

    def _disk_files(self) -> list[Path]:
        """This peft-ext version's cache files in the cache folder (every device and Triton version)."""
        folder = self.cache_dir or default_cache_dir()
        return sorted(folder.glob(f"*__peft_ext-{_slug(_versions()[1])}.json"))

    def cache_info(self) -> dict:
        """files: every cache file of this peft-ext version in the folder (whether this process used it or not),
        by path, with the number of entries it holds on disk now; devices: the devices this process looked up."""
        with self._lock:
            try:
                switch = mode()
            except ValueError as e:  # inspecting the cache must not need a valid switch
                switch = f"invalid ({e})"
            files = {}
            for path in self._disk_files():
                probe = _CacheFile(path, "", ("", ""), self._warn)
                files[str(path)] = dict(entries_on_disk=len(probe._read()))
            devices = {name: str(cache.path) for name, cache in self._files.items()}
            return dict(mode=switch, cache_dir=str(self.cache_dir or default_cache_dir()),
                        entries_in_memory=len(self._memory), files=files, devices=devices, **self.stats)  # fmt: skip

    def clear(self, disk: bool = False) -> list[str]:
        """Forget the in-memory configs; with `disk`, also delete this peft-ext version's cache files (not their
        .lock files: a writer may hold one). Returns the paths deleted."""
        deleted = []
        with self._lock:
            self._memory.clear()
            self._fast.clear()
            for cache in self._files.values():
                cache.entries, cache._stamp = {}, None
            if disk:
                for path in self._disk_files():
                    with contextlib.suppress(OSError):
                        path.unlink()
                        deleted.append(str(path))
            for k in self.stats:
                self.stats[k] = 0
        return deleted

    def lookup(self, device: torch.device, key: str) -> Optional[dict]:
        """The cached config of `key` (memory, else disk), or None."""
        mem_key = (device_name(device), key)
        cfg = self._memory.get(mem_key)
        if cfg is not None:
            self.stats["memory_hits"] += 1
            return cfg
        cache = self._file(device)
        cache.refresh()
        entry = cache.entries.get(key)
        if entry is not None:
            cfg = self._memory[mem_key] = dict(entry["config"])
            self.stats["disk_hits"] += 1
            return cfg
        return None

    # ------------------------------------------------------------------------------------------ launch
    def launch(self, kernel, name: str, grid, *, key: dict, writes: Sequence[str] = ()):
        """A callable taking the kernel's arguments (`**cfg` of the heuristic among its keywords) that launches
        `kernel` with the chosen config. grid: a tuple, or a function of the config giving one. key: the shape
        values of the key ("M" is bucketed). writes: the names of the arguments the kernel writes; while tuning each is
        replaced by a scratch tensor of its shape and strides, filled with NaN before every candidate (so the kernel
        must only store to them, never read them: a kernel that accumulates into an output would need the scratch
        filled with a copy instead)."""

        def run(*args, **kwargs):
            heuristic = {k: kwargs.pop(k) for k in TUNABLE if k in kwargs}
            grid_of = grid if callable(grid) else (lambda cfg: grid)
            cfg = self.choose(kernel, name, grid_of, args, kwargs, heuristic, key, writes)
            return kernel[grid_of(cfg)](*args, **kwargs, **cfg)

        return run

    def choose(self, kernel, name, grid_of, args, flags, heuristic, key, writes) -> dict:
        state = mode()
        if state == "off":
            return heuristic
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        compiled = device.type == "cuda" and not interpret_mode()
        if state == "auto" and (not (compiled and AUTO_ON_CUDA) or torch.are_deterministic_algorithms_enabled()):
            return heuristic
        # a memo of this exact call (every argument's dtype and strides, every integer): the launch path's cost
        # when nothing is new; the readable key below is built only when the memo misses (a new M, a new shape)
        fast = (name, device, compiled, tuple(key.items()), tuple(heuristic.items()), tuple(flags.items()),
                tuple((a.dtype, a.stride()) if isinstance(a, torch.Tensor) else a for a in args if not isinstance(a, float)))
        cfg = self._fast.get(fast)
        if cfg is not None:
            self.stats["memory_hits"] += 1
            return cfg
        names = _arg_names(kernel)[: len(args)]
        bound = dict(zip(names, args))
        fixed = {k: v for k, v in heuristic.items() if k not in KERNELS.get(name, ())}
        key_text = make_key(name, names, args, flags, fixed, key)
        valid = _VALID.get(name)

        def usable(cfg) -> bool:
            return (set(cfg) == set(heuristic) and all(cfg[k] == v for k, v in fixed.items())
                    and (valid is None or valid(cfg, bound)))  # fmt: skip

        with self._lock:
            cfg = self.lookup(device, key_text)
            if cfg is not None:
                return self._memo(fast, cfg if usable(cfg) else heuristic)
            if _tracing():
                self.stats["heuristic"] += 1
                return heuristic
            elem = 4 if "32" in str(flags.get("COMPUTE", "")) else 2  # the tiles' dtype in registers
            cands = candidates(name, heuristic, (lambda c: valid(c, bound)) if valid else None, elem, compiled)
            if self.max_candidates is not None:
                cands = cands[: max(1, self.max_candidates)]
            cfg, entry = self._tune(kernel, name, grid_of, names, args, flags, cands, writes, device, compiled)
            entry["M"] = int(key.get("M", 0))
            self.history.append(dict(key=key_text, **entry))
            self._memory[(device_name(device), key_text)] = cfg
            self._file(device).store(key_text, entry)
            return self._memo(fast, cfg)

    def _memo(self, fast, cfg: dict) -> dict:
        if len(self._fast) >= 4096:  # bounded: e.g. a new M at every call (variable sequence lengths)
            self._fast.clear()
        self._fast[fast] = cfg
        return cfg

    def _time(self, fn, compiled: bool) -> float:
        self.stats["timed"] += 1
        if self.timer is not None:
            return float(self.timer(fn))
        if compiled:
            return _cuda_timer(fn, self.warmup_ms, self.rep_ms)
        return wall_clock_timer(fn, self.cpu_reps)

    def _tune(self, kernel, name, grid_of, names, args, flags, cands, writes, device, compiled):
        """Run the candidates on scratch outputs (module docstring, steps 3-5); returns (config, cache entry)."""
        args = list(args)
        scratch, by_id = {}, {}
        for w in writes:
            i = names.index(w)
            t = args[i]
            if id(t) not in by_id:
                by_id[id(t)] = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
            scratch[w] = args[i] = by_id[id(t)]
        buffers = list(by_id.values())

        def poison():
            for b in buffers:
                b.fill_(float("nan") if b.dtype.is_floating_point else 0)

        def runner(cfg):
            return lambda: kernel[grid_of(cfg)](*args, **flags, **cfg)

        heuristic = cands[0]
        poison()
        runner(heuristic)()  # a failure here is the caller's failure: it propagates
        reference = [b.clone() for b in buffers]
        results = [(self._time(runner(heuristic), compiled), 0, heuristic)]
        rejected = []
        for order, cfg in enumerate(cands[1:], start=1):
            try:
                poison()
                built = runner(cfg)()
            except Exception as e:  # a build or launch failure (e.g. out of shared memory): not a candidate
                rejected.append(dict(config=cfg, reason=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            spills = getattr(built, "n_spills", 0)  # a compiled kernel (CUDA); the interpreter returns none
            if isinstance(spills, int) and spills > 0:
                rejected.append(dict(config=cfg, reason=f"its build spills {spills} registers"))
                continue
            why = next((w for w in (outputs_match(r, b) for r, b in zip(reference, buffers)) if w), None)
            if why:
                rejected.append(dict(config=cfg, reason=why))
                continue
            results.append((self._time(runner(cfg), compiled), order, cfg))
        self.stats["tuned"] += 1
        self.stats["rejected"] += len(rejected)
        ms, _, best = min(results, key=lambda r: (r[0], r[1]))
        entry = dict(config=best, ms=ms, heuristic=heuristic, heuristic_ms=results[0][0], timed=len(results),
                     candidates=cands, rejected=rejected)  # fmt: skip
        return dict(best), entry


def _wgrad_valid(cfg: dict, bound: dict) -> bool:
    rows = bound.get("rows_per_split")
    return rows is None or rows % cfg["BLOCK_M"] == 0


_VALID = {"wgrad": _wgrad_valid}

# ------------------------------------------------------------------------------------------ module-level API
_TUNER = Autotuner()


def get_tuner() -> Autotuner:
    return _TUNER


def set_tuner(tuner: Autotuner) -> Autotuner:
    """Install `tuner` for every launch of this process; returns the previous one."""
    global _TUNER
    if not isinstance(tuner, Autotuner):
        raise TypeError(f"set_tuner takes an Autotuner, got {type(tuner).__name__}.")
    previous, _TUNER = _TUNER, tuner
    return previous


def launch(kernel, name: str, grid, *, key: dict, writes: Sequence[str] = ()):
    """`get_tuner().launch(...)`: see Autotuner.launch."""
    return _TUNER.launch(kernel, name, grid, key=key, writes=writes)


def cache_info() -> dict:
    """The switch, the cache files and their entries, and how often this process tuned / timed / hit the cache."""
    return _TUNER.cache_info()


def clear_cache(disk: bool = False) -> list[str]:
    """Forget the tuned configs of this process (disk=True: also delete this peft-ext version's cache files).
    Returns the paths deleted."""
    return _TUNER.clear(disk=disk)
