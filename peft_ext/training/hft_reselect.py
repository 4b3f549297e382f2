"""HFT's continual-learning schedule: a new random half is trained at each stage (or epoch)."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

from peft_ext.tuners.hft import HftConfig, HftModel

from .optimizer_params import editable, swap_optimizer_params

_ADAPTER_CONFIG = "adapter_config.json"


class HftReselectCallback(TrainerCallback):
    """Re-draws the selection of every HFT adapter of the model, as its config's `reselect` says.

    - reselect="stage": at the start of each `trainer.train()` whose adapter already finished a run (continual
      learning: one run per task; the paper's setting). Works across processes: the count of finished runs is
      saved in adapter_config.json (`trained_stages`).
    - reselect="epoch": at the start of every epoch after the first (not again when a run resumes mid-epoch).
    - reselect="never": nothing.
    What earlier stages trained stays in the model (frozen); the optimizer drops the old half and takes the new, in
    the Trainer's own groups (weight decay, then none for norms and biases: `swap_optimizer_params`).

    Resuming: pass the callback to the Trainer (`callbacks=[...]`), then `trainer.train(resume_from_checkpoint=...)`
    continues a run after any number of stages exactly, in a new model built from the same HftConfig: when the
    Trainer loads the checkpoint, the adapter is first brought to the checkpoint's stage (`HftModel.load_selection`,
    from its adapter_config.json), and the optimizer checkpoint matches the one the Trainer builds for it.

    A re-selection needs the optimizer the Trainer passes to the callback's events; without one, or with one whose
    parameters cannot change (DeepSpeed's), it raises a ValueError that gives the fix, before anything is re-drawn.

        trainer = SFTTrainer(model, ..., peft_config=HftConfig(), callbacks=[HftReselectCallback()])
    """

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _restore_stage_on_load(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        for tuner, name, config in _hft_adapters(model):
            if config.reselect == "stage" and config.trained_stages > config.stage:
                _reselect(model, tuner, name, optimizer, lr_scheduler, "at the start of a new trainer.train()")

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if state.epoch is None or int(round(state.epoch)) == 0 or abs(state.epoch - round(state.epoch)) > 1e-6:
            return  # the first epoch, or a run resumed mid-epoch (the checkpoint holds this epoch's selection)
        for tuner, name, config in _hft_adapters(model):
            if config.reselect == "epoch":
                _reselect(model, tuner, name, optimizer, lr_scheduler, f"at the start of epoch {int(round(state.epoch))}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for _, _, config in _hft_adapters(model):
            config.trained_stages += 1


def _hft_adapters(model):
    """(tuner, adapter name, config) for every active HFT adapter of a PeftModel (or tuner) `model`."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, HftModel):
        return []
    return [(tuner, n, tuner.peft_config[n]) for n in tuner.active_adapters if isinstance(tuner.peft_config.get(n), HftConfig)]


def _reselect(model, tuner, name, optimizer, lr_scheduler, when):
    if optimizer is None:
        raise ValueError(
            f"HftReselectCallback: HFT adapter {name!r} is due for a new selection {when}, but the callback got no "
            f"optimizer to hand the new half to, which would never be trained. Use the callback in a Trainer (it "
            f"passes optimizer= and lr_scheduler= to every event), or re-draw yourself and update your optimizer: "
            f"`added, removed = model.base_model.reselect({name!r}); peft_ext.training.swap_optimizer_params("
            f"optimizer, added, removed, lr_scheduler, model=model)`. Nothing was re-drawn."
        )
    if not editable(optimizer):
        raise ValueError(
            f"HftReselectCallback: HFT adapter {name!r} is due for a new selection {when}, but the callback cannot add "
            f"the new half's parameters to {type(optimizer).__name__} (not a torch optimizer it can edit, e.g. "
            f"DeepSpeed's, which keeps its own copies of the parameters it was built with), so they would never be "
            f"trained. Use reselect='stage' and draw each stage before its trainer builds the optimizer: "
            f"`model.base_model.reselect({name!r})`, then a new Trainer for the next task (the callback sees the "
            f"stage already drawn). Nothing was re-drawn."
        )
    added, removed = tuner.reselect(name)
    swap_optimizer_params(optimizer, added, removed, lr_scheduler, model=model)


def _restore_stage_on_load(model) -> None:
    """Make `model.load_adapter(folder, name)` (what a Trainer calls to resume from a checkpoint) first bring an
    existing HFT adapter to the stage saved in the folder's adapter_config.json, so that its weights load."""
    if not isinstance(getattr(model, "base_model", None), HftModel) or "load_adapter" in vars(model):
        return
    model.load_adapter = _LoadAdapterAtSavedStage(model)


class _LoadAdapterAtSavedStage:
    """`load_adapter` of one PeftModel (an instance attribute in front of PeftModel.load_adapter; an object rather than
    a bound method, so that the model still deep-copies and pickles)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, model_id, adapter_name, is_trainable=False, *args, **kwargs):
        model = self.model
        config = model.peft_config.get(adapter_name)
        subfolder = kwargs.get("subfolder")
        folder = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
        config_file = os.path.join(folder, _ADAPTER_CONFIG)
        if isinstance(config, HftConfig) and os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                peft_type = json.load(f).get("peft_type")
            if peft_type == "HFT":
                saved = HftConfig.from_pretrained(str(model_id), subfolder=subfolder)
                tuner = model.base_model
                copies = [p for _, m in tuner.hft_layers(adapter_name) for p in m.hft_weight[adapter_name].values()]
                trainable = is_trainable or any(p.requires_grad for p in copies)
                tuner.load_selection(adapter_name, saved, trainable=trainable)
        return type(model).load_adapter(model, model_id, adapter_name, is_trainable, *args, **kwargs)
