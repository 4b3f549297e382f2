"""Training-step time and peak memory of SSMLoRA against PEFT LoRA (on the same insertion points, and on all q/v) and a
frozen base.

One step = forward with labels (causal-LM loss) + backward + AdamW step + zero_grad. Every variant builds a fresh
Llama from the same config and seed (random init, nothing downloaded), trains on the same random token ids with the
same optimizer settings, and is timed in this one run (design/perf.md: ratios only side by side).

SSMLoRA uses the paper's sparse insertion (`SsmLoraConfig(r, insertion="alternate_qv")`: q_proj in even blocks,
v_proj in odd ones, one chain through them); "LoRA (same points)" is a PEFT LoRA of the same rank on exactly those
modules (target_modules = their names, found with SSMLoRA's own matcher), so the difference between the two rows is
the state path (C, D, the min-max normalisation, the state dropout, the hand-off); "LoRA all q/v" is the paper's
baseline (every q_proj and v_proj, about twice the parameters). The trainable counts are checked against the spec's
formula: per module r (in + out) + r^2 (D), plus r^2 (C) for every module but a chain's first.

Shapes (--shape): `anchor` (default on CUDA) = the perf.md anchor: Llama with TinyLlama-1.1B's shape (hidden 2048,
FFN 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000), bf16 weights, batch 4 x 2048 tokens, median of 5 steps
after 2 warm-ups; `cpu` = a small Llama for a CPU table (hidden 512, FFN 1408, 4 layers, 8 / 4 heads, vocab 4096,
batch 4 x 256, bf16, median of 10 after 2); `tiny` (or --tiny) = a smoke test of the script, seconds on a CPU.
Goal: the issue sets none against LoRA; perf.md's LoRA-family goal (<= 1.10x the frozen base's step time and peak
memory, stated at r=16) is printed, judged on a GPU at the anchor shape only.

    .venv/bin/python benchmarks/ssmlora.py                               # anchor shape, needs a GPU
    .venv/bin/python benchmarks/ssmlora.py --out benchmarks/RESULTS.md    # also append the table there
    .venv/bin/python benchmarks/ssmlora.py --shape cpu --threads 1 --interleave --track-memory  # CPU table
    .venv/bin/python benchmarks/ssmlora.py --shape tiny                  # CPU smoke test, seconds

Variants (--variants, comma-separated; default frozen,lora,lora-qv,ssmlora,ssmlora-all; "all" adds the two bf16
rows):
    frozen       frozen base, only the input embedding trainable (so that there is a backward), as lowrank.py
    lora         PEFT LoRA r, alpha 2r, dropout 0, PEFT's defaults (fp32 adapter weights), on SSMLoRA's insertion
                 points (q_proj in even blocks, v_proj in odd ones); the reference of "vs LoRA (same points)"
    lora-qv      the same on q_proj and v_proj of every block (the paper's LoRA baseline)
    ssmlora      peft_ext.SsmLoraConfig(r, insertion="alternate_qv"): one chain per module type (q/v alternating is
                 one chain), detach_state=True, state_dropout 0.1, alpha 16 (the spec's defaults); get_peft_model's
                 default autocast_adapter_dtype=True casts its weights to fp32 too, as LoRA's
    ssmlora-all  SsmLoraConfig(r, insertion="all", chain="all"): every q_proj and v_proj, one chain through all
    lora-bf16    ref: lora with autocast_adapter_dtype=False (bf16 adapter weights)
    ssmlora-bf16 ref: ssmlora with autocast_adapter_dtype=False (bf16 adapter weights)

--interleave (CPU only): every model is built first and the steps are taken in rounds, one step of each variant
per round, so that a change of a shared machine's load hits every row alike (the CPU table in RESULTS.md); on CUDA
the variants run one after the other, one model alive at a time (the peak memory needs it).

Peak memory: on CUDA the caching allocator's peak (`torch.cuda.max_memory_allocated`, common.measure); elsewhere
"n/a", unless --track-memory, which adds one more step per variant under hft_step.py's tracked allocations (every
tensor alive on the device, as `hft_step.py --track-memory`; a kernel's scratch memory is not seen): its peak is the
"tracked peak GiB" column, and the memory ratios then use it off CUDA.
"""

from __future__ import annotations

import argparse
import sys

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
    log_step_row,
    markdown_table,
    parse_variants,
    random_token_batches,
    ratio,
    resolve_train_shape,
    run_training_variants,
    trainable_dtypes,
    verdict,
)

import torch

SHAPES = TRAIN_SHAPES  # common.py's presets (anchor, cpu, tiny), shared with smore.py and finegates.py
ANCHOR = SHAPES["anchor"]
LABELS = {
    "frozen": "frozen base (only the input embedding trainable)",
    "lora": "PEFT LoRA r={r}, same points as SSMLoRA (q even / v odd blocks), dropout 0 ({dtype} adapter weights)",
    "lora-qv": "PEFT LoRA r={r}, all q/v, dropout 0 ({dtype} adapter weights)",
    "ssmlora": "SSMLoRA r={r}, alternate_qv, one chain, state dropout {p} ({dtype} adapter weights)",
    "ssmlora-all": "SSMLoRA r={r}, all q/v, chain all, state dropout {p} ({dtype} adapter weights)",
    "lora-bf16": "ref: PEFT LoRA r={r}, same points, autocast_adapter_dtype=False ({dtype} adapter weights)",
    "ssmlora-bf16": "ref: SSMLoRA r={r}, alternate_qv, autocast_adapter_dtype=False ({dtype} adapter weights)",
}
DEFAULT_VARIANTS = ["frozen", "lora", "lora-qv", "ssmlora", "ssmlora-all"]
SSMLORA_VARIANTS = ("ssmlora", "ssmlora-all", "ssmlora-bf16")
GOAL_VS_FROZEN = 1.10  # perf.md's LoRA-family goal (time and peak memory), stated at r=16


# ------------------------------------------------------------------------------------------ configs, counts
def ssmlora_config(variant: str, args):
    import peft_ext

    if variant == "ssmlora-all":
        return peft_ext.SsmLoraConfig(r=args.r, insertion="all", chain="all", state_dropout=args.state_dropout)
    return peft_ext.SsmLoraConfig(r=args.r, insertion="alternate_qv", state_dropout=args.state_dropout)


def insertion_points(model: torch.nn.Module, insertion: str, args) -> list[str]:
    """The names of the modules SsmLoraConfig(insertion=...) adapts in `model`, found with SSMLoRA's own matcher (so
    that PEFT LoRA's "same points" row adapts exactly these)."""
    from peft_ext.tuners.ssmlora.model import SsmLoraModel

    config = ssmlora_config("ssmlora-all" if insertion == "all" else "ssmlora", args)
    matches = SsmLoraModel._check_target_module_exists
    names = [name for name, _ in model.named_modules() if name and matches(config, name)]
    if not names:
        raise RuntimeError(f"SsmLoraConfig(insertion={insertion!r}) matches no module of this model")
    return names


def module_shape(name: str, args) -> tuple[int, int]:
    """(in, out) of a Llama q_proj / v_proj."""
    head_dim = args.hidden // args.heads
    if name.endswith("q_proj"):
        return args.hidden, args.heads * head_dim
    if name.endswith("v_proj"):
        return args.hidden, args.kv_heads * head_dim
    raise ValueError(f"not a q_proj / v_proj: {name}")


def spec_parameters(names: list[str], chains: int, args) -> int:
    """The spec's count: per module r (in + out) + r^2 (D), plus r^2 (C) for every module but a chain's first."""
    r = args.r
    return sum(r * (i + o) + r * r for i, o in (module_shape(n, args) for n in names)) + r * r * (len(names) - chains)


def lora_parameters(names: list[str], args) -> int:
    return sum(args.r * (i + o) for i, o in (module_shape(n, args) for n in names))


# ---------------------------------------------------------------------------------------------------- model
def prepare(variant: str, model: torch.nn.Module, args) -> torch.nn.Module:
    from peft import get_peft_model

    if variant == "frozen":
        return freeze_all_but_input_embedding(model)
    if variant in ("lora", "lora-qv", "lora-bf16"):
        from peft import LoraConfig

        insertion = "all" if variant == "lora-qv" else "alternate_qv"
        points = insertion_points(model, insertion, args)
        if points != args.points[insertion]:  # the spec counts under the table assume args.points
            expected = args.points[insertion]
            print(f"[{variant}] WARNING: SSMLoRA's matcher finds {points}, not {expected}", file=sys.stderr)
        config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=points)
        return get_peft_model(model, config, autocast_adapter_dtype=variant != "lora-bf16").train()
    if variant in SSMLORA_VARIANTS:
        config = ssmlora_config(variant, args)
        return get_peft_model(model, config, autocast_adapter_dtype=variant != "ssmlora-bf16").train()
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(LABELS)}")


def adapted_modules(model: torch.nn.Module) -> int:
    """How many modules carry an adapter (PEFT's LoRA layers or SSMLoRA's), to check the insertion points."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


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
        describe=lambda v, model: {"dtype": trainable_dtypes(model), "modules": adapted_modules(model)},
        log=lambda row: log_step_row(row, f"{row.get('dtype')}, {row.get('modules')} adapted modules"),
    )  # fmt: skip
    for row in rows:
        row["label"] = LABELS[row["name"]].format(r=args.r, p=args.state_dropout, dtype=row.get("dtype", NA))
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
        ("time vs LoRA (same points)", "ms", "lora"),
        ("time vs LoRA all q/v", "ms", "lora-qv"),
        ("memory vs LoRA (same points)", "mem", "lora"),  # CUDA's peak; off CUDA the tracked peak when measured
        ("time vs frozen base", "ms", "frozen"),
        ("memory vs frozen base", "mem", "frozen"),
    ]
    return cols, ratios


def note_lines(args, rows: list[dict]) -> list[str]:
    by_name = {row["name"]: row for row in rows}
    sparse, every = args.points["alternate_qv"], args.points["all"]
    spec = {
        "ssmlora": spec_parameters(sparse, 1, args),
        "ssmlora-bf16": spec_parameters(sparse, 1, args),
        "ssmlora-all": spec_parameters(every, 1, args),
    }
    lora = {"lora": lora_parameters(sparse, args), "lora-bf16": lora_parameters(sparse, args)}
    lora["lora-qv"] = lora_parameters(every, args)
    lines = [
        f"Insertion points: SSMLoRA alternate_qv adapts {len(sparse)} modules ({sparse[0]}, {sparse[1]}, ...), one "
        f"chain; \"same points\" LoRA adapts the same {len(sparse)}; all q/v is {len(every)} modules."
    ]
    counts = []
    for name in ("lora", "lora-qv", "ssmlora", "ssmlora-all"):
        row = by_name.get(name)
        if row is None or row.get("error"):
            continue
        expected = {**spec, **lora}[name]
        check = "= the formula" if row["trainable"] == expected else f"!= the formula's {fmt_int(expected)}"
        counts.append(f"{name} {fmt_int(row['trainable'])} ({check}, {row['modules']} adapted modules)")
    if counts:
        lines.append(
            "Trainable parameters, counted from the optimizer, against the formula (LoRA: r (in + out) per module; "
            "SSMLoRA: that + r^2 (D) per module + r^2 (C) per module but a chain's first): " + "; ".join(counts) + "."
        )
    ssm, qv = by_name.get("ssmlora"), by_name.get("lora-qv")
    if ssm and qv and not ssm.get("error") and not qv.get("error"):
        lines.append(
            f"SSMLoRA alternate_qv has {100.0 * ssm['trainable'] / qv['trainable']:.1f} % of LoRA-on-all-q/v's "
            f"parameters (the paper's \"about half\")."
        )
    judged = judged_at(args, ANCHOR)
    lines += [
        "",
        f"Goals: none against LoRA in the issue; perf.md's LoRA-family step <= {GOAL_VS_FROZEN}x the frozen base's "
        f"time and peak memory (stated at r=16; this run r={args.r}).",
    ]
    for name in SSMLORA_VARIANTS:
        row = by_name.get(name)
        if row is None:
            continue
        # each SSMLoRA row against the LoRA on its own insertion points (and adapter dtype)
        ref, vs = {
            "ssmlora": ("lora", "LoRA (same points)"),
            "ssmlora-all": ("lora-qv", "LoRA all q/v (same points)"),
            "ssmlora-bf16": ("lora-bf16", "the bf16 LoRA row (same points)"),
        }[name]
        if ref not in by_name:
            ref, vs = "lora", "LoRA (same points, fp32 adapter weights)"
        t_lora = ratio(rows, row, "ms", ref)
        t_frozen = ratio(rows, row, "ms", "frozen")
        m_frozen = ratio(rows, row, "mem", "frozen")
        lines.append(
            f"- {row['label']}: time vs {vs} {NA if t_lora is None else f'{t_lora:.2f}x'}; vs frozen base: time "
            f"{verdict(t_frozen, GOAL_VS_FROZEN, judged)}, memory {verdict(m_frozen, GOAL_VS_FROZEN, judged)}."
        )
    device = torch.device(args.device)
    if device.type != "cuda":
        memory = (
            "peak memory is measured on CUDA only; the memory ratios are those of the tracked peaks (one extra "
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
        f"rank {args.r} everywhere (LoRA alpha 2r, dropout 0; SSMLoRA alpha 16, detach_state, state dropout "
        f"{args.state_dropout}); loss + backward + AdamW(lr={args.lr}) step; median of {args.steps} after "
        f"{args.warmup} warm-up(s){' (interleaved: one step of each variant per round)' if args.interleave else ''}; "
        f"attention {args.attn}."
    )
    cols, ratios = columns(args)
    parts = [
        f"### SSMLoRA training step vs PEFT LoRA (same points, all q/v) and the frozen base{note}",
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
    p.add_argument("--r", type=int, default=8, help="rank of every LoRA and SSMLoRA row (default 8, the paper's)")
    p.add_argument("--state-dropout", type=float, default=0.1, help="SSMLoRA's state dropout (default 0.1, the spec's)")
    add_train_run_args(p)
    args = p.parse_args(argv)
    resolve_train_shape(p, args)
    args.variants = parse_variants(p, args.variants, LABELS, ("lora-qv", "lora", "frozen"))  # + ratios' references
    check_train_args(p, args)
    if args.layers < 2:
        p.error("--layers must be >= 2 (alternate_qv puts q_proj in even blocks and v_proj in odd ones)")
    if args.r < 1 or (args.threads or 1) < 1:
        p.error("--r and --threads must be >= 1")
    if args.r > args.kv_heads * (args.hidden // args.heads):
        width = args.kv_heads * args.hidden // args.heads
        p.error(f"--r must be <= v_proj's width kv_heads * hidden / heads = {width}")
    if not 0.0 <= args.state_dropout < 1.0:
        p.error("--state-dropout must be in [0, 1)")
    check_interleave(p, args)
    # the insertion points on a Llama of this shape, named as in the model (blocks model.layers.<i>)
    layers = range(args.layers)
    args.points = {
        "alternate_qv": [f"model.layers.{i}.self_attn.{'q_proj' if i % 2 == 0 else 'v_proj'}" for i in layers],
        "all": [f"model.layers.{i}.self_attn.{m}" for i in layers for m in ("q_proj", "v_proj")],
    }
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
