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

Variants (--variants, comma-separated; default: frozen,full,lora,hft,hft-layer; "all" adds hft-inplace):
    frozen       frozen base, only the input embedding trainable (so that there is a backward)
    full         full fine-tuning
    lora         PEFT LoRA r=16 (--lora-r), alpha 2r, all linear layers, dropout 0, PEFT's defaults otherwise
    hft          peft_ext.HftConfig(ratio=0.5, seed=0): strategy "matrix" (the paper's)
    hft-layer    the same with strategy="layer" (half of the blocks)
    hft-inplace  reference, not HFT: the modules HFT selects trained in place (base weights requires_grad),
                 no adapter copies; the floor that HFT's copy design is compared to
"""

from __future__ import annotations

import argparse
import math
import sys

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
    markdown_table,
    random_token_batches,
    ratio,
    time_training_step,
)

import torch

ANCHOR = dict(
    hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=4, seq=2048,
    dtype="bfloat16", steps=5, warmup=2,
)  # fmt: skip
TINY = dict(
    hidden=64, ffn=176, layers=2, heads=4, kv_heads=2, vocab=512, batch=2, seq=64,
    dtype="bfloat16", steps=3, warmup=1,
)  # fmt: skip

LABELS = {
    "frozen": "frozen base (only the input embedding trainable)",
    "full": "full fine-tuning",
    "lora": "PEFT LoRA r={r}, all linear, dropout 0 (PEFT default: fp32 adapter weights)",
    "hft": "HFT ratio {ratio}, strategy matrix",
    "hft-layer": "HFT ratio {ratio}, strategy layer",
    "hft-inplace": "ref: HFT's matrix selection trained in place (not HFT)",
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
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        return model
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
        return get_peft_model(model, config).train()
    if variant in ("hft", "hft-layer"):
        import peft_ext
        from peft import get_peft_model

        strategy = "layer" if variant == "hft-layer" else "matrix"
        config = peft_ext.HftConfig(ratio=args.hft_ratio, seed=0, strategy=strategy)
        return get_peft_model(model, config).train()
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


# ----------------------------------------------------------------------------------------------------- run
def run_variant(variant: str, args, device: torch.device, dtype: torch.dtype, batches) -> dict:
    model = prepare(variant, build_model(args, device, dtype), args)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"variant {variant!r} has no trainable parameters")
    adam = {"fused": True} if args.fused_adam else {}
    optimizer = torch.optim.AdamW(params, lr=args.lr, **adam)
    return {"name": variant, **time_training_step(model, optimizer, batches, args.warmup, args.steps, device)}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPE_ALIASES[args.dtype]
    batches = random_token_batches(args.seed + 1, args.vocab, args.batch, args.seq, args.warmup + args.steps, device)
    rows = []
    for variant in args.variants:
        label = LABELS[variant].format(r=args.lora_r, ratio=args.hft_ratio)
        free_memory(device)
        try:
            row = run_variant(variant, args, device, dtype, batches)
        except torch.cuda.OutOfMemoryError:
            row = {"name": variant, "error": "OOM"}
        free_memory(device)
        row["label"] = label
        rows.append(row)
        if row.get("error"):
            print(f"[{variant}] {row['error']}", file=sys.stderr, flush=True)
        else:
            times = " ".join(fmt_ms(t) for t in row["times"])
            print(
                f"[{variant}] trainable {fmt_int(row['trainable'])} | step ms {times} | peak GiB {fmt_gib(row['gib'])}"
                f" | last loss {row['loss']:.4f}",
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


def goal_lines(args, rows: list[dict]) -> list[str]:
    """The perf.md goal and each HFT row's ratios; met / NOT met only on CUDA at the anchor shape."""
    device = torch.device(args.device)
    judged = device.type == "cuda" and all(getattr(args, k) == v for k, v in ANCHOR.items() if k not in ("steps", "warmup"))
    lines = [f"Goal (design/perf.md): HFT <= {GOAL}x full fine-tuning step time and <= {GOAL}x its peak memory."]
    for row in rows:
        if row["name"] not in ("hft", "hft-layer"):
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
        f"median of {args.steps} after {args.warmup} warm-up(s); attention {args.attn}."
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
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a shape that runs on CPU in seconds (smoke test)")
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

    fill_from_preset(args, TINY if args.tiny else ANCHOR)
    if args.device is None:
        args.device = "cpu" if args.tiny else default_device()
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
