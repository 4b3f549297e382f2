from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner

from peft_ext.tuners.base import PeftExtTuner

from .config import HftConfig
from .layer import HftLayer
from .selection import draw, find_candidates, is_supported, named_base_modules, quantized_kind
from .state_dict import deltas_from_weights, weights_from_deltas


class HftModel(PeftExtTuner, BaseTuner):
    """Half Fine-Tuning as a PEFT tuner: wraps the selected modules in `HftLayer` (see `HftConfig`).

    Example:
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_ext.HftConfig(ratio=0.5, seed=0))
        >>> model.print_trainable_parameters()  # about half of the block weights
    """

    prefix: str = "hft_"
    tuner_layer_cls = HftLayer
    target_module_mapping: dict = {}  # the default pool is every linear layer in the blocks (selection.py)

    # ------------------------------------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config: HftConfig, model_config: dict) -> HftConfig:
        return peft_config

    def _prepare_model(self, peft_config: HftConfig, model: torch.nn.Module) -> None:
        """Draw the selection (or check a saved one against this model) before any module is wrapped."""
        if peft_config.selected_modules is None:
            candidates = find_candidates(model, peft_config)
            selected = draw(candidates, peft_config.strategy, peft_config.ratio, peft_config.seed + peft_config.stage)
            if not selected:
                raise ValueError(
                    f"HftConfig(ratio={peft_config.ratio}, strategy={peft_config.strategy!r}) selects nothing to "
                    f"train among {len(candidates)} candidate modules (groups too small for that ratio): raise "
                    f"ratio, widen target_modules, or use strategy='param'."
                )
            peft_config.selected_modules = sorted(selected)
        else:
            _check_names_exist(model, peft_config.selected_modules, "selected_modules")
        trained = set(peft_config.trained_modules or ()) | set(peft_config.selected_modules)
        _check_names_exist(model, trained, "trained_modules")
        peft_config.trained_modules = sorted(trained)

    @staticmethod
    def _check_target_module_exists(peft_config: HftConfig, key: str) -> bool:
        return key in (peft_config.trained_modules or ())

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        trainable = current_key in peft_config.selected_modules
        row_fraction = peft_config.ratio if peft_config.strategy == "param" else None
        args = dict(
            trainable=trainable,
            row_fraction=row_fraction,
            seed=peft_config.seed + peft_config.stage,
            name=current_key,
            init_weights=peft_config.init_weights,
        )
        self._add_to_layer(HftLayer, target, adapter_name, parent, target_name, **args)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """fp16 copies become fp32 masters (as PEFT does for adapters): fp16 weights cannot be trained with a
        GradScaler, which is what `Trainer(fp16=True)` uses. bf16 and fp32 copies keep the base weights' dtype, as
        full fine-tuning would (HFT's copies are half the model: upcasting bf16 would double their memory); load
        the model in fp32 for fp32 masters."""
        if not autocast_adapter_dtype:
            return
        for _, layer in self.hft_layers(adapter_name):
            for p in layer.hft_weight[adapter_name].values():
                if p.dtype == torch.float16:
                    p.data = p.data.float()

    # ------------------------------------------------------------------------------------ stages and reset
    def hft_layers(self, adapter_name: Optional[str] = None):
        """(module name, HftLayer) pairs, restricted to those holding `adapter_name` when given."""
        for name, module in self.model.named_modules():
            if isinstance(module, HftLayer) and (adapter_name is None or adapter_name in module.hft_weight):
                yield name, module

    def reselect(self, adapter_name: Optional[str] = None) -> tuple[list, list]:
        """Start a new stage: draw a new selection (seed + stage), keep what earlier stages trained, frozen.

        Returns `(newly_trainable, newly_frozen)` parameter lists, for an optimizer that already exists
        (`peft_ext.training.HftReselectCallback` updates a Trainer's optimizer with them).
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config: HftConfig = self.peft_config[adapter_name]
        if config.strategy in ("explicit", "param"):
            raise ValueError(
                f"HftConfig.strategy={config.strategy!r} has nothing to re-draw: re-selection needs strategy "
                f"'matrix' or 'layer' (or set reselect='never')."
            )
        before = {id(p): p for p in self._trainable_copies(adapter_name)}
        config.stage += 1
        config.selected_modules = None
        self._prepare_model(config, self.model)
        selected = set(config.selected_modules)
        layers = dict(self.hft_layers())
        for key in config.trained_modules:
            if key in layers and adapter_name in layers[key].hft_weight:
                layers[key].set_trainable(adapter_name, key in selected)
            else:  # first selected in this stage: wrap it (or add this adapter to a wrapper of another one)
                parent_name, _, target_name = key.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                self._create_and_replace(config, adapter_name, getattr(parent, target_name), target_name, parent, key)
                self.targeted_module_names.append(key)
                layers = dict(self.hft_layers())
        after = {id(p): p for p in self._trainable_copies(adapter_name)}
        return [p for i, p in after.items() if i not in before], [p for i, p in before.items() if i not in after]

    def _trainable_copies(self, adapter_name: str) -> list[torch.nn.Parameter]:
        return [p for _, m in self.hft_layers(adapter_name) if m.is_trainable(adapter_name) for p in m.hft_weight[adapter_name].values()]

    # ------------------------------------------------------------------------------- saving and loading
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        weights = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.save_format == "full":
            return weights
        return deltas_from_weights(model, weights, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = weights_from_deltas(model, config, state_dict, adapter_name)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _check_names_exist(model: torch.nn.Module, names, field: str) -> None:
    modules = dict(named_base_modules(model))
    missing = sorted(n for n in names if n not in modules)
    if missing:
        raise ValueError(
            f"HftConfig.{field} names modules that {type(model).__name__} does not have: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. This adapter was made for another base model (or architecture): "
            f"load it onto the model it was trained on."
        )
    bad = sorted(f"{n} ({type(modules[n]).__name__})" for n in names if not is_supported(modules[n]) or quantized_kind(modules[n]))
    if bad:
        raise ValueError(
            f"HftConfig.{field} names modules HFT cannot train: {bad[:5]}. HFT trains full-precision nn.Linear, "
            f"Conv1D, nn.Embedding and norm layers."
        )

