"""Helpers shared by the scripts in benchmarks/: timing, peak memory, the environment header, markdown tables.

Scripts run as `.venv/bin/python benchmarks/<name>.py` from the repository root, so benchmarks/ is sys.path[0]
and `from common import ...` finds this file. Importing it also takes the repository root off sys.path: the
root's kernels/ folder is the package `peft_ext.kernels`, and as a top-level `kernels` it would shadow Hugging
Face's `kernels` package, which transformers probes for on import.

How to measure (design/perf.md): every variant in one run on the same device, warm-up first, then the median
of several timed repetitions; CUDA events on a GPU (time.perf_counter elsewhere); peak memory from the CUDA
caching allocator (`torch.cuda.max_memory_allocated`, reset before the warm-up), "n/a" off CUDA.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
NA = "n/a"


def _drop_repo_root_from_sys_path() -> None:
    def is_root(entry: str) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == REPO_ROOT
        except OSError:
            return False

    sys.path[:] = [entry for entry in sys.path if not is_root(entry)]


_drop_repo_root_from_sys_path()

import torch  # noqa: E402  (after the sys.path fix above)

# --dtype spellings: every script accepts the long names, the training scripts the short ones as well
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {**DTYPES, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ measuring
class Measurement(NamedTuple):
    median_ms: float
    peak_gib: Optional[float]  # None where not measured (any device but CUDA)
    times_ms: tuple[float, ...]  # every timed repetition, in order


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize(device)


def measure(fn: Callable[[], Any], warmup: int, reps: int, device: torch.device | str) -> Measurement:
    """Run `fn` `warmup` times, then time `reps` calls one by one; return the median, the peak memory, all times.

    On CUDA each call is timed with a pair of CUDA events on the current stream and the peak is
    `torch.cuda.max_memory_allocated` since the start of the warm-up (so it counts everything alive during the
    calls — weights, gradients, optimizer state created lazily by the first step, activations — and nothing
    freed before). Elsewhere each call is timed with time.perf_counter around a device synchronize, and the
    peak is None (print it as "n/a").
    """
    if reps < 1:
        raise ValueError(f"measure() needs reps >= 1, got {reps}.")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if cuda:
            with torch.cuda.device(device):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
    return Measurement(statistics.median(times), peak, tuple(times))


def free_memory(device: torch.device | str) -> None:
    """Between variants: collect garbage, return cached blocks to the driver, reset the peak counter."""
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------- environment
def _version(*dists: str) -> str:
    """The installed version of the first of `dists` found (e.g. triton ships as "triton" or "pytorch-triton")."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return NA


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda})"
    if device.type == "cpu":
        return f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
    return str(device)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def git_revision() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return NA
    return f"{sha}{' + uncommitted changes' if dirty else ''}" if sha else NA


def command_line() -> str:
    """The command that started this process, as typed from the current directory."""
    exe = Path(sys.executable)
    try:
        rel = os.path.relpath(exe)
        exe_text = rel if not rel.startswith("..") else str(exe)
    except ValueError:
        exe_text = str(exe)
    return shlex.join([exe_text, *sys.argv])


def env_header(device: torch.device | str, command: Optional[str] = None) -> str:
    """Two markdown lines: date, device, versions; then the exact command."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = ", ".join(
        f"{name} {_version(*dists)}"
        for name, *dists in (
            ("torch", "torch"),
            ("triton", "triton", "pytorch-triton"),
            ("peft", "peft"),
            ("transformers", "transformers"),
            ("peft-ext", "peft-ext"),
        )
    )
    return (
        f"{now} · {device_name(device)} · {versions} · git {git_revision()}\n\n"
        f"Command: `{command or command_line()}`"
    )


# ------------------------------------------------------------------------------------------------ tables
def fmt_ms(value: Optional[float]) -> str:
    if value is None:
        return NA
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def fmt_gib(value: Optional[float]) -> str:
    return NA if value is None else f"{value:.2f}"


def fmt_int(value: Optional[int]) -> str:
    return NA if value is None else f"{value:,}"


def fmt_ratio(value: Optional[float]) -> str:
    return NA if value is None else f"{value:.2f}"


def ratio(rows: Sequence[dict], row: dict, key: str, ref_name: str) -> Optional[float]:
    """row[key] / (the row named `ref_name`)[key]; None when either is missing, failed or zero."""
    ref = next((r for r in rows if r.get("name") == ref_name), None)
    if ref is None or row.get("error") or ref.get("error"):
        return None
    num, den = row.get(key), ref.get(key)
    if num is None or den is None or den == 0:
        return None
    return num / den


def markdown_table(
    rows: Sequence[dict],
    columns: Sequence[tuple[str, str, Callable[[Any], str]]],
    ratio_to: Sequence[tuple[str, str, str]] = (),
    label_key: str = "label",
) -> str:
    """A markdown table, one line per row.

    rows: dicts with "name" (a short key that `ratio_to` refers to), `label_key` (the first column's text),
        the values that `columns` and `ratio_to` read, and optionally "error" (e.g. "OOM": every other cell of
        that row shows it).
    columns: (header, key, formatter) for each plain column after the first.
    ratio_to: (header, key, reference row name) for each ratio column: row[key] / reference[key], 2 decimals,
        "n/a" when either side is missing.
    """
    headers = ["variant", *(c[0] for c in columns), *(r[0] for r in ratio_to)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [str(row.get(label_key, row.get("name", "?")))]
        if row.get("error"):
            cells += [str(row["error"])] * (len(headers) - 1)
        else:
            cells += [fmt(row.get(key)) for _, key, fmt in columns]
            cells += [fmt_ratio(ratio(rows, row, key, ref)) for _, key, ref in ratio_to]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def append_markdown(path: str | os.PathLike, text: str) -> None:
    """Append `text` to `path` as its own block (a blank line before it), creating the file if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text() if path.exists() else ""
    with path.open("a") as f:
        if previous and not previous.endswith("\n\n"):
            f.write("\n" if previous.endswith("\n") else "\n\n")
        f.write(text.rstrip("\n") + "\n")


def build_llama(args, device, dtype, train: bool = True, max_positions: int = 2048):
    """A random-init Llama of the shape in `args` (vocab, hidden, ffn, layers, heads, kv_heads, seed, attn),
    built on `device` (fast, and no fp32 copy on the host); untied embeddings, as TinyLlama."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, max_positions),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
    return model.to(device).train(train)


def random_token_batches(seed: int, vocab: int, batch: int, seq: int, n: int, device) -> list:
    """`n` (at least one) batches of random token ids, the same for every variant of a run."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=generator).to(device) for _ in range(max(1, n))]


def causal_lm_loss(model, ids):
    """The default training loss of the step benchmarks: the model's causal-LM loss on `ids` (labels = inputs)."""
    return model(input_ids=ids, labels=ids).loss


def optimizer_elements(optimizer) -> int:
    """Elements of the parameters `optimizer` updates (the "trainable params" column)."""
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


def time_training_step(model, optimizer, batches, warmup: int, steps: int, device, loss_fn=None) -> dict:
    """Time whole training steps (causal-LM forward + backward + optimizer step + zero_grad), cycling `batches`.

    loss_fn(model, ids) -> the loss to backpropagate (default `causal_lm_loss`; e.g. FineGates adds its sparsity loss).
    Returns trainable (elements the optimizer updates), ms (median), gib (peak), times (every timed step) and the
    last loss.
    """
    import itertools

    feed = itertools.cycle(batches)
    last = {}
    loss_fn = loss_fn or causal_lm_loss

    def step():
        ids = next(feed)
        loss = loss_fn(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()

    m = measure(step, warmup, steps, device)
    trainable = optimizer_elements(optimizer)
    return {"trainable": trainable, "ms": m.median_ms, "gib": m.peak_gib, "times": m.times_ms, "loss": float(last["loss"])}


def publish(text: str, out) -> None:
    """Print a benchmark's report, and append it to `out` (e.g. benchmarks/RESULTS.md) when given."""
    import sys

    print(text, end="", flush=True)
    if out:
        append_markdown(out, text)
        print(f"(appended to {out})", file=sys.stderr)



def fill_from_preset(args, preset: dict):
    """Options left at None take the preset's value (the full-size shape, or the small --tiny / --smoke one)."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"4096x4096,14336x4096" -> [(4096, 4096), (14336, 4096)] (OUTxIN)."""
    shapes = []
    for item in text.split(","):
        try:
            out_f, in_f = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not OUTxIN (e.g. 4096x4096)") from None
        shapes.append((out_f, in_f))
    return shapes


class KernelBench:
    """Times one call: Triton's do_bench (median, L2 flushed) on CUDA, `measure` elsewhere (interpreter smoke tests)."""

    def __init__(self, device: torch.device, rep_ms: int, warmup_ms: int, cpu_reps: int):
        self.device, self.rep_ms, self.warmup_ms, self.cpu_reps = device, rep_ms, warmup_ms, cpu_reps

    def time_ms(self, fn) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        return measure(fn, warmup=1, reps=self.cpu_reps, device=self.device).median_ms

    def copy_bandwidth(self, mib: int) -> float:
        """Bytes per second of a device-to-device torch copy (read + write), the perf.md ceiling's convention."""
        n = mib * 2**20 // 4
        src = torch.randn(n, device=self.device)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def add_kernel_bench_args(parser, cpu_reps: int, small_flag: str) -> None:
    """The options every kernel benchmark takes: dtype, do_bench timing, device, --out."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per variant (CUDA)")
    parser.add_argument("--warmup-ms", type=int, default=50, help="do_bench warm-up time per variant (CUDA)")
    parser.add_argument("--cpu-reps", type=int, default=cpu_reps, help="timed calls per variant off CUDA")
    parser.add_argument("--device", default=None, help=f"default: cuda if available, else cpu (needs {small_flag})")
    parser.add_argument("--out", default=None, help="also append the header and tables to this markdown file")


def kernel_device(requested: Optional[str], small: bool, script: str, flag: str) -> torch.device:
    """The device of a kernel benchmark: CUDA, or (only for the small preset) the CPU with Triton's interpreter."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        if not small:
            sys.exit(f"{script} measures CUDA kernels: run it on a GPU, or pass {flag} for a CPU smoke test.")
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels compile lazily, so this still applies
    return device


# ------------------------------------------------------------------ training-step benchmarks (smore, ssmlora, ...)
# The presets of the model-level step benchmarks (--shape): perf.md's anchor, a small Llama for a CPU table, a smoke
# test. smore.py, ssmlora.py and finegates.py share them.
TRAIN_SHAPES = {
    "anchor": dict(
        hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=4, seq=2048,
        dtype="bfloat16", steps=5, warmup=2,
    ),
    "cpu": dict(
        hidden=512, ffn=1408, layers=4, heads=8, kv_heads=4, vocab=4096, batch=4, seq=256,
        dtype="bfloat16", steps=10, warmup=2,
    ),
    "tiny": dict(
        hidden=64, ffn=176, layers=2, heads=4, kv_heads=2, vocab=512, batch=2, seq=32,
        dtype="bfloat16", steps=2, warmup=1,
    ),
}  # fmt: skip
SHAPE_FLAGS = ("hidden", "ffn", "layers", "heads", "kv-heads", "vocab", "batch", "seq")


def freeze_all_but_input_embedding(model):
    """The frozen-base row: every weight frozen but the input embedding, so that a backward runs through every block
    (perf.md's anchor row)."""
    model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    return model


def trainable_dtypes(model) -> str:
    """The dtypes of the trainable parameters, e.g. "float32" (the "adapter weights" of a row's label)."""
    dtypes = {str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.requires_grad}
    return "/".join(sorted(dtypes)) or NA


def add_train_shape_args(p, small_flag: bool = False) -> None:
    """The shape options of a step benchmark: --shape / --tiny (/ --small), the Llama's sizes, dtype, steps,
    warm-up and device (their defaults come from the preset, `resolve_train_args`)."""
    anchor = TRAIN_SHAPES["anchor"]
    p.add_argument("--shape", choices=sorted(TRAIN_SHAPES), default=None,
                   help="preset: anchor (default; perf.md), cpu (a small Llama for a CPU table), tiny (smoke test)")
    p.add_argument("--tiny", action="store_true", help="the same as --shape tiny (as the other scripts)")
    if small_flag:
        p.add_argument("--small", action="store_true", help="the same as --shape cpu")
    for name in SHAPE_FLAGS:
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {anchor[name.replace('-', '_')]} (anchor)")
    p.add_argument("--dtype", choices=sorted(DTYPE_ALIASES), default=None, help="weight dtype (default bfloat16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 5 at the anchor)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 at the anchor)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (cpu for --shape cpu/tiny)")


def add_train_run_args(p) -> None:
    """The run options of a step benchmark: --track-memory, --threads, --interleave, --lr, --attn, --seed, --out."""
    p.add_argument("--track-memory", action="store_true",
                   help="one more step per variant under tracked allocations (peak memory on any device)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU; default torch's). On a CPU shared with other jobs, 1 thread "
                        "avoids the stalls of oversubscribed thread pools")  # fmt: skip
    p.add_argument("--interleave", action="store_true",
                   help="off CUDA: all models built first, steps taken in rounds (one per variant per round), so "
                        "that a change of a shared machine's load hits every row alike")  # fmt: skip
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also append the header and table to this markdown file")


def resolve_train_shape(p, args, default_shape: str = "anchor"):
    """--tiny (/ --small) -> --shape, the preset's values for every option left unset, the device (cpu for a non-anchor
    preset), the dtype's long name; checks the steps and the head counts."""
    small = getattr(args, "small", False)
    for flag, shape in (("tiny", "tiny"), ("small", "cpu")):
        if getattr(args, flag, False):
            if args.shape not in (None, shape) or (flag == "tiny" and small):
                p.error(f"--{flag} is --shape {shape}")
            args.shape = shape
    args.shape = args.shape or default_shape
    fill_from_preset(args, TRAIN_SHAPES[args.shape])
    if args.device is None:
        args.device = "cpu" if args.shape != "anchor" else default_device()
    args.dtype = str(DTYPE_ALIASES[args.dtype]).removeprefix("torch.")
    return args


def check_train_args(p, args) -> None:
    """The checks every step benchmark makes once its own options are parsed."""
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")


def check_interleave(p, args) -> None:
    if args.interleave and torch.device(args.device).type == "cuda":
        p.error("--interleave keeps every model alive at once, which spoils CUDA's per-row peak memory: CPU only")


def run_training_variants(
    variants, build, args, device, batches, describe=None, loss_fn=None, log=None
) -> list[dict]:
    """Time the training step of every variant; one row dict per variant, in order.

    build(variant) -> (model, optimizer); describe(variant, model) -> extra row entries (e.g. the adapter dtype);
    loss_fn(variant) -> the loss function of that variant's step (None: `causal_lm_loss`); log(row) is called for
    each row once it is measured.
    Sequential (default): one model alive at a time, freed between variants, a CUDA OOM fails its row only.
    args.interleave (off CUDA): every model built first, then the steps taken in rounds, one step of each variant per
    round (warm-up rounds first), so that a change of the machine's load hits every row alike; each step timed by
    `measure` (one call), the median per variant reported. args.track_memory: one more step per variant under
    hft_step.py's tracked allocations ("tracked" GiB).
    """
    describe = describe or (lambda variant, model: {})
    loss_fn = loss_fn or (lambda variant: None)
    log = log or (lambda row: None)

    def tracked(model, optimizer):
        from hft_step import tracked_peak_step

        return tracked_peak_step(model, optimizer, batches[0], device)

    if not args.interleave:

        def one(variant) -> dict:  # its model and optimizer die with this frame, an OOM's too
            model, optimizer = build(variant)
            row = {"name": variant, **describe(variant, model)}
            row.update(time_training_step(model, optimizer, batches, args.warmup, args.steps, device, loss_fn(variant)))
            if args.track_memory:
                row.update(tracked(model, optimizer))
            return row

        rows = []
        for variant in variants:
            free_memory(device)
            try:
                row = one(variant)
            except torch.cuda.OutOfMemoryError:
                row = {"name": variant, "error": "OOM"}
            free_memory(device)
            rows.append(row)
            log(row)
        return rows

    import itertools

    models = {v: build(v) for v in variants}
    rows = {v: {"name": v, **describe(v, m), "times": [], "gib": None} for v, (m, _) in models.items()}
    feeds = {v: itertools.cycle(batches) for v in models}  # the same batches, in the same order, as time_training_step

    def stepper(variant):
        model, optimizer = models[variant]
        compute_loss = loss_fn(variant) or causal_lm_loss

        def step():
            ids = next(feeds[variant])
            loss = compute_loss(model, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows[variant]["loss"] = float(loss.detach())

        return step

    steps = {v: stepper(v) for v in models}
    for round_ in range(args.warmup + args.steps):
        for variant in models:
            t = measure(steps[variant], 0, 1, device).median_ms
            if round_ >= args.warmup:
                rows[variant]["times"].append(t)
    for variant, (model, optimizer) in models.items():
        row = rows[variant]
        row["ms"] = statistics.median(row["times"])
        row["times"] = tuple(row["times"])
        row["trainable"] = optimizer_elements(optimizer)
        if args.track_memory:
            row.update(tracked(model, optimizer))
    for variant in models:
        log(rows[variant])
    return [rows[v] for v in models]


def log_step_row(row: dict, detail: str) -> None:
    """One variant's step times, peak and last loss on stderr ("[name] trainable N (detail) | step ms ... | ...")."""
    import math

    variant = row["name"]
    if row.get("error"):
        print(f"[{variant}] {row['error']}", file=sys.stderr, flush=True)
        return
    times = " ".join(fmt_ms(t) for t in row["times"])
    tracked = f" | tracked peak GiB {row['tracked']:.3f}" if "tracked" in row else ""
    print(
        f"[{variant}] trainable {fmt_int(row['trainable'])} ({detail}) | step ms {times} | peak GiB "
        f"{fmt_gib(row['gib'])}{tracked} | last loss {row['loss']:.4f}",
        file=sys.stderr,
        flush=True,
    )
    if not math.isfinite(row["loss"]):
        print(f"[{variant}] WARNING: the loss is not finite", file=sys.stderr, flush=True)


def judged_at(args, anchor: dict) -> bool:
    """A goal is judged ("met" / "NOT met") only for a CUDA run at the anchor shape (steps and warm-up aside)."""
    keys = [k for k in anchor if k not in ("steps", "warmup")]
    return torch.device(args.device).type == "cuda" and all(getattr(args, k) == anchor[k] for k in keys)


def verdict(value, goal, judged: bool) -> str:
    """"1.23x", with " (met)" / " (NOT met)" against `goal` (an upper bound) when judged."""
    if value is None:
        return NA
    return f"{value:.2f}x" + (f" ({'met' if value <= goal else 'NOT met'})" if judged else "")


def parse_variants(p, text: str, labels: dict, references: Sequence[str]) -> list[str]:
    """--variants: comma-separated keys of `labels` or "all", with the ratios' reference rows added, in `labels`
    order."""
    variants = list(labels) if text == "all" else [v.strip() for v in text.split(",") if v]
    unknown = [v for v in variants if v not in labels]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(labels)} or 'all'")
    for ref in references:
        if ref not in variants:
            variants.insert(0, ref)
    return sorted(dict.fromkeys(variants), key=list(labels).index)
