"""Training-step time and peak memory of HFT against full fine-tuning, PEFT LoRA and a frozen base.

One step = forward with labels (causal-LM loss) + backward + AdamW step + zero_grad. Every variant builds a fresh
model from the same config and seed (random init, nothing downloaded), trains on the same random token ids
with the same optimizer settings, and is timed in this one run (design/perf.md: ratios only side by side).

Default shape = the perf.md anchor: Llama with TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 22 layers,
32 heads, 4 KV heads, vocab 32000), bf16 weights, batch 4 x 2048 tokens, median of 5 steps after 2 warm-ups.
Goal (perf.md): HFT <= 0.75x full fine-tuning step time and <= 0.75x its peak memory.

    .venv/bin/python benchmarks/hft_step.py                            # anchor shape, needs a GPU
    .venv/bin/python benchmarks/hft_step.py --out benchmarks/RESULTS.md  # also append the table there
    .venv/bin/python benchmarks/hft_step.py --tiny                     # CPU smoke test, seconds
    .venv/bin/python benchmarks/hft_step.py --memory-cpu               # peak memory on CPU, tracked (below)

Variants (--variants, comma-separated; default: frozen,full,lora,hft,hft-layer; "all" adds hft-inplace):
    frozen       frozen base, only the input embedding trainable (so that there is a backward)
    full         full fine-tuning
    lora         PEFT LoRA r=16 (--lora-r), alpha 2r, all linear layers, dropout 0, PEFT's defaults otherwise
    hft          peft_ext.HftConfig(ratio=0.5, seed=0): strategy "matrix" (the paper's)
    hft-layer    the same with strategy="layer" (half of the blocks)
    hft-inplace  reference, not HFT: the modules HFT selects trained in place (base weights requires_grad),
                 no adapter copies; the floor that HFT's copy design is compared to
    hft-offload  "hft" with the pre-trained weights of the selected modules kept off the accelerator
                 (peft_ext.tuners.hft.layer.offload_originals: pinned CPU memory on a GPU; on a CPU run they go to
                 the "meta" device, which stands in for host memory: a training step never reads them)

Peak memory: on CUDA the caching allocator's peak (`torch.cuda.max_memory_allocated`). `--track-memory` (on by
default off CUDA) adds a second table measured on any device by tracked allocations: one more training step under
a TorchDispatchMode that counts the storage of every tensor alive on the device (the weights, gradients and
optimizer state alive at the start, and every tensor an op returns, until it is freed); a kernel's internal
scratch memory is not seen. `--checkpointing on|both` runs the variants with gradient checkpointing (both: without
and with, each compared with full fine-tuning under the same setting). `--memory-cpu` is the preset for the CPU
comparison: a small Llama (hidden 256, 4 layers, vocab 4096, batch 2 x 256, bf16), full fine-tuning and the HFT
variants, with and without checkpointing, one timed step.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import weakref

from common import (  # noqa: I001  (common must come first: it fixes sys.path before transformers loads)
    build_llama,
    publish,
    NA,
    DTYPE_ALIASES,
    default_device,
    env_header,
    fmt_gib,
    fmt_int,
    fill_from_preset,
    fmt_ms,
    free_memory,
    freeze_all_but_input_embedding,
    fmt_ratio,
    GIB,
    markdown_table,
    random_token_batches,
    ratio,
    time_training_step,
)

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ANCHOR = dict(
    hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=4, seq=2048,
    dtype="bfloat16", steps=5, warmup=2,
)  # fmt: skip
TINY = dict(
    hidden=64, ffn=176, layers=2, heads=4, kv_heads=2, vocab=512, batch=2, seq=64,
    dtype="bfloat16", steps=3, warmup=1,
)  # fmt: skip
MEMORY_CPU = dict(
    hidden=256, ffn=704, layers=4, heads=4, kv_heads=2, vocab=4096, batch=2, seq=256,
    dtype="bfloat16", steps=1, warmup=1,
)  # fmt: skip
MEMORY_CPU_VARIANTS = ["full", "hft", "hft-offload", "hft-layer"]

LABELS = {
    "frozen": "frozen base (only the input embedding trainable)",
    "full": "full fine-tuning",
    "lora": "PEFT LoRA r={r}, all linear, dropout 0 (PEFT default: fp32 adapter weights)",
    "hft": "HFT ratio {ratio}, strategy matrix",
    "hft-layer": "HFT ratio {ratio}, strategy layer",
    "hft-inplace": "ref: HFT's matrix selection trained in place (not HFT)",
    "hft-offload": "HFT ratio {ratio}, strategy matrix, originals offloaded",
}
DEFAULT_VARIANTS = ["frozen", "full", "lora", "hft", "hft-layer"]
GOAL = 0.75


# ---------------------------------------------------------------------------------------------------- model
def build_model(args, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return build_llama(args, device, dtype, max_positions=args.seq)


def prepare(variant: str, model: torch.nn.Module, args) -> torch.nn.Module:
    """Set what trains for `variant`; returns the model to train (a PeftModel for the adapter variants)."""
    if variant == "full":
        return model.requires_grad_(True)
    if variant == "frozen":
        return freeze_all_but_input_embedding(model)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
        return get_peft_model(model, config).train()
    if variant in ("hft", "hft-layer", "hft-offload"):
        import peft_ext
        from peft import get_peft_model
        from peft_ext.tuners.hft.layer import offload_originals

        strategy = "layer" if variant == "hft-layer" else "matrix"
        config = peft_ext.HftConfig(ratio=args.hft_ratio, seed=0, strategy=strategy)
        model = get_peft_model(model, config).train()
        if variant == "hft-offload":  # pinned host memory beside a GPU; "meta" stands in for it on a CPU run
            offload_originals(model, "cpu" if model.device.type != "cpu" else "meta")
        return model
    if variant == "hft-inplace":
        import peft_ext
        from peft_ext.tuners.hft.selection import draw, find_candidates

        config = peft_ext.HftConfig(ratio=args.hft_ratio, seed=0)
        selected = draw(find_candidates(model, config), config.strategy, config.ratio, config.seed + config.stage)
        model.requires_grad_(False)
        for name in selected:
            model.get_submodule(name).requires_grad_(True)
        return model
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(LABELS)}")


# ------------------------------------------------------------------------------------------ tracked memory
class TrackedAllocations(TorchDispatchMode):
    """Live and peak bytes of tensor storage on one device: the tensors given at the start, then every tensor an op
    returns (forward, backward and optimizer ops alike), each storage counted once and until its last tensor is
    freed. Device-independent (it works on CPU, where no allocator keeps statistics); scratch memory inside a kernel
    is not seen."""

    def __init__(self, device: torch.device, alive=()):
        super().__init__()
        self.device = device
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0
        for tensor in alive:
            self.track(tensor)

    def track(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device.type:
            return
        if self.device.index is not None and tensor.device.index != self.device.index:
            return
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if not nbytes:
            return
        if key in self.refs:
            self.refs[key] += 1
        else:
            self.refs[key], self.sizes[key] = 1, nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            self.track(tensor)
        return out


def tracked_peak_step(model, optimizer, ids, device: torch.device) -> dict:
    """One more training step under `TrackedAllocations`: its peak, and what was alive before it (GiB)."""
    gc.collect()
    alive = [*model.parameters(), *model.buffers()]
    alive += [p.grad for p in model.parameters() if p.grad is not None]
    alive += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    alive.append(ids)
    tracker = TrackedAllocations(device, alive)
    start = tracker.current
    with tracker:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    return {"tracked": tracker.peak / GIB, "tracked_start": start / GIB}


# ----------------------------------------------------------------------------------------------------- run
def run_variant(variant: str, args, device: torch.device, dtype: torch.dtype, batches, checkpointing=False) -> dict:
    model = prepare(variant, build_model(args, device, dtype), args)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"variant {variant!r} has no trainable parameters")
    adam = {"fused": True} if args.fused_adam else {}
    optimizer = torch.optim.AdamW(params, lr=args.lr, **adam)
    row = {"name": variant, **time_training_step(model, optimizer, batches, args.warmup, args.steps, device)}
    if args.track_memory:
        row.update(tracked_peak_step(model, optimizer, batches[0], device))
    return row


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPE_ALIASES[args.dtype]
    batches = random_token_batches(args.seed + 1, args.vocab, args.batch, args.seq, args.warmup + args.steps, device)
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    rows = []
    for variant, checkpointing in [(v, c) for c in settings for v in args.variants]:
        label = LABELS[variant].format(r=args.lora_r, ratio=args.hft_ratio)
        free_memory(device)
        try:
            row = run_variant(variant, args, device, dtype, batches, checkpointing)
        except torch.cuda.OutOfMemoryError:
            row = {"name": variant, "error": "OOM"}
        free_memory(device)
        if checkpointing:
            row["name"], label = variant + "+gc", label + ", gradient checkpointing"
        row["label"] = label
        variant = row["name"]
        rows.append(row)
        if row.get("error"):
            print(f"[{variant}] {row['error']}", file=sys.stderr, flush=True)
        else:
            times = " ".join(fmt_ms(t) for t in row["times"])
            tracked = f" | tracked peak GiB {row['tracked']:.3f}" if "tracked" in row else ""
            print(
                f"[{variant}] trainable {fmt_int(row['trainable'])} | step ms {times} | peak GiB {fmt_gib(row['gib'])}"
                f"{tracked} | last loss {row['loss']:.4f}",
                file=sys.stderr,
                flush=True,
            )
            if not math.isfinite(row["loss"]):
                print(f"[{variant}] WARNING: the loss is not finite", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- report
COLUMNS = [
    ("trainable params", "trainable", fmt_int),
    ("step ms (median)", "ms", fmt_ms),
    ("peak GiB", "gib", fmt_gib),
]
RATIOS = [
    ("time vs full FT", "ms", "full"),
    ("memory vs full FT", "gib", "full"),
    ("time vs frozen base", "ms", "frozen"),
]
TRACKED_COLUMNS = [
    ("alive at step start GiB", "tracked_start", lambda v: NA if v is None else f"{v:.3f}"),
    ("tracked peak GiB", "tracked", lambda v: NA if v is None else f"{v:.3f}"),
    ("tracked peak vs full FT (same checkpointing)", "tracked_vs_full", fmt_ratio),
]


def tracked_table(rows: list[dict]) -> str:
    """Tracked peak memory; each row against full fine-tuning run with the same checkpointing setting."""
    for row in rows:
        ref = "full+gc" if row["name"].endswith("+gc") else "full"
        row["tracked_vs_full"] = ratio(rows, row, "tracked", ref)
    return markdown_table(rows, TRACKED_COLUMNS)


def goal_lines(args, rows: list[dict]) -> list[str]:
    """The perf.md goal and each HFT row's ratios; met / NOT met only on CUDA at the anchor shape."""
    device = torch.device(args.device)
    judged = device.type == "cuda" and all(getattr(args, k) == v for k, v in ANCHOR.items() if k not in ("steps", "warmup"))
    judged = judged and args.checkpointing == "off"
    lines = [f"Goal (design/perf.md): HFT <= {GOAL}x full fine-tuning step time and <= {GOAL}x its peak memory."]
    for row in rows:
        if row["name"] not in ("hft", "hft-layer", "hft-offload"):
            continue

        def verdict(key: str, what: str) -> str:
            value = ratio(rows, row, key, "full")
            if value is None:
                return f"{what} {NA}"
            return f"{what} {value:.2f}x" + (f" ({'met' if value <= GOAL else 'NOT met'})" if judged else "")

        lines.append(f"- {row['label']}: {verdict('ms', 'time')}, {verdict('gib', 'memory')}.")
    if device.type != "cuda":
        lines.append(
            f"- {device.type.upper()} run: a smoke test of the script, not a performance measurement (peak memory is "
            "measured on CUDA only; the goal is judged on a GPU at the anchor shape)."
        )
    elif not judged:
        lines.append("- Not the anchor shape: ratios shown, the goal is judged at the anchor shape only.")
    return lines


def report(args, rows: list[dict]) -> str:
    device = torch.device(args.device)
    shape = (
        f"Llama, hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV "
        f"heads, vocab {args.vocab}; {args.dtype} weights, random init; batch {args.batch} x {args.seq} tokens; "
        f"loss + backward + AdamW(lr={args.lr}{', fused' if args.fused_adam else ''}) step; "
        f"median of {args.steps} after {args.warmup} warm-up(s); attention {args.attn}"
        f"{'; gradient checkpointing ' + args.checkpointing if args.checkpointing != 'off' else ''}."
    )
    title_note = f" ({device.type.upper()} --tiny smoke test)" if args.tiny else f" ({device.type.upper()})" if device.type != "cuda" else ""
    parts = [
        f"### HFT training step{title_note}",
        "",
        env_header(device),
        "",
        shape,
        "",
        markdown_table(rows, COLUMNS, RATIOS),
        "",
        *goal_lines(args, rows),
    ]
    if args.track_memory:
        parts += [
            "",
            "Peak memory by tracked allocations (one more step; every tensor alive on the device, see the script's "
            "docstring):",
            "",
            tracked_table(rows),
        ]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a shape that runs on CPU in seconds (smoke test)")
    p.add_argument("--memory-cpu", action="store_true",
                   help="the CPU memory comparison: a small shape, full FT and HFT variants, checkpointing both, "
                        "tracked allocations")  # fmt: skip
    p.add_argument("--checkpointing", choices=("off", "on", "both"), default=None,
                   help="gradient checkpointing (non-reentrant): off (default), on, or both (each variant twice)")
    p.add_argument("--track-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure peak memory by tracked allocations (default: on with --memory-cpu)")
    for name, kind in (("hidden", int), ("ffn", int), ("layers", int), ("heads", int), ("kv-heads", int),
                       ("vocab", int), ("batch", int), ("seq", int)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind, default=None, help=f"default {ANCHOR[name.replace('-', '_')]}")
    p.add_argument("--dtype", choices=sorted(DTYPE_ALIASES), default=None, help="weight dtype (default bfloat16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(LABELS)}; 'all' for every one")  # fmt: skip
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--hft-ratio", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--fused-adam", action="store_true", help="AdamW(fused=True) for every variant (CUDA)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also append the header and table to this markdown file")
    args = p.parse_args(argv)

    if args.memory_cpu:
        fill_from_preset(args, MEMORY_CPU)
        args.checkpointing = args.checkpointing or "both"
        args.track_memory = True if args.track_memory is None else args.track_memory
        if args.variants == ",".join(DEFAULT_VARIANTS):
            args.variants = ",".join(MEMORY_CPU_VARIANTS)
    fill_from_preset(args, TINY if args.tiny else ANCHOR)
    args.checkpointing = args.checkpointing or "off"
    args.track_memory = bool(args.track_memory)
    if args.device is None:
        args.device = "cpu" if args.tiny or args.memory_cpu else default_device()
    args.dtype = str(DTYPE_ALIASES[args.dtype]).removeprefix("torch.")  # one spelling: bf16 -> bfloat16
    args.variants = list(LABELS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in LABELS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(LABELS)} or 'all'")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    text = report(args, rows)
    publish(text, args.out)


if __name__ == "__main__":
    main()
