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
import itertools
import math
import statistics
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

SHAPES = {
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
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        return model
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


def adapter_dtype(model: torch.nn.Module) -> str:
    dtypes = {str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.requires_grad}
    return "/".join(sorted(dtypes)) or NA


def adapted_modules(model: torch.nn.Module) -> int:
    """How many modules carry an adapter (PEFT's LoRA layers or SSMLoRA's), to check the insertion points."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


# ----------------------------------------------------------------------------------------------------- run
def build_variant(variant: str, args, device: torch.device, dtype: torch.dtype):
    model = prepare(variant, build_llama(args, device, dtype, max_positions=args.seq), args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    return model, optimizer


def run_variant(variant: str, args, device: torch.device, dtype: torch.dtype, batches) -> dict:
    model, optimizer = build_variant(variant, args, device, dtype)
    row = {"name": variant, "dtype": adapter_dtype(model), "modules": adapted_modules(model)}
    row.update(time_training_step(model, optimizer, batches, args.warmup, args.steps, device))
    if args.track_memory:
        from hft_step import tracked_peak_step

        row.update(tracked_peak_step(model, optimizer, batches[0], device))
    return row


def run_interleaved(args, device: torch.device, dtype: torch.dtype, batches) -> list[dict]:
    """--interleave (off CUDA): every variant's model built first, then the steps taken in rounds, one step of each
    variant per round (warm-up rounds first), so that a change of the machine's load hits every row alike. Each
    step is timed by common.measure (one call); the median per variant is reported."""
    from common import measure

    models = {v: build_variant(v, args, device, dtype) for v in args.variants}
    rows = {
        v: {"name": v, "dtype": adapter_dtype(m), "modules": adapted_modules(m), "times": [], "gib": None}
        for v, (m, _) in models.items()
    }
    feeds = {v: itertools.cycle(batches) for v in models}  # the same batches, in the same order, as time_training_step

    def stepper(variant):
        model, optimizer = models[variant]

        def step():
            ids = next(feeds[variant])
            loss = model(input_ids=ids, labels=ids).loss
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
        row["trainable"] = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        if args.track_memory:
            from hft_step import tracked_peak_step

            row.update(tracked_peak_step(model, optimizer, batches[0], device))
    return [rows[v] for v in models]


def _log(row: dict) -> None:
    variant = row["name"]
    if row.get("error"):
        print(f"[{variant}] {row['error']}", file=sys.stderr, flush=True)
        return
    times = " ".join(fmt_ms(t) for t in row["times"])
    tracked = f" | tracked peak GiB {row['tracked']:.3f}" if "tracked" in row else ""
    print(
        f"[{variant}] trainable {fmt_int(row['trainable'])} ({row['dtype']}, {row['modules']} adapted modules) | "
        f"step ms {times} | peak GiB {fmt_gib(row['gib'])}{tracked} | last loss {row['loss']:.4f}",
        file=sys.stderr,
        flush=True,
    )
    if not math.isfinite(row["loss"]):
        print(f"[{variant}] WARNING: the loss is not finite", file=sys.stderr, flush=True)


def run(args) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPE_ALIASES[args.dtype]
    batches = random_token_batches(args.seed + 1, args.vocab, args.batch, args.seq, args.warmup + args.steps, device)
    if args.interleave:
        rows = run_interleaved(args, device, dtype, batches)
        for row in rows:
            _log(row)
    else:
        rows = []
        for variant in args.variants:
            free_memory(device)
            try:
                row = run_variant(variant, args, device, dtype, batches)
            except torch.cuda.OutOfMemoryError:
                row = {"name": variant, "error": "OOM"}
            free_memory(device)
            rows.append(row)
            _log(row)
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


def _judged(args) -> bool:
    keys = [k for k in ANCHOR if k not in ("steps", "warmup")]
    return torch.device(args.device).type == "cuda" and all(getattr(args, k) == ANCHOR[k] for k in keys)


def _verdict(value, goal, judged: bool) -> str:
    if value is None:
        return NA
    return f"{value:.2f}x" + (f" ({'met' if value <= goal else 'NOT met'})" if judged else "")


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
    judged = _judged(args)
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
            f"{_verdict(t_frozen, GOAL_VS_FROZEN, judged)}, memory {_verdict(m_frozen, GOAL_VS_FROZEN, judged)}."
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
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="preset: anchor (default; perf.md), cpu (a small Llama for a CPU table), tiny (smoke test)")
    p.add_argument("--tiny", action="store_true", help="the same as --shape tiny (as the other scripts)")
    for name in ("hidden", "ffn", "layers", "heads", "kv-heads", "vocab", "batch", "seq"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {ANCHOR[name.replace('-', '_')]} (anchor)")
    p.add_argument("--dtype", choices=sorted(DTYPE_ALIASES), default=None, help="weight dtype (default bfloat16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 5 at the anchor)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 at the anchor)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (cpu for --shape cpu/tiny)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(LABELS)}; 'all' for every one")  # fmt: skip
    p.add_argument("--r", type=int, default=8, help="rank of every LoRA and SSMLoRA row (default 8, the paper's)")
    p.add_argument("--state-dropout", type=float, default=0.1, help="SSMLoRA's state dropout (default 0.1, the spec's)")
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
    args = p.parse_args(argv)
    if args.tiny:
        if args.shape not in (None, "tiny"):
            p.error("--tiny is --shape tiny")
        args.shape = "tiny"
    args.shape = args.shape or "anchor"
    fill_from_preset(args, SHAPES[args.shape])
    if args.device is None:
        args.device = "cpu" if args.shape != "anchor" else default_device()
    args.dtype = str(DTYPE_ALIASES[args.dtype]).removeprefix("torch.")
    args.variants = list(LABELS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in LABELS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(LABELS)} or 'all'")
    for ref in ("lora-qv", "lora", "frozen"):  # the ratios' references
        if ref not in args.variants:
            args.variants.insert(0, ref)
    args.variants = sorted(dict.fromkeys(args.variants), key=list(LABELS).index)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")
    if args.layers < 2:
        p.error("--layers must be >= 2 (alternate_qv puts q_proj in even blocks and v_proj in odd ones)")
    if args.r < 1 or (args.threads or 1) < 1:
        p.error("--r and --threads must be >= 1")
    if args.r > args.kv_heads * (args.hidden // args.heads):
        width = args.kv_heads * args.hidden // args.heads
        p.error(f"--r must be <= v_proj's width kv_heads * hidden / heads = {width}")
    if not 0.0 <= args.state_dropout < 1.0:
        p.error("--state-dropout must be in [0, 1)")
    if args.interleave and torch.device(args.device).type == "cuda":
        p.error("--interleave keeps every model alive at once, which spoils CUDA's per-row peak memory: CPU only")
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
