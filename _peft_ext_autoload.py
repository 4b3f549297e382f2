"""Imports peft_ext right after peft, so that plain PEFT code loads peft-ext adapters.

PEFT 0.21 has no plugin hook: loading an adapter whose `peft_type` is "HFT" fails with a bare
`KeyError: 'HFT'` unless something registered that type first. The wheel installs a one-line
`peft_ext_autoload.pth` that imports this module at interpreter start-up (unless PEFT_EXT_NO_AUTOLOAD=1).

How it works: a finder at the front of `sys.meta_path` answers only for "peft". It asks the finders behind
it for the real spec and returns that spec with its loader wrapped, so the import that actually executes
peft runs `import peft_ext` right after peft's `__init__` finished. A bare `importlib.util.find_spec("peft")`
(as `transformers.utils.is_peft_available()`, `import trl` and transformers' `from_pretrained` make) gets a
wrapped spec that it never executes, and the finder stays; it removes itself once peft has been executed.
If peft_ext fails to import, `import peft` still succeeds and a warning says why.

This module runs at every Python start-up: it imports nothing beyond what the interpreter already loaded
(`os`, `sys`, `_thread`), and `warnings` only on the failure path.
"""

import os
import sys
from _thread import get_ident

__all__ = ["disabled", "install", "uninstall"]

#: The switch: PEFT_EXT_NO_AUTOLOAD=1 (or true / yes / on) keeps the finder out of `sys.meta_path`.
ENV = "PEFT_EXT_NO_AUTOLOAD"

#: Set to True once the hook itself imported peft_ext (tests and diagnostics read it).
imported_peft_ext = False


def disabled(environ=os.environ):
    return environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _ExecThenImport:
    """Loader wrapper: executes the real module, then imports the follower.

    Only the spec handed out by the finder holds it (the real loader object is never modified, so a loader
    shared by several modules — a zipimporter — stays as it was). After execution the module's `__loader__`
    and `__spec__.loader` are the real loader again. Other attributes (get_source, get_resource_reader, ...)
    are the real loader's.
    """

    def __init__(self, loader, finder):
        self.loader = loader
        self.finder = finder

    def __getattr__(self, name):  # only for what the wrapper lacks
        if name in ("loader", "finder"):  # not set yet (copy, pickle): no endless recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __repr__(self):
        return f"<peft-ext autoload wrapper of {self.loader!r}>"

    def create_module(self, spec):
        create = getattr(self.loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)  # an error here propagates and the finder stays for the next try
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        if sys.modules.get(self.finder.target) is module:  # a real import, not a hand-made module_from_spec
            self.finder.executed(module)


class _ImportAfter:
    """`sys.meta_path` finder: once `target` has been imported, import `follower` (peft, then peft_ext).

    Duck-typed (find_spec only): importlib.abc is not imported at start-up, it costs milliseconds.
    """

    _peft_ext_autoload = True  # marks the finder for install(), whatever copy of this module made it

    def __init__(self, target="peft", follower="peft_ext"):
        self.target = target
        self.follower = follower
        self._asking = set()  # threads inside find_spec: the finders asked there may ask the meta path again
        self.asked = 0  # lookups of target so far (diagnostics: transformers & co look peft up before importing it)

    def __repr__(self):
        return f"<peft-ext autoload: import {self.follower} after {self.target}>"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.target:
            return None
        thread = get_ident()
        if thread in self._asking:
            return None
        self.asked += 1
        self._asking.add(thread)
        try:
            spec = self._real_spec(fullname, path, target)
        finally:
            self._asking.discard(thread)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # nothing to wrap (not found, namespace package, legacy loader): import goes on as usual
        if not isinstance(spec.loader, _ExecThenImport):
            spec.loader = _ExecThenImport(spec.loader, self)
        return spec

    def _real_spec(self, fullname, path, target):
        """What the import system would have found without this finder: ask the finders behind it."""
        finders = list(sys.meta_path)
        try:
            finders = finders[finders.index(self) + 1 :]
        except ValueError:  # removed meanwhile (another thread executed peft): ask them all
            finders = [f for f in finders if f is not self]
        for finder in finders:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def executed(self, module=None):
        """peft has been executed: leave sys.meta_path, then import peft_ext (never failing the import of peft). A
        callable follower is called with the executed module instead."""
        global imported_peft_ext
        try:
            sys.meta_path.remove(self)
        except ValueError:
            return  # another import already ran the follower
        try:
            if callable(self.follower):
                self.follower(module)
                return
            __import__(self.follower)
        except Exception as err:
            import warnings

            warnings.warn(
                f"{self.follower} is installed but could not be imported after {self.target}, so {self.target} "
                f"does not know its adapter types (set {ENV}=1 to skip this): {err!r}",
                RuntimeWarning,
                stacklevel=3,  # the `import peft` statement (importlib frames are skipped)
            )
        else:
            if self.follower == "peft_ext":
                imported_peft_ext = True


def patch_transformers_load_adapter(module):
    """transformers' `PeftAdapterMixin.load_adapter` loads adapter files with its own weight loader, which never runs
    a tuner's remapping (HFT's files hold deltas): route it through peft_ext's converting loader. Applied as soon as
    transformers.integrations.peft exists, because the first `load_adapter` call is what imports peft (and so
    peft_ext): patching later would miss that call. peft_ext itself is imported only when load_adapter runs."""
    mixin = getattr(module, "PeftAdapterMixin", None)
    if mixin is None or getattr(mixin.load_adapter, "_peft_ext_checked", False):
        return
    original = mixin.load_adapter

    def load_adapter(self, *args, **kwargs):
        try:
            from peft_ext.registry import load_adapter_converting
        except Exception:  # peft-ext unusable here: transformers' own behaviour
            return original(self, *args, **kwargs)
        return load_adapter_converting(original, self, *args, **kwargs)

    load_adapter._peft_ext_checked = True
    load_adapter.__wrapped__ = original
    load_adapter.__doc__ = original.__doc__
    load_adapter.__name__ = load_adapter.__qualname__ = "load_adapter"
    mixin.load_adapter = load_adapter


def install(target="peft", follower="peft_ext"):
    """Put the finder at the front of sys.meta_path; a no-op when disabled, already there or peft is imported."""
    if disabled():
        return None
    if target == "peft":  # transformers' adapter loader, patched as soon as it exists (see the function)
        transformers_peft = sys.modules.get("transformers.integrations.peft")
        if transformers_peft is not None:
            patch_transformers_load_adapter(transformers_peft)
        else:
            install("transformers.integrations.peft", patch_transformers_load_adapter)
    if target in sys.modules:
        return None
    for finder in sys.meta_path:
        if getattr(finder, "_peft_ext_autoload", False) and getattr(finder, "target", None) == target:
            return finder
    finder = _ImportAfter(target, follower)
    sys.meta_path.insert(0, finder)
    return finder


def uninstall():
    """Take every autoload finder out of sys.meta_path."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_peft_ext_autoload", False)]


install()
