"""Small-scale reproduction of COLA's claim: at equal rank, steps and learning rate, a chain of LoRAs fits a task that
LoRA under-fits better than LoRA does (design/methods/cola.md); full fine-tuning is the ceiling.

    peft-ext reproduce-cola recipes/cola_vs_lora.yaml [--set steps=100 ...] [--out DIR]
    (or python -m peft_ext.experiments.cola_vs_lora with the same arguments)

Two tasks (`task:` in the recipe):

  teacher (default, minutes on a CPU): a random tiny Llama is the base; the teacher is the same model with a
    full-rank random change of every linear weight of the blocks (relative size `delta`), which a rank-r adapter
    cannot represent. Each method trains the base to match the teacher's logits on random token sequences (MSE);
    the score is the held-out error relative to the untrained base's, `unexplained` = |s - t|^2 / |b - t|^2
    (1.0: nothing learned, 0.0: the teacher reproduced). The mechanism COLA is about (an update of higher rank than
    one LoRA's, built from several) is exactly what this task needs.
  sft: a real model (`model:`, e.g. smollm2-135m-instruct) fine-tuned with TRL's SFTTrainer on a built-in dataset
    (`data:`, e.g. fictional-facts, or codebook-N: a random table of N made-up words and code words to memorise,
    peft_ext.data.codebook, which needs an update of high rank); the score is the final training-set loss (how well
    the method fits the data).

Methods: `lora` (LoraConfig(r, lora_alpha)), `cola` (ColaConfig with the same r and lora_alpha, one run per
`chain_lengths` entry, driven by ColaChainCallback), `fft` (all weights trained, `fft_learning_rate`), and LoRA at
each `reference_ranks` entry (`lora-r<rank>`, lora_alpha scaled to keep alpha/r; e.g. rank M·r, the chain's total
rank). Every run uses the same data order, steps, schedule and (LoRA/COLA) learning rate. Writes results.json and
results.md (mean and spread over the seeds, and whether each COLA beats LoRA in every seed) to the output folder.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, get_peft_model

from peft_ext.experiments.recipe_main import recipe_main
from peft_ext.overrides import apply_overrides, config_from_dict, load_yaml
from peft_ext.trainer_defaults import device_defaults
from peft_ext.training import ColaChainCallback
from peft_ext.tuners.cola import ColaConfig


@dataclass
class Repro:
    task: str = "teacher"
    methods: list = field(default_factory=lambda: ["lora", "cola", "fft"])
    chain_lengths: list = field(default_factory=lambda: [2, 3, 4])
    reference_ranks: list = field(default_factory=list)  # extra LoRA runs at these ranks ("lora-r8"), e.g. M·r
    r: int = 2
    lora_alpha: float = 4
    target_modules: str | list = "all-linear"
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-2
    fft_learning_rate: float = 3e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    output_dir: str = "outputs/cola_vs_lora"
    cpu_threads: Optional[int] = None  # torch.set_num_threads on a CPU run (tiny models run fastest on 1)
    # task "teacher"
    teacher: dict = field(default_factory=dict)
    # task "sft"
    model: str = "smollm2-135m-instruct"
    data: str = "fictional-facts"
    max_length: int = 64

    def __post_init__(self):
        if self.task not in ("teacher", "sft"):
            raise ValueError(f"cola_vs_lora: task must be 'teacher' or 'sft', got {self.task!r}")
        unknown = [m for m in self.methods if m not in ("lora", "cola", "fft")]
        if unknown:
            raise ValueError(f"cola_vs_lora: unknown method(s) {unknown}; choose from lora, cola, fft")
        self.teacher = {**TEACHER_DEFAULTS, **(self.teacher or {})}
        unknown = sorted(set(self.teacher) - set(TEACHER_DEFAULTS))
        if unknown:
            raise ValueError(f"cola_vs_lora: unknown teacher key(s) {unknown}; known: {sorted(TEACHER_DEFAULTS)}")

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[list[str]] = None) -> "Repro":
        data = apply_overrides(load_yaml(path), overrides)
        return config_from_dict(cls, data, where=f"{path}: ")

    def runs(self) -> list[tuple[str, Optional[int]]]:
        out = []
        for method in self.methods:
            if method == "cola":
                out += [(f"cola-M{m}", m) for m in self.chain_lengths]
            else:
                out.append((method, None))
        return out + [(f"lora-r{rank}", None) for rank in self.reference_ranks]


TEACHER_DEFAULTS = dict(
    hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=64, seq=16, delta=0.5, n_train=2048, n_eval=256, seed=1234
)


# ------------------------------------------------------------------------------------------ teacher task
def _tiny_llama(t: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["ffn"], num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"], max_position_embeddings=max(64, t["seq"]),
        tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def teacher_data(t: dict) -> dict:
    """Base and teacher models' logits on random token sequences (train and held-out)."""
    base = _tiny_llama(t, t["seed"]).eval()
    teacher = _tiny_llama(t, t["seed"]).eval()
    g = torch.Generator().manual_seed(t["seed"] + 1)
    with torch.no_grad():
        for name, module in teacher.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):  # a full-rank change of relative Frobenius size `delta`
                noise = torch.randn(module.weight.shape, generator=g)
                module.weight += t["delta"] * module.weight.norm() * noise / noise.norm()
    ids = torch.randint(0, t["vocab"], (t["n_train"] + t["n_eval"], t["seq"]), generator=g)
    with torch.no_grad():
        target = torch.cat([teacher(input_ids=chunk).logits for chunk in ids.split(256)])
        start = torch.cat([base(input_ids=chunk).logits for chunk in ids.split(256)])
    n = t["n_train"]
    scale = (start[:n] - target[:n]).pow(2).mean().item()  # the loss of the untrained base: 1.0 after scaling
    return {"ids": ids, "target": target, "start": start, "n_train": n, "scale": scale}


class _LogitsDataset(torch.utils.data.Dataset):
    def __init__(self, ids, target):
        self.ids, self.target = ids, target

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.target[i]}


def _mse_loss(scale: float):
    def loss(outputs, labels, num_items_in_batch=None):
        return (outputs.logits.float() - labels).pow(2).mean() / scale

    return loss


def _unexplained(model, data: dict) -> float:
    n = data["n_train"]
    ids, target, start = data["ids"][n:], data["target"][n:], data["start"][n:]
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        out = torch.cat([model(input_ids=c.to(device)).logits.float().cpu() for c in ids.split(128)])
    return ((out - target).pow(2).sum() / (start - target).pow(2).sum()).item()


# ----------------------------------------------------------------------------------------------- methods
def _adapt(model, repro: Repro, chain_length: Optional[int], run: str):
    """(model to train, callbacks) for one run: lora, lora-r<rank> (alpha/r kept), cola-M<m>, fft."""
    method = run.split("-")[0]
    if method == "fft":
        return model.requires_grad_(True), []
    r, alpha = repro.r, repro.lora_alpha
    if run.startswith("lora-r"):  # a reference rank: the same alpha/r, so the same scale of the update
        r = int(run[len("lora-r") :])
        alpha = repro.lora_alpha * r / repro.r
    common = dict(r=r, lora_alpha=alpha, target_modules=repro.target_modules, task_type="CAUSAL_LM")
    if method == "lora":
        return get_peft_model(model, LoraConfig(**common)), []
    return get_peft_model(model, ColaConfig(**common, chain_length=chain_length)), [ColaChainCallback()]


def _training_args(repro: Repro, method: str, seed: int, out: str, **extra):
    from transformers import TrainingArguments

    return dict(
        output_dir=out, max_steps=repro.steps, per_device_train_batch_size=repro.batch_size,
        learning_rate=repro.fft_learning_rate if method == "fft" else repro.learning_rate,
        lr_scheduler_type=repro.lr_scheduler_type, warmup_steps=repro.warmup_steps, weight_decay=0.0, seed=seed,
        data_seed=seed, save_strategy="no", report_to="none", logging_steps=max(1, repro.steps // 10),
        disable_tqdm=True, dataloader_num_workers=0, **{**device_defaults(), **extra},
    ), TrainingArguments  # fmt: skip


def run_teacher(repro: Repro, run: str, chain_length: Optional[int], seed: int, data: dict, out: str) -> dict:
    from transformers import Trainer

    method = run.split("-")[0]
    torch.manual_seed(seed)  # the adapters' init
    model, callbacks = _adapt(_tiny_llama(repro.teacher, repro.teacher["seed"]), repro, chain_length, run)
    kwargs, args_cls = _training_args(repro, method, seed, out)
    n = data["n_train"]
    trainer = Trainer(
        model=model, args=args_cls(**kwargs), train_dataset=_LogitsDataset(data["ids"][:n], data["target"][:n]),
        compute_loss_func=_mse_loss(data["scale"]), callbacks=callbacks,
    )  # fmt: skip
    result = trainer.train()
    return {"score": _unexplained(model, data), "train_loss": result.training_loss}


def training_data(name: str):
    """`codebook-N` (N made-up words and their code words, peft_ext.data.codebook), else a built-in dataset or file."""
    from datasets import Dataset

    from peft_ext.data import load_training_data
    from peft_ext.data.codebook import codebook_qa

    if name.startswith("codebook-"):
        try:
            n = int(name.split("-", 1)[1])
        except ValueError:
            raise ValueError(f"cola_vs_lora: data {name!r}: write codebook-N with N the number of pairs") from None
        return Dataset.from_list(codebook_qa(n))
    return load_training_data(name)


def run_sft(repro: Repro, run: str, chain_length: Optional[int], seed: int, out: str) -> dict:
    from trl import SFTConfig, SFTTrainer

    from peft_ext.data import load_model

    method = run.split("-")[0]
    model, tokenizer = load_model(repro.model)
    torch.manual_seed(seed)
    model, callbacks = _adapt(model, repro, chain_length, run)
    kwargs, _ = _training_args(repro, method, seed, out, max_length=repro.max_length, eval_strategy="no")
    data = training_data(repro.data)
    trainer = SFTTrainer(
        model=model, args=SFTConfig(**kwargs), train_dataset=data, eval_dataset=data, processing_class=tokenizer,
        callbacks=callbacks,
    )  # fmt: skip
    result = trainer.train()
    return {"score": trainer.evaluate()["eval_loss"], "train_loss": result.training_loss}


# ------------------------------------------------------------------------------------------------- report
def summarize(repro: Repro, results: dict) -> str:
    metric = "held-out unexplained fraction of the teacher's change" if repro.task == "teacher" else "final training-set loss"
    lines = [
        f"## COLA vs LoRA ({repro.task} task): {metric}, lower is better",
        "",
        f"r={repro.r}, lora_alpha={repro.lora_alpha}, {repro.steps} steps of batch {repro.batch_size}, LoRA/COLA "
        f"lr {repro.learning_rate}, FFT lr {repro.fft_learning_rate}, {repro.lr_scheduler_type} schedule, seeds "
        f"{repro.seeds}.",
        "",
        "| method | mean | min | max | per seed |",
        "|---|---|---|---|---|",
    ]
    for run, scores in results.items():
        values = [scores[str(s)]["score"] for s in repro.seeds]
        lines.append(
            f"| {run} | {statistics.fmean(values):.4f} | {min(values):.4f} | {max(values):.4f} | "
            f"{', '.join(f'{v:.4f}' for v in values)} |"
        )
    if "lora" in results:
        lines.append("")
        lora = [results["lora"][str(s)]["score"] for s in repro.seeds]
        for run, scores in results.items():
            if not run.startswith("cola"):
                continue
            values = [scores[str(s)]["score"] for s in repro.seeds]
            wins = sum(v < w for v, w in zip(values, lora))
            lines.append(
                f"- {run} vs LoRA: below LoRA in {wins} of {len(values)} seeds; mean {statistics.fmean(values):.4f} vs "
                f"{statistics.fmean(lora):.4f} ({'COLA better' if statistics.fmean(values) < statistics.fmean(lora) else 'COLA NOT better'})."
            )
    return "\n".join(lines) + "\n"


def reproduce(repro: Repro, out_dir: Optional[str] = None, log=print) -> dict:
    out = Path(out_dir or repro.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if repro.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(repro.cpu_threads)
    data = teacher_data(repro.teacher) if repro.task == "teacher" else None
    results: dict = {}
    for run, chain_length in repro.runs():
        results[run] = {}
        for seed in repro.seeds:
            start = time.time()
            work = str(out / "runs" / f"{run}-seed{seed}")
            if repro.task == "teacher":
                row = run_teacher(repro, run, chain_length, seed, data, work)
            else:
                row = run_sft(repro, run, chain_length, seed, work)
            row["seconds"] = round(time.time() - start, 1)
            results[run][str(seed)] = row
            log(f"[{run} seed {seed}] score {row['score']:.4f} (train loss {row['train_loss']:.4f}, {row['seconds']} s)")
            if not math.isfinite(row["score"]):
                log(f"[{run} seed {seed}] WARNING: the score is not finite")
    text = summarize(repro, results)
    (out / "results.json").write_text(json.dumps({"recipe": repro.__dict__, "results": results}, indent=2, default=str))
    (out / "results.md").write_text(text)
    log(text)
    return results


def main(argv=None) -> None:
    recipe_main(__doc__, "recipes/cola_vs_lora.yaml", Repro.from_yaml, reproduce, argv)


if __name__ == "__main__":
    main()
