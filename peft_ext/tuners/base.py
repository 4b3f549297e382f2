"""The shared base of every peft-ext method: what each tuner would otherwise repeat.

A method is one folder `peft_ext/tuners/<method>/` (config.py, layer.py, model.py, __init__.py that calls
`peft_ext.register_method`). What it builds on lives here:

- `is_conv1d`, `logical_weight`, `in_out_features`: transformers' Conv1D (GPT-2) stores its weight as (in, out);
  every layer that reads a "linear" weight asks these instead of testing the class name itself.
- `ExactMerge`: the merge / unmerge template. A layer says which base parameters an adapter changes and to what
  (`merged_values`); `merge` writes them (checking NaN for `safe_merge`), and `unmerge` puts the original tensors
  back bit for bit. The originals are kept as (non-persistent) buffers of the layer, so `model.to(torch.bfloat16)`
  or `.to(device)` after a merge moves them with the model: `unmerge` / `disable_adapter()` then restore the
  original converted like every other tensor, and the next forward runs.
- `PeftExtLayer`: the set-up of a layer built from scratch on `BaseTunerLayer` (an `nn.ModuleDict` per name of
  `adapter_layer_names`, PEFT's bookkeeping attributes, the base layer's in/out features).
- `PeftExtTuner`: the tuner mixin (list it before `BaseTuner`): model-card tags naming the method and peft-ext,
  `adapter_names=` mixed batches routed to every layer, and a clear error when target_modules match nothing.
"""

from __future__ import annotations

import copy
import zlib
from contextlib import contextmanager
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_adapters_to_merge
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from peft_ext.tuners.mixed_batch import adapter_names_hooks

PACKAGE_TAG = "peft-ext"


# ------------------------------------------------------------------------------------------- Conv1D
def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and relatives): a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D"


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def logical_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear-like module (a transposed view for Conv1D)."""
    return module.weight.T if is_conv1d(module) else module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    out_features, in_features = logical_weight(module).shape
    return in_features, out_features


def output_dim(module: nn.Module, pname: str, tensor: torch.Tensor) -> int:
    """The dimension of `tensor` (the module's parameter `pname`) that indexes output features: 0, except for the
    (in, out) weight of Conv1D."""
    return 1 if pname == "weight" and tensor.dim() == 2 and is_conv1d(module) else 0



def call_with_parameters(module: nn.Module, params: dict[str, torch.Tensor], args: tuple = (), kwargs=None, strict=None):
    """`torch.func.functional_call(module, params, args, kwargs)`: run `module` with some of its parameters (by name,
    dotted for submodules) replaced by `params`, also under FSDP1 with `use_orig_params=True`.

    FSDP1 sets each unsharded parameter of a wrapped module as a plain attribute for the forward (`module.__dict__`),
    which shadows the `_parameters` entry that functional_call swaps: there, functional_call alone runs the module
    with its own (base) tensors, raises nothing, and `params` get no gradient. The shadowing attributes are swapped
    here as well, and restored after the call."""
    kwargs = {} if kwargs is None else kwargs
    shadowed = []
    for name, value in params.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner.__dict__:
            shadowed.append((owner, leaf, owner.__dict__[leaf]))
            owner.__dict__[leaf] = value
    try:
        extra = {} if strict is None else {"strict": strict}
        return torch.func.functional_call(module, params, args, kwargs, **extra)
    finally:
        for owner, leaf, value in reversed(shadowed):
            owner.__dict__[leaf] = value

@contextmanager
def seeded(seed: Optional[int], name: str):
    """An adapter's initialisation: drawn from (seed, module name) when a seed is given, leaving torch's RNGs (CUDA
    ones included) as they were; else from torch's global RNG."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        yield


# --------------------------------------------------------------------------------------------- merge
class ExactMerge:
    """Mixin for a BaseTunerLayer: the merge / unmerge template (see the module docstring).

    A layer implements `merged_values(adapter_name) -> {parameter name: new value}` (the base layer's parameters
    after merging that adapter on top of what is merged already; `original_base_value(name)` is W0 and the
    current parameter holds what earlier merges wrote) and sets `method_label` for messages.
    """

    method_label = "This method"
    _ORIGINALS = "merged_originals"

    def merged_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def adapter_keys(self):
        """The names of the adapters this layer holds: the keys of its first `adapter_layer_names` entry (a layer
        whose adapters may lack that entry overrides this)."""
        return getattr(self, self.adapter_layer_names[0]).keys()

    def _merge_holder(self) -> nn.Module:
        holder = self._modules.get(self._ORIGINALS)
        if holder is None:
            holder = nn.Module()
            self._modules[self._ORIGINALS] = holder
        return holder

    def original_base_value(self, pname: str) -> torch.Tensor:
        """W0 of the base parameter `pname`, even while an adapter is merged into it."""
        holder = self._modules.get(self._ORIGINALS)
        if holder is not None and pname in holder._buffers:
            return holder._buffers[pname]
        return getattr(self.get_base_layer(), pname).data

    def write_base_value(self, pname: str, value: torch.Tensor) -> None:
        """Write `value` into the base parameter `pname`, keeping its original tensor the first time."""
        param = getattr(self.get_base_layer(), pname)
        holder = self._merge_holder()
        if pname not in holder._buffers:
            holder.register_buffer(pname, param.data, persistent=False)
        param.data = value.to(device=param.device, dtype=param.dtype).clone()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the adapters' updates into the base layer; `unmerge` restores the original tensors bit for bit (kept
        while merged: one extra copy of each written parameter)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapters = self.adapter_keys()
        for name in adapter_names:
            if name not in adapters:
                continue
            with torch.no_grad():
                new = self.merged_values(name)
                if safe_merge:
                    self.check_finite(name, new)
                for pname, value in new.items():
                    self.write_base_value(pname, value)
            self.merged_adapters.append(name)

    def check_finite(self, adapter_name: str, values: dict[str, torch.Tensor]) -> None:
        """`safe_merge`: refuse merged values holding NaN or inf, naming the adapter and the layer."""
        if not all(torch.isfinite(t).all() for t in values.values()):
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken: its "
                f"{self.method_label} update of {type(self.get_base_layer()).__name__} holds NaN or inf. Nothing "
                f"was merged."
            )

    def unmerge(self) -> None:
        base = self.get_base_layer()
        holder = self._modules.pop(self._ORIGINALS, None)
        if holder is not None:
            for pname, original in holder._buffers.items():
                getattr(base, pname).data = original
        self.merged_adapters = []

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]):
        """`merge_and_unload`: the merged base layer; `unload`: the exact original base layer."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        elif self.merged:
            self.unmerge()
        self._modules.pop(self._ORIGINALS, None)  # the merged values stay; W0 is no longer needed
        return self.get_base_layer()


# --------------------------------------------------------------------------------------------- layer
class PeftExtLayer(nn.Module, ExactMerge, BaseTunerLayer):
    """Set-up shared by layers built on `BaseTunerLayer` (list a forward protocol such as `OneAdapterForward` before
    it): `adapter_layer_names` become `nn.ModuleDict`s, PEFT's bookkeeping attributes are set, and `in_features` /
    `out_features` are read from a linear-like base layer. Subclasses add adapters in `update_layer`."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ModuleDict())
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.kwargs = kwargs
        if is_linear_like(base_layer) and hasattr(base_layer, "weight"):
            self.in_features, self.out_features = in_out_features(base_layer)

    def enable_adapters(self, enabled: bool) -> None:
        """Disabling (`disable_adapter()`, DPO's reference pass) unmerges first, so the base runs exactly W0 whatever
        the layer's forward does (PEFT's own layers do this in their forward)."""
        if not enabled and self.merged:
            self.unmerge()
        super().enable_adapters(enabled)

    def _check_can_run(self) -> None:
        """Called before an adapter runs in a forward: raise to refuse it (e.g. an inference-only method in a
        training forward). Accepts by default."""

    def __repr__(self) -> str:
        return f"{self.method_label.lower()}." + super().__repr__()


# --------------------------------------------------------------------------------------------- tuner
def tag_model(model: nn.Module, method: str) -> None:
    """Put `peft-ext` and the method's name into the base model's tags: PEFT writes them into the model card."""
    tags = [PACKAGE_TAG, method.lower()]
    add_tags = getattr(model, "add_model_tags", None)
    if callable(add_tags):
        add_tags(tags)
    else:  # a plain nn.Module: PEFT reads the attribute all the same
        existing = list(getattr(model, "model_tags", None) or [])
        model.model_tags = existing + [t for t in tags if t not in existing]


def _expand_all_linear(config, model: nn.Module) -> None:
    """Expand target_modules="all-linear" as PEFT does, also counting linear layers already wrapped by a tuner layer.

    PEFT recognises a wrapped linear layer only by "Linear" in its class name (a convention of its own tuners), so a
    second adapter with "all-linear" would otherwise match none of the layers the first one wrapped."""
    target = getattr(config, "target_modules", None)
    if not (isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return
    wrapped = {
        name
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and "Linear" not in type(module).__name__
        and is_linear_like(module.get_base_layer())
    }
    if not wrapped:
        return  # PEFT's own expansion sees every linear layer
    expanded = set(_maybe_include_all_linear_layers(copy.copy(config), model).target_modules)
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    skip = {n for n, m in model.named_modules() if head is not None and (m is head or m is getattr(head, "base_layer", None))}
    config.target_modules = expanded | {name.rsplit(".", 1)[-1] for name in wrapped - skip}


# the segments wrappers insert into module names, which state dicts of the whole model do not have (FSDP1's units;
# torch's activation-checkpoint wrapper)
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _unwrapped_name(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


class PeftExtTuner:
    """Mixin for a tuner (list it before `BaseTuner` or `LoraModel`): model-card tags, `adapter_names=` mixed
    batches for every `tuner_layer_cls` layer, and a clear error when target_modules match nothing. After injection
    the sets PEFT expands "all-linear" into are stored sorted, so adapter_config.json is the same on every run.
    A tuner built on one of PEFT's own (LoRA's) keeps that tuner's mixed-batch hooks with
    `routes_adapter_names = False`."""

    routes_adapter_names = True

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names, **kwargs):
        """PEFT's selection of the adapter's entries, also for a model whose layers are wrapped inside (FSDP1's
        auto-wrap units, activation-checkpoint wrappers): PEFT derives the keys from the module names and strips only
        a leading `_fsdp_wrapped_module.`, while the full state dict of such a model has the unwrapped names, so
        `save_pretrained(state_dict=...)` wrote an adapter file without the wrapped layers' tensors."""
        selected = super()._get_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names, **kwargs,
        )  # fmt: skip
        if not any(seg in name for name, _ in model.named_modules() for seg in _WRAPPER_SEGMENTS):
            return selected
        from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes

        prefixes = {_unwrapped_name(p) for p in _get_tuner_state_dict_key_prefixes(model)}
        missing = {k: v for k, v in _filter_state_dict_by_key_prefixes(state_dict, prefixes).items() if k not in selected}
        return {**selected, **missing}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        tag_model(model, str(getattr(config.peft_type, "value", config.peft_type)))
        _expand_all_linear(config, model)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as err:
            raise NoMatchingPeftModuleError(
                f"{type(config).__name__}(target_modules={getattr(config, 'target_modules', None)!r}, exclude_modules="
                f"{getattr(config, 'exclude_modules', None)!r}) matches no module of {type(model).__name__} this "
                f"method can wrap: check target_modules. ({err})"
            ) from err
        for name in ("target_modules", "exclude_modules"):
            value = getattr(config, name, None)
            if isinstance(value, (set, frozenset)):
                setattr(config, name, sorted(value))

    # -------------------------------------------------------------------------------------- safe merges
    def _check_safe_merge(self, adapter_names: Optional[list[str]]) -> None:
        """`safe_merge=True`: check every layer's merged values for NaN / inf before any layer is touched (PEFT merges
        layer by layer, so a bad last layer would leave the earlier ones merged, or already unloaded)."""
        for module in self.model.modules():
            if not isinstance(module, ExactMerge):
                continue
            adapters = module.adapter_keys()
            requested = module.active_adapters if adapter_names is None else adapter_names
            for name in requested:
                if name in adapters and name not in module.merged_adapters:
                    with torch.no_grad():
                        module.check_finite(name, module.merged_values(name))

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_safe_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and safe_merge:
            self._check_safe_merge(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _add_to_layer(self, layer_cls, target, adapter_name, parent, target_name, **update_args) -> nn.Module:
        """PEFT's `_create_and_replace` step: add `adapter_name` to `target` if it already is a `layer_cls`, else wrap
        it in a new one (`layer_cls(target, adapter_name)`, then `update_layer(adapter_name, **update_args)`)."""
        if isinstance(target, layer_cls):
            target.update_layer(adapter_name, **update_args)
            return target
        new_module = layer_cls(target, adapter_name)
        new_module.update_layer(adapter_name, **update_args)
        self._replace_module(parent, target_name, new_module, target)
        return new_module

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if not self.routes_adapter_names:
            with super()._enable_peft_forward_hooks(*args, **kwargs):
                yield
            return
        adapter_names = kwargs.pop("adapter_names", None)
        layer_cls = self.tuner_layer_cls
        merged = any(getattr(m, "merged", False) for m in self.model.modules() if isinstance(m, layer_cls))
        with adapter_names_hooks(self, layer_cls, adapter_names, merged, kwargs.get("num_beams", 1)):
            yield


__all__ = [
    "ExactMerge",
    "PeftExtLayer",
    "PeftExtTuner",
    "in_out_features",
    "is_conv1d",
    "is_linear_like",
    "logical_weight",
    "output_dim",
    "seeded",
    "tag_model",
]
