"""Low-rank adapters on the fused kernels: training step and mixed-adapter forward, side by side in one run.

Table 1, training step (forward with labels + backward + AdamW step + zero_grad), at each --ranks value:
    frozen        frozen base, only the input embedding trainable (so that there is a backward)
    lora          PEFT LoRA r, alpha 2r, all linear layers, dropout 0, PEFT's defaults (fp32 adapter weights)
    lora-fused    the same model after peft_ext.accelerate_lora(model)
    cola          peft_ext.ColaConfig(r, chain_length=3), timed on its last link (2 links merged: rank 2r frozen
                  + r trained, the most expensive point of the chain)
    lora-fused-recompute   lora-fused + peft_ext.recompute_adapter_inputs(model): the adapter layers rebuild their
                  saved inputs (norm outputs, down_proj input, ...) in the backward from what the base saves anyway
    cola-recompute         cola + peft_ext.recompute_adapter_inputs(model)
    lora-bf16     (with --variants all) PEFT LoRA with autocast_adapter_dtype=False: bf16 adapter weights, PEFT's path
Under the step table, the activation bytes each row's forward saves for its backward (unique storages, parameters
excluded; peft_ext.SavedTensorsCounter, one extra step): a memory figure measured on any device, CPU included.
Table 2, inference forward (no grad), one batch:
    no adapter; one unmerged LoRA r (PEFT / fused); a mixed batch over L adapters (`adapter_names=`, each row its
    own adapter, L = --adapters) (PEFT / fused).

Default shape = the perf.md anchor: Llama with TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 22 layers, 32 heads,
4 KV heads, vocab 32000), bf16 weights, training batch 4 x 2048, median of 5 steps after 2 warm-ups; the forward
table uses 16 x 256 tokens (the anchor's 8 x 512 tokens, in 16 rows so that 16 adapters fit in one batch).
Goals (perf.md): LoRA-family step <= 1.10x the frozen base's time and peak memory at r=16; one unmerged adapter
<= 1.1x and 4 / 16 mixed adapters <= 1.3x the no-adapter forward.

    .venv/bin/python benchmarks/lowrank.py                             # anchor shape, needs a GPU
    .venv/bin/python benchmarks/lowrank.py --out benchmarks/RESULTS.md  # also append the tables there
    .venv/bin/python benchmarks/lowrank.py --tiny                      # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

from common import (  # noqa: I001  (common must come first: it fixes sys.path before transformers loads)
    build_llama,
    publish,
    DTYPE_ALIASES,
    default_device,
    env_header,
    fmt_gib,
    fmt_int,
    fill_from_preset,
    fmt_ms,
    free_memory,
    judged_at,
    verdict,
    freeze_all_but_input_embedding,
    markdown_table,
    measure,
    random_token_batches,
    ratio,
    time_training_step,
)

import torch

ANCHOR = dict(
    hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=4, seq=2048,
    fwd_batch=16, fwd_seq=256, dtype="bfloat16", steps=5, warmup=2,
)  # fmt: skip
TINY = dict(  # hidden 128 / 2 KV heads: the k/v projections are 64 wide, so r=64 still fits every layer
    hidden=128, ffn=352, layers=2, heads=4, kv_heads=2, vocab=512, batch=2, seq=64,
    fwd_batch=16, fwd_seq=16, dtype="bfloat16", steps=3, warmup=1,
)  # fmt: skip
STEP_LABELS = {
    "frozen": "frozen base (only the input embedding trainable)",
    "lora": "PEFT LoRA r={r} (fp32 adapter weights)",
    "lora-fused": "PEFT LoRA r={r} + peft_ext.accelerate",
    "cola": "COLA r={r}, M=3, last link (rank {r2} merged + {r} trained)",
    "lora-fused-recompute": "PEFT LoRA r={r}, fused, inputs recomputed (accelerate + recompute_adapter_inputs)",
    "cola-recompute": "COLA r={r} + recompute_adapter_inputs, M=3, last link",
    "lora-bf16": "ref: PEFT LoRA r={r}, bf16 adapter weights (autocast_adapter_dtype=False)",
}
DEFAULT_VARIANTS = ["frozen", "lora", "lora-fused", "cola", "lora-fused-recompute", "cola-recompute"]
STEP_GOAL, ONE_ADAPTER_GOAL, MIXED_GOAL = 1.10, 1.1, 1.3


# ---------------------------------------------------------------------------------------------------- models
def build_model(args, device: torch.device, dtype: torch.dtype, train: bool = True) -> torch.nn.Module:
    return build_llama(args, device, dtype, train=train, max_positions=max(args.seq, args.fwd_seq))


def lora_config(r: int, **kw):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", **kw)


def prepare_step(variant: str, model: torch.nn.Module, r: int) -> torch.nn.Module:
    import peft_ext
    from peft import get_peft_model

    if variant == "frozen":
        return freeze_all_but_input_embedding(model)
    if variant.endswith("-recompute"):
        peft_model = prepare_step(variant.removesuffix("-recompute"), model, r)
        peft_ext.recompute_adapter_inputs(peft_model, warn=False)
        return peft_model
    if variant in ("lora", "lora-fused"):
        peft_model = get_peft_model(model, lora_config(r))
        return peft_ext.accelerate_lora(peft_model) if variant == "lora-fused" else peft_model
    if variant == "lora-bf16":
        return get_peft_model(model, lora_config(r), autocast_adapter_dtype=False)
    if variant == "cola":
        config = peft_ext.ColaConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", chain_length=3)
        peft_model = get_peft_model(model, config)
        peft_model.base_model.next_link()  # time the last link: two links merged
        peft_model.base_model.next_link()
        return peft_model
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(STEP_LABELS)}")


# ----------------------------------------------------------------------------------------------- training
def run_step(variant: str, r: int, args, device, dtype, batches) -> dict:
    model = prepare_step(variant, build_model(args, device, dtype), r)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    row = time_training_step(model, optimizer, batches, args.warmup, args.steps, device)
    try:  # after the timed steps (their peak is already read): a failure here costs only this figure
        row["saved"] = saved_activation_bytes(model, batches[0])
    except torch.cuda.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
    return row


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves in one forward (parameters and buffers excluded), then its backward
    (so that the graph is freed the usual way); gradients are cleared after."""
    from peft_ext import SavedTensorsCounter

    with SavedTensorsCounter(exclude=[*model.parameters(), *model.buffers()]) as counter:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.bytes


# ------------------------------------------------------------------------------------------------ forward
def forward_model(kind: str, fused: bool, adapters: int, r: int, args, device, dtype):
    """(model, extra forward kwargs) for one forward row."""
    import peft_ext
    from peft import get_peft_model

    model = build_model(args, device, dtype, train=False)
    if kind == "base":
        return model, {}
    config = lora_config(r, init_lora_weights=False)  # random B: a non-trivial adapter
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, adapters):
        peft_model.add_adapter(f"a{i}", lora_config(r, init_lora_weights=False))
    peft_model.eval()
    if fused:
        peft_ext.accelerate_lora(peft_model)
    if kind == "single":
        return peft_model, {}
    names = [f"a{i % adapters}" for i in range(args.fwd_batch)]
    return peft_model, {"adapter_names": names}


def run_forward(kind: str, fused: bool, adapters: int, args, device, dtype, batches) -> dict:
    model, extra = forward_model(kind, fused, adapters, args.fwd_r, args, device, dtype)
    feed = itertools.cycle(batches)

    @torch.no_grad()
    def fwd():
        model(input_ids=next(feed), **extra)

    m = measure(fwd, args.warmup, args.steps, device)
    return {"ms": m.median_ms, "gib": m.peak_gib, "times": m.times_ms}


def forward_rows(args) -> list[tuple[str, str, bool, int]]:
    rows = [("base", "no adapter", False, 0)]
    rows += [
        ("single", f"one unmerged PEFT LoRA r={args.fwd_r}", False, 1),
        ("single", f"one unmerged PEFT LoRA r={args.fwd_r} + peft_ext.accelerate", True, 1),
    ]
    for n in args.adapters:
        rows += [
            ("mixed", f"{n} adapter(s) mixed via adapter_names, PEFT", False, n),
            ("mixed", f"{n} adapter(s) mixed via adapter_names + peft_ext.accelerate", True, n),
        ]
    return rows


# --------------------------------------------------------------------------------------------------- run
def _guarded(fn, name: str, device) -> dict:
    free_memory(device)
    try:
        row = fn()
    except torch.cuda.OutOfMemoryError:
        row = {"error": "OOM"}
    free_memory(device)
    row["name"] = name
    return row


def _log(row: dict) -> None:
    if row.get("error"):
        print(f"[{row['name']}] {row['error']}", file=sys.stderr, flush=True)
        return
    extra = f" | last loss {row['loss']:.4f}" if "loss" in row else ""
    times = " ".join(fmt_ms(t) for t in row["times"])
    print(f"[{row['name']}] ms {times} | peak GiB {fmt_gib(row['gib'])}{extra}", file=sys.stderr, flush=True)
    if "loss" in row and not math.isfinite(row["loss"]):
        print(f"[{row['name']}] WARNING: the loss is not finite", file=sys.stderr, flush=True)


def run(args) -> tuple[list[dict], list[dict]]:
    device, dtype = torch.device(args.device), DTYPE_ALIASES[args.dtype]
    train_batches = random_token_batches(args.seed + 1, args.vocab, args.batch, args.seq, args.warmup + args.steps, device)
    step_rows = []
    frozen = None
    for r in args.ranks:
        for variant in args.variants:
            if variant == "frozen" and frozen is not None:
                continue  # the frozen base does not depend on r: measured once
            name = "frozen" if variant == "frozen" else f"{variant}-r{r}"
            row = _guarded(lambda: run_step(variant, r, args, device, dtype, train_batches), name, device)
            row["label"] = STEP_LABELS[variant].format(r=r, r2=2 * r)
            frozen = row if variant == "frozen" else frozen
            step_rows.append(row)
            _log(row)
    fwd_batches = random_token_batches(
        args.seed + 2, args.vocab, args.fwd_batch, args.fwd_seq, args.warmup + args.steps, device
    )
    fwd_rows = []
    for i, (kind, label, fused, n) in enumerate(forward_rows(args)):
        name = "base" if kind == "base" else f"fwd{i}"
        row = _guarded(lambda: run_forward(kind, fused, n, args, device, dtype, fwd_batches), name, device)
        row["label"] = label
        fwd_rows.append(row)
        _log(row)
    return step_rows, fwd_rows


# ------------------------------------------------------------------------------------------------ report
def goal_lines(args, step_rows, fwd_rows) -> list[str]:
    judged = judged_at(args, ANCHOR)
    lines = [f"Goals (design/perf.md): LoRA-family step <= {STEP_GOAL}x frozen-base time and peak memory at r=16; "
             f"one unmerged adapter <= {ONE_ADAPTER_GOAL}x, 4 and 16 mixed adapters <= {MIXED_GOAL}x the no-adapter "
             f"forward."]  # fmt: skip
    for row in step_rows:
        if row["name"] in ("lora-fused-r16", "cola-r16", "lora-fused-recompute-r16", "cola-recompute-r16"):
            t, m = ratio(step_rows, row, "ms", "frozen"), ratio(step_rows, row, "gib", "frozen")
            lines.append(f"- {row['label']}: time {verdict(t, STEP_GOAL, judged)}, memory {verdict(m, STEP_GOAL, judged)}.")
    for row in fwd_rows:
        if "accelerate" not in row["label"]:
            continue
        goal = ONE_ADAPTER_GOAL if row["label"].startswith("one") else MIXED_GOAL
        lines.append(f"- {row['label']}: {verdict(ratio(fwd_rows, row, 'ms', 'base'), goal, judged)}.")
    if torch.device(args.device).type != "cuda":
        lines.append("- CPU run: a smoke test of the script, not a performance measurement (the fused path runs the "
                     "PyTorch reference on the CPU; peak memory is measured on CUDA only).")  # fmt: skip
    elif not judged:
        lines.append("- Not the anchor shape: ratios shown, the goals are judged at the anchor shape only.")
    return lines


def saved_lines(step_rows) -> list[str]:
    """The activation bytes each step row's forward saved (measured by SavedTensorsCounter), and the ratio to the
    frozen base's: text lines, not a table (the step and forward tables stay the report's only two)."""
    lines = ["Activations saved for the backward, per forward (unique storages, parameters excluded; "
             "peft_ext.SavedTensorsCounter, measured on this device):"]  # fmt: skip
    for row in step_rows:
        if row.get("error") or "saved" not in row:
            continue
        rel = ratio(step_rows, row, "saved", "frozen")
        rel_text = "" if rel is None or row["name"] == "frozen" else f" ({rel:.2f}x the frozen base's)"
        lines.append(f"- {row['name']}: {row['saved'] / 2**20:.3f} MiB{rel_text}")
    return lines


def report(args, step_rows, fwd_rows) -> str:
    device = torch.device(args.device)
    note = f" ({device.type.upper()} --tiny smoke test)" if args.tiny else f" ({device.type.upper()})" if device.type != "cuda" else ""
    model = (f"Llama, hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, {args.heads} heads / {args.kv_heads} "
             f"KV heads, vocab {args.vocab}; {args.dtype} weights, random init; attention {args.attn}; median of "
             f"{args.steps} after {args.warmup} warm-up(s).")  # fmt: skip
    step_cols = [("trainable params", "trainable", fmt_int), ("step ms (median)", "ms", fmt_ms), ("peak GiB", "gib", fmt_gib)]
    step_ratios = [("time vs frozen base", "ms", "frozen"), ("memory vs frozen base", "gib", "frozen")]
    fwd_cols = [("forward ms (median)", "ms", fmt_ms), ("peak GiB", "gib", fmt_gib)]
    fwd_ratios = [("time vs no adapter", "ms", "base")]
    parts = [
        f"### Low-rank adapters: training step and mixed-adapter forward{note}",
        "",
        env_header(device),
        "",
        model,
        "",
        f"Training step: batch {args.batch} x {args.seq} tokens, loss + backward + AdamW(lr={args.lr}) step, all linear "
        f"layers adapted, dropout 0.",
        "",
        markdown_table(step_rows, step_cols, step_ratios),
        "",
        *saved_lines(step_rows),
        "",
        f"Inference forward (no grad): batch {args.fwd_batch} x {args.fwd_seq} tokens, LoRA r={args.fwd_r} on all "
        f"linear layers; a mixed batch gives row i adapter i mod L.",
        "",
        markdown_table(fwd_rows, fwd_cols, fwd_ratios),
        "",
        *goal_lines(args, step_rows, fwd_rows),
    ]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a shape that runs on CPU in seconds (smoke test)")
    for name in ("hidden", "ffn", "layers", "heads", "kv-heads", "vocab", "batch", "seq", "fwd-batch", "fwd-seq"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {ANCHOR[name.replace('-', '_')]}")
    p.add_argument("--dtype", choices=sorted(DTYPE_ALIASES), default=None, help="weight dtype (default bfloat16)")
    p.add_argument("--steps", type=int, default=None, help="timed repetitions, median reported (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default 2)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"training-step rows, comma-separated, from {', '.join(STEP_LABELS)}; 'all' for every one")  # fmt: skip
    p.add_argument("--ranks", type=_ints, default=[16, 64], help="training-step ranks (default 16,64)")
    p.add_argument("--fwd-r", type=int, default=16, help="adapter rank in the forward table (default 16)")
    p.add_argument("--adapters", type=_ints, default=[1, 4, 16], help="mixed-batch adapter counts (default 1,4,16)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also append the header and tables to this markdown file")
    args = p.parse_args(argv)
    fill_from_preset(args, TINY if args.tiny else ANCHOR)
    if args.device is None:
        args.device = "cpu" if args.tiny else default_device()
    args.dtype = str(DTYPE_ALIASES[args.dtype]).removeprefix("torch.")
    args.variants = list(STEP_LABELS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in STEP_LABELS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(STEP_LABELS)} or 'all'")
    if "frozen" not in args.variants:
        args.variants.insert(0, "frozen")  # the ratios' reference
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")
    if any(n < 1 for n in args.adapters) or any(n > args.fwd_batch for n in args.adapters):
        p.error(f"--adapters values must be in 1..--fwd-batch ({args.fwd_batch}): every adapter needs a row")
    if any(r < 1 for r in [*args.ranks, args.fwd_r]):
        p.error("ranks must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    step_rows, fwd_rows = run(args)
    text = report(args, step_rows, fwd_rows)
    publish(text, args.out)


if __name__ == "__main__":
    main()
