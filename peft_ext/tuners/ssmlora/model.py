from __future__ import annotations

import copy
import re
from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils.error import NoMatchingPeftModuleError
import torch
from torch import nn

from peft_ext.tuners.base import PeftExtTuner, is_linear_like

from .config import SsmLoraConfig
from .layer import SsmLoraLayer, SsmRun, merge_error

# the first number in a module's name is its block's index: q_proj in even blocks, v_proj in odd ones
_INSERTION_REGEX = {
    "alternate_qv": r"(?:.*?\.)?\d*[02468]\.(?:.*\.)?q_proj|(?:.*?\.)?\d*[13579]\.(?:.*\.)?v_proj",
    "all": r"(?:.*\.)?(?:q_proj|v_proj)",
}


class SsmLoraModel(PeftExtTuner, BaseTuner):
    """SSMLoRA as a PEFT tuner: each adapted linear layer becomes an `SsmLoraLayer` (see `SsmLoraConfig`); the
    wrapped model's forward hooks start every chain's state from zero and let each layer hand its state to the next
    module of its chain.

    Example:
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_ext.SsmLoraConfig(r=8, insertion="alternate_qv"))
    """

    prefix: str = "ssmlora_"
    tuner_layer_cls = SsmLoraLayer
    target_module_mapping: dict = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, **kwargs) -> None:
        self.ssmlora_run = SsmRun()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        self._ssmlora_hooks = []
        for module in _entry_modules(self.model):  # the model, and the parts a trainer or generate() calls directly
            self._ssmlora_hooks += [
                module.register_forward_pre_hook(self._ssmlora_pre_forward),
                module.register_forward_hook(self._ssmlora_post_forward, always_call=True),
            ]
        self.register_load_state_dict_post_hook(_check_loaded_layout)

    # ------------------------------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: SsmLoraConfig, model_config: dict) -> SsmLoraConfig:
        return peft_config  # target_modules None: the insertion pattern decides (_check_target_module_exists)

    @staticmethod
    def _check_target_module_exists(peft_config: SsmLoraConfig, key: str):
        # PEFT's result as is (an excluded module is an _ExcludedModule, falsy: PEFT counts the exclusions)
        if peft_config.insertion is None:
            return check_target_module_exists(peft_config, key)
        config = copy.copy(peft_config)
        config.target_modules = _INSERTION_REGEX[peft_config.insertion]
        found = check_target_module_exists(config, key)
        if not found or peft_config.layers_to_transform is None:
            return found
        config.target_modules = [key.rsplit(".", 1)[-1]]  # a list target: PEFT applies layers_to_transform / pattern
        return check_target_module_exists(config, key)

    def _check_new_adapter_config(self, config) -> None:
        if not isinstance(config, SsmLoraConfig):
            raise TypeError(f"an SSMLoRA model takes SsmLoraConfig adapters, got {type(config).__name__}.")
        super()._check_new_adapter_config(config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # a copy: chain_layout is filled in below, and the caller's config object may serve another model
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(
                f"SSMLoRA does not support encoder-decoder models ({type(model).__name__}) yet: its chains hand a per-"
                f"token state from module to module, and the encoder's, the decoder's and the cross-attention's tokens "
                f"are different sequences. Use it on decoder-only or encoder-only models, or use LoRA here."
            )
        config: SsmLoraConfig = copy.copy(self.peft_config[adapter_name])
        self.peft_config[adapter_name] = config
        stored = config.chain_layout
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as err:
            if config.insertion is None:
                raise
            raise ValueError(
                f"SsmLoraConfig(insertion={config.insertion!r}) matches no module of {type(model).__name__}: it "
                f"adapts q_proj / v_proj inside numbered blocks. Give target_modules (module names, a regex or "
                f"'all-linear') for this architecture."
            ) from err
        layout = chain_layout(model, adapter_name)
        for chain in layout:
            ranks = {model.get_submodule(n).rank(adapter_name) for n in chain}
            if len(ranks) > 1:
                raise ValueError(
                    f"SSMLoRA chain {chain[0]} ... {chain[-1]} mixes ranks {sorted(ranks)}: a state is handed from module "
                    f"to module, so every module of a chain needs one rank. Make rank_pattern give the chain's modules "
                    f"one rank (with insertion='alternate_qv', q_proj and v_proj form one chain), or link fewer modules "
                    f"(chain='per_type' with insertion='all' or target_modules: one chain per module type)."
                )
        if stored is not None and [list(c) for c in stored] != layout:
            raise ValueError(
                f"this SSMLoRA adapter was trained with the chains {_describe(stored)}, but on "
                f"{type(model).__name__} its modules form {_describe(layout)}: the adapter comes from another base or "
                f"another chain layout (insertion / target_modules / chain). Load it onto the model it was trained on, "
                f"with its own adapter_config.json."
            )
        for chain in layout:  # the first module's state is always zero: its C would multiply zero, never train
            head = model.get_submodule(chain[0])
            if adapter_name in head.ssmlora_C:
                del head.ssmlora_C[adapter_name]
        config.chain_layout = layout

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not (is_linear_like(base) or "bitsandbytes" in type(base).__module__):
            raise ValueError(
                f"SSMLoRA wraps linear layers (nn.Linear, transformers' Conv1D, bitsandbytes 4/8-bit); {current_key} is "
                f"a {type(base).__name__}. Leave it out of target_modules (use exclude_modules)."
            )
        rank = _rank_for(peft_config, current_key)
        new = self._add_to_layer(
            SsmLoraLayer, target, adapter_name, parent, target_name, r=rank, config=peft_config,
            chain_key=_chain_key(peft_config, current_key), name=current_key,
        )  # fmt: skip
        new.ssmlora_run = self.ssmlora_run

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if self.prefix not in name:
                p.requires_grad = False

    # -------------------------------------------------------------------------------------------- merging
    def _check_mergeable(self, adapter_names: Optional[list[str]], safe_merge: bool) -> None:
        """Every layer of the adapters to merge has C = D = 0 (and, for safe_merge, finite tensors), checked before
        any layer is touched."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for module_name, module in self.model.named_modules():
            if not isinstance(module, SsmLoraLayer):
                continue
            for adapter in names:
                if adapter not in module.ssmlora_A or adapter in module.merged_adapters:
                    continue
                if safe_merge:
                    tensors = [getattr(module, n)[adapter].weight for n in module.adapter_layer_names if adapter in getattr(module, n)]
                    if not all(torch.isfinite(t).all() for t in tensors):
                        raise ValueError(
                            f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken: its SSMLoRA "
                            f"tensors in {module_name} hold NaN or inf. Nothing was merged."
                        )
                if module.state_path_active(adapter):
                    raise ValueError(merge_error(module_name))

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._check_mergeable(adapter_names, safe_merge)
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        for handle in self._ssmlora_hooks:
            handle.remove()
        self._ssmlora_hooks = []
        return model

    # ------------------------------------------------------------------------------------------- the chains
    def _ssmlora_pre_forward(self, module, args):
        run = self.ssmlora_run
        run.depth += 1
        if run.depth > 1:
            return  # the backbone inside the model's own forward: one chain run
        run.states = {}
        run.in_forward = True
        run.grad = torch.is_grad_enabled()
        # transformers 5 names it is_activation_checkpointing (is_gradient_checkpointing is deprecated)
        flag = getattr(self.model, "is_activation_checkpointing", None)
        run.checkpointing = bool(getattr(self.model, "is_gradient_checkpointing", False) if flag is None else flag)
        if not run.checkpointing:
            run.replay.clear()  # nothing will be recomputed: keep no state for it

    def _ssmlora_post_forward(self, module, args, output):
        run = self.ssmlora_run
        run.depth = max(0, run.depth - 1)
        if run.depth == 0:
            run.in_forward = False
            run.states = {}
        return output


def _entry_modules(model: nn.Module) -> list[nn.Module]:
    """Where a forward over the adapted layers can start: the model, its backbone (`base_model_prefix`: what TRL's
    reward and value heads call) and, for an encoder, get_encoder()."""
    modules = [model]
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if isinstance(backbone, nn.Module) and backbone is not model:
        modules.append(backbone)
    return modules


def chain_layout(model: nn.Module, adapter_name: str) -> list[list[str]]:
    """The chains of `adapter_name`: per chain key (in order of first appearance), its modules' names in model
    order."""
    chains: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, SsmLoraLayer) and adapter_name in module.ssmlora_A:
            chains.setdefault(module.ssmlora_chain[adapter_name], []).append(name.removeprefix("base_model.model."))
    return list(chains.values())


def _check_loaded_layout(tuner: "SsmLoraModel", incompatible) -> None:
    """A state dict that fills only part of an adapter's tensors, or holds SSMLoRA tensors this model has no place
    for, was saved with another chain layout (e.g. loaded with PeftModel.from_pretrained(config=...) of other chains:
    the stored chain_layout is not read then)."""
    unexpected = [k for k in incompatible.unexpected_keys if f".{tuner.prefix}" in k or k.startswith(tuner.prefix)]
    if unexpected:
        raise ValueError(
            f"the weights loaded into an SSMLoRA adapter hold tensors this model's chains have no place for (e.g. "
            f"{unexpected[0]}): they were saved with another chain layout (insertion / target_modules / chain) than "
            f"this config's. Load the adapter with its own adapter_config.json (PeftModel.from_pretrained without "
            f"config=) or the config it was trained with."
        )
    missing: dict[str, list[str]] = {}
    for key in incompatible.missing_keys:
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3].startswith(tuner.prefix):  # ...ssmlora_C.<adapter>.weight
            missing.setdefault(parts[-2], []).append(key)
    for adapter, keys in missing.items():
        total = sum(
            1 for n, _ in tuner.model.named_parameters() if f".{tuner.prefix}" in n and n.split(".")[-2] == adapter
        )
        if len(keys) < total:
            raise ValueError(
                f"the weights loaded into SSMLoRA adapter {adapter!r} cover only part of its modules ({len(keys)} of "
                f"its {total} tensors missing, e.g. {keys[0]}): they were saved with another chain layout "
                f"(insertion / target_modules / chain) than this config's. Load the adapter with its own "
                f"adapter_config.json (PeftModel.from_pretrained without config=) or the config it was trained with."
            )


def _chain_key(config: SsmLoraConfig, key: str) -> str:
    if config.chain == "all":
        return "all"
    if config.insertion == "alternate_qv":
        return "qv"  # q and v alternate across blocks: one chain
    return key.rsplit(".", 1)[-1]


def _rank_for(config: SsmLoraConfig, key: str) -> int:
    for pattern, rank in (config.rank_pattern or {}).items():
        if key == pattern or key.endswith("." + pattern) or re.fullmatch(pattern, key):
            return rank
    return config.r


def _describe(layout) -> str:
    return "; ".join(f"[{c[0]} ... {c[-1]}] ({len(c)} modules)" if len(c) > 1 else f"[{c[0]}]" for c in layout)


__all__ = ["SsmLoraModel", "chain_layout"]
