"""Make PEFT accept new methods as native peft types: peft-ext's own, and any user's (the public extension API).

PEFT's `register_peft_method` only accepts a name that is already a member of its closed `PeftType` str-enum
(huggingface/peft#2273: a new method still needs edits inside PEFT). `register_method` adds the member the way
`enum.EnumType` itself does (name == value, so `PeftType("HFT")`, `PeftType.HFT`, json and pickle all work), then
calls PEFT's public registration:

    import peft_ext
    from my_package.config import ScaleConfig      # a dataclass subclassing peft_ext.PeftExtConfig
    from my_package.model import ScaleModel        # a peft.tuners.tuners_utils.BaseTuner subclass
    peft_ext.register_method("SCALE", ScaleConfig, ScaleModel)   # prefix: ScaleModel.prefix

After that `get_peft_model`, `PeftModel.from_pretrained`, TRL's `peft_config=` and the rest accept `ScaleConfig`.
Registration is idempotent (re-import, `importlib.reload`) and refuses to overwrite a method that another class
(another package, or a future PEFT release) registered under the same name.

With peft-ext imported, an adapter folder whose `peft_type` nobody registered fails with `UnknownPeftTypeError`,
which names the field, the package the adapter asks for (`peft_ext_requirement`) and the fix, instead of PEFT's
bare `KeyError: 'SCALE'`. (This wraps two PEFT classmethods, `PeftConfig._get_peft_type` and
`PeftConfig.from_peft_type`, only to check the type: a known type takes PEFT's path unchanged.) And since loading
never unpickles, `PeftModel.save_pretrained(..., safe_serialization=False)` of an adapter registered here is refused
before anything is written (a wrapper that checks that one argument, then calls PEFT's own).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import PeftType, register_peft_method


class RegistrationError(RuntimeError):
    """A method registration that clashes with something PEFT already knows under the same name."""


class UnknownPeftTypeError(KeyError, ValueError):
    """An adapter whose `peft_type` no installed package registered (a KeyError, as PEFT's own, for callers that
    catch that)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    config_cls: type
    model_cls: type
    prefix: str
    requirement: str  # what an adapter of this method needs installed, e.g. "peft-ext>=0.1.0"


def _requirement_of(package: str) -> str:
    """"dist>=version" for the installed distribution that provides the import package `package` (its import name
    when no distribution provides it, e.g. code on PYTHONPATH)."""
    from importlib import metadata

    if package == "peft_ext":
        from peft_ext.version import __version__

        return f"peft-ext>={__version__}"
    for dist in metadata.packages_distributions().get(package, []):
        try:
            return f"{dist}>={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return package


_METHODS: dict[str, MethodInfo] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _package(cls: type) -> str:
    return cls.__module__.split(".")[0]


def _check_name(name) -> None:
    if not isinstance(name, str) or name != name.upper() or not name.isidentifier() or name.endswith("_"):
        raise ValueError(
            f"register_method(name=...): peft type names are upper-case identifiers not ending in '_' (PEFT's "
            f"convention, e.g. 'SCALE'), got {name!r}."
        )


def add_peft_type(name: str) -> PeftType:
    """Add `name` (upper case) to PEFT's `PeftType` enum and return the member; a no-op if present."""
    _check_name(name)
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


def _remove_peft_type(name: str) -> None:
    member = PeftType._member_map_.pop(name, None)
    if name in PeftType._member_names_:
        PeftType._member_names_.remove(name)
    PeftType._value2member_map_.pop(name, None)
    if member is not None and PeftType.__dict__.get(name) is member:
        type.__delattr__(PeftType, name)


def _check_classes(name: str, config_cls, model_cls, prefix) -> str:
    if not (isinstance(config_cls, type) and issubclass(config_cls, PeftConfig)):
        raise TypeError(
            f"register_method({name!r}, config_cls=...) needs the method's config class, a dataclass subclassing "
            f"peft_ext.PeftExtConfig (or peft.PeftConfig); got {config_cls!r}."
        )
    if not (isinstance(model_cls, type) and issubclass(model_cls, BaseTuner)):
        raise TypeError(
            f"register_method({name!r}, model_cls=...) needs the method's tuner class, a subclass of "
            f"peft.tuners.tuners_utils.BaseTuner; got {model_cls!r}."
        )
    own_prefix = getattr(model_cls, "prefix", None)
    if prefix is not None and own_prefix is not None and prefix != own_prefix:
        raise ValueError(
            f"register_method({name!r}, prefix={prefix!r}) differs from {model_cls.__name__}.prefix = {own_prefix!r}, "
            f"which PEFT uses to find the adapter's parameters: leave prefix= out, or set {model_cls.__name__}.prefix."
        )
    prefix = prefix if prefix is not None else own_prefix
    if not isinstance(prefix, str) or not prefix.endswith("_") or not prefix[:-1].isidentifier():
        raise ValueError(
            f"register_method({name!r}, prefix=...): the prefix of the adapter's parameter names must be an "
            f"identifier ending in '_' (e.g. 'scale_'), set as {model_cls.__name__}.prefix or passed as prefix=; got "
            f"{prefix!r}."
        )
    return prefix


def register_method(name: str, config_cls: type, model_cls: type, prefix: str | None = None) -> PeftType:
    """Register a method with PEFT under the peft type `name` (upper case, e.g. "SCALE"); returns the member.

    `config_cls` is the method's config (subclass `peft_ext.PeftExtConfig`: it sets `peft_type` for you and stamps
    the package requirement into adapter_config.json), `model_cls` its `BaseTuner`, and `prefix` the prefix of its
    adapter parameters (default `model_cls.prefix`). Re-registering the same classes (same module and qualified
    name, as after `importlib.reload`) rebinds them; another class under a registered name raises
    `RegistrationError` naming the package that holds the name.
    """
    _check_name(name)
    taken = name in PeftType._member_map_ and PeftType[name] in PEFT_TYPE_TO_CONFIG_MAPPING
    if taken and isinstance(config_cls, type):  # the name first: the most useful message when it is taken
        known_config = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[name]]
        known_model = PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType[name])
        same = _qualname(known_config) == _qualname(config_cls) and (
            known_model is None or not isinstance(model_cls, type) or _qualname(known_model) == _qualname(model_cls)
        )
        if not same:
            raise RegistrationError(
                f"PEFT already has a method called {name!r}, registered by the package '{_package(known_config)}' "
                f"({_qualname(known_config)}), so '{_package(config_cls)}' cannot register {_qualname(config_cls)} "
                f"under that name: choose another name in register_method(name=...)."
            )
    prefix = _check_classes(name, config_cls, model_cls, prefix)
    for other in _METHODS.values():
        if other.name != name and _qualname(other.config_cls) == _qualname(config_cls):
            raise RegistrationError(
                f"{_qualname(config_cls)} is already registered as {other.name!r}: one config class serves one peft "
                f"type (its adapter_config.json names it); subclass it for a second name."
            )
    if taken:
        peft_type = PeftType[name]
        # importlib.reload: point PEFT at the fresh classes
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    else:
        added = name not in PeftType._member_map_
        peft_type = add_peft_type(name)
        try:
            register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
        except Exception:
            if added:  # leave PeftType as it was
                _remove_peft_type(name)
            raise
    _METHODS[name] = MethodInfo(name, config_cls, model_cls, prefix, _requirement_of(_package(config_cls)))
    _install_peft_checks()
    return peft_type


def peft_type_of(config_cls: type) -> PeftType:
    """The peft type a config class (or its nearest registered base class) was registered under."""
    for cls in config_cls.__mro__:
        for peft_type, registered in PEFT_TYPE_TO_CONFIG_MAPPING.items():
            if registered is cls or (isinstance(registered, type) and _qualname(registered) == _qualname(cls)):
                return peft_type
    raise RegistrationError(
        f"{config_cls.__name__} is not registered with PEFT: call peft_ext.register_method(NAME, "
        f"{config_cls.__name__}, YourTunerModel) in your method's package __init__ before making configs."
    )


def requirement_of_config(config_cls: type) -> str | None:
    """The requirement stamp of a registered method's adapters (None if the class is not registered here)."""
    for info in _METHODS.values():
        if config_cls is info.config_cls or issubclass(config_cls, info.config_cls):
            return info.requirement
    return None


def load_entry_point_methods() -> list[str]:
    """Import every package that declares an entry point in the group "peft_ext.methods" (so a method package
    installed with pip registers itself on `import peft_ext`, and through the start-up hook, without an import in
    the user's script). A package that fails to import is reported with a warning, never breaking peft-ext."""
    import warnings
    from importlib import metadata

    loaded = []
    for entry_point in metadata.entry_points(group="peft_ext.methods"):
        try:
            entry_point.load()
        except Exception as err:  # a broken plugin must not break `import peft_ext` (nor `import peft`)
            dist = getattr(getattr(entry_point, "dist", None), "name", "?")
            warnings.warn(
                f"peft-ext: the method package {entry_point.value!r} (entry point {entry_point.name!r} of {dist}) "
                f"failed to import and is not registered: {err!r}",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            loaded.append(entry_point.name)
    return loaded


def registered_methods() -> dict[str, type]:
    """The methods registered through peft-ext (its own and users'): peft type name -> config class."""
    return {name: info.config_cls for name, info in _METHODS.items()}



# ------------------------------------------------------------------------------------ unknown peft types
def _unknown_type_error(peft_type, where: str, requirement: str | None) -> UnknownPeftTypeError:
    registered = ", ".join(sorted(_METHODS)) or "none"
    if requirement:
        fix = (
            f"It was saved with {requirement} (its peft_ext_requirement): pip install -U '{requirement}', and import "
            f"that package before loading if it does not register itself (an entry point in group "
            f"'peft_ext.methods')."
        )
    else:
        fix = (
            "Install (and import) the package that defines it (the adapter's README.md / model card names it), or "
            "upgrade peft if it is one of PEFT's newer methods."
        )
    return UnknownPeftTypeError(
        f"{where} has peft_type {str(peft_type)!r}, which no installed package registers with PEFT. {fix} "
        f"Registered through peft-ext: {registered} (besides PEFT's own types)."
    )


def _is_known(peft_type) -> bool:
    try:
        return peft_type in PEFT_TYPE_TO_CONFIG_MAPPING
    except TypeError:  # unhashable: let PEFT report it
        return True


def _defining_class(name: str) -> type:
    return next(c for c in PeftConfig.__mro__ if name in c.__dict__)


def _is_registered_here(config) -> bool:
    return any(type(config) is info.config_cls or isinstance(config, info.config_cls) for info in _METHODS.values())


def _install_peft_checks() -> None:
    _install_unknown_type_check()
    _install_safe_save_check()
    _install_transformers_load_adapter()


def load_adapter_converting(original, self, peft_model_id=None, adapter_name=None, peft_config=None,
                            adapter_state_dict=None, *args, **kwargs):
    """transformers' `model.load_adapter(folder)` (and `AutoModelForCausalLM.from_pretrained(adapter_folder)`) loads
    adapter files with its own weight loader, which maps file keys to parameter names but never runs the tuner's
    `_remap_adapter_state_dict_for_load`: a method whose files hold something else than its parameters (HFT stores
    deltas W - W0) loaded nothing there. A tuner that declares `state_dict_for_transformers(model, config,
    state_dict)` gets its local file converted first (safetensors only); transformers then loads the result
    (`original` is transformers' own load_adapter)."""
    folder = None if peft_model_id is None else os.fspath(peft_model_id)
    if adapter_state_dict is None and folder is not None and os.path.isdir(folder) and not kwargs.get("hotswap"):
        from peft_ext.adapter_files import SAFETENSORS_NAME, check_adapter_folder

        config = peft_config if isinstance(peft_config, PeftConfig) else PeftConfig.from_pretrained(folder)
        convert = getattr(PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type), "state_dict_for_transformers", None)
        if convert is not None:
            from safetensors.torch import load_file

            check_adapter_folder(folder)
            adapter_state_dict = convert(self, config, load_file(os.path.join(folder, SAFETENSORS_NAME)))
            peft_config = config
    return original(self, peft_model_id, adapter_name, peft_config, adapter_state_dict, *args, **kwargs)


def _install_transformers_load_adapter() -> None:
    """Route transformers' `load_adapter` through `load_adapter_converting`. The start-up hook does it as soon as
    transformers' PEFT integration exists; this covers PEFT_EXT_NO_AUTOLOAD=1 with an explicit `import peft_ext`,
    with the hook module's own patch (a no-op when it is in place)."""
    try:
        import transformers.integrations.peft as integration
        from _peft_ext_autoload import patch_transformers_load_adapter
    except ImportError:  # pragma: no cover - transformers without the PEFT integration, or the hook module gone
        return
    patch_transformers_load_adapter(integration)


def _install_safe_save_check() -> None:
    """Loading never unpickles, so `save_pretrained(..., safe_serialization=False)` of an adapter registered here is
    refused before anything is written (it would make a folder that cannot be loaded)."""
    from peft import PeftModel

    save = PeftModel.save_pretrained
    if getattr(save, "_peft_ext_checked", False):
        return

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, safe_serialization: bool = True, **kwargs):
        if not safe_serialization:
            configs = getattr(self, "peft_config", {}) or {}
            names = sorted(n for n, c in configs.items() if _is_registered_here(c))
            if names:
                raise ValueError(
                    f"save_pretrained(safe_serialization=False) would write a pickle (adapter_model.bin) for the "
                    f"peft-ext adapter(s) {names}, which peft-ext never loads (a pickle can run code): call "
                    f"save_pretrained(..., safe_serialization=True), the default. Nothing was written."
                )
        return save(self, save_directory, *args, safe_serialization=safe_serialization, **kwargs)

    save_pretrained._peft_ext_checked = True
    PeftModel.save_pretrained = save_pretrained


def _install_unknown_type_check() -> None:
    owner = _defining_class("_get_peft_type")
    get_type = owner.__dict__["_get_peft_type"].__func__
    if not getattr(get_type, "_peft_ext_checked", False):

        @functools.wraps(get_type)
        def _get_peft_type(cls, model_id, **hf_hub_download_kwargs):
            peft_type = get_type(cls, model_id, **hf_hub_download_kwargs)
            if not _is_known(peft_type):
                subfolder = hf_hub_download_kwargs.get("subfolder")
                path = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
                config_file = os.path.join(path, "adapter_config.json")
                requirement = None
                if os.path.isfile(config_file):
                    with open(config_file, encoding="utf-8") as f:
                        requirement = json.load(f).get("peft_ext_requirement")
                raise _unknown_type_error(peft_type, config_file, requirement)
            return peft_type

        _get_peft_type._peft_ext_checked = True
        owner._get_peft_type = classmethod(_get_peft_type)

    owner = _defining_class("from_peft_type")
    from_type = owner.__dict__["from_peft_type"].__func__
    if not getattr(from_type, "_peft_ext_checked", False):

        @functools.wraps(from_type)
        def from_peft_type(cls, **kwargs):
            if "peft_type" in kwargs and not _is_known(kwargs["peft_type"]):
                raise _unknown_type_error(kwargs["peft_type"], "The adapter config", kwargs.get("peft_ext_requirement"))
            return from_type(cls, **kwargs)

        from_peft_type._peft_ext_checked = True
        owner.from_peft_type = classmethod(from_peft_type)
