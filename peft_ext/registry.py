"""Make PEFT accept peft-ext's methods as native peft types.

PEFT's `register_peft_method` only accepts a name that is already a member of its closed `PeftType`
str-enum. `add_peft_type` adds the member the way `enum.EnumType` itself does (name == value, so
`PeftType("HFT")`, `PeftType.HFT`, json and pickle all work), then `register_method` calls PEFT's public
registration. Both are idempotent (re-import, `importlib.reload`) and refuse to overwrite a method that
someone else (e.g. a future PEFT release) registered under the same name.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


class RegistrationError(RuntimeError):
    """A peft-ext method clashes with something PEFT already knows under the same name."""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def add_peft_type(name: str) -> PeftType:
    """Add `name` (upper case) to PEFT's `PeftType` enum and return the member; a no-op if present."""
    if name != name.upper() or not name.isidentifier():
        raise ValueError(f"peft type names are upper-case identifiers (PEFT's convention), got {name!r}")
    if name in PeftType._member_map_:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    if hasattr(PeftType, "_add_member_"):  # Python 3.13+
        PeftType._add_member_(name, member)
    else:
        type.__setattr__(PeftType, name, member)
        PeftType._member_map_[name] = member
    PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


def register_method(name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Register a peft-ext method with PEFT under `name` (e.g. "HFT"), idempotently.

    Re-registering the same classes (same module and qualified name, as after `importlib.reload`) rebinds
    them; a different class already registered under the name raises `RegistrationError`.
    """
    peft_type = add_peft_type(name)
    known_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if known_config is not None:
        known_model = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
        same = _qualname(known_config) == _qualname(config_cls) and (
            known_model is None or _qualname(known_model) == _qualname(model_cls)
        )
        if not same:
            raise RegistrationError(
                f"PEFT already has a method called {name!r} ({_qualname(known_config)}), so peft-ext cannot register "
                f"{_qualname(config_cls)} under that name. Upgrade peft-ext, or pin peft to a version without "
                f"its own {name!r}."
            )
        # importlib.reload: point PEFT at the fresh classes
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        return peft_type
    register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type


def registered_methods() -> dict[str, type]:
    """The peft-ext methods PEFT now knows: peft type name -> config class."""
    return {
        t.value: cfg for t, cfg in PEFT_TYPE_TO_CONFIG_MAPPING.items() if cfg.__module__.startswith("peft_ext.")
    }
