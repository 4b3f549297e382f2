"""Training-step time and peak memory of S'MoRE against PEFT LoRA at equal trainable parameters and a frozen base.

One step = forward with labels (causal-LM loss; S'MoRE adds its load-balance loss to it, as in training) + backward
+ AdamW step + zero_grad. Every variant builds a fresh Llama from the same config and seed (random init, nothing
downloaded), adapts the MLP projections (gate_proj, up_proj, down_proj) of every block, trains on the same random
token ids with the same optimizer settings, and is timed in this one run (design/perf.md: ratios only side by side).

LoRA's rank is chosen so that its trainable parameters equal S'MoRE's, router included (the spec's "equal total
trainable parameters"): r = round(N_smore / sum over the adapted layers of (in + out)); both counts and their
difference are printed under the table.

Shapes (--shape): `anchor` (default on CUDA) = the perf.md anchor: Llama with TinyLlama-1.1B's shape (hidden 2048,
FFN 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000), bf16 weights, batch 4 x 2048 tokens, median of 5 steps
after 2 warm-ups; `cpu` = a small Llama for a CPU table (hidden 512, FFN 1408, 4 layers, 8 / 4 heads, vocab 4096,
batch 4 x 256, bf16, median of 10 after 2); `tiny` (or --tiny) = a smoke test of the script, seconds on a CPU.
Goal (issue): S'MoRE 4-4 top-2 step <= 1.25x the step of a PEFT LoRA with the same trainable parameters, on a GPU at
the anchor shape (perf.md's LoRA-family goal, <= 1.10x the frozen base, is printed too).

    .venv/bin/python benchmarks/smore.py                               # anchor shape, needs a GPU
    .venv/bin/python benchmarks/smore.py --out benchmarks/RESULTS.md    # also append the table there
    .venv/bin/python benchmarks/smore.py --shape cpu --threads 1 --interleave --track-memory --variants all  # CPU table
    .venv/bin/python benchmarks/smore.py --shape tiny                  # CPU smoke test, seconds

Variants (--variants, comma-separated; default frozen,lora,smore,smore-dense; "all" adds the two bf16 rows):
    frozen       frozen base, only the input embedding trainable (so that there is a backward), as lowrank.py
    lora         PEFT LoRA, rank by the formula above, alpha 2r, dropout 0, PEFT's defaults (fp32 adapter weights)
    smore        peft_ext.SmoreConfig: switch gate, num_experts [4, 4], num_active [2, 2], expert_ranks [8, 8],
                 router_dim = router_down_dim = 32, expert_act tanh (the spec's defaults; paper's "4-4 top-2");
                 get_peft_model's default autocast_adapter_dtype=True casts its weights to fp32 too, as LoRA's
    smore-dense  the same with gate_type "dense", num_experts [2, 2], expert_ranks [16, 16] (same widths
                 d = [0, 32, 64], so nearly the same parameter count)
    lora-bf16    ref: lora with autocast_adapter_dtype=False (bf16 adapter weights)
    smore-bf16   ref: smore with autocast_adapter_dtype=False (bf16 adapter weights)

--interleave (CPU only): every model is built first and the steps are taken in rounds, one step of each variant
per round, so that a change of a shared machine's load hits every row alike (the CPU table in RESULTS.md); on CUDA
the variants run one after the other, one model alive at a time (the peak memory needs it).

Peak memory: on CUDA the caching allocator's peak (`torch.cuda.max_memory_allocated`, common.measure); elsewhere
"n/a", unless --track-memory, which adds one more step per variant under hft_step.py's tracked allocations (every
tensor alive on the device, as `hft_step.py --track-memory`; a kernel's scratch memory is not seen): its peak is the
"tracked peak GiB" column, and "memory vs LoRA" then uses it off CUDA.
"""

from __future__ import annotations

import argparse

from common import (  # noqa: I001  (common must come first: it fixes sys.path before transformers loads)
    build_llama,
    publish,
    NA,
    DTYPE_ALIASES,
    TRAIN_SHAPES,
    add_train_run_args,
    add_train_shape_args,
    check_interleave,
    check_train_args,
    env_header,
    fmt_gib,
    fmt_int,
    fmt_ms,
    freeze_all_but_input_embedding,
    judged_at,
    parse_variants,
    log_step_row,
    markdown_table,
    random_token_batches,
    ratio,
    resolve_train_shape,
    run_training_variants,
    trainable_dtypes,
    verdict,
)

import torch

SHAPES = TRAIN_SHAPES  # common.py's presets (anchor, cpu, tiny), shared with ssmlora.py and finegates.py
ANCHOR = SHAPES["anchor"]
TARGETS = ["gate_proj", "up_proj", "down_proj"]
SMORE = dict(num_experts=[4, 4], num_active=[2, 2], expert_ranks=[8, 8], gate_type="switch")
SMORE_DENSE = dict(num_experts=[2, 2], num_active=[2, 2], expert_ranks=[16, 16], gate_type="dense")
LABELS = {
    "frozen": "frozen base (only the input embedding trainable)",
    "lora": "PEFT LoRA r={r}, dropout 0, PEFT's defaults ({dtype} adapter weights)",
    "smore": "S'MoRE switch 4-4 top-2, ranks 8-8, tanh ({dtype} adapter weights)",
    "smore-dense": "S'MoRE dense 2-2, ranks 16-16, tanh ({dtype} adapter weights)",
    "lora-bf16": "ref: PEFT LoRA r={r}, autocast_adapter_dtype=False ({dtype} adapter weights)",
    "smore-bf16": "ref: S'MoRE switch 4-4 top-2, autocast_adapter_dtype=False ({dtype} adapter weights)",
}
DEFAULT_VARIANTS = ["frozen", "lora", "smore", "smore-dense"]
GOAL_VS_LORA, GOAL_VS_FROZEN = 1.25, 1.10


# ------------------------------------------------------------------------------------------ configs, ranks
def smore_config(variant: str, args):
    import peft_ext

    shape = SMORE_DENSE if variant == "smore-dense" else SMORE
    return peft_ext.SmoreConfig(
        target_modules=list(TARGETS), router_dim=args.router_dim, router_down_dim=args.router_dim, expert_act="tanh",
        **shape,
    )  # fmt: skip


def adapted_shapes(args) -> list[tuple[int, int]]:
    """(in, out) of every adapted layer: gate_proj and up_proj hidden -> ffn, down_proj ffn -> hidden, per block."""
    return [(args.hidden, args.ffn), (args.hidden, args.ffn), (args.ffn, args.hidden)] * args.layers


def smore_parameters(variant: str, args) -> int:
    """The spec's count (SmoreConfig.trainable_parameters) summed over the adapted layers; the table's column is
    counted from the optimizer's parameters, and the two are compared."""
    config = smore_config(variant, args)
    return sum(config.trainable_parameters(i, o) for i, o in adapted_shapes(args))


def lora_rank(target: int, args) -> int:
    """The rank whose r * sum(in + out) over the adapted layers is nearest to `target` (at least 1)."""
    per_rank = sum(i + o for i, o in adapted_shapes(args))
    return max(1, round(target / per_rank))


# ---------------------------------------------------------------------------------------------------- model
def prepare(variant: str, model: torch.nn.Module, args) -> torch.nn.Module:
    from peft import get_peft_model

    if variant == "frozen":
        return freeze_all_but_input_embedding(model)
    if variant in ("lora", "lora-bf16"):
        from peft import LoraConfig

        r = args.lora_r
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(TARGETS))
        return get_peft_model(model, config, autocast_adapter_dtype=variant == "lora").train()
    if variant in ("smore", "smore-dense", "smore-bf16"):
        config = smore_config("smore-dense" if variant == "smore-dense" else "smore", args)
        return get_peft_model(model, config, autocast_adapter_dtype=variant != "smore-bf16").train()
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(LABELS)}")


# ----------------------------------------------------------------------------------------------------- run
def build_variant(variant: str, args, device: torch.device, dtype: torch.dtype):
    model = prepare(variant, build_llama(args, device, dtype, max_positions=args.seq), args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    return model, optimizer


def run(args) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPE_ALIASES[args.dtype]
    batches = random_token_batches(args.seed + 1, args.vocab, args.batch, args.seq, args.warmup + args.steps, device)
    rows = run_training_variants(
        args.variants, lambda v: build_variant(v, args, device, dtype), args, device, batches,
        describe=lambda v, model: {"dtype": trainable_dtypes(model)},
        log=lambda row: log_step_row(row, row.get("dtype")),
    )  # fmt: skip
    for row in rows:
        row["label"] = LABELS[row["name"]].format(r=args.lora_r, dtype=row.get("dtype", NA))
        # memory column the ratios read: CUDA's allocator peak, else the tracked peak when measured
        row["mem"] = row.get("gib") if row.get("gib") is not None else row.get("tracked")
    return rows


# ------------------------------------------------------------------------------------------------- report
def columns(args) -> tuple[list, list]:
    cols = [
        ("trainable params", "trainable", fmt_int),
        ("step ms (median)", "ms", fmt_ms),
        ("peak GiB", "gib", fmt_gib),
    ]
    if args.track_memory:
        cols.append(("tracked peak GiB", "tracked", lambda v: NA if v is None else f"{v:.3f}"))
    ratios = [
        ("time vs LoRA", "ms", "lora"),
        ("memory vs LoRA", "mem", "lora"),  # CUDA's peak; off CUDA the tracked peak when measured
        ("time vs frozen base", "ms", "frozen"),
    ]
    return cols, ratios


def note_lines(args, rows: list[dict]) -> list[str]:
    by_name = {row["name"]: row for row in rows}
    per_rank = sum(i + o for i, o in adapted_shapes(args))
    target = args.smore_params
    lines = [
        f"Equal parameters: S'MoRE 4-4 has {fmt_int(target)} trainable parameters (SmoreConfig.trainable_parameters "
        f"over the {len(adapted_shapes(args))} adapted layers, router included); LoRA's rank r = "
        f"round({fmt_int(target)} / {fmt_int(per_rank)}) = {args.lora_r} (sum of in + out over those layers) gives "
        f"{fmt_int(args.lora_r * per_rank)}."
    ]
    smore, lora = by_name.get("smore"), by_name.get("lora") or by_name.get("lora-bf16")
    if smore and lora and not smore.get("error") and not lora.get("error"):
        diff = 100.0 * (lora["trainable"] - smore["trainable"]) / smore["trainable"]
        check = "" if smore["trainable"] == target else f" (the spec's count says {fmt_int(target)})"
        lines.append(
            f"Counted from the optimizer: S'MoRE {fmt_int(smore['trainable'])}{check}, LoRA r={args.lora_r} "
            f"{fmt_int(lora['trainable'])}: LoRA has {diff:+.2f} % of S'MoRE's count."
        )
    judged = judged_at(args, ANCHOR)
    lines += [
        "",
        f"Goals: S'MoRE step <= {GOAL_VS_LORA}x a PEFT LoRA step at equal trainable parameters (issue); LoRA-family "
        f"step <= {GOAL_VS_FROZEN}x the frozen base's time (design/perf.md, at r=16).",
    ]
    for name in ("smore", "smore-dense", "smore-bf16"):
        row = by_name.get(name)
        if row is None:
            continue
        t_lora = ratio(rows, row, "ms", "lora")
        t_frozen = ratio(rows, row, "ms", "frozen")
        extra = ""
        if name == "smore-bf16" and "lora-bf16" in by_name:
            extra = f", vs the bf16 LoRA row {verdict(ratio(rows, row, 'ms', 'lora-bf16'), GOAL_VS_LORA, judged)}"
        lines.append(
            f"- {row['label']}: time vs LoRA {verdict(t_lora, GOAL_VS_LORA, judged)}{extra}; time vs frozen base "
            f"{verdict(t_frozen, GOAL_VS_FROZEN, judged)}."
        )
    device = torch.device(args.device)
    if device.type != "cuda":
        memory = (
            "peak memory is measured on CUDA only; \"memory vs LoRA\" is the ratio of the tracked peaks (one extra "
            "step under hft_step.py's tracked allocations)"
            if args.track_memory
            else "peak memory is measured on CUDA only (n/a here)"
        )
        lines.append(
            f"- {device.type.upper()} run: ratios from this run only, {memory}; the goals are judged on a GPU at the "
            f"anchor shape."
        )
    elif not judged:
        lines.append("- Not the anchor shape: ratios shown, the goals are judged at the anchor shape only.")
    return lines


def report(args, rows: list[dict]) -> str:
    device = torch.device(args.device)
    note = f" ({device.type.upper()} --shape {args.shape})" if device.type != "cuda" else (
        f" (--shape {args.shape})" if args.shape != "anchor" else ""
    )
    shape = (
        f"Llama, hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV "
        f"heads, vocab {args.vocab}; {args.dtype} weights, random init; batch {args.batch} x {args.seq} tokens; "
        f"adapters on gate_proj, up_proj, down_proj of every block; loss (+ S'MoRE's load-balance loss) + backward + "
        f"AdamW(lr={args.lr}) step; median of {args.steps} after {args.warmup} warm-up(s)"
        f"{' (interleaved: one step of each variant per round)' if args.interleave else ''}; attention {args.attn}; "
        f"S'MoRE router_dim = router_down_dim = {args.router_dim}."
    )
    cols, ratios = columns(args)
    parts = [
        f"### S'MoRE training step vs PEFT LoRA at equal parameters{note}",
        "",
        env_header(device),
        "",
        shape,
        "",
        markdown_table(rows, cols, ratios),
        "",
        *note_lines(args, rows),
    ]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_shape_args(p)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(LABELS)}; 'all' for every one")  # fmt: skip
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: equal parameters to S'MoRE 4-4)")
    p.add_argument("--router-dim", type=int, default=32, help="S'MoRE router_dim = router_down_dim (default 32)")
    add_train_run_args(p)
    args = p.parse_args(argv)
    resolve_train_shape(p, args)
    args.variants = parse_variants(p, args.variants, LABELS, ("lora", "frozen"))  # with the ratios' references
    check_train_args(p, args)
    if args.router_dim < 1 or (args.lora_r is not None and args.lora_r < 1) or (args.threads or 1) < 1:
        p.error("--router-dim, --lora-r and --threads must be >= 1")
    check_interleave(p, args)
    args.smore_params = smore_parameters("smore", args)
    if args.lora_r is None:
        args.lora_r = lora_rank(args.smore_params, args)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # the header's device line reports the thread count
    rows = run(args)
    text = report(args, rows)
    publish(text, args.out)


if __name__ == "__main__":
    main()
