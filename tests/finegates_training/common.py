"""Shared pieces of the FineGates training-driver tests: tiny Llama, training arguments, TRL rows, the spec's sparsity
loss written out by hand."""

from __future__ import annotations

import math
import re

import torch
from peft import get_peft_model
from transformers import TrainerCallback, TrainingArguments

from peft_ext import FineGatesConfig
from peft_ext.testing.models import MODELS

COMMON = dict(
    use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no", logging_steps=1, weight_decay=0.0,
    dataloader_num_workers=0, seed=0, disable_tqdm=True, max_grad_norm=0.0, lr_scheduler_type="constant",
)
SFT_ROWS = [
    {"prompt": "what is 2 plus 3?", "completion": " 5."},
    {"prompt": "what is 1 plus 1?", "completion": " 2."},
    {"prompt": "sort c a b:", "completion": " a b c."},
    {"prompt": "say hi:", "completion": " hi."},
]
DPO_ROWS = [
    {"prompt": "2 plus 3 is", "chosen": " 5.", "rejected": " 7."},
    {"prompt": "1 plus 1 is", "chosen": " 2.", "rejected": " 3."},
    {"prompt": "4 plus 4 is", "chosen": " 8.", "rejected": " 9."},
    {"prompt": "0 plus 6 is", "chosen": " 6.", "rejected": " 1."},
]
LOG_KEYS = ("finegates/sparsity_loss", "finegates/lambda", "finegates/open_rows", "finegates/open_cols",
            "finegates/removable_fraction", "finegates/closed_fraction")


def training_args(tmp_path, cls=TrainingArguments, **overrides):
    args = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-1)
    return cls(**{**args, **COMMON, **overrides})


def finegates_model(kind: str = "llama", **config):
    return get_peft_model(MODELS[kind].make(0), FineGatesConfig(**{"seed": 0, **config}))


def gate_logits(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if re.search(r"gates_(row|col)_logits", n)}


def hand_sparsity_loss(model, target_sparsity: float, sigma: float = 0.5) -> torch.Tensor:
    """The spec's "target" objective, written out: per gated layer (|mean_i p_r,i - k| + |mean_j p_c,j - k|) / 2 with
    p = Phi((tanh(theta) + 0.5) / sigma), k = 1 - target; the mean over layers."""
    k = 1.0 - target_sparsity
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in gate_logits(model).items():
        prefix, side = re.match(r"(.*)\.gates_(row|col)_logits\.", name).groups()
        layers.setdefault(prefix, {})[side] = p
    per_layer = []
    for sides in layers.values():
        keep = {s: 0.5 * (1 + torch.erf((torch.tanh(t) + 0.5) / (sigma * math.sqrt(2)))) for s, t in sides.items()}
        means = [keep["row"].mean(), keep["col"].mean()]
        per_layer.append(0.5 * ((means[0] - k).abs() + (means[1] - k).abs()))
    return torch.stack(per_layer).mean()


class GradsBeforeStep(TrainerCallback):
    """The accumulated gradients of the gate logits just before each optimizer step (no clipping: max_grad_norm=0)."""

    def __init__(self):
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads[state.global_step + 1] = {
            n: p.grad.detach().clone() for n, p in gate_logits(model).items() if p.grad is not None
        }


class AfterStep(TrainerCallback):
    """Copies of the gate logits after each optimizer step (step 0: before training)."""

    def __init__(self):
        self.values: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.values[0] = {n: p.detach().clone() for n, p in gate_logits(model).items()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.values[state.global_step] = {n: p.detach().clone() for n, p in gate_logits(model).items()}


def step_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h and "step" in h and "train_runtime" not in h]
