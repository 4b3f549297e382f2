"""A clearer error than PEFT's when a config's target_modules match nothing, for tuners built on PEFT's injection."""

from __future__ import annotations

from peft.utils.error import NoMatchingPeftModuleError
from torch import nn


class NamesUnmatchedTargets:
    """Mixin for a BaseTuner (list it before the tuner base): PEFT's NoMatchingPeftModuleError is re-raised naming
    the config class, its target_modules / exclude_modules and the fix. After injection the sets PEFT expands
    "all-linear" into are stored sorted, so adapter_config.json is valid JSON and the same on every run."""

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as err:
            raise NoMatchingPeftModuleError(
                f"{type(config).__name__}(target_modules={config.target_modules!r}, exclude_modules="
                f"{config.exclude_modules!r}) matches no nn.Linear / Conv1D module of {type(model).__name__}: check "
                f"target_modules. ({err})"
            ) from err
        for name in ("target_modules", "exclude_modules"):
            value = getattr(config, name, None)
            if isinstance(value, (set, frozenset)):
                setattr(config, name, sorted(value))
