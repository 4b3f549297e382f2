from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from peft_ext.tuners.base import PeftExtTuner, is_linear_like

from .layer import ScaleLayer


class ScaleModel(PeftExtTuner, BaseTuner):
    prefix: str = "scale_"
    tuner_layer_cls = ScaleLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError("ScaleConfig.target_modules is None: give module names or 'all-linear'.")
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not is_linear_like(base):
            raise ValueError(f"Scale wraps nn.Linear and Conv1D layers; {current_key} is {type(base).__name__}.")
        args = dict(init_weights=peft_config.init_weights, seed=peft_config.seed, name=current_key)
        self._add_to_layer(ScaleLayer, target, adapter_name, parent, target_name, **args)
