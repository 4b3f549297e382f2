"""Small-scale reproduction of FineGates' claims (design/methods/finegates.md, "Small-scale reproduction"): learning
which whole rows and columns of the frozen linears to switch off (stochastic gates pulled to a target sparsity),
FineGates classifies about as well as LoRA at ~20 % of the gated weights removed and a few points lower at ~40 %,
with far fewer trainable parameters; the closed rows / columns are then cut out, giving a physically smaller model
that computes the same outputs, faster (the paper: <= 25 % less CPU inference time).

    peft-ext reproduce-finegates recipes/finegates_vs_lora.yaml [--set steps=40 ...] [--out DIR]
    (or python -m peft_ext.experiments.finegates_vs_lora with the same arguments)

Task: ssmlora_vs_lora's (generated hotel reviews labelled by the majority of their opinions, peft_ext.data.review_votes;
a sequence classifier with a score head, PEFT task_type SEQ_CLS, so the head is a modules_to_save copy trained in full
by every method alike). Score: held-out accuracy (chance 0.5).

Methods (`methods:` in the recipe), all with the same score head, steps, learning rate and data order per seed:
  lora            PEFT LoraConfig(r, lora_alpha) on every linear of the blocks (q, k, v, o, gate, up, down)
  finegates-0.2   FineGatesConfig(target_sparsity=0.2, bias="gates") on its default targets (the same seven linears)
  finegates-0.3   the same at 0.3
  finegates-0.4   the same at 0.4
  finegates-lora  target finegates_lora_target (0.3) with a LoRA inside the gates (lora_r = r, lora_alpha as LoRA's)

Training: a plain loop (no Trainer): AdamW (weight decay 0), the data in a per-seed random order (reshuffled every
epoch), `lr_scheduler_type` over `steps`; loss = task cross-entropy + lambda(step) * model.base_model.sparsity_loss()
for FineGates (lambda from FineGatesConfig.lambda_at: sparsity_lambda from sparsity_start_step, ramped over
sparsity_warmup_steps). The gate logits are their own AdamW group with `gates_learning_rate`, weight decay 0 and the
schedule `gates_lr_scheduler_type` (the official code: constant); everything else trainable (score head, bias
deltas, LoRA) uses `learning_rate`. No gradient clipping.

Per FineGates run, after training (all in fp32, eval mode):
  - accuracy of the gated model; gate_stats() (open row / column fractions, the removable fraction of the gated
    weights: sum over gated layers of m n - open rows x open cols, the official "compressed params", before coupling);
  - dense = a copy merged with merge_and_unload(prune=False) (same shapes, structured zeros);
    pruned = merge_and_unload(prune=True) (physically cut: MLP neurons, whole KV groups, residual dims gathered);
    the prune report's whole-model parameters before / after (after coupling and padding to prune_multiple_of);
  - exactness: max |logits| difference on the held-out set, pruned vs gated;
  - CPU latency, dense vs pruned side by side in this process (torch.set_num_threads(latency_threads), repeats
    interleaved, the median): prefill of B x T random tokens (prefill_shapes, no cache) and decode ms / token
    (decode_tokens single-token steps with the KV cache after a 1 x decode_prompt prompt). The classifier's forward:
    the backbone and the 576 x 2 score head (no vocabulary-sized LM head).
Results: results.json and results.md (the table printed at the end) in the output folder.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from peft_ext.experiments.common import classification_logits, encode, write_run_results
from peft_ext.experiments.recipe_main import recipe_main
from peft_ext.experiments.smore_vs_lora import _mean_std, hardware_text
from peft_ext.experiments.ssmlora_vs_lora import DATA_DEFAULTS, accuracy, load_classifier, trainable_parameters
from peft_ext.overrides import apply_overrides, config_from_dict, load_yaml

WHO = "finegates_vs_lora"
METHODS = ("lora", "finegates-0.2", "finegates-0.3", "finegates-0.4", "finegates-lora")
LABELS = {
    "lora": "LoRA",
    "finegates-0.2": "FineGates 0.2",
    "finegates-0.3": "FineGates 0.3",
    "finegates-0.4": "FineGates 0.4",
    "finegates-lora": "FineGates 0.3 + LoRA",
}
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GATE_LOGITS = re.compile(r"\.gates_(?:row|col)_logits\.")


@dataclass
class Repro:
    model: str = "smollm2-135m-instruct"
    methods: list = field(default_factory=lambda: list(METHODS))
    num_labels: int = 2
    r: int = 8  # LoRA's rank, and the LoRA inside finegates-lora
    lora_alpha: float = 16.0  # scale lora_alpha / r, for both LoRAs
    finegates_lora_target: float = 0.3  # finegates-lora's target sparsity
    sparsity_lambda: float = 50.0  # the spec's (official) lambda
    sparsity_start_step: int = 0
    sparsity_warmup_steps: int = 0
    gates_learning_rate: float = 5e-2  # the gate logits' own AdamW group (weight decay 0)
    gates_lr_scheduler_type: str = "constant"
    gate_init_mean: float = 1.0  # FineGatesConfig's (official) init and noise
    gate_init_std: float = 0.1
    gate_noise_std: float = 0.1
    prune_multiple_of: int = 8
    filler: int = 0  # neutral sentences between the opinions (ssmlora_vs_lora's variants)
    data: dict = field(default_factory=dict)
    # training, the same for every run
    steps: int = 48
    batch_size: int = 8
    learning_rate: float = 1e-3  # everything trainable but the gate logits
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    max_length: int = 256
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    # measurement
    eval_batch_size: int = 20
    timing_skip: int = 2
    latency_threads: int = 2
    latency_repeats: int = 3
    prefill_shapes: list = field(default_factory=lambda: [[1, 128], [8, 128]])
    decode_prompt: int = 128
    decode_tokens: int = 16
    latency_seeds: Optional[list] = None  # the seeds whose pruned models are timed; None: every seed
    output_dir: str = "outputs/finegates_vs_lora"
    cpu_threads: Optional[int] = None

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"{WHO}: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"{WHO}: methods must be distinct and not empty, got {self.methods}")
        self.data = {**DATA_DEFAULTS, **(self.data or {})}
        unknown = sorted(set(self.data) - set(DATA_DEFAULTS))
        if unknown:
            raise ValueError(f"{WHO}: unknown data key(s) {unknown}; known: {sorted(DATA_DEFAULTS)}")
        if len(set(map(str, self.seeds))) != len(self.seeds) or not self.seeds:
            raise ValueError(f"{WHO}: seeds must be distinct and not empty, got {self.seeds}")
        if self.latency_seeds is not None and set(map(str, self.latency_seeds)) - set(map(str, self.seeds)):
            raise ValueError(f"{WHO}: latency_seeds {self.latency_seeds} must be among seeds {self.seeds}")
        shapes = self.prefill_shapes
        if not isinstance(shapes, list) or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in shapes):
            raise ValueError(f"{WHO}: prefill_shapes must be a list of [batch, tokens] pairs, got {shapes!r}")
        if self.latency_repeats < 0 or self.decode_tokens < 0 or self.steps < 1:
            raise ValueError(f"{WHO}: steps must be >= 1, latency_repeats and decode_tokens >= 0")

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[list[str]] = None) -> "Repro":
        data = apply_overrides(load_yaml(path), overrides)
        return config_from_dict(cls, data, where=f"{path}: ")


# ------------------------------------------------------------------------------------------------ the methods
def is_finegates(method: str) -> bool:
    return method.startswith("finegates")


def target_sparsity(repro: Repro, method: str) -> Optional[float]:
    if method == "finegates-lora":
        return float(repro.finegates_lora_target)
    return float(method.split("-")[1]) if is_finegates(method) else None


def adapter_config(repro: Repro, method: str):
    from peft import LoraConfig

    from peft_ext.tuners.finegates import FineGatesConfig

    if method == "lora":
        return LoraConfig(r=repro.r, lora_alpha=repro.lora_alpha, target_modules=list(BLOCK_LINEARS), task_type="SEQ_CLS")
    if is_finegates(method):
        lora = method == "finegates-lora"
        return FineGatesConfig(
            target_sparsity=target_sparsity(repro, method), bias="gates", sparsity_lambda=repro.sparsity_lambda,
            sparsity_start_step=repro.sparsity_start_step, sparsity_warmup_steps=repro.sparsity_warmup_steps,
            gates_learning_rate=repro.gates_learning_rate, gate_init_mean=repro.gate_init_mean,
            gate_init_std=repro.gate_init_std, gate_noise_std=repro.gate_noise_std,
            prune_multiple_of=repro.prune_multiple_of, lora_r=repro.r if lora else 0,
            lora_alpha=repro.lora_alpha if lora else None, task_type="SEQ_CLS",
        )  # fmt: skip
    raise ValueError(f"{WHO}: unknown method {method!r}")


def block_linear_shapes(model) -> list[tuple[str, int, int]]:
    """(name, in, out) of every q/k/v/o/gate/up/down projection in the numbered blocks, in model order."""
    out = []
    for name, module in model.named_modules():
        if re.fullmatch(r".*\.layers\.\d+\.\w+\.(" + "|".join(BLOCK_LINEARS) + ")", name) and isinstance(
            module, torch.nn.Linear
        ):
            out.append((name, module.in_features, module.out_features))
    return out


def parameter_plan(repro: Repro, shapes: list[tuple[str, int, int]], head: int) -> dict:
    """{method: {"params", "adapter", "head", "modules", "config"}} by the formulas: LoRA r (in + out) per module;
    FineGates in + out gates + out bias deltas per module (+ r (in + out) with its LoRA)."""
    if not shapes:
        raise ValueError(f"{WHO}: the model has no {'/'.join(BLOCK_LINEARS)} linears in numbered blocks")
    r = repro.r
    plan = {}
    for method in repro.methods:
        if method == "lora":
            adapter = sum(r * (a + b) for _, a, b in shapes)
            text = f"r={r}, lora_alpha={repro.lora_alpha:g} (scale {repro.lora_alpha / r:g})"
        else:
            lora = method == "finegates-lora"
            adapter = sum((a + b) + b + (r * (a + b) if lora else 0) for _, a, b in shapes)
            text = f"target {target_sparsity(repro, method):g}, bias deltas" + (
                f", LoRA r={r} (scale {repro.lora_alpha / r:g})" if lora else ""
            )
        plan[method] = {"params": adapter + head, "adapter": adapter, "head": head, "modules": len(shapes), "config": text}
    return plan


def adapt(model, repro: Repro, method: str):
    from peft import get_peft_model

    return get_peft_model(model, adapter_config(repro, method))


def param_groups(model, lr: float, gates_lr: float) -> list[dict]:
    """The gate logits (their own lr, weight decay 0) and everything else trainable (lr, weight decay 0)."""
    gates, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (gates if GATE_LOGITS.search(name) else others).append(p)
    groups = [{"params": others, "lr": lr, "weight_decay": 0.0}]
    if gates:
        groups.append({"params": gates, "lr": gates_lr, "weight_decay": 0.0})
    return groups


# ------------------------------------------------------------------------------------------------ training
def _batch(rows: list[dict], pad: int) -> dict:
    width = max(len(x["input_ids"]) for x in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, x in enumerate(rows):
        ids[i, : len(x["input_ids"])] = torch.tensor(x["input_ids"])
        mask[i, : len(x["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([x["labels"] for x in rows])}


def batches(n: int, batch_size: int, steps: int, seed: int):
    """`steps` index lists of `batch_size`: a per-seed random order of range(n), reshuffled every epoch."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=g).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def train(model, repro: Repro, method: str, seed: int, rows: list[dict], pad: int, log=print) -> dict:
    from transformers import get_scheduler

    finegates = is_finegates(method)
    config = model.peft_config["default"] if finegates else None
    groups = param_groups(model, repro.learning_rate, repro.gates_learning_rate)
    optimizer = torch.optim.AdamW(groups)
    # one schedule per group: the task's on everything but the gates, the gates' own on the gate logits
    kinds = [repro.lr_scheduler_type] + ([repro.gates_lr_scheduler_type] if len(groups) > 1 else [])
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factors = [
        get_scheduler(kind, probe, num_warmup_steps=repro.warmup_steps, num_training_steps=repro.steps).lr_lambdas[0]
        for kind in kinds
    ]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    model.train()
    torch.manual_seed(seed)  # the gate noise
    history, step_times = [], []
    every = max(1, repro.steps // 10)
    window = {"loss": [], "sparsity": []}
    for step, idx in enumerate(batches(len(rows), repro.batch_size, repro.steps, seed)):
        t0 = time.perf_counter()
        batch = _batch([rows[i] for i in idx], pad)
        task = model(**batch).loss
        loss = task
        sparsity = None
        if finegates:
            lam = config.lambda_at(step)
            sparsity = model.base_model.sparsity_loss()
            loss = task + lam * sparsity
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        window["loss"].append(float(task.detach()))
        if sparsity is not None:
            window["sparsity"].append(float(sparsity.detach()))
        if (step + 1) % every == 0 or step + 1 == repro.steps:
            entry = {"step": step + 1, "loss": statistics.fmean(window["loss"])}
            if finegates:
                stats = model.base_model.gate_stats()
                entry.update(sparsity_loss=statistics.fmean(window["sparsity"]), open_rows=stats["open_rows"],
                             open_cols=stats["open_cols"], removable=stats["removable_fraction"],
                             keep_rows=stats["mean_keep_rows"], keep_cols=stats["mean_keep_cols"])  # fmt: skip
                log(f"    step {step + 1}: loss {entry['loss']:.4f}, sparsity {entry['sparsity_loss']:.4f}, open rows "
                    f"{stats['open_rows']:.3f} cols {stats['open_cols']:.3f}, removable {stats['removable_fraction']:.3f}")
            history.append(entry)
            window = {"loss": [], "sparsity": []}
    timed = step_times[repro.timing_skip :] or step_times
    return {"loss_history": history, "final_loss": history[-1]["loss"], "step_seconds": statistics.median(timed)}


# ------------------------------------------------------------------------------------------------ latency
@torch.no_grad()
def latency(models: dict, repro: Repro, vocab_size: int, seed: int = 0) -> dict:
    """{"median" | "min": {name: {"prefill BxT": seconds, "decode": seconds per token}}, "raw": every repeat's, "load":
    the 1-minute load average before and after}: over `latency_repeats` after one warm-up, the models taking turns
    within every repeat (a drift of the machine's load hits them alike; the min is the less load-sensitive)."""
    import os

    load = [os.getloadavg()[0]]
    threads = torch.get_num_threads()
    torch.set_num_threads(repro.latency_threads)
    g = torch.Generator().manual_seed(seed)
    low = min(100, vocab_size // 2)  # clear of the special tokens (the pad token would move the pooled position)
    inputs = {f"prefill {b}x{t}": torch.randint(low, vocab_size, (b, t), generator=g) for b, t in repro.prefill_shapes}
    prompt = torch.randint(low, vocab_size, (1, repro.decode_prompt), generator=g)
    new = torch.randint(low, vocab_size, (repro.decode_tokens, 1, 1), generator=g)
    times = {name: {} for name in models}
    try:
        for model in models.values():
            model.eval()
        for rep in range(1 + repro.latency_repeats):
            for name, model in models.items():
                for key, ids in inputs.items():
                    t0 = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
                    dt = time.perf_counter() - t0
                    if rep:
                        times[name].setdefault(key, []).append(dt)
                if repro.decode_tokens:
                    cache = _cache_of(model(input_ids=prompt, use_cache=True))
                    t0 = time.perf_counter()
                    for tok in new:
                        cache = _cache_of(model(input_ids=tok, use_cache=True, **{_cache_arg(model): cache}))
                    dt = (time.perf_counter() - t0) / repro.decode_tokens
                    if rep:
                        times[name].setdefault("decode", []).append(dt)
    finally:
        torch.set_num_threads(threads)
    load.append(os.getloadavg()[0])
    return {
        "median": {name: {k: statistics.median(v) for k, v in per.items()} for name, per in times.items()},
        "min": {name: {k: min(v) for k, v in per.items()} for name, per in times.items()},
        "raw": times,
        "load": load,
    }


def _cache_arg(model) -> str:
    """The forward's KV-cache argument: `cache` (transformers >= 5.x, where `past_key_values` is deprecated) or
    `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ one run
def run_one(repro: Repro, method: str, seed: int, data: tuple, time_it: bool, log=print) -> dict:
    train_items, held_out = data
    base, tokenizer = load_classifier(repro.model, repro.num_labels, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(seed)  # the adapter's initialisation
    model = adapt(base, repro, method)
    rows = encode(tokenizer, train_items, repro.max_length, WHO)
    row = {"trainable_params": trainable_parameters(model)}
    row.update(train(model, repro, method, seed, rows, pad, log))
    model.eval()
    gated = classification_logits(model, tokenizer, held_out, repro.eval_batch_size, repro.max_length, WHO)
    row["accuracy"] = accuracy(held_out, gated.argmax(-1).tolist())
    row["predicted_positive"] = float(gated.argmax(-1).float().mean())
    if not is_finegates(method):
        return row
    stats = model.base_model.gate_stats()
    row["gate_stats"] = stats
    row["gated_weights"] = sum(m.in_features * m.out_features for _, m in model.base_model._gated_layers())
    dense = copy.deepcopy(model).merge_and_unload(prune=False)
    pruned = model.merge_and_unload(prune=True)
    report = pruned.finegates_prune_report
    row["prune_report"] = {k: v for k, v in report.to_dict().items() if k not in ("layers",)}
    row["prune_layers"] = report.layers
    row["params_dense"], row["params_pruned"] = _n_params(dense), _n_params(pruned)
    if row["params_dense"] != report.params_before or row["params_pruned"] != report.params_after:
        raise RuntimeError(f"{WHO}: the prune report's counts differ from the models' ({method}, seed {seed})")
    pruned_logits = classification_logits(pruned, tokenizer, held_out, repro.eval_batch_size, repro.max_length, WHO)
    row["max_diff_pruned_vs_gated"] = float((pruned_logits - gated).abs().max())
    row["pruned_accuracy"] = accuracy(held_out, pruned_logits.argmax(-1).tolist())["all"]
    if time_it:
        timing = latency({"dense": dense, "pruned": pruned}, repro, dense.config.vocab_size, seed)
        row["latency"], row["latency_min"] = timing["median"], timing["min"]
        row["latency_raw"], row["latency_load"] = timing["raw"], timing["load"]
    return row


# ------------------------------------------------------------------------------------------------- report
def _fmt(x, spec) -> str:
    return format(x, spec) if x is not None else "–"


def summarize(repro: Repro, plan: dict, results: dict, length: float, hardware: str) -> str:
    seeds = [str(s) for s in repro.seeds]
    d = repro.data
    lines = [
        "## FineGates vs LoRA: held-out accuracy on review-majority classification (chance 0.5), removal and latency",
        "",
        f"{repro.model} with a score head ({repro.num_labels} labels, trained by every method); {repro.steps} steps of "
        f"batch {repro.batch_size}, lr {repro.learning_rate:g} ({repro.lr_scheduler_type}, warm-up {repro.warmup_steps}); "
        f"FineGates: gate logits lr {repro.gates_learning_rate:g} ({repro.gates_lr_scheduler_type}), lambda "
        f"{repro.sparsity_lambda:g} from step {repro.sparsity_start_step} (ramp {repro.sparsity_warmup_steps}), init "
        f"N({repro.gate_init_mean:g}, {repro.gate_init_std:g}^2), noise {repro.gate_noise_std:g}; "
        f"{d['n_train']} training / {d['n_eval']} held-out reviews of {d['opinions']} opinions ({length:.0f} tokens on "
        f"average), seeds {repro.seeds}; {hardware}.",
        "",
        "| method | config | trainable params (adapter + head) | vs LoRA | accuracy (mean ± std) | per seed | "
        "final train loss | step time (s) | open rows / cols | gated weights removable | whole model: params "
        "dense → pruned | removed | max abs diff pruned vs gated |",
        "|" + "---|" * 13,
    ]
    mean_of = lambda rows, key: statistics.fmean([rows[s][key] for s in seeds])  # noqa: E731
    lora_params = plan["lora"]["params"] if "lora" in plan else None
    for method, rows in results.items():
        acc = [rows[s]["accuracy"]["all"] for s in seeds]
        mean, std = _mean_std(acc)
        params = rows[seeds[0]]["trainable_params"]
        cells = [
            LABELS[method], plan[method]["config"], f"{params:,} ({plan[method]['adapter']:,} + {plan[method]['head']:,})",
            f"{params / lora_params:.3f}×" if lora_params else "–", f"{mean:.3f} ± {std:.3f}",
            ", ".join(f"{a:.3f}" for a in acc), f"{mean_of(rows, 'final_loss'):.3f}",
            f"{mean_of(rows, 'step_seconds'):.2f}",
        ]
        if is_finegates(method):
            rem = [rows[s]["gate_stats"]["removable_fraction"] for s in seeds]
            whole = [rows[s]["prune_report"]["params_removed"] / rows[s]["params_dense"] for s in seeds]
            cells += [
                f"{mean_of_stat(rows, seeds, 'open_rows'):.3f} / {mean_of_stat(rows, seeds, 'open_cols'):.3f}",
                f"{statistics.fmean(rem):.1%} ({', '.join(f'{x:.1%}' for x in rem)})",
                f"{statistics.fmean([rows[s]['params_dense'] for s in seeds]) / 1e6:.2f} M → "
                f"{statistics.fmean([rows[s]['params_pruned'] for s in seeds]) / 1e6:.2f} M",
                f"{statistics.fmean(whole):.1%} ({', '.join(f'{x:.1%}' for x in whole)})",
                f"{max(rows[s]['max_diff_pruned_vs_gated'] for s in seeds):.1e}",
            ]
        else:
            cells += ["–"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Accuracy: the gated model (eval gates) on {d['n_eval']} held-out reviews. Open rows / cols: the fraction of "
        "gates open in eval (mean over seeds). Gated weights removable: sum over the gated linears of m·n − open rows × "
        "open cols over their m·n (the official count, before coupling). Whole model: parameters of the merged model "
        "(merge_and_unload(prune=False)) and of the pruned one (prune=True: dead MLP neurons, whole KV groups, "
        "residual dims gathered; padded to a multiple of "
        f"{repro.prune_multiple_of}), i.e. after coupling; removed = their difference over the dense count (embeddings "
        "included). Max abs diff: of the held-out logits, pruned vs gated, fp32, the max over seeds. Step time: median "
        f"wall time of a training step (steps {repro.timing_skip + 1}-{repro.steps}), mean over seeds.",
        "",
    ]
    # what the pruning cut, per method
    cut = []
    for method, rows in results.items():
        if not is_finegates(method):
            continue
        rep = [rows[s]["prune_report"] for s in seeds]
        cats = {k: statistics.fmean([r["params_removed_by_category"].get(k, 0) for r in rep]) for k in ("mlp", "attention", "residual")}
        cut.append(
            f"| {LABELS[method]} | {statistics.fmean([r['mlp_neurons_removed'] for r in rep]):.0f} | "
            f"{statistics.fmean([r['heads_removed'] for r in rep]):.1f} ({statistics.fmean([r['kv_groups_removed'] for r in rep]):.1f}) | "
            f"{statistics.fmean([r['residual_in_dims_gathered'] for r in rep]):.0f} / "
            f"{statistics.fmean([r['residual_out_dims_gathered'] for r in rep]):.0f} | "
            f"{statistics.fmean([len(r['gathered_modules']) for r in rep]):.0f} | "
            f"{cats['mlp'] / 1e6:.2f} M / {cats['attention'] / 1e6:.2f} M / {cats['residual'] / 1e6:.2f} M | "
            f"{statistics.fmean([rows[s]['gate_stats']['removed_params'] for s in seeds]) / 1e6:.2f} M | "
            f"{statistics.fmean([rows[s]['pruned_accuracy'] for s in seeds]):.3f} |"
        )
    if cut:
        lines += [
            "What the pruning cut (mean over seeds):",
            "",
            "| method | MLP neurons removed | query heads (KV groups) removed | residual dims gathered in / out | "
            "PrunedLinear modules | params removed: MLP / attention / residual | removable by the gates (before "
            "coupling) | pruned accuracy |",
            "|" + "---|" * 8,
            *cut,
            "",
        ]
    # latency
    for stat, field_name, what in (("median", "latency", "the median"), ("min", "latency_min", "the minimum")):
        lat, lat_keys = [], []
        for method, rows in results.items():
            timed = [s for s in seeds if field_name in rows[s]]
            if not is_finegates(method) or not timed:
                continue
            lat_keys = list(rows[timed[0]][field_name]["dense"])
            cells = []
            for key in lat_keys:
                dense = [rows[s][field_name]["dense"][key] for s in timed]
                pruned = [rows[s][field_name]["pruned"][key] for s in timed]
                ratio = [p / q for p, q in zip(pruned, dense)]
                cells.append(
                    f"{statistics.fmean(dense) * 1e3:.1f} → {statistics.fmean(pruned) * 1e3:.1f} "
                    f"({statistics.fmean(ratio):.2f}×; {', '.join(f'{x:.2f}' for x in ratio)})"
                )
            loads = [x for s in timed for x in rows[s].get("latency_load", [])]
            load = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "–"
            lat.append(f"| {LABELS[method]} | {', '.join(timed)} | {load} | " + " | ".join(cells) + " |")
        if lat:
            lines += [
                f"CPU latency ({stat}), dense (merged, unpruned) → pruned, ms (decode: ms per token), mean over the "
                f"timed seeds of {what} of {repro.latency_repeats} repeats (models interleaved, "
                f"{repro.latency_threads} threads); in brackets pruned / dense, mean and per seed; load: the machine's "
                f"1-minute load average around the timing:",
                "",
                "| method | seeds | load | " + " | ".join(
                    k + (f" (after {repro.decode_prompt} tokens, {repro.decode_tokens} steps)" if k == "decode" else "")
                    for k in lat_keys) + " |",
                "|" + "---|" * (3 + len(lat_keys)),
                *lat,
                "",
            ]
    lora = results.get("lora")
    if lora:
        lora_acc = [lora[s]["accuracy"]["all"] for s in seeds]
        for method, rows in results.items():
            if method == "lora":
                continue
            acc = [rows[s]["accuracy"]["all"] for s in seeds]
            wins = sum(a > b for a, b in zip(acc, lora_acc))
            ties = sum(a == b for a, b in zip(acc, lora_acc))
            diff = statistics.fmean(acc) - statistics.fmean(lora_acc)
            rem = statistics.fmean([rows[s]["gate_stats"]["removable_fraction"] for s in seeds])
            lines.append(
                f"- {LABELS[method]} vs LoRA: {diff:+.3f} in the mean at {rem:.1%} of the gated weights removable; "
                f"above LoRA in {wins} of {len(acc)} seeds{f' ({ties} tied)' if ties else ''}."
            )
    return "\n".join(lines) + "\n"


def mean_of_stat(rows: dict, seeds: list, key: str) -> float:
    return statistics.fmean([rows[s]["gate_stats"][key] for s in seeds])


def reproduce(repro: Repro, out_dir: Optional[str] = None, log=print) -> dict:
    from peft_ext.data.review_votes import review_vote_splits
    from peft_ext.quiet import quiet_libraries

    quiet_libraries()
    started = time.time()
    out = Path(out_dir or repro.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if repro.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(repro.cpu_threads)
    d = repro.data
    model, tokenizer = load_classifier(repro.model, repro.num_labels, 0)
    head = model.score.weight.numel() + (model.score.bias.numel() if model.score.bias is not None else 0)
    plan = parameter_plan(repro, block_linear_shapes(model), head)
    del model
    log("Trainable parameters by the formulas (adapter + score head):")
    for method, p in plan.items():
        log(f"  {method:15s} {p['params']:>10,} = {p['adapter']:,} + {p['head']:,}   ({p['modules']} modules; {p['config']})")
    hardware = hardware_text()
    data = review_vote_splits(d["n_train"], d["n_eval"], d["seed"], d["opinions"], repro.filler)
    length = statistics.fmean(len(x["input_ids"]) for x in encode(tokenizer, data[0] + data[1], repro.max_length, WHO))
    log(f"filler {repro.filler}: {length:.0f} tokens per review on average")
    timed_seeds = set(map(str, repro.seeds if repro.latency_seeds is None else repro.latency_seeds))
    results: dict = {method: {} for method in repro.methods}
    for seed in repro.seeds:  # the methods take turns, so that a drift in the machine's load hits them alike
        for method in repro.methods:
            t0 = time.time()
            log(f"[{method} seed {seed}]")
            row = run_one(repro, method, seed, data, str(seed) in timed_seeds, log)
            row["seconds"] = round(time.time() - t0, 1)
            if row["trainable_params"] != plan[method]["params"]:
                raise RuntimeError(
                    f"{WHO}: {method} has {row['trainable_params']:,} trainable parameters, the formula "
                    f"{plan[method]['params']:,}"
                )
            results[method][str(seed)] = row
            text = f"[{method} seed {seed}] accuracy {row['accuracy']['all']:.3f} (final loss {row['final_loss']:.4f}, "
            text += f"step {row['step_seconds']:.2f} s, {row['seconds']} s)"
            if is_finegates(method):
                text += (
                    f"; removable {row['gate_stats']['removable_fraction']:.1%} of gated weights, params "
                    f"{row['params_dense']:,} -> {row['params_pruned']:,}, max diff {row['max_diff_pruned_vs_gated']:.1e}"
                )
                if "latency" in row:
                    text += "; " + ", ".join(
                        f"{k} {row['latency']['dense'][k] * 1e3:.1f} -> {row['latency']['pruned'][k] * 1e3:.1f} ms"
                        for k in row["latency"]["dense"]
                    )
            log(text)
            (out / "partial.json").write_text(json.dumps({"results": results}, indent=2, default=str))
    text = summarize(repro, plan, results, length, hardware)
    write_run_results(out, text, started, log, results, recipe=repro.__dict__, plan=plan, length=length, hardware=hardware)
    return results


def main(argv=None) -> None:
    recipe_main(__doc__, "recipes/finegates_vs_lora.yaml", Repro.from_yaml, reproduce, argv)


if __name__ == "__main__":
    main()
