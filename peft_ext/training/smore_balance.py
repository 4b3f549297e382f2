"""S'MoRE's training driver: the auxiliary loss's accumulation scale, load-balance logging and starving experts."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from transformers import TrainerCallback

from peft_ext.training.companions import find_tuner
from peft_ext.tuners.smore import SmoreConfig, SmoreModel

STARVE_FACTOR = 0.25  # an expert starves below STARVE_FACTOR / s_l of its layer's picks (the spec's 1 / (4 s_l))
_MAX_LISTED = 16  # (module, S'MoRE layer) pairs named in one warning


class SmoreCallback(TrainerCallback):
    """Drives the load-balance loss of the model's S'MoRE adapters (see `peft_ext.SmoreConfig`) and reports it.

    A callback cannot change the loss: the auxiliary loss reaches the gradient through the model itself
    (`aux_loss_mode`). What this callback does:

    - At the start of training and of every optimizer step: sets the weight of the injected auxiliary gradient
      (aux_loss_mode="inject", and "add_to_loss" where the trainer builds its loss from log_probs / logits) to
      1 / gradient_accumulation_steps, as the trainer divides its own loss, times the fp16 loss scale when a
      GradScaler runs (read from accelerate's optimizer wrapper), so that the unscaling leaves it intact (restored
      at the end of training). fp16 without a reachable scaler warns.
    - After every micro-batch: collects the model's `smore_stats()` (the auxiliary loss, each gate's expert load and
      router entropy).
    - At every training log: adds, as means over the logging window,
        `smore/aux_loss`                           the summed auxiliary loss of a forward,
        `smore/router_entropy`                     the routers' entropy (nats), over modules and S'MoRE layers,
        `smore/load_min/l{l}`, `smore/load_max/l{l}`  per S'MoRE layer l, the smallest / largest expert share of a
                                                    module's gate, averaged over the adapted modules,
        `smore/starving_experts`                   how many (module, S'MoRE layer, expert) got a share < 1/(4 s_l),
      and warns (once per module and S'MoRE layer per run) naming each starving expert. The values are added to the
      trainer's `state.log_history` and to the logs seen by the callbacks after this one. The Trainer calls the
      `report_to` integrations (TensorBoard, W&B, ...) before the callbacks given to it; to send the values there too,
      move this callback to the front:
      `trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(SmoreCallback))`.

    A model without S'MoRE adapters is left alone. SmoreConfig declares this callback as its training companion:
    `peft_ext.training.attach_companions(SFTTrainer, config)` attaches it.

        trainer = SFTTrainer(model, args, train_dataset=..., peft_config=SmoreConfig(), callbacks=[SmoreCallback()])
    """

    def __init__(self, starve_factor: float = STARVE_FACTOR):
        self.starve_factor = float(starve_factor)
        self._reset()
        self._scaled: Optional[tuple[SmoreModel, float]] = None

    def _reset(self) -> None:
        self._seen: dict[str, list] = {}  # the stats lists last collected (the layers write a new list per forward)
        self._aux_sum, self._aux_n = 0.0, 0
        self._load: dict[tuple[str, int], list] = {}  # (module:adapter, layer) -> [sum of load vectors, count]
        self._entropy_sum, self._entropy_n = 0.0, 0
        self._warned: set[tuple[str, int]] = set()
        self._warned_fp16 = False

    # ------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._reset()
        tuner = find_smore_model(model)
        if tuner is None:
            return
        run = tuner.smore_run
        self._scaled = (tuner, run.inject_scale, run.inject_scale_set)
        self._set_scale(tuner, args, kwargs.get("optimizer"))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._scaled is not None:
            self._set_scale(self._scaled[0], args, kwargs.get("optimizer"))

    def _set_scale(self, tuner: SmoreModel, args, optimizer) -> None:
        """1 / gradient_accumulation_steps, times the fp16 loss scale when a GradScaler runs (accelerate's optimizer
        wrapper holds it as `.scaler`): the injected aux gradient is then scaled and unscaled like the loss's."""
        scale = 1.0 / max(1, int(args.gradient_accumulation_steps))
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale *= float(scaler.get_scale())
        elif getattr(args, "fp16", False) and not self._warned_fp16:
            self._warned_fp16 = True
            warnings.warn(
                "SmoreCallback: fp16 training without a loss scaler in reach (the trainer's optimizer has no "
                "`.scaler`): where the S'MoRE load-balance loss is injected beside the trainer's loss (log_probs, "
                "logits, aux_loss_mode='inject') its gradient is not loss-scaled, and unscaling shrinks it. Train in "
                "bf16, or with a trainer that adds it to outputs.loss.",
                stacklevel=3,
            )
        tuner.set_aux_inject_scale(scale)

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or not (self._aux_n or self._load or self._entropy_n):
            return  # not a training log (evaluation, the run's summary), or nothing collected since the last one
        values = self._summary(state)
        logs.update(values)
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and last.get("step") == state.global_step and "loss" in last:
            last.update(values)  # Trainer.log appends a copy of `logs` to the history before calling on_log

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._load:
            self._summary(state)  # the window after the last log: warn about starving experts
        if self._scaled is not None:
            tuner, scale, was_set = self._scaled
            tuner.set_aux_inject_scale(scale)
            tuner.smore_run.inject_scale_set = was_set
            self._scaled = None

    # ------------------------------------------------------------------------------------------ helpers
    def _collect(self, model) -> None:
        tuner = find_smore_model(model)
        if tuner is None:
            return
        stats = tuner.smore_stats()
        layers = stats["layers"]
        fresh = {key: per_layer for key, per_layer in layers.items() if self._seen.get(key) is not per_layer}
        if not fresh:
            return  # no training forward with statistics since the last collection
        self._seen = dict(layers)
        if stats["aux_loss"] is not None:
            self._aux_sum += float(stats["aux_loss"])
            self._aux_n += 1
        for key, per_layer in fresh.items():
            for entry in per_layer:
                load, entropy = entry.get("load"), entry.get("entropy")
                if load is not None:  # summed on the device; read once per log (no host sync per micro-batch)
                    load = load.detach().float()
                    slot = self._load.get((key, int(entry["layer"])))
                    if slot is None or slot[0].shape != load.shape:
                        self._load[(key, int(entry["layer"]))] = [load.clone(), 1]
                    else:
                        slot[0] += load
                        slot[1] += 1
                if entropy is not None:
                    self._entropy_sum = self._entropy_sum + entropy.detach().float()
                    self._entropy_n += 1

    def _summary(self, state) -> dict[str, float]:
        """The window's log values; warns about newly starving experts; starts a new window."""
        out: dict[str, float] = {}
        if self._aux_n:
            out["smore/aux_loss"] = self._aux_sum / self._aux_n
        if self._entropy_n:
            out["smore/router_entropy"] = float(self._entropy_sum) / self._entropy_n
        mins: dict[int, list[float]] = {}
        maxs: dict[int, list[float]] = {}
        starving: list[tuple[str, int, int, float, float]] = []
        for (key, layer), (total, count) in sorted(self._load.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            share = (total / count).cpu()
            mins.setdefault(layer, []).append(float(share.min()))
            maxs.setdefault(layer, []).append(float(share.max()))
            threshold = self.starve_factor / share.numel()
            for expert in torch.nonzero(share < threshold).flatten().tolist():
                starving.append((key, layer, expert, float(share[expert]), threshold))
        for layer in sorted(mins):
            out[f"smore/load_min/l{layer}"] = sum(mins[layer]) / len(mins[layer])
            out[f"smore/load_max/l{layer}"] = sum(maxs[layer]) / len(maxs[layer])
        if self._load:
            out["smore/starving_experts"] = float(len(starving))
        groups: dict[tuple[str, int], list] = {}  # (module:adapter, layer) -> [threshold, (expert, share), ...]
        for key, layer, expert, share, threshold in starving:
            if (key, layer) not in self._warned:
                groups.setdefault((key, layer), [threshold]).append((expert, share))
        if groups and getattr(state, "is_world_process_zero", True):  # several processes: rank 0's window speaks
            self._warned.update(groups)
            listed = "; ".join(
                f"{key} S'MoRE layer {layer} (threshold {threshold:.3f}): "
                + ", ".join(f"expert {e} share {share:.3f}" for e, share in experts)
                for (key, layer), (threshold, *experts) in list(groups.items())[:_MAX_LISTED]
            )
            more = f"; and {len(groups) - _MAX_LISTED} more module layers" if len(groups) > _MAX_LISTED else ""
            warnings.warn(
                f"S'MoRE: starving experts up to step {state.global_step} (share of their layer's picks below "
                f"1/(4 s_l) over the last logging window): {listed}{more}. Their weights barely train. Raise "
                f"SmoreConfig.balance_loss_weight, use aux_loss_mode 'add_to_loss' or 'inject' (not 'none'), or "
                f"lower the learning rate.",
                stacklevel=3,
            )
        self._aux_sum, self._aux_n = 0.0, 0
        self._load = {}
        self._entropy_sum, self._entropy_n = 0.0, 0
        return out


def find_smore_model(model) -> Optional[SmoreModel]:
    """The SmoreModel inside `model`: itself, a PeftModel's base_model, or under accelerate / DDP (`.module`) or
    torch.compile (`._orig_mod`) wrappers; None if there is none."""
    return find_tuner(model, lambda module: isinstance(module, SmoreModel))


def _smore_configs(tuner: SmoreModel) -> list[tuple[str, SmoreConfig]]:
    active = tuner.active_adapters
    return [(n, c) for n, c in tuner.peft_config.items() if n in active and isinstance(c, SmoreConfig)]


__all__ = ["SmoreCallback", "find_smore_model"]
