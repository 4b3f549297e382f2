"""Micro-benchmark of the fused low-rank kernels (peft_ext.kernels) at the anchor model's linear layers.

One layer y = x W^T (+ s (x A^T) B^T), bf16 x and W, tokens 8192 (perf.md anchor: batch 4 x 2048), shapes
(out x in) 2048x2048 (q/o proj), 5632x2048 (gate/up), 2048x5632 (down), ranks 16 and 64. Every variant is
timed in this one run with triton.testing.do_bench (median, L2 flushed between calls; CUDA) on the same
random inputs (never zeros: B is random, not PEFT's zero init).

Training table (forward with autograd on, and forward + backward = dx, dA, dB; W frozen):
    base            frozen base: F.linear(x, W), backward computes dx only
    peft fp32       PEFT LoRA's unfused math with its default fp32 adapter weights: x upcast to fp32,
                    lora_B(lora_A(x)) * s added to the bf16 base output, cast back (peft/tuners/lora/layer.py)
    peft bf16       the same with bf16 adapter weights (autocast_adapter_dtype=False)
    ours fp32       peft_ext.kernels.lowrank_linear, fp32 adapter weights (tiles cast in the kernel)
    ours bf16       the same with bf16 adapter weights
  columns: ms, peak extra MiB over the inputs (CUDA), ratios to the base row of the same shape, and for
  ours the relative error of the output against a float64 reference; "extra MB (model)" is what a model of the
  design's device-memory traffic (kernels/lowrank.py `lowrank_bytes_model`, not measured) adds to the frozen
  base's forward + backward, and "extra / BW floor" the measured extra time over that many bytes at the copy
  bandwidth measured in this run (--copy-mib; 1.0 = the adapter costs exactly its bytes' floor).
    ours fp32 dB 2-pass / dB fused: "ours fp32" with the backward's dB path forced (kernels/lowrank.py
                    `fuse_db_saves_bytes` chooses between them by the bytes model; its row uses the rule's choice)
Sibling-group table (--groups, default the anchor's q/k/v 2048+256+256 x 2048 and gate/up 5632+5632 x 2048, r from
  --ranks, fp32 adapter weights): forward + backward of all siblings on one x, W frozen:
    base            the frozen base GEMMs F.linear(x, W_i), backward dx only (autograd sums the dx_i)
    per projection  one lowrank_linear per sibling (today's path, dB fused by the rule)
    grouped         kernels/lowrank_grouped.py `grouped_lowrank_linear`: one grouped shrink, one x read for every dA
  with "extra MB (model)" from `grouped_bytes_model` (a model) and "extra / BW floor" as in the training table.
Inference table (torch.no_grad, --infer-tokens, default 4096 = 8 x 512 as perf.md's forward anchor):
    base, ours / PEFT-style with one adapter, and mixed batches of --adapters adapters (one per sequence of
    512 tokens, sequences spread evenly over the adapters): ours (lowrank_linear_gathered, with a plan built
    once per forward as a model would, and with the plan built inside the call) vs PEFT's mixed-batch loop
    (per adapter: select its rows, upcast, two matmuls, add back; index lists precomputed, in PEFT's favour).

Goals (perf.md, whole model): training step <= 1.10x frozen base at r=16; one unmerged adapter forward <= 1.1x,
mixed 4-16 adapters <= 1.3x the no-adapter forward. The per-layer ratios printed here are what those rest on.

    .venv/bin/python benchmarks/lowrank_kernels.py                              # anchor shapes, needs a GPU
    .venv/bin/python benchmarks/lowrank_kernels.py --out benchmarks/RESULTS.md  # also append the tables there
    .venv/bin/python benchmarks/lowrank_kernels.py --tiny                       # CPU smoke test (Triton interpreter)
--skip-train / --skip-groups / --skip-infer leave out a table (the GPU runbook runs each table as its own step).
"""

from __future__ import annotations

import argparse
import sys

from common import (  # noqa: I001  (first: fixes sys.path)
    DTYPES,
    KernelBench,
    add_kernel_bench_args,
    env_header,
    fill_from_preset,
    fmt_ms,
    fmt_ratio,
    kernel_device,
    parse_shapes,
    publish,
)

import torch
import torch.nn.functional as F

ANCHOR = dict(
    tokens=8192, infer_tokens=4096, seq=512, shapes="2048x2048,5632x2048,2048x5632", ranks="16,64", adapters="4,16",
    copy_mib=1024, groups="2048+256+256x2048,5632+5632x2048",
)
TINY = dict(tokens=96, infer_tokens=64, seq=16, shapes="48x40", ranks="4", adapters="2,3", copy_mib=4, groups="48+16+16x40")


# ------------------------------------------------------------------------------------------------ timing
class Bench(KernelBench):
    def peak_extra_mib(self, fn):
        """Peak memory allocated during one call, above what was allocated before it (CUDA only)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------------------- variants
def peft_lora(x, weight, lora_a, lora_b, scale):
    """PEFT LoRA Linear.forward without dropout: base, input cast to the adapter dtype, two matmuls, add."""
    result = F.linear(x, weight)
    out_dtype = result.dtype
    xa = F.linear(x.to(lora_a.dtype), lora_a)
    result = result + F.linear(xa, lora_b) * scale
    return result.to(out_dtype)


def peft_mixed(x3, weight, a_stack, b_stack, scales, seq_rows):
    """PEFT's LoRA _mixed_batch_forward: per adapter, select its sequences, upcast, lora, add back."""
    result = F.linear(x3, weight)
    out_dtype = result.dtype
    for j, rows in enumerate(seq_rows):
        if rows.numel() == 0:
            continue
        sub = x3[rows].to(a_stack.dtype)
        lora = F.linear(F.linear(sub, a_stack[j]), b_stack[j]) * scales[j]
        result[rows] += lora.to(out_dtype)
    return result


def training_rows(bench: Bench, args, dtype, copy_bps: float) -> list[dict]:
    from peft_ext.kernels import lowrank as lowrank_module
    from peft_ext.kernels import lowrank_linear, reference_lowrank_linear
    from peft_ext.kernels.lowrank import lowrank_bytes_model

    rows = []
    g = torch.Generator(device=bench.device).manual_seed(0)
    for out_f, in_f in parse_shapes(args.shapes):
        for r in (int(v) for v in args.ranks.split(",")):
            M, s = args.tokens, 2.0
            x = torch.randn(M, in_f, device=bench.device, generator=g, dtype=dtype).requires_grad_()
            w = torch.randn(out_f, in_f, device=bench.device, generator=g, dtype=dtype) / in_f**0.5
            a32 = (torch.randn(r, in_f, device=bench.device, generator=g) / in_f**0.5).requires_grad_()
            b32 = (torch.randn(out_f, r, device=bench.device, generator=g) / r**0.5).requires_grad_()
            a16, b16 = (t.detach().to(dtype).requires_grad_() for t in (a32, b32))
            dy = torch.randn(M, out_f, device=bench.device, generator=g, dtype=dtype)
            rule = lowrank_module.fuse_db_saves_bytes
            variants = [
                ("base", "frozen base x W^T", lambda: F.linear(x, w), (x,)),
                ("peft32", "PEFT LoRA math, fp32 adapter (default)", lambda: peft_lora(x, w, a32, b32, s), (x, a32, b32)),
                ("peft16", "PEFT LoRA math, bf16 adapter", lambda: peft_lora(x, w, a16, b16, s), (x, a16, b16)),
                ("ours32", "ours, fp32 adapter", lambda: lowrank_linear(x, w, None, a32, b32, s), (x, a32, b32)),
                ("ours32-2pass", "ours, fp32 adapter, dB 2-pass", lambda: lowrank_linear(x, w, None, a32, b32, s), (x, a32, b32)),
                ("ours32-fused", "ours, fp32 adapter, dB fused", lambda: lowrank_linear(x, w, None, a32, b32, s), (x, a32, b32)),
                ("ours16", "ours, bf16 adapter", lambda: lowrank_linear(x, w, None, a16, b16, s), (x, a16, b16)),
            ]
            ref = reference_lowrank_linear(x.detach().double(), w.double(), None, a32.detach().double(), b32.detach().double(), s)
            base = None
            for name, label, fwd, inputs in variants:
                def step(fwd=fwd, inputs=inputs):
                    return torch.autograd.grad(fwd(), inputs, dy)

                row = dict(name=name, label=label, shape=f"{out_f}x{in_f}", r=r)
                forced = {"ours32-2pass": False, "ours32-fused": True}.get(name)
                lowrank_module.fuse_db_saves_bytes = rule if forced is None else (lambda *a, forced=forced: forced)
                try:
                    row["fwd_ms"] = bench.time_ms(fwd)
                    row["step_ms"] = bench.time_ms(step)
                    row["mem_mib"] = bench.peak_extra_mib(step)
                    if name.startswith("ours"):
                        with torch.no_grad():
                            row["err"] = rel_err(fwd(), ref)
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                if name == "base":
                    base = row
                elif base and not base.get("error") and not row.get("error"):
                    row["fwd_x"] = row["fwd_ms"] / base["fwd_ms"]
                    row["step_x"] = row["step_ms"] / base["step_ms"]
                    if row["mem_mib"] is not None and base["mem_mib"]:
                        row["mem_x"] = row["mem_mib"] / base["mem_mib"]
                    if name.startswith("ours"):
                        adapter_dtype = a32.dtype if name.startswith("ours32") else dtype
                        model = [
                            lowrank_bytes_model(M, in_f, out_f, r, dtype, adapter_dtype, bench.device, True, adapter, forced)
                            for adapter in (True, False)
                        ]
                        extra = model[0]["total"] - model[1]["total"]
                        row["extra_mb"] = extra / 1e6
                        added_ms = row["step_ms"] - base["step_ms"]
                        row["floor_x"] = added_ms / (extra / copy_bps * 1e3) if added_ms > 0 else None
                lowrank_module.fuse_db_saves_bytes = rule
                rows.append(row)
                print(f"[train {row['shape']} r={r}] {label}: {row}", file=sys.stderr, flush=True)
            x = w = a32 = b32 = a16 = b16 = dy = ref = None  # free the device memory before the next shape
    return rows


def parse_groups(spec: str) -> list:
    """"2048+256+256x2048,5632+5632x2048" -> [([2048, 256, 256], 2048), ([5632, 5632], 2048)]."""
    groups = []
    for item in spec.split(","):
        outs, in_f = item.strip().split("x")
        groups.append(([int(v) for v in outs.split("+")], int(in_f)))
    return groups


def group_rows(bench: Bench, args, dtype, copy_bps: float) -> list[dict]:
    """Sibling projections on one x (module docstring): base, one lowrank_linear each, grouped."""
    from peft_ext.kernels import grouped_lowrank_linear, lowrank_linear, reference_lowrank_linear
    from peft_ext.kernels.lowrank import lowrank_bytes_model
    from peft_ext.kernels.lowrank_grouped import grouped_bytes_model

    rows = []
    g = torch.Generator(device=bench.device).manual_seed(1)
    for outs, in_f in parse_groups(args.groups):
        for r in (int(v) for v in args.ranks.split(",")):
            M, n = args.tokens, len(outs)
            x = torch.randn(M, in_f, device=bench.device, generator=g, dtype=dtype).requires_grad_()
            ws = [torch.randn(o, in_f, device=bench.device, generator=g, dtype=dtype) / in_f**0.5 for o in outs]
            a_s = [(torch.randn(r, in_f, device=bench.device, generator=g) / in_f**0.5).requires_grad_() for _ in outs]
            b_s = [(torch.randn(o, r, device=bench.device, generator=g) / r**0.5).requires_grad_() for o in outs]
            dys = [torch.randn(M, o, device=bench.device, generator=g, dtype=dtype) for o in outs]
            scales = [2.0] * n
            shape = f"{'+'.join(map(str, outs))}x{in_f}"
            if r * n > 128:
                continue  # the grouped Triton path takes a concatenated rank <= 128
            variants = [
                ("gbase", "siblings, frozen base", lambda: [F.linear(x, w) for w in ws], (x,)),
                ("gper", "siblings, one lowrank_linear each", lambda: [
                    lowrank_linear(x, w, None, a, b, s) for w, a, b, s in zip(ws, a_s, b_s, scales)], (x, *a_s, *b_s)),
                ("ggrouped", "siblings, grouped (one x read)", lambda: grouped_lowrank_linear(
                    x, ws, None, a_s, b_s, scales), (x, *a_s, *b_s)),
            ]  # fmt: skip
            model = grouped_bytes_model(M, in_f, outs, r, dtype, torch.float32, bench.device, backward=True)
            base_bytes = sum(lowrank_bytes_model(M, in_f, o, r, dtype, torch.float32, bench.device, True, False)["total"]
                             for o in outs) + (n - 1) * 3 * M * in_f * (torch.finfo(dtype).bits // 8)  # fmt: skip
            base = None
            for name, label, fwd, inputs in variants:
                def step(fwd=fwd, inputs=inputs):
                    return torch.autograd.grad(fwd(), inputs, dys)

                row = dict(name=name, label=label, shape=shape, r=r)
                try:
                    row["fwd_ms"] = bench.time_ms(fwd)
                    row["step_ms"] = bench.time_ms(step)
                    row["mem_mib"] = bench.peak_extra_mib(step)
                    if name != "gbase":
                        with torch.no_grad():
                            ys = fwd()
                            refs = [reference_lowrank_linear(x.detach().double(), w.double(), None, a.detach().double(),
                                                             b.detach().double(), s) for w, a, b, s in zip(ws, a_s, b_s, scales)]  # fmt: skip
                            row["err"] = max(rel_err(y, ref) for y, ref in zip(ys, refs))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                if name == "gbase":
                    base = row
                elif base and not base.get("error") and not row.get("error"):
                    row["fwd_x"] = row["fwd_ms"] / base["fwd_ms"]
                    row["step_x"] = row["step_ms"] / base["step_ms"]
                    if row["mem_mib"] is not None and base["mem_mib"]:
                        row["mem_x"] = row["mem_mib"] / base["mem_mib"]
                    total = model["grouped" if name == "ggrouped" else "per_projection"]["total"]
                    extra = total - base_bytes
                    row["extra_mb"] = extra / 1e6
                    added_ms = row["step_ms"] - base["step_ms"]
                    row["floor_x"] = added_ms / (extra / copy_bps * 1e3) if added_ms > 0 and extra > 0 else None
                rows.append(row)
                print(f"[group {shape} r={r}] {label}: {row}", file=sys.stderr, flush=True)
            x = ws = a_s = b_s = dys = None  # free the device memory before the next group
    return rows


def inference_rows(bench: Bench, args, dtype) -> list[dict]:
    from peft_ext.kernels import (
        lowrank_linear,
        lowrank_linear_gathered,
        plan_adapter_segments,
        reference_lowrank_linear_gathered,
    )

    rows = []
    g = torch.Generator(device=bench.device).manual_seed(1)
    n_seq = args.infer_tokens // args.seq
    for out_f, in_f in parse_shapes(args.shapes):
        for r in (int(v) for v in args.ranks.split(",")):
            max_l = max(int(v) for v in args.adapters.split(","))
            x3 = torch.randn(n_seq, args.seq, in_f, device=bench.device, generator=g, dtype=dtype)
            w = torch.randn(out_f, in_f, device=bench.device, generator=g, dtype=dtype) / in_f**0.5
            a_all = torch.randn(max_l, r, in_f, device=bench.device, generator=g) / in_f**0.5
            b_all = torch.randn(max_l, out_f, r, device=bench.device, generator=g) / r**0.5
            variants = [
                ("base", "no adapter x W^T", lambda: F.linear(x3, w)),
                ("peft1", "PEFT LoRA math, one adapter (fp32)", lambda: peft_lora(x3, w, a_all[0], b_all[0], 2.0)),
                ("ours1", "ours, one adapter (fp32)", lambda: lowrank_linear(x3, w, None, a_all[0], b_all[0], 2.0)),
            ]
            checks = {}
            for n_ad in (int(v) for v in args.adapters.split(",")):
                a, b = a_all[:n_ad].contiguous(), b_all[:n_ad].contiguous()
                scales = torch.full((n_ad,), 2.0, device=bench.device)
                index = torch.arange(n_seq, device=bench.device) % n_ad  # one adapter per sequence
                plan = plan_adapter_segments(index, n_ad, x3.shape, device=bench.device)
                seq_rows = [(index == j).nonzero().flatten() for j in range(n_ad)]
                scale_list = [2.0] * n_ad
                variants += [
                    (f"peft{n_ad}", f"PEFT mixed batch, {n_ad} adapters (fp32)",
                     lambda a=a, b=b, sr=seq_rows, sl=scale_list: peft_mixed(x3, w, a, b, sl, sr)),
                    (f"ours{n_ad}", f"ours gathered, {n_ad} adapters, plan reused",
                     lambda a=a, b=b, sc=scales, p=plan: lowrank_linear_gathered(x3, w, None, a, b, sc, p)),
                    (f"ours{n_ad}p", f"ours gathered, {n_ad} adapters, plan per call",
                     lambda a=a, b=b, sc=scales, i=index: lowrank_linear_gathered(x3, w, None, a, b, sc, i, check_index=False)),
                ]  # fmt: skip
                checks[f"ours{n_ad}"] = (a, b, scale_list, index)
            base = None
            for name, label, fwd in variants:
                row = dict(name=name, label=label, shape=f"{out_f}x{in_f}", r=r)
                with torch.no_grad():
                    try:
                        row["fwd_ms"] = bench.time_ms(fwd)
                        if name in checks:
                            a, b, sl, index = checks[name]
                            ref = reference_lowrank_linear_gathered(x3.double(), w.double(), None, a.double(), b.double(), sl, index)
                            row["err"] = rel_err(fwd(), ref)
                    except torch.cuda.OutOfMemoryError:
                        row["error"] = "OOM"
                if name == "base":
                    base = row
                elif base and not base.get("error") and not row.get("error"):
                    row["fwd_x"] = row["fwd_ms"] / base["fwd_ms"]
                rows.append(row)
                print(f"[infer {row['shape']} r={r}] {label}: {row}", file=sys.stderr, flush=True)
            x3 = w = a_all = b_all = None  # free the device memory before the next shape
    return rows


# ------------------------------------------------------------------------------------------------ output
def table(rows: list[dict], columns: list[tuple[str, str, object]]) -> str:
    headers = ["variant", "shape (out x in)", "r", *(c[0] for c in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row["label"], row["shape"], str(row["r"])]
        if row.get("error"):
            cells += [row["error"]] * len(columns)
        else:
            cells += [fmt(row.get(key)) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_mib(v):
    return "n/a" if v is None else f"{v:.0f}"


def fmt_mb(v):
    return "-" if v is None else f"{v:.1f}"


def fmt_err(v):
    return "" if v is None else f"{v:.1e}"


def fmt_x(v):
    return "" if v is None else fmt_ratio(v)


def goals(train: list[dict], infer: list[dict], anchor: bool) -> str:
    lines = ["Per-layer ratios behind perf.md's goals" + ("" if anchor else " (not the anchor shape: a test of the script)") + ":"]
    for row in train:
        if row["name"] == "ours32" and row.get("step_x") is not None:
            lines.append(f"- training fwd+bwd, ours fp32 adapter, {row['shape']} r={row['r']}: {row['step_x']:.2f}x frozen base "
                         f"(goal for the whole step at r=16: <= 1.10x)")  # fmt: skip
    for row in infer:
        if row["name"] == "ours1" and row.get("fwd_x") is not None:
            lines.append(f"- one adapter forward, {row['shape']} r={row['r']}: {row['fwd_x']:.2f}x no adapter (goal <= 1.1x)")
        elif row["name"].startswith("ours") and not row["name"].endswith("p") and row.get("fwd_x") is not None:
            lines.append(f"- {row['label']}, {row['shape']} r={row['r']}: {row['fwd_x']:.2f}x no adapter (goal <= 1.3x)")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU with the Triton interpreter (smoke test)")
    p.add_argument("--tokens", type=int, default=None, help=f"rows of x in the training table (default {ANCHOR['tokens']})")
    p.add_argument("--infer-tokens", type=int, default=None, help=f"rows in the inference table (default {ANCHOR['infer_tokens']})")
    p.add_argument("--seq", type=int, default=None, help=f"tokens per sequence in mixed batches (default {ANCHOR['seq']})")
    p.add_argument("--shapes", default=None, help=f"comma-separated OUTxIN (default {ANCHOR['shapes']})")
    p.add_argument("--ranks", default=None, help=f"comma-separated ranks (default {ANCHOR['ranks']})")
    p.add_argument("--adapters", default=None, help=f"adapters per mixed batch, comma-separated (default {ANCHOR['adapters']})")
    p.add_argument("--groups", default=None, help=f"sibling groups OUT+OUT+...xIN, comma-separated (default {ANCHOR['groups']})")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-groups", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--copy-mib", type=int, default=None, help="buffer of the copy-bandwidth measurement (default 1024; --tiny 4)")
    add_kernel_bench_args(p, cpu_reps=2, small_flag="--tiny")
    args = p.parse_args(argv)
    return fill_from_preset(args, TINY if args.tiny else ANCHOR)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = kernel_device(args.device, args.tiny, "lowrank_kernels.py", "--tiny")
    bench = Bench(device, args.rep_ms, args.warmup_ms, args.cpu_reps)
    dtype = DTYPES[args.dtype]
    anchor = device.type == "cuda" and not args.tiny and args.tokens == ANCHOR["tokens"] and args.dtype == "bfloat16"

    parts = [env_header(device)]
    copy_bps = bench.copy_bandwidth(args.copy_mib)
    train = [] if args.skip_train else training_rows(bench, args, dtype, copy_bps)
    grouped = [] if args.skip_groups else group_rows(bench, args, dtype, copy_bps)  # its own table: skipped apart
    infer = [] if args.skip_infer else inference_rows(bench, args, dtype)
    if train:
        parts.append(f"Training, one layer, {args.tokens} tokens, {args.dtype} (W frozen; backward = dx, dA, dB):\n\n" + table(train, [
            ("fwd ms", "fwd_ms", fmt_ms), ("fwd+bwd ms", "step_ms", fmt_ms), ("peak extra MiB", "mem_mib", fmt_mib),
            ("fwd vs base", "fwd_x", fmt_x), ("fwd+bwd vs base", "step_x", fmt_x), ("memory vs base", "mem_x", fmt_x),
            ("rel err vs fp64", "err", fmt_err), ("extra MB (model)", "extra_mb", fmt_mb),
            ("extra / BW floor", "floor_x", fmt_x),
        ]))  # fmt: skip
        parts.append(f"Copy bandwidth measured in this run: {copy_bps / 1e9:.0f} GB/s (torch copy of {args.copy_mib} MiB, "
                     f"read + write); the bytes are a model, the times measured.")
    if grouped:
        parts.append(f"Sibling projections on one x, {args.tokens} tokens, {args.dtype}, fp32 adapter weights (W frozen; "
                     f"backward = dx, every dA and dB):\n\n" + table(grouped, [
            ("fwd ms", "fwd_ms", fmt_ms), ("fwd+bwd ms", "step_ms", fmt_ms), ("peak extra MiB", "mem_mib", fmt_mib),
            ("fwd vs base", "fwd_x", fmt_x), ("fwd+bwd vs base", "step_x", fmt_x), ("memory vs base", "mem_x", fmt_x),
            ("max rel err vs fp64", "err", fmt_err), ("extra MB (model)", "extra_mb", fmt_mb),
            ("extra / BW floor", "floor_x", fmt_x),
        ]))  # fmt: skip
    if infer:
        parts.append(f"Inference, one layer, {args.infer_tokens} tokens ({args.infer_tokens // args.seq} sequences of {args.seq}), "
                     f"{args.dtype}, no grad:\n\n" + table(infer, [
            ("fwd ms", "fwd_ms", fmt_ms), ("fwd vs base", "fwd_x", fmt_x), ("rel err vs fp64", "err", fmt_err),
        ]))  # fmt: skip
    parts.append(goals(train, infer, anchor))
    text = "\n\n".join(parts) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
