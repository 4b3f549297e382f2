"""Training companions: what a method declares its trainer needs, attached without a per-method switch.

A config names its companions (`PeftExtConfig.training_companions()`, "module:Name" paths, so tuners never import
training code). `attach_companions(TrainerCls, config)` resolves them: a `TrainerCallback` subclass becomes a
callback instance, any other class is a trainer mixin put in front of the trainer class.

    trainer_cls, callbacks = attach_companions(SFTTrainer, peft_config)
    trainer = trainer_cls(model=..., peft_config=peft_config, callbacks=callbacks, ...)
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

from torch import nn
from transformers import TrainerCallback


def resolve_companion(path: str, owner: str = "a config") -> type:
    """Import "module:Name" (or "module.Name") and return the class."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"{owner}.training_companions() names {path!r}, which does not import ({err}): give 'package.module:Class' "
            f"of a TrainerCallback subclass or a trainer mixin class."
        ) from err
    if not isinstance(obj, type):
        raise ValueError(f"{owner}.training_companions() names {path!r}, which is not a class.")
    return obj


def companions_of(peft_config) -> list[type]:
    """The companion classes a config declares (none for PEFT's own configs)."""
    declare = getattr(peft_config, "training_companions", None)
    if peft_config is None or not callable(declare):
        return []
    owner = type(peft_config).__name__
    return [resolve_companion(path, owner) for path in declare()]


def attach_companions(trainer_cls: type, peft_config) -> tuple[type, list[TrainerCallback]]:
    """(trainer class with the config's mixins in front, new callback instances) for `peft_config` (or None)."""
    callbacks, mixins = [], []
    for cls in companions_of(peft_config):
        if issubclass(cls, TrainerCallback):
            callbacks.append(cls())
        elif not issubclass(trainer_cls, cls):
            mixins.append(cls)
    if mixins:
        name = "".join(m.__name__ for m in mixins) + trainer_cls.__name__
        trainer_cls = type(name, (*mixins, trainer_cls), {"__module__": trainer_cls.__module__})
    return trainer_cls, callbacks


def find_tuner(model, is_tuner: Callable[[nn.Module], bool]) -> Optional[nn.Module]:
    """The tuner inside whatever a trainer holds: `model` itself, a PeftModel's base_model, or under accelerate / DDP /
    DeepSpeed (`.module`) or torch.compile (`._orig_mod`) wrappers; the first module `is_tuner` accepts, or None."""
    seen = set()
    while isinstance(model, nn.Module) and id(model) not in seen:
        seen.add(id(model))
        if is_tuner(model):
            return model
        for attr in ("module", "_orig_mod", "base_model"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and inner is not model:
                model = inner
                break
        else:
            return None
    return None
