"""Small-scale reproduction of Delta-CoMe (Ping et al., 2024; design/methods/deltacome.md): how much of a full
fine-tune's task score survives when its delta is compressed to 1/8 or 1/16 of its fp16 size, with Delta-CoMe
(mixed precision along the singular spectrum, GPTQ) against low-rank and BitDelta at the same budget.

    peft-ext reproduce-delta --config recipes/deltacome_reproduction.yaml [--set max_steps=10 ...] [--out DIR]

1. Fine-tune the model fully (TRL's SFTTrainer, as `peft-ext demo` trains FFT) on a task with a measurable score:
   the 48 fictional-country facts. Embeddings (tied to the head in SmolLM2) are frozen, so the whole delta lies in
   the linear layers of the blocks and the norms, which is what the compressed adapter stores.
2. For each budget and method: `compress_delta(base, finetuned, ...)` writes a DELTACOME adapter folder; it is
   loaded back onto a fresh copy of the base with `PeftModel.from_pretrained` and merged (`merge_and_unload`: the
   base weight plus the dequantised delta, the same function as the unmerged forward up to fp32 rounding, and
   much faster to score on a CPU).
3. Score base, fine-tune and every compressed fine-tune: task accuracy (4-option multiple choice on the 48
   facts), task loss (NLL of the 48 training statements: a finer measure of what the fine-tune learned),
   world-knowledge accuracy and LM loss on held-out English (general ability). Per layer, two errors of the
   compressed delta: in weight space, |dW - dW_hat|_F / |dW|_F, and on the layer's inputs from held-out English
   text (not GPTQ's calibration text), sqrt(tr(E H E^T) / tr(dW H dW^T)) with E = dW - dW_hat, H = sum x x^T.

Writes results.md (the table), results.json (every number, the config, timings) and, with save_adapters, the
adapter folders under adapters/.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from peft_ext.overrides import apply_overrides, config_from_dict, load_yaml

# method name in a recipe -> (compress_delta method, quantizer, table label)
METHODS = {
    "deltacome": ("deltacome", "gptq", "Delta-CoMe (GPTQ)"),
    "deltacome-rtn": ("deltacome", "rtn", "Delta-CoMe (RTN)"),
    "lowrank": ("lowrank", "rtn", "low-rank (fp16)"),
    "bitdelta": ("bitdelta", "rtn", "BitDelta (1-bit)"),
    "bitdelta-distill": ("bitdelta", "rtn", "BitDelta (1-bit, distilled α)"),
}
BITDELTA_BUDGET = "1/16"  # 1 bit per weight: BitDelta's size whatever the budget asked
DISTILLED = {"bitdelta-distill"}  # BitDelta with its scale distillation (bitdelta_distill_steps, bitdelta_distill_lr)
# training data -> the texts whose NLL is the task loss (the probes are the 48 facts' multiple-choice questions)
TASKS = {
    "fictional-facts": lambda r: r["text"],
    "fictional-facts-qa": lambda r: r["prompt"] + r["completion"],
}


@dataclass
class DeltaCompressionConfig:
    """The experiment. Defaults = recipes/deltacome_reproduction.yaml (a few minutes on a 2-core CPU).

    model: "smollm2-135m-instruct" (offline), "tiny-llama" (tests), a local folder or a Hub id.
    data: the fine-tuning task, "fictional-facts" (statements) or "fictional-facts-qa" (question/answer).
    max_steps, per_device_train_batch_size, learning_rate, lr_scheduler_type, warmup_steps, max_length, seed:
        the full fine-tune, as in TRL's SFTConfig.
    freeze_embeddings: keep the input embeddings and the output head fixed during the fine-tune (compress_delta
        stores linear layers of the blocks and changed norms, not embeddings).
    methods: from "deltacome" (GPTQ, the paper), "deltacome-rtn" (round-to-nearest ablation), "lowrank",
        "bitdelta" (1 bit per weight: its size is 1/16 whatever the budget, so it is compressed once; closed-form
        scales mean|ΔW|), "bitdelta-distill" (the same signs, scales refined by BitDelta's distillation).
    bitdelta_distill_steps, bitdelta_distill_lr: that distillation (BitDelta's 200 Adam steps at 1e-4, batches of
        4 × 128 tokens of the offline English training text, logit MSE against the fine-tune).
    budgets: fractions of each layer's dense fp16 delta, e.g. ["1/8", "1/16"].
    bands, group_size: Delta-CoMe's precision schedule and quantisation group (DeltaComeConfig).
    calibration_samples, calibration_seq_len: GPTQ's calibration on peft-ext's offline English text.
    english_texts, eval_max_length: held-out English paragraphs (and tokens each) for the LM loss.
    save_adapters: keep every compressed adapter folder under output_dir/adapters.
    """

    model: str = "smollm2-135m-instruct"
    data: str = "fictional-facts"
    max_steps: int = 30
    per_device_train_batch_size: int = 8
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = 3
    max_length: int = 64
    seed: int = 0
    freeze_embeddings: bool = True
    methods: list[str] = field(default_factory=lambda: ["deltacome", "lowrank", "bitdelta"])
    budgets: list = field(default_factory=lambda: ["1/8", "1/16"])
    bands: list = field(default_factory=lambda: [[2, 8], [32, 3], [None, 2]])
    group_size: int = 128
    calibration_samples: int = 32
    calibration_seq_len: int = 256
    bitdelta_distill_steps: int = 200
    bitdelta_distill_lr: float = 1e-4
    english_texts: int = 48
    eval_max_length: int = 128
    save_adapters: bool = True
    output_dir: str = "outputs/deltacome_reproduction"

    def __post_init__(self):
        from peft_ext.tuners.deltacome.bands import check_schedule, parse_budget

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"reproduce-delta: methods must be a non-empty list from {list(METHODS)}, got {self.methods}")
        if self.data not in TASKS:
            raise ValueError(f"reproduce-delta: data must be one of {list(TASKS)} (the task the probes score), got {self.data!r}")
        if not self.budgets:
            raise ValueError("reproduce-delta: budgets must name at least one budget, e.g. [1/8, 1/16]")
        self.budgets = [str(b) for b in self.budgets]
        for budget in self.budgets:
            value = parse_budget(budget, "reproduce-delta: budgets entry")
            if any(METHODS[m][0] == "bitdelta" for m in self.methods) and value < 1 / 16:
                raise ValueError(f"reproduce-delta: budget {budget} is below BitDelta's fixed 1/16; drop bitdelta or the budget")
        bands = check_schedule(self.bands, "reproduce-delta: bands")
        self.bands = bands if isinstance(bands, str) else [list(b) for b in bands]
        self.learning_rate = float(self.learning_rate)
        self.bitdelta_distill_lr = float(self.bitdelta_distill_lr)
        if DISTILLED & set(self.methods) and (not isinstance(self.bitdelta_distill_steps, int) or self.bitdelta_distill_steps < 1):
            raise ValueError(f"reproduce-delta: bitdelta_distill_steps must be a positive integer with bitdelta-distill, got {self.bitdelta_distill_steps!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "DeltaCompressionConfig":
        return config_from_dict(cls, data, kind="reproduce-delta config ")

    @classmethod
    def from_yaml(cls, path: str | None = None, overrides: list[str] | None = None) -> "DeltaCompressionConfig":
        """The defaults, updated by the YAML file at `path` (if any), then by `key=value` overrides."""
        data = load_yaml(path) if path else {}
        return cls.from_dict(apply_overrides(data, overrides))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_delta_compression(config: DeltaCompressionConfig | None = None) -> dict:
    """Fine-tune, compress with every method and budget, score everything; print the table and save results."""
    from peft_ext.data import load_model, load_training_data
    from peft_ext.quiet import quiet_libraries
    from peft_ext.evaluation.scores import builtin_score_data

    config = config or DeltaCompressionConfig()
    quiet_libraries()
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    print(f"Loading {config.model} ...", flush=True)
    base, tokenizer = load_model(config.model)
    base.eval()
    train_data = load_training_data(config.data)
    task_texts = [TASKS[config.data](r) for r in train_data]
    score_data = builtin_score_data(config.english_texts, config.eval_max_length)

    def score(model) -> dict:
        return _scores(model, tokenizer, score_data, task_texts, config.max_length)

    base_scores = score(base)
    print(f"Base: {_describe(base_scores)}", flush=True)
    finetuned, training = finetune(base, tokenizer, train_data, config)
    ft_scores = score(finetuned)
    print(f"Fine-tune ({training['steps']} steps, {training['train_time_s']:.0f} s): {_describe(ft_scores)}", flush=True)
    device = next(finetuned.parameters()).device

    rows, cache, hessians = [], {}, {}
    adapters = output_dir / "adapters"
    for budget in config.budgets:
        for name in config.methods:
            method, quantizer, label = METHODS[name]
            fixed = method == "bitdelta"  # 1 bit per weight whatever the budget: compressed and scored once
            key = (name, None if fixed else budget)
            if key not in cache:
                folder = adapters / (name if fixed else f"{name}_{budget.replace('/', 'over')}") if config.save_adapters else None
                cache[key] = compress_and_score(
                    base, finetuned, tokenizer, config, method, quantizer, BITDELTA_BUDGET if fixed else budget, folder,
                    device, score, hessians,
                    distill_steps=config.bitdelta_distill_steps if name in DISTILLED else 0,
                )
                print(f"{label}{'' if fixed else ' at ' + budget}: {_describe(cache[key]['scores'])}, ratio "
                      f"{cache[key]['totals']['ratio']:.4f}, compressed in {cache[key]['compress_time_s']:.0f} s", flush=True)
            rows.append(_row(name, label, budget, cache[key], base_scores, ft_scores, budget_independent=fixed))

    dense = rows[0]["dense_fp16_delta_bytes"]
    results = {
        "config": config.to_dict(),
        "base": base_scores,
        "finetuned": {**ft_scores, **training, "dense_fp16_delta_bytes": dense},
        "compressed": rows,
        "total_time_s": time.perf_counter() - started,
        "versions": _versions(),
    }
    table = format_table(results)
    (output_dir / "results.md").write_text(table + "\n")
    (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{config.model}: full fine-tune on {config.data} ({training['steps']} steps x batch "
          f"{config.per_device_train_batch_size}), delta compressed per linear layer\n")
    print(table)
    written = [output_dir / "results.md", output_dir / "results.json"] + ([adapters] if config.save_adapters else [])
    print(f"\nTotal time {results['total_time_s']:.0f} s. Wrote " + ", ".join(str(p) for p in written))
    return results


def finetune(base, tokenizer, train_data, config: DeltaCompressionConfig):
    """A full fine-tune of a copy of `base` (the same SFTTrainer set-up as the demo's FFT); (model, training info)."""
    from transformers import ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from peft_ext.training.progress import LossProgressBar
    from peft_ext.trainer_defaults import device_defaults, quiet_defaults

    model = copy.deepcopy(base)
    if config.freeze_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)  # tied embeddings: one parameter, frozen once
    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory() as scratch:  # nothing is saved: compress_delta reads the model in memory
        args = SFTConfig(
            output_dir=scratch,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.per_device_train_batch_size,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler_type,
            warmup_steps=config.warmup_steps,
            max_length=config.max_length,
            seed=config.seed,
            disable_tqdm=False,
            **quiet_defaults(),
            **device_defaults(),
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_data, processing_class=tokenizer)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgressBar("full fine-tune"))
        start = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - start
    model = trainer.model.eval()
    info = {
        "steps": trainer.state.global_step,
        "train_time_s": train_time,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "loss_curve": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
    }
    for p in model.parameters():
        p.requires_grad_(False)
    return model, info


def compress_and_score(
    base, finetuned, tokenizer, config, method, quantizer, budget, folder, device, score, hessians, distill_steps: int = 0
) -> dict:
    """compress_delta -> the adapter folder -> PeftModel.from_pretrained on a fresh base copy -> merged -> scores.
    `hessians` (filled on first use): the held-out-text input Hessians of the compressed layers. distill_steps > 0:
    BitDelta's scales distilled (compress_delta's bitdelta_distill_steps)."""
    from peft import PeftModel

    from peft_ext.compression import compress_delta

    start = time.perf_counter()
    result = compress_delta(
        base, finetuned, method=method, budget=budget, bands=config.bands, group_size=config.group_size,
        quantizer=quantizer, tokenizer=tokenizer, calibration_samples=config.calibration_samples,
        calibration_seq_len=config.calibration_seq_len, bitdelta_distill_steps=distill_steps,
        bitdelta_distill_lr=config.bitdelta_distill_lr, device=device,
    )
    compress_time = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as scratch:
        folder = result.save(folder if folder is not None else scratch)
        model = PeftModel.from_pretrained(copy.deepcopy(base).to(device), folder)
        model = model.merge_and_unload().eval()
    scores = score(model)
    names = [r["module"] for r in result.layers]
    if not hessians:
        hessians.update(heldout_hessians(finetuned, tokenizer, names, config))
    heldout = output_errors(base, finetuned, model, hessians, names)
    del model
    calibration = [r["rel_output_error"] for r in result.layers if r["rel_output_error"] is not None]
    return {
        "scores": scores,
        "totals": result.totals,
        "mean_rel_output_error": sum(heldout.values()) / len(heldout),
        "rel_output_error": heldout,
        "mean_rel_output_error_calibration": sum(calibration) / len(calibration) if calibration else None,
        "not_stored": [s["parameter"] for s in result.skipped if not s["reason"].startswith("unchanged")],
        "compress_time_s": compress_time,
        "adapter_dir": str(folder) if config.save_adapters else None,
        "distillation": {k: v for k, v in result.totals.items() if k.startswith("distill_")} or None,
    }


def heldout_hessians(model, tokenizer, names, config) -> dict:
    """sum x x^T of each named layer's inputs over held-out English text (GPTQ calibrates on the training split)."""
    from peft_ext.compression.calibration import calibration_batches, collect_hessians
    from peft_ext.data import heldout_english

    batches = calibration_batches(heldout_english(), tokenizer, config.calibration_samples, config.calibration_seq_len)
    return collect_hessians(model, names, batches)


@torch.no_grad()
def output_errors(base, finetuned, compressed, hessians, names) -> dict:
    """Per layer sqrt(tr(E H E^T) / tr(dW H dW^T)), E = W_ft - W_compressed, dW = W_ft - W_base: the relative error
    of the delta's contribution to the layer's outputs on the inputs H was collected on."""
    from peft_ext.tuners.base import logical_weight

    errors = {}
    for name in names:
        h = hessians[name]
        w_base, w_ft, w_hat = (logical_weight(m.get_submodule(name)).float().to(h.device) for m in (base, finetuned, compressed))
        delta, error = w_ft - w_base, w_ft - w_hat
        num, den = ((error @ h) * error).sum(), ((delta @ h) * delta).sum().clamp_min(1e-30)
        errors[name] = float((num / den).clamp_min(0).sqrt())
    return errors


def _scores(model, tokenizer, score_data, task_texts, max_length) -> dict:
    from peft_ext.evaluation import lm_loss
    from peft_ext.evaluation.scores import measure_scores

    scores = measure_scores(model, tokenizer, score_data)
    return {
        "task_acc": scores["new_task"], "task_loss": lm_loss(model, tokenizer, task_texts, max_length),
        "old_knowledge": scores["old_knowledge"], "lm_loss": scores["lm_loss"],
    }


def _row(name, label, budget, done, base, ft, budget_independent: bool) -> dict:
    """One table row. `budget`: the budget whose rows it is listed with ("listed_under"); a budget-independent row
    (BitDelta) carries its own budget, 1/16, in "budget" and "budget_fraction"."""
    from peft_ext.tuners.deltacome.bands import parse_budget

    s, t = done["scores"], done["totals"]
    own = BITDELTA_BUDGET if budget_independent else budget
    return {
        "method": name, "label": label, "budget": own, "budget_fraction": parse_budget(own), "listed_under": budget,
        "budget_independent": budget_independent,
        "stored_bytes": t["compressed_bytes"], "dense_fp16_delta_bytes": t["dense_fp16_delta_bytes"], "ratio": t["ratio"],
        "dense_modules_bytes": t["dense_modules_bytes"], "file_bytes": t["file_bytes"],
        **s,
        "task_acc_vs_finetuned": s["task_acc"] - ft["task_acc"],
        "task_acc_gain_kept": _kept(base["task_acc"], ft["task_acc"], s["task_acc"]),
        "task_loss_gain_kept": _kept(base["task_loss"], ft["task_loss"], s["task_loss"]),
        "mean_rel_error": t["mean_rel_error"], "mean_rel_output_error": done["mean_rel_output_error"],
        "mean_rel_output_error_calibration": done["mean_rel_output_error_calibration"],
        "not_stored": done["not_stored"], "compress_time_s": done["compress_time_s"], "adapter_dir": done["adapter_dir"],
        "distillation": done.get("distillation"),
    }


def _kept(base: float, ft: float, value: float) -> Optional[float]:
    """The share of the fine-tune's change (base -> ft) that `value` keeps: 1 = all of it, 0 = back at the base."""
    return None if ft == base else (value - base) / (ft - base)


def format_table(results: dict) -> str:
    """The markdown table: base, fine-tune, then every method at every budget."""
    header = [
        "method", "budget", "stored bytes", "ratio", "task acc", "Δ acc vs FT", "task loss", "FT loss gain kept",
        "world-knowledge acc", "English LM loss", "mean layer rel. error", "mean layer rel. output error",
    ]
    base, ft = results["base"], results["finetuned"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def line(cells):
        lines.append("| " + " | ".join(cells) + " |")

    line(["base (no delta)", "–", "0", "0", f"{base['task_acc']:.3f}", f"{base['task_acc'] - ft['task_acc']:+.3f}",
          f"{base['task_loss']:.3f}", "0 %", f"{base['old_knowledge']:.3f}", f"{base['lm_loss']:.3f}", "1", "1"])
    line(["fine-tune (uncompressed)", "1", f"{ft['dense_fp16_delta_bytes']:,}", "1", f"{ft['task_acc']:.3f}", "0",
          f"{ft['task_loss']:.3f}", "100 %", f"{ft['old_knowledge']:.3f}", f"{ft['lm_loss']:.3f}", "0", "0"])
    for r in results["compressed"]:
        kept = "–" if r["task_loss_gain_kept"] is None else f"{100 * r['task_loss_gain_kept']:.0f} %"
        budget = r["budget"] + ("*" if r["budget_independent"] else "")
        line([r["label"], budget, f"{r['stored_bytes']:,}", f"{r['ratio']:.4f}", f"{r['task_acc']:.3f}",
              f"{r['task_acc_vs_finetuned']:+.3f}", f"{r['task_loss']:.3f}", kept, f"{r['old_knowledge']:.3f}",
              f"{r['lm_loss']:.3f}", f"{r['mean_rel_error']:.3f}", f"{r['mean_rel_output_error']:.3f}"])
    notes = [
        "",
        "stored bytes: the compressed linear-layer deltas (codes, scales, mins, singular values / fp16 factors / "
        "signs), against the dense fp16 delta of the same layers (the fine-tune row); ratio = stored / dense. "
        "Norm layers the fine-tune changed are stored whole on top (a few KB). task acc: 4-option multiple choice "
        "on the 48 taught facts (chance 0.25); task loss: NLL of the training statements (nats/token); FT loss gain "
        "kept = (base − method) / (base − fine-tune) of the task loss. mean layer rel. error = mean over layers of "
        "‖ΔW − ΔŴ‖_F / ‖ΔW‖_F; rel. output error = the same on the layer's outputs for inputs from held-out "
        "English text, √(tr(E H Eᵀ) / tr(ΔW H ΔWᵀ)), E = ΔW − ΔŴ, H = Σ x xᵀ (GPTQ calibrates on other text).",
    ]
    if any(r["budget_independent"] for r in results["compressed"]):
        notes.append("* BitDelta stores 1 bit per weight, 1/16 of the fp16 delta, whatever the budget: one adapter at "
                     "1/16, repeated with each budget's rows (with a larger budget's rows it stores fewer bytes than "
                     "the others).")
    distilled = {json.dumps(r["distillation"], sort_keys=True): r["distillation"] for r in results["compressed"] if r.get("distillation")}
    for d in distilled.values():  # one note per distilled adapter (BitDelta's is listed under every budget)
        held = (f", held-out English {d['distill_heldout_loss_before']:.4g} → {d['distill_heldout_loss_after']:.4g}"
                if d.get("distill_heldout_loss_before") is not None else "")
        notes.append(
            f"BitDelta (distilled α): the same signs, each layer's scale refined by BitDelta's distillation ({d['distill_steps']} "
            f"Adam steps, lr {d['distill_lr']:g} cosine-annealed, batches of 4 × {d['distill_seq_len']} tokens cycling over "
            f"{d['distill_samples']} samples of the offline English training text): logit MSE against the fine-tune "
            f"{d['distill_loss_before']:.4g} → {d['distill_loss_after']:.4g} on that text{held}."
        )
    if any(r["not_stored"] for r in results["compressed"]):
        names = sorted({n for r in results["compressed"] for n in r["not_stored"]})
        notes.append(f"WARNING: changed by the fine-tune but not stored by the adapters: {names[:5]}")
    return "\n".join(lines + notes)


def _describe(s: dict) -> str:
    return (f"task acc {s['task_acc']:.3f}, task loss {s['task_loss']:.3f}, world-knowledge {s['old_knowledge']:.3f}, "
            f"LM loss {s['lm_loss']:.3f}")


def _versions() -> dict:
    import sys

    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": sys.version.split()[0]}
