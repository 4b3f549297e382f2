"""Run a comparison: every method x seed trained by the recipe code (peft_ext.recipe.build_trainer, TRL's SFT or
DPO trainer) under the same budget, then scored, sized and timed; a rerun skips the runs already finished.

Layout of output_dir: runs/<method>/seed<k>/run.json (one finished run; adapter/ beside it), base.json (the base
model's scores), results.json, results.csv, report.md, loss_curves.png, pareto.png.
Under `accelerate launch` / torchrun every process trains (data parallel); the main process scores and writes.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from peft_ext.compare.config import CompareConfig, MethodSpec, check_model
from peft_ext.compare.data import load_data, training_columns, training_format
from peft_ext.compare.measure import PeakMemory, files_bytes, forward_latency_ms, latency_batch, weights_bytes
from peft_ext.compare.scoring import Scorer, check_chat_template, check_fit, check_rows, default_scorer, make_scorer


@dataclass
class Prepared:
    """Everything checked and loaded before the first step of training."""

    trainer: str  # "sft" | "dpo"
    train_format: str
    train: object  # datasets.Dataset
    methods: list[MethodSpec]
    scorer: Scorer
    probes: list[Scorer]


@dataclass
class Inputs:
    """The comparison's data, loaded and checked without the model: (dataset, format) of each set."""

    train: tuple
    eval: tuple
    probes: list  # (name, scorer kind, dataset, format, field)


def load_inputs(config: CompareConfig) -> Inputs:
    """Load every data set and check the model path, the methods, the scorers and the rows they read: the bad input
    that can be found without the model fails here, before the model is loaded."""
    check_model(config.model)
    train = load_data(config.train_data, "train_data")
    config.method_specs(training_format(train[1]))
    eval_set = load_data(config.eval_data, "eval_data")
    check_fit(config.scorer, eval_set[1], "eval_data")
    check_rows(config.scorer, *eval_set, "eval_data")
    probes = []
    for i, probe in enumerate(config.forgetting):
        data, fmt = load_data(probe["data"], f"forgetting[{i}].data")
        kind = probe["scorer"] or default_scorer(fmt)
        check_fit(kind, fmt, f"forgetting[{i}]")
        check_rows(kind, data, fmt, f"forgetting[{i}]")
        probes.append((probe["name"], kind, data, fmt, f"forgetting[{i}]"))
    names = [p[0] for p in probes]
    if len(set(names)) != len(names) or "score" in names:
        raise ValueError(f"compare forgetting: probe names must be unique and not 'score', got {names}: give each "
                         f"probe its own `name:`")
    return Inputs(train, eval_set, probes)


def prepare(config: CompareConfig, tokenizer, inputs: Inputs | None = None) -> Prepared:
    """Load and check the data, the scorers and the methods: every bad input fails here, before any training."""
    inputs = inputs or load_inputs(config)
    train, train_fmt = inputs.train
    trainer = training_format(train_fmt)
    if train_fmt == "messages":
        check_chat_template(tokenizer, "train_data")
    methods = config.method_specs(trainer)
    scorer = make_scorer("score", config.scorer, *inputs.eval, tokenizer, "eval_data",
                         config.eval_max_length, config.max_new_tokens)
    probes = [make_scorer(name, kind, data, fmt, tokenizer, field, config.eval_max_length, config.max_new_tokens)
              for name, kind, data, fmt, field in inputs.probes]
    return Prepared(trainer, train_fmt, training_columns(train, train_fmt), methods, scorer, probes)


def measure_scores(model, prepared: Prepared) -> dict:
    return {"score": prepared.scorer(model), **{p.name: p(model) for p in prepared.probes}}


def file_stamp(spec) -> list:
    """Size and modification time of the local files behind a data spec or model path (an edited file is new data)."""
    path = spec.get("path") if isinstance(spec, dict) else spec
    if not isinstance(path, str) or not os.path.exists(path):
        return []
    files = [Path(path)] if os.path.isfile(path) else sorted(p for p in Path(path).rglob("*") if p.is_file())
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def data_fingerprint(config: CompareConfig) -> list:
    specs = [config.eval_data] + [p["data"] for p in config.forgetting]
    return [config.model, file_stamp(config.model), config.eval_data, config.scorer, config.forgetting,
            [file_stamp(s) for s in specs], config.eval_max_length, config.max_new_tokens]


def planned_precision(config: CompareConfig) -> str:
    """The mixed precision the runs will train in: bf16/fp16 from trainer_args (or peft-ext's device default: bf16 on
    a GPU that has it), else accelerate's ACCELERATE_MIXED_PRECISION (`accelerate launch --mixed_precision`), else
    fp32."""
    from peft_ext.trainer_defaults import device_defaults

    args = {**device_defaults(), **config.trainer_args}
    if args.get("bf16"):
        return "bf16"
    if args.get("fp16"):
        return "fp16"
    env = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    return env if env in ("bf16", "fp16", "fp8") else "fp32"


def launch(config: CompareConfig) -> dict:
    """How the runs are launched: processes (WORLD_SIZE, set by torchrun and accelerate launch), gradient accumulation,
    the global batch (per-device batch x processes x accumulation) and the mixed precision."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "processes": processes,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "global_batch": config.per_device_train_batch_size * processes * config.gradient_accumulation_steps,
        "precision": planned_precision(config),
    }


def run_fingerprint(config: CompareConfig, spec: MethodSpec, seed: int) -> str:
    budget = [config.max_steps, config.per_device_train_batch_size, config.max_length, config.lr_scheduler_type,
              config.warmup_steps, config.trainer_args, launch(config)]
    return config.fingerprint(data_fingerprint(config), config.train_data, file_stamp(config.train_data), budget,
                              spec.peft_type, spec.fields, spec.learning_rate, seed, config.latency, config.latency_batch)


def _reusable(run_dir: Path, fingerprint: str, config: CompareConfig) -> dict | None:
    """The run recorded in run_dir, if it was made under the same fingerprint and has what this config keeps (an
    adapter that save_adapters asks for: a run made with save_adapters=false is trained again to write it)."""
    saved = _read_finished(run_dir / "run.json", fingerprint)
    if saved is None:
        return None
    if config.save_adapters and saved.get("size_kind") == "adapter safetensors" and not (run_dir / "adapter").is_dir():
        return None
    return saved


def _read_finished(path: Path, fingerprint: str) -> dict | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("fingerprint") == fingerprint else None


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # a run cut short never leaves a half-written file that a rerun would trust


def base_scores(config: CompareConfig, prepared: Prepared, model, out: Path, main: bool) -> dict:
    path, fingerprint = out / "base.json", config.fingerprint(data_fingerprint(config))
    saved = _read_finished(path, fingerprint)
    if saved is not None:
        return saved["scores"]
    scores = measure_scores(model, prepared)
    if main:
        _write_json(path, {"fingerprint": fingerprint, "scores": scores})
    return scores


def train_one(config: CompareConfig, prepared: Prepared, spec: MethodSpec, seed: int, base: dict, run_dir: Path) -> dict | None:
    """Train one method with one seed through the recipe code; on the main process score, size and time it.
    Returns the run's record (None on the other processes)."""
    from peft import PeftModel
    from transformers import ProgressCallback

    from peft_ext.recipe import Recipe, build_trainer
    from peft_ext.training.progress import LossProgressBar

    with tempfile.TemporaryDirectory() as scratch:  # TRL's output_dir; nothing is checkpointed there
        trainer_args = {
            **config.trainer_args,
            "max_steps": config.max_steps,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "max_length": config.max_length,
            "learning_rate": spec.learning_rate,
            "lr_scheduler_type": config.lr_scheduler_type,
            "warmup_steps": config.warmup_steps,
            "seed": seed,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "disable_tqdm": False,
        }
        recipe = Recipe(model=config.model, data=str(config.train_data), method=spec.method_dict(seed),
                        trainer=prepared.trainer, trainer_args=trainer_args, output_dir=scratch)
        trainer = build_trainer(recipe, train_dataset=prepared.train)
        if len(trainer.train_dataset) == 0:
            raise ValueError(
                f"train_data: no example keeps a token to learn from after TRL cut it to max_length="
                f"{config.max_length} tokens (the answers are past the cut): raise max_length, or shorten the prompts"
            )
        if trainer.is_fsdp_enabled or getattr(trainer, "is_deepspeed_enabled", False):
            raise ValueError(
                "peft-ext compare runs one process or data-parallel (DDP) processes: it scores, merges and times the "
                "whole model in the main process, which FSDP and DeepSpeed shard. Launch with a DDP config "
                "(recipes/accelerate/ddp.yaml) or torchrun."
            )
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgressBar(f"{spec.name} seed {seed}"))
        memory = PeakMemory()
        with memory:
            start = time.perf_counter()
            trainer.train()
            train_time = time.perf_counter() - start
    main = trainer.is_world_process_zero()
    record = None
    if main:
        # keep_fp32_wrapper=False: a bf16 run's autocast wrapper comes off, so that the trained model, its merged form
        # and the base are all scored and timed the same way (design/platform.md, TRL section)
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        scores = measure_scores(model, prepared)
        processes = trainer.accelerator.num_processes
        precision = str(trainer.accelerator.mixed_precision)
        record = {
            "method": spec.name,
            "peft_type": spec.peft_type,
            "seed": seed,
            "learning_rate": spec.learning_rate,
            **scores,
            **{f"{p.name}_change": scores[p.name] - base[p.name] for p in prepared.probes},
            "steps": trainer.state.global_step,
            "processes": processes,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "global_batch": config.per_device_train_batch_size * processes * config.gradient_accumulation_steps,
            "precision": "fp32" if precision == "no" else precision,
            "hardware": hardware(),
            "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "train_time_s": train_time,
            "peak_memory_mb": memory.peak_bytes / 2**20,
            "memory_kind": memory.kind,
            **trained_params(model),
            **loss_curves(trainer.state.log_history),
        }
        unchanged = unchanged_note(spec, scores, base, trainer.state.global_step)
        if unchanged:
            record["unchanged_from_base"] = unchanged
        record.update(_size_and_latency(config, prepared, model, trainer.processing_class, run_dir, PeftModel))
    trainer.accelerator.wait_for_everyone()
    del trainer
    gc.collect()
    return record


def _size_and_latency(config, prepared, model, tokenizer, run_dir: Path, PeftModel) -> dict:
    out = {"latency_ms_unmerged": None, "latency_ms_merged": None, "merge_note": None}
    if isinstance(model, PeftModel):
        adapter_dir = run_dir / "adapter"
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        model.save_pretrained(adapter_dir)
        out["adapter_mb"] = files_bytes(adapter_dir) / 2**20
        out["size_kind"] = "adapter safetensors"
        if not config.save_adapters:
            shutil.rmtree(adapter_dir)
    else:
        out["adapter_mb"] = weights_bytes(model) / 2**20
        out["size_kind"] = "full model weights"
    if not config.latency:
        return out
    batch = latency_batch(tokenizer, prepared.scorer.texts, config.latency_batch, config.eval_max_length)
    out["latency_ms_unmerged"] = forward_latency_ms(model, batch)
    if not isinstance(model, PeftModel):
        out["merge_note"] = "no adapter"
        return out
    try:
        merged = model.merge_and_unload()
    except (ValueError, RuntimeError, NotImplementedError, TypeError, AttributeError) as error:
        out["merge_note"] = f"cannot merge: {first_sentence(str(error))}"
        return out
    out["latency_ms_merged"] = forward_latency_ms(merged, batch)
    return out


def first_sentence(text: str, limit: int = 300) -> str:
    """The error's first line, cut at a sentence or word end (never mid-word) when longer than `limit`."""
    line = (text.strip().splitlines() or [""])[0].strip()
    if len(line) <= limit:
        return line
    cut = line[:limit]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > limit // 2 else cut[: cut.rfind(" ")].rstrip(",;:") + " ..."


def trained_params(model) -> dict:
    """Parameters the method trained over the run: those with requires_grad at the end, plus the frozen factors of
    links a method merged during the run (COLA's chain keeps each finished link as frozen cola_merged_A/B factors,
    declared by the layer's frozen_peft_weight_names). `trainable_params_now`: requires_grad at the end only."""
    now = sum(p.numel() for p in model.parameters() if p.requires_grad)
    merged = 0
    for module in model.modules():
        for adapter, names in (getattr(module, "frozen_peft_weight_names", None) or {}).items():
            for name in names:
                holder = getattr(module, name, None)
                factor = holder[adapter] if holder is not None and adapter in holder else None
                weight = getattr(factor, "weight", None)
                if isinstance(weight, torch.nn.Parameter) and not weight.requires_grad:
                    merged += weight.numel()
    return {"trainable_params": now + merged, "trainable_params_now": now}


def loss_curves(log_history: list[dict]) -> dict:
    """The training loss per logged step. A method that adds a regulariser to the loss and logs it (FineGates:
    the logged loss is task + lambda * sparsity, with finegates/lambda and finegates/sparsity_loss logged beside it)
    gets its task loss plotted, so that every method's curve is on one scale; the term is kept as its own curve."""
    curve, term = [], []
    for h in log_history:
        if "loss" not in h:
            continue
        extra = float(h.get("finegates/lambda", 0.0)) * float(h.get("finegates/sparsity_loss", 0.0))
        curve.append((h["step"], h["loss"] - extra))
        if "finegates/lambda" in h:
            term.append((h["step"], extra))
    return {"loss_curve": curve, **({"regularizer_curve": term} if term else {})}


def unchanged_note(spec: MethodSpec, scores: dict, base: dict, steps: int) -> str | None:
    """A note when the trained model scores exactly as the base on every measure (the score and each probe): the
    method did not move from its identity at init, so its zero forgetting means nothing was learned."""
    if not all(math.isclose(scores[k], base[k], rel_tol=1e-7, abs_tol=1e-9) for k in scores):
        return None
    if spec.peft_type == "FINEGATES":
        why = (f"FineGates' gates start open (the model is the base bit for bit) and change the output only once a "
               f"gate's logit crosses the closing threshold; in {steps} steps none did. Raise gates_learning_rate "
               f"(default: the method's learning_rate) or max_steps, or give it lora_r > 0")
    else:
        why = (f"its update starts as the identity and did not change the output in {steps} steps: raise the method's "
               f"learning_rate or max_steps")
    return (f"scores exactly as the base on the score and every probe: it did not move from the base, so its "
            f"forgetting of 0 means nothing was learned. {why}.")


def hardware() -> str:
    from peft_ext.compare.report import hardware as describe

    return describe()


def run_compare(config: CompareConfig | None = None) -> dict:
    """Run every method and seed of `config` (default: the built-in comparison); print and write the results."""
    from peft_ext.compare.config import builtin_default
    from peft_ext.compare.plots import plot_loss_curves, plot_pareto
    from peft_ext.compare.report import format_table, report_markdown, summarize, write_results
    from peft_ext.data import load_model
    from peft_ext.quiet import quiet_libraries

    config = config or builtin_default()
    quiet_libraries()
    # transformers 5 renames past_key_values (the multiple-choice scorer's shared question cache): said on every call
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*", category=FutureWarning)
    started = time.perf_counter()
    main = int(os.environ.get("RANK", "0")) == 0  # torchrun and accelerate launch set RANK; the Trainer joins later
    out = Path(config.output_dir)
    log = print if main else (lambda *a, **k: None)

    # the data, the methods and the scorers first: bad input fails before a model is downloaded or loaded
    inputs = load_inputs(config)
    log(f"Loading {config.model} ...", flush=True)
    model, tokenizer = load_model(config.model)
    prepared = prepare(config, tokenizer, inputs)  # what needs the tokenizer: chat templates; before any training
    if torch.cuda.is_available():  # the base is scored where the trained models will be
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    base = base_scores(config, prepared, model, out, main)
    del model
    gc.collect()
    log(f"Base model: {_describe(base, prepared)}", flush=True)

    runs, skipped = [], 0
    for seed in config.seeds:
        for spec in prepared.methods:
            run_dir = out / "runs" / spec.name / f"seed{seed}"
            fingerprint = run_fingerprint(config, spec, seed)
            finished = _reusable(run_dir, fingerprint, config)
            if finished is not None:
                log(f"{spec.name} seed {seed}: finished earlier, skipped ({run_dir / 'run.json'})", flush=True)
                runs.append(finished)
                skipped += 1
                continue
            record = train_one(config, prepared, spec, seed, base, run_dir)
            if record is not None:  # the main process
                record["fingerprint"] = fingerprint
                _write_json(run_dir / "run.json", record)
                log(f"{spec.name} seed {seed}: {_describe(record, prepared)}, {record['train_time_s']:.1f} s", flush=True)
                runs.append(record)
            if main and runs[-1].get("unchanged_from_base"):
                log(f"WARNING: {spec.name} seed {seed} {runs[-1]['unchanged_from_base']}", flush=True)
    if not main:
        return {}
    names = [s.name for s in prepared.methods]
    results = {
        "config": config.to_dict(),
        "trainer": prepared.trainer,
        "base": base,
        "scorer": {"kind": prepared.scorer.kind, "size": prepared.scorer.size,
                   "higher_is_better": prepared.scorer.higher_is_better},
        "probes": {p.name: {"kind": p.kind, "size": p.size, "higher_is_better": p.higher_is_better}
                   for p in prepared.probes},
        "runs": runs,
        "skipped_runs": skipped,
        "launch": launch(config),
        "hardware": hardware(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "summary": summarize(names, runs, [p.name for p in prepared.probes]),
        "total_time_s": time.perf_counter() - started,
    }
    files = write_results(out, results)
    files.append(plot_loss_curves(runs, out / "loss_curves.png"))
    files.append(plot_pareto(results, out / "pareto.png"))
    report = report_markdown(results)
    (out / "report.md").write_text(report)
    files.append(out / "report.md")
    print("\n" + format_table(results))  # its legend repeats any method's unchanged-from-base warning
    print(f"\nTotal time {results['total_time_s']:.0f} s ({skipped} runs skipped as finished). Wrote "
          + ", ".join(str(f) for f in files))
    return results


def compare(config: str | CompareConfig | None = None, overrides: list[str] | None = None) -> dict:
    """The Python form of `peft-ext compare [CONFIG.yaml] [--set KEY=VALUE ...]`."""
    if isinstance(config, CompareConfig):
        config = config.with_overrides(overrides)
    else:
        config = CompareConfig.from_yaml(config, overrides)
    return run_compare(config)


def _describe(scores: dict, prepared: Prepared) -> str:
    """The score and each probe's value."""
    return ", ".join(f"{k} {scores[k]:.3f}" for k in ["score"] + [p.name for p in prepared.probes])
