"""HFT's continual-learning schedule: a new random half is trained at each stage (or epoch)."""

from __future__ import annotations

from transformers import TrainerCallback

from peft_ext.tuners.hft import HftConfig, HftModel

from .optimizer_params import swap_optimizer_params


class HftReselectCallback(TrainerCallback):
    """Re-draws the selection of every HFT adapter of the model, as its config's `reselect` says.

    - reselect="stage": at the start of each `trainer.train()` whose adapter already finished a run (continual
      learning: one run per task; the paper's setting). Works across processes: the count of finished runs is
      saved in adapter_config.json (`trained_stages`).
    - reselect="epoch": at the start of every epoch after the first.
    - reselect="never": nothing.
    What earlier stages trained stays in the model (frozen); the optimizer drops the old half and takes the new.

        trainer = SFTTrainer(model, ..., peft_config=HftConfig(), callbacks=[HftReselectCallback()])
    """

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        for tuner, name, config in _hft_adapters(model):
            if config.reselect == "stage" and config.trained_stages > config.stage:
                _reselect(tuner, name, optimizer, lr_scheduler)

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if state.epoch is None or int(round(state.epoch)) == 0:
            return
        for tuner, name, config in _hft_adapters(model):
            if config.reselect == "epoch":
                _reselect(tuner, name, optimizer, lr_scheduler)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for _, _, config in _hft_adapters(model):
            config.trained_stages += 1


def _hft_adapters(model):
    """(tuner, adapter name, config) for every active HFT adapter of a PeftModel (or tuner) `model`."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, HftModel):
        return []
    return [(tuner, n, tuner.peft_config[n]) for n in tuner.active_adapters if isinstance(tuner.peft_config.get(n), HftConfig)]


def _reselect(tuner, name, optimizer, lr_scheduler):
    added, removed = tuner.reselect(name)
    if optimizer is not None:
        swap_optimizer_params(optimizer, added, removed, lr_scheduler)
