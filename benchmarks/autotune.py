"""Heuristic vs autotuned launch configs of the LoRA-family kernels (peft_ext.kernels.autotune), side by side.

At the anchor model's linear layers (TinyLlama: tokens 8192 = batch 4 x 2048, shapes out x in 2048x2048 (q/o),
256x2048 (k/v), 5632x2048 (gate/up), 2048x5632 (down), r = 16, bf16; design/perf.md), each kernel is timed in this
one run twice on the same random inputs: with PEFT_EXT_AUTOTUNE=0 (the heuristic config) and with tuning on (a fresh
tuner, its cache in a temporary folder unless --cache-dir is given, so every key is tuned here). Rows:

    shrink/expand forward   xa = x A^T, y_low = s xa B^T (kernels/lowrank.py `shrink_expand`, forward use)
    weight grad dA          s dyb^T x   (`lowrank_weight_grad`, C = in features)
    weight grad dB          s dy^T xa   (`lowrank_weight_grad`, transposed, C = out features)
    dy pass, dB fused       the backward's one pass over dy (`dy_pass`): dyb, dx_low and dB's per-program partials
    dy pass, no dB          the same pass without dB (dyb, dx_low), as when fusing does not pay
    gathered, L adapters    the mixed-adapter forward (`lowrank_linear_gathered`, plan reused) at 16 x 256 tokens
                            with L = 4 and 16 adapters, fp32 stacks; the whole call, base GEMM included

Columns: the two configs, their median ms (triton.testing.do_bench on CUDA: L2 flushed between calls; wall clock on
the CPU), tuned / heuristic, the wall time of the first tuned call (builds and times the candidates: the one-time cost
of a new shape, which the disk cache then saves) and the relative difference of the tuned output from the heuristic's
(the tuner's guard keeps it within rounding).

    .venv/bin/python benchmarks/autotune.py                          # the anchor shapes, needs a GPU
    .venv/bin/python benchmarks/autotune.py --out benchmarks/RESULTS.md
    .venv/bin/python benchmarks/autotune.py --tiny                   # CPU smoke test (Triton interpreter), seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

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

ANCHOR = dict(tokens=8192, shapes="2048x2048,256x2048,5632x2048,2048x5632", rank=16, infer_tokens=4096, seq=256,
              adapters="4,16", max_candidates=None)  # fmt: skip
TINY = dict(tokens=64, shapes="48x40", rank=4, infer_tokens=32, seq=8, adapters="2,3", max_candidates=3)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (a - b).norm().item()


def variants(args, device, dtype):
    """(label, shape text, M, fn returning the output) for every row; inputs drawn once per shape."""
    from peft_ext.kernels import lowrank_linear_gathered, plan_adapter_segments
    from peft_ext.kernels.lowrank import dy_pass, lowrank_weight_grad, shrink_expand

    g = torch.Generator(device=device).manual_seed(0)
    M, r = args.tokens, args.rank
    n_seq = args.infer_tokens // args.seq
    for out_f, in_f in parse_shapes(args.shapes):
        shape = f"{out_f}x{in_f}"
        x = torch.randn(M, in_f, device=device, generator=g, dtype=dtype)
        dy = torch.randn(M, out_f, device=device, generator=g, dtype=dtype)
        a = (torch.randn(r, in_f, device=device, generator=g) / in_f**0.5).to(dtype)
        b = (torch.randn(out_f, r, device=device, generator=g) / r**0.5).to(dtype)
        xa = torch.randn(M, r, device=device, generator=g, dtype=dtype)
        dyb = torch.randn(M, r, device=device, generator=g, dtype=dtype)
        y = torch.empty(M, out_f, device=device, dtype=dtype)
        mid = torch.empty(M, r, device=device, dtype=dtype)

        def forward(x=x, a=a, b=b, y=y, mid=mid):
            shrink_expand(x, a, b, 2.0, out=y, mid=mid)  # into preallocated buffers: only the kernel is timed
            return y

        yield "shrink/expand forward", shape, M, forward
        yield "weight grad dA", shape, M, lambda dyb=dyb, x=x: lowrank_weight_grad(dyb, x, 2.0)
        yield "weight grad dB", shape, M, lambda xa=xa, dy=dy: lowrank_weight_grad(xa, dy, 2.0, transpose=True)
        # the backward's one pass over dy: dyb and dx_low, and with xa the fused dB partials (the row compares dB)
        yield "dy pass, dB fused", shape, M, lambda dy=dy, b=b, a=a, xa=xa: dy_pass(dy, b, a, xa, 2.0)[2]
        yield "dy pass, no dB", shape, M, lambda dy=dy, b=b, a=a: dy_pass(dy, b, a, None, 2.0)[0]
        x3 = torch.randn(n_seq, args.seq, in_f, device=device, generator=g, dtype=dtype)
        w = (torch.randn(out_f, in_f, device=device, generator=g) / in_f**0.5).to(dtype)
        for n_ad in (int(v) for v in args.adapters.split(",")):
            a_st = torch.randn(n_ad, r, in_f, device=device, generator=g) / in_f**0.5
            b_st = torch.randn(n_ad, out_f, r, device=device, generator=g) / r**0.5
            scales = torch.full((n_ad,), 2.0, device=device)
            index = torch.arange(n_seq, device=device) % n_ad  # one adapter per sequence
            plan = plan_adapter_segments(index, n_ad, x3.shape, device=device)
            yield (f"gathered, {n_ad} adapters (whole call)", shape, args.infer_tokens,
                   lambda x3=x3, w=w, a=a_st, b=b_st, sc=scales, p=plan: lowrank_linear_gathered(x3, w, None, a, b, sc, p))


def fmt_cfg(cfg) -> str:
    if not cfg:
        return "n/a"
    short = dict(BLOCK_M="M", BLOCK_K="K", BLOCK_N="N", BLOCK_C="C", BLOCK_R="R", num_warps="w", num_stages="s")
    return " ".join(f"{short.get(k, k)}{v}" for k, v in cfg.items())


def run_rows(bench: KernelBench, args, device, dtype, cache_dir: str) -> list[dict]:
    from peft_ext.kernels import autotune

    rows = []
    previous_switch = os.environ.get("PEFT_EXT_AUTOTUNE")
    try:
        for label, shape, M, fn in variants(args, device, dtype):
            row = dict(name=label, label=label, shape=shape, M=M)
            try:
                os.environ["PEFT_EXT_AUTOTUNE"] = "0"
                with torch.no_grad():
                    heuristic_out = fn().clone()
                    row["heur_ms"] = bench.time_ms(fn)
                tuner = autotune.Autotuner(cache_dir=cache_dir, max_candidates=args.max_candidates)
                autotune.set_tuner(tuner)
                os.environ["PEFT_EXT_AUTOTUNE"] = "1"
                with torch.no_grad():
                    t0 = time.perf_counter()
                    tuned_out = fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    row["tune_s"] = time.perf_counter() - t0
                    row["tuned_ms"] = bench.time_ms(fn)
                row["diff"] = rel_diff(tuned_out, heuristic_out)
                record = tuner.history[-1] if tuner.history else None
                if record is not None:
                    row["heur_cfg"], row["tuned_cfg"] = record["heuristic"], record["config"]
                    row["tried"] = f"{record['timed']}/{len(record['candidates'])}"
                else:  # the key was in --cache-dir already
                    row["tuned_cfg"] = next(iter(tuner._memory.values()), None)
                    row["tried"] = "cached"
                row["ratio"] = row["tuned_ms"] / row["heur_ms"]
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
            rows.append(row)
            print(f"[{shape}] {label}: {row}", file=sys.stderr, flush=True)
    finally:
        if previous_switch is None:
            os.environ.pop("PEFT_EXT_AUTOTUNE", None)
        else:
            os.environ["PEFT_EXT_AUTOTUNE"] = previous_switch
    return rows


def table(rows: list[dict]) -> str:
    headers = ["variant", "shape (out x in)", "M", "heuristic config", "tuned config", "timed / candidates",
               "heuristic ms", "tuned ms", "tuned / heuristic", "tuning s (first call)", "rel diff vs heuristic"]  # fmt: skip
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row["label"], row["shape"], str(row["M"])]
        if row.get("error"):
            cells += [row["error"]] * (len(headers) - 3)
        else:
            cells += [fmt_cfg(row.get("heur_cfg")), fmt_cfg(row.get("tuned_cfg")), row.get("tried", "n/a"),
                      fmt_ms(row["heur_ms"]), fmt_ms(row["tuned_ms"]), fmt_ratio(row["ratio"]),
                      f"{row['tune_s']:.2f}", f"{row['diff']:.1e}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU with the Triton interpreter (smoke test)")
    p.add_argument("--tokens", type=int, default=None, help=f"rows of x (default {ANCHOR['tokens']})")
    p.add_argument("--shapes", default=None, help=f"comma-separated OUTxIN (default {ANCHOR['shapes']})")
    p.add_argument("--rank", type=int, default=None, help=f"adapter rank (default {ANCHOR['rank']})")
    p.add_argument("--infer-tokens", type=int, default=None, help=f"rows of the mixed-adapter rows (default {ANCHOR['infer_tokens']})")
    p.add_argument("--seq", type=int, default=None, help=f"tokens per sequence in mixed batches (default {ANCHOR['seq']})")
    p.add_argument("--adapters", default=None, help=f"adapters per mixed batch, comma-separated (default {ANCHOR['adapters']})")
    p.add_argument("--max-candidates", type=int, default=None, help="try only the first n candidates (default: all; --tiny 3)")
    p.add_argument("--cache-dir", default=None, help="the tuner's cache folder (default: a fresh temporary one)")
    add_kernel_bench_args(p, cpu_reps=2, small_flag="--tiny")
    args = p.parse_args(argv)
    return fill_from_preset(args, TINY if args.tiny else ANCHOR)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = kernel_device(args.device, args.tiny, "autotune.py", "--tiny")
    bench = KernelBench(device, args.rep_ms, args.warmup_ms, args.cpu_reps)
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory(prefix="peft_ext_autotune_") as tmp:
        cache_dir = args.cache_dir or tmp
        rows = run_rows(bench, args, device, dtype, cache_dir)
    parts = [
        env_header(device),
        f"Autotuned vs heuristic launch configs, {args.tokens} tokens (mixed-adapter rows: {args.infer_tokens} tokens in "
        f"sequences of {args.seq}), r = {args.rank}, {args.dtype}:\n\n" + table(rows),
        "Configs: M/K/N/C/R = BLOCK_M/K/N/C/R, w = num_warps, s = num_stages. tuning s: wall time of the first call "
        "with tuning on (candidate builds + timings; later calls, and later processes through the disk cache, skip it)."
        + ("" if device.type == "cuda" else " A CPU run (Triton interpreter) tests the script; its times mean nothing."),
    ]
    publish("\n\n".join(parts) + "\n", args.out)


if __name__ == "__main__":
    main()
