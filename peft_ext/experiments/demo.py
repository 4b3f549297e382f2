"""The main job: teach SmolLM2 new facts with HFT, full fine-tuning (FFT) and LoRA; compare learning and forgetting.

Each method fine-tunes a fresh copy of the same model on the same data with TRL's SFTTrainer, with the same
steps, batch and learning-rate schedule (the rate itself is per method, see DemoConfig). Before and after, three
scores: new-task multiple-choice accuracy, old-knowledge multiple-choice accuracy and LM loss on held-out English
text (forgetting = the change of the last two against the base). Run it with `peft-ext demo [--config YAML]`.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import ProgressCallback
from trl import SFTConfig, SFTTrainer

import peft_ext
from peft_ext.data import load_model, load_training_data
from peft_ext.training.progress import LossProgressBar, ScoreCurve
from peft_ext.experiments.demo_config import DemoConfig
from peft_ext.experiments.demo_plots import plot_score_curves, plot_training_loss
from peft_ext.experiments.demo_report import at_equal_new_task, format_equal_score, format_table, summarize, with_changes, write_results
from peft_ext.quiet import quiet_libraries
from peft_ext.evaluation.scores import builtin_score_data, measure_scores
from peft_ext.trainer_defaults import device_defaults, quiet_defaults


def method_peft_config(method: str, config: DemoConfig, seed: int):
    """The peft_config handed to SFTTrainer: HFT and LoRA adapters, None for full fine-tuning."""
    if method == "hft":
        return peft_ext.HftConfig(ratio=config.hft_ratio, seed=seed)
    if method == "lora":
        return LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    return None


def train_and_score(method: str, seed: int, config: DemoConfig, train_data, score_data, base: dict) -> dict:
    """Fine-tune a fresh copy of the model with one method and seed; its scores, curves, time and size."""
    model, tokenizer = load_model(config.model)
    torch.manual_seed(seed)  # SFTTrainer wraps the model (LoRA's random init) before it seeds anything itself
    curve = ScoreCurve(tokenizer, score_data, config.eval_every, config.target_new_task, config.stop_at_target)
    with tempfile.TemporaryDirectory() as scratch:  # nothing is saved: the demo keeps scores, not weights
        args = SFTConfig(
            output_dir=scratch,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.per_device_train_batch_size,
            learning_rate=config.learning_rate[method],
            lr_scheduler_type=config.lr_scheduler_type,
            warmup_steps=config.warmup_steps,
            max_length=config.max_length,
            seed=seed,
            disable_tqdm=False,
            **quiet_defaults(),
            **device_defaults(),
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_data,
            processing_class=tokenizer,
            peft_config=method_peft_config(method, config, seed),
            callbacks=[curve],
        )
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgressBar(f"{method.upper():4s} seed {seed}"))
        start = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - start - curve.eval_seconds
    scores = measure_scores(trainer.model, tokenizer, score_data)
    run = {
        "method": method,
        "seed": seed,
        **with_changes(scores, base),
        "steps": trainer.state.global_step,
        "train_time_s": train_time,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "loss_curve": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
        "score_curve": [{"step": 0, **base}] + curve.points,
    }
    del trainer, model
    gc.collect()
    return run


def run_demo(config: DemoConfig | None = None) -> dict:
    """Run every method and seed of `config` (default: the built-in few-minute CPU demo); print and save results."""
    config = config or DemoConfig()
    quiet_libraries()
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    print(f"Loading {config.model} ...", flush=True)
    model, tokenizer = load_model(config.model)  # the first SmolLM2 load converts and caches it
    score_data = builtin_score_data(config.english_texts, config.eval_max_length)
    train_data = load_training_data(config.data)
    base = measure_scores(model, tokenizer, score_data)
    del model
    print(f"Base model: {_describe(base)}", flush=True)

    runs = []
    finished = output_dir / "runs.jsonl"  # one line per finished run: a long run that is cut short keeps them
    finished.write_text("")
    for seed in config.seeds:
        for method in config.methods:
            run = train_and_score(method, seed, config, train_data, score_data, base)
            print(f"{method.upper()} seed {seed}: {_describe(run)}, {run['train_time_s']:.1f} s", flush=True)
            runs.append(run)
            with open(finished, "a") as f:
                f.write(json.dumps(run) + "\n")

    summary = summarize(config.methods, runs)
    comparison = at_equal_new_task(config.methods, runs, base, config.target_new_task)
    results = {
        "config": config.to_dict(),
        "base": base,
        "runs": runs,
        "summary": summary,
        "equal_new_task": comparison,
        "total_time_s": time.perf_counter() - started,
    }
    files = write_results(output_dir, results) + [finished]
    files.append(plot_training_loss(runs, output_dir / "training_loss.png"))
    if comparison is not None:
        files.append(plot_score_curves(runs, base, output_dir / "score_curves.png"))

    seeds = f"{len(config.seeds)} seeds, mean\u00b1std" if len(config.seeds) > 1 else f"seed {config.seeds[0]}"
    print(f"\n{config.model}, {config.max_steps} steps x batch {config.per_device_train_batch_size} on {config.data} ({seeds})")
    print(format_table(base, summary))
    if comparison is not None:
        print(format_equal_score(comparison))
    print(f"\nTotal time {results['total_time_s']:.0f} s. Wrote " + ", ".join(str(f) for f in files))
    return results


def _describe(scores: dict) -> str:
    return f"new-task {scores['new_task']:.3f}, old-knowledge {scores['old_knowledge']:.3f}, LM loss {scores['lm_loss']:.3f}"
