"""FineGates' training driver: the sparsity loss inside the trainer's loss, the gates' optimizer group, logging.

A callback cannot change the loss, so FineGates ships a trainer mixin:

    from trl import SFTTrainer
    from peft_ext.training import FineGatesCallback, with_finegates

    trainer = with_finegates(SFTTrainer)(model=..., args=..., peft_config=FineGatesConfig(target_sparsity=0.3),
                                         callbacks=[FineGatesCallback()], ...)

(`peft_ext.training.attach_companions(SFTTrainer, config)` and `peft-ext train` do the same from the config's
declared companions.)

Objective per optimizer step, as in the official code: the mean over the step's gradient-accumulation micro-batches of
task_loss + lambda(step) * L_s, where L_s = `FineGatesModel.sparsity_loss()` (the mean over gated layers of the
config's per-layer objective) and lambda(step) = `FineGatesConfig.lambda_at(global_step)`.

This module only duck-types the tuner (`sparsity_loss()`, `gate_stats()`, `peft_config`, `active_adapters`) and the
config (`lambda_at()`, `target_sparsity`, `gates_learning_rate`, `sparsity_start_step`): it imports nothing from
`peft_ext.tuners`.
"""

from __future__ import annotations

import logging
import re
import warnings
import weakref
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback

from peft_ext.training.companions import find_tuner

logger = logging.getLogger(__name__)

GATE_LOGIT_PATTERN = re.compile(r"(?:^|\.)gates_(?:row|col)_logits(?:\.|$)")

_FIX = (
    "Give the trainer a model with a FineGates adapter: pass peft_config=FineGatesConfig(...) to a TRL trainer, or "
    "wrap the model first with peft.get_peft_model(model, peft_ext.FineGatesConfig(...)). For other PEFT methods, use "
    "the plain trainer class (not with_finegates / FineGatesTrainerMixin)."
)

# FineGatesModel -> the training record of the FineGatesTrainerMixin driving it (read by FineGatesCallback)
_DRIVEN: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------ finding the tuner
def _is_finegates_tuner(module: Any) -> bool:
    # class attributes only: PeftModel forwards unknown attributes to its base_model through __getattr__
    cls = type(module)
    return callable(getattr(cls, "sparsity_loss", None)) and callable(getattr(cls, "gate_stats", None))


def find_finegates_model(model) -> Optional[nn.Module]:
    """The FineGatesModel inside `model`: itself, a PeftModel's base_model, or under accelerate / DDP / DeepSpeed
    (`.module`) or torch.compile (`._orig_mod`) wrappers; None if there is none."""
    return find_tuner(model, _is_finegates_tuner)


def _active_configs(tuner) -> list:
    """The FineGates configs of the tuner's active adapters (those `sparsity_loss()` covers)."""
    active = getattr(tuner, "active_adapters", None)
    if active is None:
        active = getattr(tuner, "active_adapter", [])
    if isinstance(active, str):
        active = [active]
    configs = getattr(tuner, "peft_config", {})
    return [configs[name] for name in active if name in configs and callable(getattr(configs[name], "lambda_at", None))]


def _config_of(tuner):
    """The FineGates config whose schedule drives training: the first active FineGates adapter's."""
    configs = _active_configs(tuner)
    if not configs:
        raise ValueError(f"The model's FineGates tuner has no active FineGates adapter (active: "
                         f"{getattr(tuner, 'active_adapters', None)!r}). Activate one with model.set_adapter(name).")
    return configs[0]


def is_gate_logit(name: str) -> bool:
    """Whether a parameter name is a FineGates gate logit (`...gates_row_logits.<adapter>` / `gates_col_logits`)."""
    return GATE_LOGIT_PATTERN.search(name) is not None


# ------------------------------------------------------------------------------------------ parameter groups
def finegates_param_groups(
    model: nn.Module, lr: float, gates_lr: Optional[float] = None, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups for a model with FineGates adapters (trainable parameters only):

    - the gate logits (`gates_row_logits`, `gates_col_logits`): learning rate `gates_lr` (None: `lr`), weight decay
      0 (decay would drag the logits to 0, i.e. every gate to 0.5);
    - everything else trainable (the bias delta `gates_bias`, the LoRA `gates_lora_A/B`, modules_to_save heads):
      `lr` and `weight_decay`.

        optimizer = torch.optim.AdamW(finegates_param_groups(model, lr=1e-3, gates_lr=1e-2, weight_decay=0.01))

    Empty groups are left out. Raises ValueError if the model has no trainable gate logits.
    """
    gates, others = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (gates if is_gate_logit(name) else others).append(param)
    if not gates:
        raise ValueError(
            "finegates_param_groups: the model has no trainable FineGates gate logits (parameters named "
            f"'...gates_row_logits.<adapter>' / '...gates_col_logits.<adapter>'). {_FIX}"
        )
    groups = [{"params": gates, "lr": float(lr if gates_lr is None else gates_lr), "weight_decay": 0.0}]
    if others:
        groups.append({"params": others, "lr": float(lr), "weight_decay": float(weight_decay)})
    return groups


# ------------------------------------------------------------------------------------------ trainer mixin
class FineGatesTrainerMixin:
    """Put in front of a `transformers.Trainer` subclass (Trainer, TRL's SFTTrainer, DPOTrainer, ...); best through
    `with_finegates(TrainerCls)` or `attach_companions(TrainerCls, FineGatesConfig(...))`.

    - `compute_loss` returns the trainer's own loss + lambda(step) * L_s in training (model.training; evaluation
      losses stay the task loss), scaled so that per optimizer step the sparsity term counts once: the installed
      Trainer's `training_step` divides the returned loss by the number of accumulation micro-batches unless the loss
      counts as already scaled for gradient accumulation (`loss_is_scaled_for_ga`, or, when that is None, a
      `num_items_in_batch`-normalised loss: `model_accepts_loss_kwargs and num_items_in_batch is not None`, or a
      `compute_loss_func`); in the scaled case the term is divided by the micro-batch count here. lambda(step) =
      `config.lambda_at(state.global_step)`; at lambda = 0 (before `sparsity_start_step`) L_s is not computed.
      The logged `loss` therefore includes lambda * L_s; `FineGatesCallback` logs both parts.
    - `create_optimizer`: the trainer's own optimizer (args.optim and its kwargs), with the gate logits moved to
      their own parameter group: learning rate `config.gates_learning_rate` (None: args.learning_rate), weight decay
      0. An optimizer passed to the trainer (`optimizers=(opt, sched)`) is left untouched.
    - `self.finegates_last`: {"step", "lambda", "sparsity_loss" (detached tensor or None)} of the last training
      micro-batch.

    Raises ValueError at construction (and in compute_loss) when the model holds no FineGates adapter.
    """

    def __init__(self, *args, **kwargs):
        self.finegates_last: dict[str, Any] = {"step": None, "lambda": 0.0, "sparsity_loss": None}
        super().__init__(*args, **kwargs)
        if getattr(self, "model", None) is not None:
            _DRIVEN[self._finegates_tuner(self.model)] = self.finegates_last

    # -------------------------------------------------------------------------------- helpers
    def _finegates_tuner(self, model=None):
        tuner = find_finegates_model(model if model is not None else self.model)
        if tuner is None:
            raise ValueError(
                f"{type(self).__name__} (FineGatesTrainerMixin) adds the FineGates sparsity loss, but the model "
                f"({type(model if model is not None else self.model).__name__}) holds no FineGates adapter. {_FIX}"
            )
        return tuner

    def _finegates_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirrors Trainer.training_step: True where it will NOT divide compute_loss's result by the number of
        gradient-accumulation micro-batches."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5.19 (TRL's DPOTrainer sets False)
        if flag is not None:
            return bool(flag)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def _finegates_micro_batches(self) -> int:
        steps = getattr(self, "current_gradient_accumulation_steps", None)  # fewer on an epoch's short last step
        return max(1, int(steps or self.args.gradient_accumulation_steps))

    # -------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result  # evaluation / prediction: the task loss only
        tuner = self._finegates_tuner(model)
        _DRIVEN[tuner] = self.finegates_last
        step = int(self.state.global_step)
        lam = float(_config_of(tuner).lambda_at(step))
        self.finegates_last["step"], self.finegates_last["lambda"] = step, lam
        if lam == 0.0:
            self.finegates_last["sparsity_loss"] = None
            return result
        sparsity = tuner.sparsity_loss()
        self.finegates_last["sparsity_loss"] = sparsity.detach()
        term = lam * sparsity
        if self._finegates_loss_is_scaled_for_ga(num_items_in_batch):
            term = term / self._finegates_micro_batches()
        if return_outputs:
            loss, outputs = result
            return loss + term.to(loss.device), outputs
        return result + term.to(result.device)

    # -------------------------------------------------------------------------------- optimizer
    def get_decay_parameter_names(self, model) -> list[str]:
        return [n for n in super().get_decay_parameter_names(model) if not is_gate_logit(n)]

    def create_optimizer(self, *args, **kwargs):
        user_optimizer = self.optimizer is not None
        optimizer = super().create_optimizer(*args, **kwargs)
        if not user_optimizer:
            model = args[0] if args else kwargs.get("model")
            self._finegates_split_gate_group(optimizer, self.model if model is None else model)
        return optimizer

    def _finegates_split_gate_group(self, optimizer, model) -> None:
        """Move the gate logits into their own group (gates learning rate, weight decay 0); the group's other
        settings are the optimizer's defaults, i.e. the kwargs it was built with."""
        gates = [p for n, p in model.named_parameters() if p.requires_grad and is_gate_logit(n)]
        if not gates:
            return
        inner = optimizer
        while not hasattr(inner, "add_param_group") and hasattr(inner, "optimizer"):
            inner = inner.optimizer  # SageMaker MP / accelerate wrappers
        groups = getattr(inner, "param_groups", None)
        ids = {id(p) for p in gates}
        placed = sum(1 for g in groups or () for p in g["params"] if id(p) in ids)
        if groups is None or not hasattr(inner, "add_param_group") or placed != len(gates):
            warnings.warn(
                f"FineGates: the optimizer {type(optimizer).__name__} did not take the model's parameters as plain "
                f"parameter groups (GaLore, LOMO, an optimizer factory, ...): the gate logits keep its settings "
                f"instead of FineGatesConfig.gates_learning_rate and weight decay 0 (they are still left out of "
                f"weight decay where the Trainer decides it).",
                stacklevel=3,
            )
            return
        tuner = find_finegates_model(model) or find_finegates_model(self.model)
        gates_lr = getattr(_config_of(tuner), "gates_learning_rate", None) if tuner is not None else None
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        inner.param_groups[:] = [g for g in groups if g["params"]]
        group = {"params": gates}
        if "lr" in inner.defaults:
            group["lr"] = float(self.args.learning_rate if gates_lr is None else gates_lr)
        if "weight_decay" in inner.defaults:
            group["weight_decay"] = 0.0
        inner.add_param_group(group)


_WRAPPED: dict[type, type] = {}


def with_finegates(trainer_cls: type) -> type:
    """`trainer_cls` with `FineGatesTrainerMixin` in front (the same class if it already has it), named
    "FineGates" + its name (e.g. FineGatesSFTTrainer); the same class object on every call.

        trainer = with_finegates(SFTTrainer)(model=..., args=..., peft_config=FineGatesConfig(), ...)
    """
    if not isinstance(trainer_cls, type):
        raise TypeError(f"with_finegates takes a trainer class, got {trainer_cls!r}.")
    if issubclass(trainer_cls, FineGatesTrainerMixin):
        return trainer_cls
    cached = _WRAPPED.get(trainer_cls)
    if cached is not None:
        return cached
    name = "FineGates" + trainer_cls.__name__
    cls = type(name, (FineGatesTrainerMixin, trainer_cls), {"__module__": trainer_cls.__module__, "__qualname__": name})
    _WRAPPED[trainer_cls] = cls
    return cls


# ------------------------------------------------------------------------------------------ callback
class FineGatesCallback(TrainerCallback):
    """Logs FineGates' sparsity and optionally stops training once the target is reached.

    At every training log it adds:
        `finegates/sparsity_loss`       L_s (without lambda): the value that entered the loss at the last training
                                        micro-batch, or, before the start step and without the mixin, L_s evaluated
                                        at log time,
        `finegates/lambda`              the lambda applied at the last micro-batch (0.0 without the mixin),
        `finegates/open_rows`, `finegates/open_cols`   fractions of evaluation gates > 0,
        `finegates/removable_fraction`  gated weight entries removable / all gated weight entries,
    to the logs seen by the callbacks after it and to `state.log_history`. The Trainer calls the `report_to`
    integrations before the callbacks given to it; to send the values there too, move this callback to the front:
    `trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(FineGatesCallback))`.

        `finegates/closed_fraction`     row and column gates exactly 0 / all gates (what target_sparsity aims at),
    stop_at_target=True: after each optimizer step past `sparsity_start_step`, stops training
    (`control.should_training_stop`) once `closed_fraction` >= target - tolerance (reached the band target ±
    tolerance, or overshot it in one step); target: `target` or the config's `target_sparsity`, a fraction of gates
    (the removable fraction of weight entries is larger: about 1 - (1 - s)^2). `stopped_at` records the step.

    Without the FineGatesTrainerMixin (a plain trainer class) the sparsity loss is not in the objective: it warns once
    and names `with_finegates`. A model without FineGates adapters is left alone.
    """

    def __init__(self, stop_at_target: bool = False, tolerance: float = 0.02, target: Optional[float] = None):
        self.stop_at_target = bool(stop_at_target)
        self.tolerance = float(tolerance)
        self.target = None if target is None else float(target)
        self.stopped_at: Optional[int] = None
        self._warned_no_mixin = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.stopped_at = None
        tuner = find_finegates_model(model)
        if tuner is not None and tuner not in _DRIVEN and not self._warned_no_mixin:
            self._warned_no_mixin = True
            warnings.warn(
                "FineGatesCallback: the trainer does not add the FineGates sparsity loss to its loss (no "
                "FineGatesTrainerMixin), so the gates are trained by the task loss alone and will not move toward "
                "target_sparsity. Build the trainer from peft_ext.training.with_finegates(TrainerCls) (or "
                "attach_companions(TrainerCls, config)).",
                stacklevel=3,
            )

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs:
            return  # not a training log (evaluation, the run's summary)
        tuner = find_finegates_model(model)
        if tuner is None:
            return
        values = self._values(tuner)
        logs.update(values)
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and last.get("step") == state.global_step and "loss" in last:
            last.update(values)  # Trainer.log appends a copy of `logs` to the history before calling on_log

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.stop_at_target or self.stopped_at is not None:
            return
        tuner = find_finegates_model(model)
        if tuner is None:
            return
        config = _config_of(tuner)
        if state.global_step <= int(getattr(config, "sparsity_start_step", 0)):
            return  # the sparsity loss has not acted yet
        target = self.target if self.target is not None else float(config.target_sparsity)
        closed = float(tuner.gate_stats()["closed_fraction"])
        if closed >= target - self.tolerance:
            self.stopped_at = int(state.global_step)
            control.should_training_stop = True
            logger.info(
                "FineGatesCallback: closed gate fraction %.4f reached target %.4f +- %.4f at step %d: stopping.",
                closed, target, self.tolerance, state.global_step,
            )

    def _values(self, tuner) -> dict[str, float]:
        record = _DRIVEN.get(tuner)
        sparsity = record.get("sparsity_loss") if record else None
        if sparsity is None:
            with torch.no_grad():
                sparsity = tuner.sparsity_loss()
        stats = tuner.gate_stats()
        return {
            "finegates/sparsity_loss": float(sparsity),
            "finegates/lambda": float(record["lambda"]) if record else 0.0,
            "finegates/open_rows": float(stats["open_rows"]),
            "finegates/open_cols": float(stats["open_cols"]),
            "finegates/removable_fraction": float(stats["removable_fraction"]),
            "finegates/closed_fraction": float(stats["closed_fraction"]),
        }


__all__ = [
    "FineGatesCallback",
    "FineGatesTrainerMixin",
    "find_finegates_model",
    "finegates_param_groups",
    "is_gate_logit",
    "with_finegates",
]
