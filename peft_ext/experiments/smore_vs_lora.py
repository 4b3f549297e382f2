"""Small-scale reproduction of S'MoRE's claim (design/methods/smore.md, "Small-scale reproduction"): at equal
trainable parameters (router included), steps, learning rate and data, a tree of routed low-rank experts (S'MoRE)
fits a task at least as well as a flat mixture of LoRA experts, which is at least as good as LoRA.

    peft-ext reproduce-smore recipes/smore_vs_lora.yaml [--set steps=40 ...] [--out DIR]
    (or python -m peft_ext.experiments.smore_vs_lora with the same arguments)

Task: arithmetic word problems (peft_ext.data.word_problems), trained with TRL's SFTTrainer on prompt/completion pairs
(loss on the answer only) and scored by exact match of the greedy answer on held-out problems whose numbers never
appear in training (`exact_match`: one teacher-forced forward per batch, which is the same test as greedy decoding).

Methods (`methods:` in the recipe), adapters on the same modules (default: every MLP gate/up/down_proj):
  lora            LoraConfig, rank by the formula: round(S'MoRE 4-4's trainable parameters / sum of in + out)
                  unless `lora_rank` is given; lora_alpha = rank (scale 1, as S'MoRE's default alpha=None)
  flat            S'MoRE with one layer (L = 1), `flat_experts` experts top-`flat_active`, expert_act identity: a flat
                  mixture of LoRA experts with MixLoRA's switch gate and load-balance loss
  smore           S'MoRE `tree_experts` (4-4) top-`tree_active` (2-2), switch gate, expert_act tanh
  smore-identity  the same tree with expert_act identity
  smore-noaux     the `smore` tree without the auxiliary loss (balance_loss_weight 0): the expert load without it
All S'MoRE runs share router_dim, router_down_dim, balance_loss_weight and init. Before training, the trainable
parameter count of every method (SmoreConfig.trainable_parameters per adapted layer; r * (in + out) for LoRA) is
printed and checked against the model's actual count; the runs must lie within `param_tolerance` (2 %) of each other.

Per run: held-out exact match (and per operation), final training loss, the median time of a training step (after
`timing_skip` warm-up steps), the peak memory of training (CUDA: max_memory_allocated above the allocation before
training; CPU: the peak resident set size during training above the RSS before it, with large allocations returned
to the OS on free so that runs in one process do not hide each other's memory), and for S'MoRE runs the expert load
(`model.base_model.smore_stats()`), averaged over the last `load_window` training steps: per S'MoRE layer, each
module's smallest and largest expert share (balanced: 1 / s) and router entropy, averaged over modules. Writes
results.json and results.md (the tables printed at the end) to the output folder.
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from peft_ext.experiments.common import write_run_results
from peft_ext.experiments.recipe_main import recipe_main
from peft_ext.overrides import apply_overrides, config_from_dict, load_yaml
from peft_ext.trainer_defaults import device_defaults

METHODS = ("lora", "flat", "smore", "smore-identity", "smore-noaux")
LABELS = {
    "lora": "LoRA",
    "flat": "flat mixture (S'MoRE L=1, identity)",
    "smore": "S'MoRE tree, tanh",
    "smore-identity": "S'MoRE tree, identity",
    "smore-noaux": "S'MoRE tree, tanh, no aux loss",
}
DATA_DEFAULTS = dict(n_train=400, n_eval=150, seed=0, ops=["add", "sub", "mul"])


@dataclass
class Repro:
    model: str = "smollm2-135m-instruct"
    methods: list = field(default_factory=lambda: ["lora", "flat", "smore", "smore-identity", "smore-noaux"])
    target_modules: str | list = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    # the S'MoRE tree (smore, smore-identity, smore-noaux), bottom layer first
    tree_experts: list = field(default_factory=lambda: [4, 4])
    tree_active: list = field(default_factory=lambda: [2, 2])
    tree_ranks: list = field(default_factory=lambda: [4, 4])
    # the flat mixture (one S'MoRE layer, identity)
    flat_experts: int = 8
    flat_active: int = 2
    flat_rank: int = 4
    # shared by every S'MoRE run
    router_dim: int = 16
    router_down_dim: int = 32
    gate_type: str = "switch"
    init: str = "w_final_zero"
    balance_loss_weight: float = 0.01
    # "inject": each layer backpropagates its load-balance loss itself (what the recorded run used). "add_to_loss"
    # (the tuner's default) gives the same gradient under SFTTrainer: the loss rides on the fused LM head's log_probs
    aux_loss_mode: str = "inject"
    # LoRA: None = by the formula (the tree's count / sum of in + out); alpha None = the rank (scale 1)
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    param_tolerance: float = 0.02
    # training, the same for every run
    steps: int = 50
    batch_size: int = 8
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    max_length: int = 64
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    data: dict = field(default_factory=dict)
    # measurement
    eval_batch_size: int = 50
    score_base: bool = True  # score the untrained model once
    timing_skip: int = 2  # leave the first steps out of the step time
    load_window: int = 10  # average the expert load over the last N training steps
    output_dir: str = "outputs/smore_vs_lora"
    cpu_threads: Optional[int] = None  # torch.set_num_threads on a CPU run

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"smore_vs_lora: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if not self.methods:
            raise ValueError("smore_vs_lora: methods is empty")
        self.data = {**DATA_DEFAULTS, **(self.data or {})}
        unknown = sorted(set(self.data) - set(DATA_DEFAULTS))
        if unknown:
            raise ValueError(f"smore_vs_lora: unknown data key(s) {unknown}; known: {sorted(DATA_DEFAULTS)}")
        if len(set(map(str, self.seeds))) != len(self.seeds) or not self.seeds:
            raise ValueError(f"smore_vs_lora: seeds must be distinct and not empty, got {self.seeds}")

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[list[str]] = None) -> "Repro":
        data = apply_overrides(load_yaml(path), overrides)
        return config_from_dict(cls, data, where=f"{path}: ")


# ----------------------------------------------------------------------------------------------- methods
def smore_config(repro: Repro, method: str):
    """The SmoreConfig of an S'MoRE method (flat, smore, smore-identity, smore-noaux)."""
    from peft_ext.tuners.smore import SmoreConfig

    common = dict(
        target_modules=repro.target_modules, router_dim=repro.router_dim, router_down_dim=repro.router_down_dim,
        gate_type=repro.gate_type, init=repro.init, balance_loss_weight=repro.balance_loss_weight,
        aux_loss_mode=repro.aux_loss_mode, task_type="CAUSAL_LM",
    )  # fmt: skip
    if method == "flat":
        return SmoreConfig(
            num_experts=[repro.flat_experts], num_active=[repro.flat_active], expert_ranks=[repro.flat_rank],
            expert_act="identity", **common,
        )  # fmt: skip
    if method not in ("smore", "smore-identity", "smore-noaux"):
        raise ValueError(f"smore_vs_lora: {method!r} is not an S'MoRE method")
    if method == "smore-noaux":
        # no auxiliary loss: weight 0 (0 * aux adds exactly nothing to the gradient), every other setting as the run
        # with it
        common["balance_loss_weight"] = 0.0
        if common["aux_loss_mode"] == "none":
            common["aux_loss_mode"] = "inject"
    return SmoreConfig(
        num_experts=list(repro.tree_experts), num_active=list(repro.tree_active), expert_ranks=list(repro.tree_ranks),
        expert_act="identity" if method == "smore-identity" else "tanh", **common,
    )  # fmt: skip


def target_shapes(model, target_modules) -> list[tuple[str, int, int]]:
    """(name, in, out) of the linear layers `target_modules` selects (PEFT's own matching)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    class _Config:  # the fields check_target_module_exists reads
        def __init__(self, targets):
            self.target_modules, self.exclude_modules = targets, None
            self.layers_to_transform = self.layers_pattern = None

    config = _Config(target_modules)
    return [
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and check_target_module_exists(config, name)
    ]


def parameter_plan(repro: Repro, shapes: list[tuple[str, int, int]]) -> dict:
    """{method: {"params", "per_shape": {"in->out": per-layer count}, "config": short text}} by the formulas, with
    LoRA's rank chosen by the formula unless given; raises ValueError when two methods differ by more than
    param_tolerance."""
    if not shapes:
        raise ValueError(f"smore_vs_lora: target_modules {repro.target_modules} match no linear layer of the model")
    by_shape: dict[tuple[int, int], int] = {}
    for _, n_in, n_out in shapes:
        by_shape[(n_in, n_out)] = by_shape.get((n_in, n_out), 0) + 1
    tree = smore_config(repro, "smore")
    tree_total = sum(k * tree.trainable_parameters(i, o) for (i, o), k in by_shape.items())
    width = sum(k * (i + o) for (i, o), k in by_shape.items())
    rank = repro.lora_rank or max(1, round(tree_total / width))
    plan = {}
    for method in repro.methods:
        if method == "lora":
            per = {f"{i}->{o}": rank * (i + o) for (i, o) in by_shape}
            text = f"r={rank}, alpha={repro.lora_alpha if repro.lora_alpha is not None else rank}"
        else:
            config = smore_config(repro, method)
            per = {f"{i}->{o}": config.trainable_parameters(i, o) for (i, o) in by_shape}
            text = (
                f"s={config.num_experts}, f={config.num_active}, r={config.expert_ranks}, d_L={config.widths()[-1]}, "
                f"{config.expert_act}, router m={config.router_dim} d_down={config.router_down_dim}"
                + (", no aux" if config.balance_loss_weight == 0 or config.aux_loss_mode == "none"
               else f", aux {config.balance_loss_weight} ({config.aux_loss_mode})")
            )
        total = sum(per[f"{i}->{o}"] * k for (i, o), k in by_shape.items())
        plan[method] = {"params": total, "per_shape": per, "config": text, "lora_rank": rank if method == "lora" else None}
    counts = [p["params"] for p in plan.values()]
    spread = max(counts) / min(counts) - 1
    if spread > repro.param_tolerance + 1e-12:
        detail = ", ".join(f"{m} {p['params']:,}" for m, p in plan.items())
        raise ValueError(
            f"smore_vs_lora: trainable parameters differ by {100 * spread:.2f} % (> {100 * repro.param_tolerance:g} %): "
            f"{detail}. Change tree_ranks, flat_rank, router_dim / router_down_dim or lora_rank."
        )
    return plan


def adapt(model, repro: Repro, method: str, lora_rank: int):
    from peft import LoraConfig, get_peft_model

    if method == "lora":
        alpha = repro.lora_alpha if repro.lora_alpha is not None else lora_rank
        config = LoraConfig(r=lora_rank, lora_alpha=alpha, target_modules=repro.target_modules, task_type="CAUSAL_LM")
    else:
        config = smore_config(repro, method)
    return get_peft_model(model, config), config


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ scoring
def _digit_tokens(tokenizer) -> torch.Tensor:
    """A mask over the vocabulary: tokens whose text (leading spaces dropped) starts with a digit."""
    mask = torch.zeros(len(tokenizer), dtype=torch.bool)
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i]).lstrip(" ")
        mask[i] = bool(text) and text[0].isdigit()
    return mask


def exact_match(model, tokenizer, items: list[dict], batch_size: int = 50) -> list[bool]:
    """Per item: does greedy decoding after `prompt` give exactly the number in `completion`?

    Greedy decoding produces the completion's tokens iff each of them is the argmax given the ones before (teacher
    forcing), and then stops the number iff the next argmax does not start with a digit. So one forward of
    prompt + completion per item answers it: no generation loop, and the same tokens as in training (the prompt's
    tokens must be a prefix of prompt + completion's, which the task's format guarantees; checked)."""
    digits = _digit_tokens(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[bool] = []
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                encoded = []
                for item in chunk:
                    prompt = tokenizer(item["prompt"]).input_ids
                    full = tokenizer(item["prompt"] + item["completion"]).input_ids
                    if full[: len(prompt)] != prompt or len(full) == len(prompt):
                        raise ValueError(
                            f"exact_match: the prompt's tokens are not a prefix of the full text's: {item['prompt']!r}"
                        )
                    encoded.append((len(prompt), full))
                width = max(len(full) for _, full in encoded)
                ids = torch.full((len(encoded), width), pad, dtype=torch.long)
                mask = torch.zeros((len(encoded), width), dtype=torch.long)
                for row, (_, full) in enumerate(encoded):  # right padding: positions are 0.. for every row
                    ids[row, : len(full)] = torch.tensor(full)
                    mask[row, : len(full)] = 1
                pred = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
                for row, (n, full) in enumerate(encoded):
                    answer_ok = pred[row, n - 1 : len(full) - 1].tolist() == full[n:]
                    out.append(bool(answer_ok and not digits[pred[row, len(full) - 1]]))
    finally:
        model.train(was_training)
    return out


def accuracy_by_op(items: list[dict], correct: list[bool]) -> dict:
    result = {"all": sum(correct) / max(1, len(correct))}
    for op in sorted({item["op"] for item in items}):
        picked = [c for c, item in zip(correct, items) if item["op"] == op]
        result[op] = sum(picked) / len(picked)
    return result


# ------------------------------------------------------------------------------------------ measurement
class _RSS:
    """Peak resident memory of this process during a block, above the RSS at its start (Linux; else None)."""

    def __init__(self):
        self.libc = None
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD fixed: large blocks go back to the OS on free
        except OSError:
            self.libc = None

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> Optional[int]:
        import gc

        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
                f.write("5")
        except OSError:
            return None
        self.base = self._status("VmRSS")
        return self.base

    def peak_above_start(self) -> Optional[int]:
        peak = self._status("VmHWM")
        return None if peak is None or getattr(self, "base", None) is None else peak - self.base


def _measure_callback(model, repro: Repro, method: str):
    from transformers import TrainerCallback

    smore = method != "lora"

    class Measure(TrainerCallback):
        def __init__(self):
            self.step_times: list[float] = []
            self.loads: dict[str, list[dict]] = {}  # module -> per S'MoRE layer sums
            self.load_steps = 0
            self.aux: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_times.append(time.perf_counter() - self._t)
            if smore and state.global_step > args.max_steps - repro.load_window:
                stats = model.base_model.smore_stats()
                if stats["aux_loss"] is not None:
                    self.aux.append(float(stats["aux_loss"]))
                for module, per_layer in stats["layers"].items():
                    acc = self.loads.setdefault(module, [None] * len(per_layer))
                    for entry in per_layer:
                        l = entry["layer"]
                        load = entry["load"].float().cpu()
                        ent = float(entry["entropy"]) if entry["entropy"] is not None else float("nan")
                        if acc[l] is None:
                            acc[l] = {"load": load.clone(), "entropy": ent}
                        else:
                            acc[l]["load"] += load
                            acc[l]["entropy"] += ent
                self.load_steps += 1

    return Measure()


def expert_load_summary(loads: dict, steps: int) -> list[dict]:
    """Per S'MoRE layer: experts, the smallest and largest expert share of each module averaged over the modules
    (each module's shares averaged over `steps` first), the balanced share 1/s, the router entropy (mean, nats) and
    its maximum log(s), and how many modules have an expert below 1/(4 s) (the SmoreCallback's starving mark)."""
    if not loads or steps == 0:
        return []
    layers: dict[int, list] = {}
    for per_layer in loads.values():
        for l, entry in enumerate(per_layer):
            if entry is not None:
                layers.setdefault(l, []).append((entry["load"] / steps, entry["entropy"] / steps))
    out = []
    for l in sorted(layers):
        rows = layers[l]
        s = rows[0][0].numel()
        out.append({
            "layer": l, "experts": s, "modules": len(rows), "balanced": 1.0 / s,
            "min_share": statistics.fmean(float(x.min()) for x, _ in rows),
            "max_share": statistics.fmean(float(x.max()) for x, _ in rows),
            "starving_modules": sum(float(x.min()) < 1.0 / (4 * s) for x, _ in rows),
            "entropy": statistics.fmean(e for _, e in rows), "max_entropy": math.log(s),
        })  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- one run
def _training_args(repro: Repro, seed: int, out: str) -> dict:
    return dict(
        output_dir=out, max_steps=repro.steps, per_device_train_batch_size=repro.batch_size,
        learning_rate=repro.learning_rate, lr_scheduler_type=repro.lr_scheduler_type, warmup_steps=repro.warmup_steps,
        weight_decay=0.0, seed=seed, data_seed=seed, save_strategy="no", report_to="none",
        logging_steps=max(1, repro.steps // 10), disable_tqdm=True, dataloader_num_workers=0, max_length=repro.max_length,
        eval_strategy="no", completion_only_loss=True, **device_defaults(),
    )  # fmt: skip


def _trainer_parts(config):
    """(SFTTrainer class, callbacks) with the config's training companions (S'MoRE: SmoreCallback, which logs the
    auxiliary loss and expert load and warns on starving experts), as `peft-ext train` attaches them."""
    from trl import SFTTrainer

    from peft_ext.training.companions import attach_companions

    return attach_companions(SFTTrainer, config)


def run_one(repro: Repro, method: str, seed: int, data: tuple, lora_rank: int, out: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig

    from peft_ext.data import load_model

    train, held_out = data
    base, tokenizer = load_model(repro.model)
    torch.manual_seed(seed)  # the adapter's initialisation
    model, config = adapt(base, repro, method, lora_rank)
    trainer_cls, callbacks = _trainer_parts(config)
    measure = _measure_callback(model, repro, method)
    dataset = Dataset.from_list([{"prompt": x["prompt"], "completion": x["completion"]} for x in train])
    trainer = trainer_cls(
        model=model, args=SFTConfig(**_training_args(repro, seed, out)), train_dataset=dataset,
        processing_class=tokenizer, callbacks=[*callbacks, measure],
    )  # fmt: skip
    cuda = torch.cuda.is_available()
    rss = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem_start = torch.cuda.memory_allocated()
    else:
        rss = _RSS()
        rss.start()
    result = trainer.train()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - mem_start
    else:
        peak = rss.peak_above_start()
    timed = measure.step_times[repro.timing_skip :] or measure.step_times
    correct = exact_match(model, tokenizer, held_out, repro.eval_batch_size)
    row = {
        "accuracy": accuracy_by_op(held_out, correct),
        "train_loss": result.training_loss,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "trainable_params": trainable_parameters(model),
        "step_seconds": statistics.median(timed) if timed else None,
        "peak_memory_bytes": peak,
        "memory_kind": "cuda max_memory_allocated above start" if cuda else "peak RSS above start",
        "loss_history": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
    }
    if method != "lora":
        row["expert_load"] = expert_load_summary(measure.loads, measure.load_steps)
        row["aux_loss_last"] = statistics.fmean(measure.aux) if measure.aux else None
    return row


def score_base(repro: Repro, held_out: list[dict]) -> dict:
    from peft_ext.data import load_model

    model, tokenizer = load_model(repro.model)
    return accuracy_by_op(held_out, exact_match(model, tokenizer, held_out, repro.eval_batch_size))


# ------------------------------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(repro: Repro, plan: dict, results: dict, base: Optional[dict], hardware: str) -> str:
    seeds = [str(s) for s in repro.seeds]
    ops = repro.data["ops"]
    lines = [
        "## S'MoRE vs flat mixture vs LoRA: held-out exact match on arithmetic word problems, higher is better",
        "",
        f"{repro.model}, adapters on {repro.target_modules}; {repro.steps} steps of batch {repro.batch_size}, lr "
        f"{repro.learning_rate} ({repro.lr_scheduler_type}, warm-up {repro.warmup_steps}), {repro.data['n_train']} "
        f"training / {repro.data['n_eval']} held-out problems ({', '.join(ops)}), seeds {repro.seeds}; {hardware}.",
        "",
        f"| method | config | trainable params | vs LoRA | exact match (mean ± std) | per seed | "
        f"{' | '.join(ops)} | final train loss | step time (s) | vs LoRA | peak train memory (MiB) | vs LoRA |",
        "|" + "---|" * (11 + len(ops)),
    ]
    lora = results.get("lora")
    lora_params = plan["lora"]["params"] if "lora" in plan else None

    def per_method_mean(rows, key):
        values = [rows[s][key] for s in seeds if rows[s].get(key) is not None]
        return statistics.fmean(values) if values else None

    lora_step = per_method_mean(lora, "step_seconds") if lora else None
    lora_mem = per_method_mean(lora, "peak_memory_bytes") if lora else None
    if base is not None:
        lines.append(
            f"| base (untrained) | – | 0 | – | {base['all']:.3f} | – | {' | '.join(f'{base[o]:.3f}' for o in ops)} "
            f"| – | – | – | – | – |"
        )
    for method, rows in results.items():
        acc = [rows[s]["accuracy"]["all"] for s in seeds]
        mean, std = _mean_std(acc)
        params = rows[seeds[0]]["trainable_params"]
        step = per_method_mean(rows, "step_seconds")
        mem = per_method_mean(rows, "peak_memory_bytes")
        op_means = {o: statistics.fmean(rows[s]["accuracy"][o] for s in seeds) for o in ops}
        ratio = lambda a, b: f"{a / b:.2f}×" if a is not None and b else "–"  # noqa: E731
        lines.append(
            f"| {LABELS[method]} | {plan[method]['config']} | {params:,} | "
            f"{(f'{100 * (params / lora_params - 1):+.1f} %' if lora_params else '–')} | {mean:.3f} ± {std:.3f} | "
            f"{', '.join(f'{a:.3f}' for a in acc)} | "
            f"{' | '.join(f'{op_means[o]:.3f}' for o in ops)} | "
            f"{statistics.fmean(rows[s]['final_loss'] for s in seeds):.3f} | "
            f"{(f'{step:.2f}' if step is not None else '–')} | {ratio(step, lora_step)} | "
            f"{(f'{mem / 2**20:.0f}' if mem is not None else '–')} | {ratio(mem, lora_mem)} |"
        )
    memory_kind = next(iter(next(iter(results.values())).values()))["memory_kind"]
    lines += [
        "",
        f"Step time: median wall time of a training step (steps {repro.timing_skip + 1}-{repro.steps}), mean over "
        f"seeds. Peak train memory: {memory_kind} of training (model, adapter, gradients, optimizer state, "
        f"activations), mean over seeds. Final train loss: the logged loss of the last {max(1, repro.steps // 10)} "
        "steps, mean over seeds (the language-model loss; an injected load-balance loss is not in it).",
    ]
    load_rows = [(m, rows) for m, rows in results.items() if m != "lora"]
    if load_rows:
        lines += [
            "",
            f"### Expert load (switch gate), last {repro.load_window} training steps, averaged over the adapted modules "
            "and seeds",
            "",
            "| method | aux loss | S'MoRE layer | experts | min share | max share | balanced | modules with a starving "
            "expert (< 1/(4s)) | router entropy / max |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, rows in load_rows:
            per_seed = [rows[s]["expert_load"] for s in seeds]
            aux = [rows[s]["aux_loss_last"] for s in seeds if rows[s].get("aux_loss_last") is not None]
            aux_text = "none" if method == "smore-noaux" else (
                f"{repro.balance_loss_weight} (sum {statistics.fmean(aux):.3f})" if aux else str(repro.balance_loss_weight)
            )
            for i, layer in enumerate(per_seed[0]):
                entries = [p[i] for p in per_seed]
                avg = lambda k: statistics.fmean(e[k] for e in entries)  # noqa: E731
                lines.append(
                    f"| {LABELS[method]} | {aux_text} | {layer['layer']} | {layer['experts']} | {avg('min_share'):.3f} | "
                    f"{avg('max_share'):.3f} | {layer['balanced']:.3f} | "
                    f"{statistics.fmean(e['starving_modules'] for e in entries):.1f} of {layer['modules']} | "
                    f"{avg('entropy'):.3f} / {layer['max_entropy']:.3f} |"
                )
    if lora:
        lines.append("")
        lora_acc = [lora[s]["accuracy"]["all"] for s in seeds]
        for method, rows in results.items():
            if method == "lora":
                continue
            acc = [rows[s]["accuracy"]["all"] for s in seeds]
            wins = sum(a > b for a, b in zip(acc, lora_acc))
            ties = sum(a == b for a, b in zip(acc, lora_acc))
            diff = statistics.fmean(acc) - statistics.fmean(lora_acc)
            lines.append(
                f"- {LABELS[method]} vs LoRA: {diff:+.3f} in the mean; above LoRA in {wins} of {len(acc)} seeds"
                f"{f' ({ties} tied)' if ties else ''}."
            )
    return "\n".join(lines) + "\n"


def hardware_text() -> str:
    import platform

    import peft
    import transformers
    import trl

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} thread(s))"
    return (
        f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"trl {trl.__version__}, Python {platform.python_version()}"
    )


def reproduce(repro: Repro, out_dir: Optional[str] = None, log=print) -> dict:
    from peft_ext.data import load_model
    from peft_ext.data.word_problems import word_problem_splits

    started = time.time()
    out = Path(out_dir or repro.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if repro.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(repro.cpu_threads)
    d = repro.data
    data = word_problem_splits(d["n_train"], d["n_eval"], d["seed"], tuple(d["ops"]))
    plan = parameter_plan(repro, target_shapes(load_model(repro.model)[0], repro.target_modules))
    lora_rank = plan["lora"]["lora_rank"] if "lora" in plan else (repro.lora_rank or 1)
    log("Trainable parameters by the formulas (per adapted layer, by shape in->out; total):")
    for method, p in plan.items():
        per = ", ".join(f"{shape}: {n:,}" for shape, n in p["per_shape"].items())
        log(f"  {method:15s} {p['params']:>12,}   ({per})   {p['config']}")
    base = score_base(repro, data[1]) if repro.score_base else None
    if base is not None:
        log(f"[base] exact match {base['all']:.3f}")
    hardware = hardware_text()
    results: dict = {}
    for method in repro.methods:
        results[method] = {}
        for seed in repro.seeds:
            t0 = time.time()
            row = run_one(repro, method, seed, data, lora_rank, str(out / "runs" / f"{method}-seed{seed}"))
            row["seconds"] = round(time.time() - t0, 1)
            if row["trainable_params"] != plan[method]["params"]:
                raise RuntimeError(
                    f"smore_vs_lora: {method} has {row['trainable_params']:,} trainable parameters, the formula "
                    f"{plan[method]['params']:,}"
                )
            results[method][str(seed)] = row
            log(
                f"[{method} seed {seed}] exact match {row['accuracy']['all']:.3f} (final loss {row['final_loss']:.4f}, "
                f"step {row['step_seconds']:.2f} s, {row['seconds']} s)"
            )
    text = summarize(repro, plan, results, base, hardware)
    write_run_results(out, text, started, log, results, recipe=repro.__dict__, plan=plan, base=base, hardware=hardware)
    return results


def main(argv=None) -> None:
    recipe_main(__doc__, "recipes/smore_vs_lora.yaml", Repro.from_yaml, reproduce, argv)


if __name__ == "__main__":
    main()
