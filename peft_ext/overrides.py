"""`--set key=value` overrides for YAML configs: dotted keys reach into nested mappings, values are YAML."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[list[str], object]:
    """"trainer_args.max_steps=2" -> (["trainer_args", "max_steps"], 2)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"an override is key=value (e.g. trainer_args.max_steps=2), got {text!r}")
    return key.strip().split("."), parse_yaml(value)


def apply_overrides(config: dict, overrides: list[str] | None) -> dict:
    """A copy of `config` with every override applied in order (missing intermediate mappings are created)."""
    config = copy.deepcopy(config)
    for text in overrides or ():
        path, value = parse_override(text)
        node = config
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return config


def load_yaml(path: str) -> dict:
    with open(path) as f:
        data = parse_yaml(f.read()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping (key: value lines), got {type(data).__name__}")
    return data


def config_from_dict(cls, data: dict, where: str = "", kind: str = "", required: tuple = ()):
    """`cls(**data)` for a config dataclass, with unknown keys named and the known ones listed (not a TypeError):
    "{where}unknown {kind}key(s) [...]; known keys: [...]", e.g. where="recipe.yaml: ", kind="recipe "; then the
    `required` keys missing from `data`: "{where}the {kind}needs [...]"."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}unknown {kind}key(s) {unknown}; known keys: {sorted(names)}")
    missing = sorted(n for n in required if n not in data)
    if missing:
        raise ValueError(f"{where}the {kind or 'config '}needs {missing}")
    return cls(**data)


def import_packages(modules, what: str, fix: str = "") -> list[str]:
    """Import each module named in `modules` (a name or a list; packages that register methods of their own);
    a ValueError names the one that does not import, prefixed with `what` and followed by `fix`."""
    modules = [modules] if isinstance(modules, str) else list(modules)
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"{what}: {module!r} does not import ({err}){fix}") from err
    return modules
