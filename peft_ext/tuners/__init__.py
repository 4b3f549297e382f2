"""One sub-package per method. `load_methods()` imports each (a folder here with an __init__.py): the method's own
__init__ registers its peft type with PEFT (`peft_ext.register_method`), so adding a method is adding a folder."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def load_methods() -> list[ModuleType]:
    """Import every method package under peft_ext/tuners/ (sorted by name) and return them."""
    return [
        importlib.import_module(f"{__name__}.{info.name}")
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
        if info.ispkg
    ]
