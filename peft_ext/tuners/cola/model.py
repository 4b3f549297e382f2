from __future__ import annotations

import warnings
from typing import Optional

from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from peft_ext.tuners.base import PeftExtTuner, is_conv1d

from .bnb import ColaLinear4bit, is_bnb_4bit
from .config import ColaConfig
from .layer import ColaChain, ColaLinear, link_seed


class ColaModel(PeftExtTuner, LoraModel):
    """COLA as a PEFT tuner: LoRA's model with `ColaLinear` layers (see `ColaConfig`). Everything LoRA's tuner
    does (targeting, rank/alpha patterns, modules_to_save, several adapters, mixed batches) applies.

    Example:
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_ext.ColaConfig(r=8, chain_length=3, target_modules="all-linear"))
        >>> trainer = SFTTrainer(model, ..., callbacks=[peft_ext.training.ColaChainCallback()])
        >>> peft_ext.export_as_lora(model, "out/lora")  # one rank-3*8 LoRA that plain PEFT loads
    """

    prefix: str = "lora_"
    routes_adapter_names = False  # LoRA's own mixed-batch hooks reach COLA's layers (LoRA layers)

    # ------------------------------------------------------------------------------------------- injection
    def _check_new_adapter_config(self, config) -> None:
        if not isinstance(config, ColaConfig):
            raise TypeError(f"a COLA model takes ColaConfig adapters, got {type(config).__name__}.")
        super()._check_new_adapter_config(config)

    @staticmethod
    def _create_new_module(lora_config: ColaConfig, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        name = kwargs.get("target_name") or type(base).__name__
        if kwargs.pop("parameter_name", None) is not None:
            raise ValueError("COLA wraps modules, not parameters: leave target_parameters unset.")
        if type(base) is nn.Linear:
            if lora_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting it to False.")
                lora_config.fan_in_fan_out = False
            return ColaLinear(target, adapter_name, config=lora_config, **kwargs)
        if is_conv1d(base):
            if not lora_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting it to True.")
                lora_config.fan_in_fan_out = True
            return ColaLinear(target, adapter_name, config=lora_config, is_target_conv_1d_layer=True, **kwargs)
        if is_bnb_4bit(base):  # merged links stay frozen factors: the 4-bit weight is never requantized
            return ColaLinear4bit(target, adapter_name, config=lora_config, **kwargs)
        if "bitsandbytes" in type(base).__module__ or hasattr(getattr(base, "weight", None), "quant_state"):
            raise ValueError(
                f"COLA does not support the quantized layer {name} ({type(base).__name__}): it wraps nn.Linear, "
                f"Conv1D and bitsandbytes 4-bit layers. Load the base model in 4, 16 or 32 bits."
            )
        raise ValueError(
            f"COLA wraps nn.Linear and transformers' Conv1D layers; {name} is {type(base).__name__}. Leave it out of "
            f"target_modules (use exclude_modules) or train it with modules_to_save."
        )

    # ------------------------------------------------------------------------------------------- the chain
    def cola_layers(self, adapter_name: Optional[str] = None):
        """(module name, COLA layer) pairs, restricted to those holding `adapter_name` when given."""
        for name, module in self.model.named_modules():
            if isinstance(module, ColaChain) and (adapter_name is None or adapter_name in module.lora_A):
                yield name, module

    def next_link(self, adapter_name: Optional[str] = None) -> list[nn.Parameter]:
        """Merge the current link of `adapter_name` (default: the active one) into its frozen factors and start the
        next link (A drawn from the config's seed, B = 0). Returns the parameters whose optimizer state must be
        reset (the same Parameter objects as before: an optimizer keeps them, see ColaChainCallback)."""
        adapter_name = adapter_name or self.active_adapters[0]
        config: ColaConfig = self.peft_config[adapter_name]
        if config.current_link + 1 >= config.chain_length:
            raise ValueError(
                f"COLA adapter {adapter_name!r} is on its last link ({config.current_link + 1} of chain_length="
                f"{config.chain_length}): there is no next link."
            )
        if any(layer.merged for _, layer in self.cola_layers(adapter_name)):
            raise ValueError("cannot start the next COLA link while the adapter is merged: call unmerge_adapter() first.")
        link = config.current_link + 1
        params = []
        for name, layer in self.cola_layers(adapter_name):
            params += layer.start_next_link(adapter_name, link_seed(config.seed, link, name))
        config.current_link = link
        return params

    def add_weighted_adapter(self, *args, **kwargs):
        """LoRA's adapter arithmetic combines lora_A / lora_B only and would drop the merged links: refused."""
        raise ValueError(
            "add_weighted_adapter is not supported for COLA adapters (it would ignore their merged links): export each "
            "chain with peft_ext.export_as_lora, load the exported LoRAs into a LoRA model and combine those."
        )

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Reshape the chain to the checkpoint's before it loads: a Trainer resuming mid-chain loads a checkpoint
        whose merged factors hold k links into an adapter built at link 0 (and loading the best checkpoint at the end
        of a run may go back to fewer links). Sets config.current_link = k.

        A checkpoint at link 0 holds no merged factors (they are empty: not parameters, see MergedFactor); files
        written before that hold them as empty tensors, which are dropped here."""
        state_dict = dict(state_dict)
        links = {}
        for name, layer in model.named_modules():
            if not isinstance(layer, ColaChain) or adapter_name not in layer.lora_A:
                continue
            keys = {part: _checkpoint_keys(name, part, adapter_name) for part in ("cola_merged_A", "cola_merged_B", "lora_A")}
            for key in keys["cola_merged_A"] + keys["cola_merged_B"]:
                if key in state_dict and state_dict[key].numel() == 0:
                    del state_dict[key]
            merged = next((state_dict[k] for k in keys["cola_merged_A"] if k in state_dict), None)
            current = next((state_dict[k] for k in keys["lora_A"] if k in state_dict), None)
            if current is None:
                continue  # missing keys: PEFT's load reports them
            for t in (merged, current):
                if t is not None and (t.dim() != 2 or t.shape[1] != layer.in_features):
                    raise ValueError(
                        f"The adapter file's COLA factor for {name.removeprefix('base_model.model.')} has shape "
                        f"{tuple(t.shape)}, but this layer has in_features={layer.in_features}: the adapter was "
                        f"trained on another base model. Load it onto the model it was trained on."
                    )
            merged_rank = 0 if merged is None else merged.shape[0]
            links[name] = layer.resize_for(adapter_name, merged_rank, current.shape[0])
        if len(set(links.values())) > 1:
            raise ValueError(f"the COLA checkpoint's layers are at different links: {sorted(set(links.values()))}.")
        if links:
            config.current_link = next(iter(links.values()))
        # after the reshaping, so that the merged factors (parameters now, where links are merged) are mapped
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _checkpoint_keys(module_name: str, part: str, adapter_name: str) -> list[str]:
    """The keys `<module>.<part>.weight` may have in a checkpoint: without the adapter name (a file) or with it, with
    or without PEFT's "base_model.model." prefix."""
    keys = [f"{module_name}.{part}.weight", f"{module_name}.{part}.{adapter_name}.weight"]
    prefix = "base_model.model."
    return keys + [k.removeprefix(prefix) for k in keys] + [prefix + k for k in keys]


__all__ = ["ColaModel"]
