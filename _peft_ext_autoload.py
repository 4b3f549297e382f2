"""Imports peft_ext right after peft, so that plain PEFT code loads peft-ext adapters.

PEFT 0.21 has no plugin hook: loading an adapter whose `peft_type` is "HFT" fails with a bare
`KeyError: 'HFT'` unless something registered that type first. The wheel installs a one-line
`peft_ext_autoload.pth` that imports this module at interpreter start-up; it only puts a finder on
`sys.meta_path` (stdlib only, no import of torch or peft), and the finder runs `import peft_ext`
once `peft` itself has finished executing. Set PEFT_EXT_NO_AUTOLOAD=1 to turn it off.
"""

import importlib.abc
import os
import sys
import warnings


class _ImportPeftExtAfterPeft(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot: find the real spec with the remaining finders
        from importlib.util import find_spec

        spec = find_spec("peft")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                import peft_ext  # noqa: F401  (registers HFT, COLA, ... with PEFT)
            except Exception as err:  # never break `import peft` itself
                warnings.warn(f"peft-ext is installed but failed to register with PEFT: {err!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def install():
    if os.environ.get("PEFT_EXT_NO_AUTOLOAD") == "1" or "peft" in sys.modules:
        return
    if not any(isinstance(f, _ImportPeftExtAfterPeft) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportPeftExtAfterPeft())


install()
