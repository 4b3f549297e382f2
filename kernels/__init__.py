"""peft_ext.kernels: Triton kernels with plain-PyTorch references.

This folder sits at the repository root but is installed as `peft_ext.kernels` (pyproject.toml's package-dir
mapping, editable install and wheel alike). A Python started in the repository root (`python -c`, `python -m`,
a notebook: the working directory is on sys.path) also finds it as a top-level `kernels`, the name of Hugging
Face's kernels package, which transformers (`integrations.hub_kernels`, `is_kernels_available`) and bitsandbytes
(`kernels.get_kernel`) use. So when this file executes under any name other than `peft_ext.kernels` it never
poses as a package of its own:

- as `kernels`, it looks for another top-level `kernels` further along sys.path, skipping this folder and any
  copy of it (a folder whose `__init__.py` names `peft_ext.kernels`, e.g. another checkout) and namespace-package
  portions. If one is found (Hugging Face's), it loads that module the way the import system would
  (`module_from_spec`, registered in `sys.modules["kernels"]` before it executes, so its own absolute imports of
  `kernels.<submodule>` resolve against its own `__path__`) and leaves it in `sys.modules["kernels"]`; the import
  statement returns that entry, so `import kernels` gives Hugging Face's module itself. This module object is then
  made a copy of its namespace, for callers that execute a spec by hand and keep the object (and for
  `importlib.reload`, which re-executes this file in the live module).
- with no other `kernels` (or under any other name, e.g. `main.kernels`), it stays inert: nothing to import from
  it, no submodules (`__path__ = []`) and no `__file__`, which is how transformers recognises a folder shadowing a
  real package (`is_kernels_available()` is False, `from kernels import get_kernel` raises ImportError).

Only the standard library runs before the hand-over (no torch, no peft_ext import).
"""

if __name__ == "peft_ext.kernels":
    # Low-rank linear y = x W^T + b + s (x A^T) B^T, and compressed weight deltas (Delta-CoMe) y = x W^T + b +
    # ((x V) sigma) U^T with U, V dequantised from bit planes on the fly: Triton on CUDA (or under
    # TRITON_INTERPRET=1), else the plain-PyTorch references. See lowrank.py / lowrank_gathered.py /
    # delta.py for the designs.
    from .delta_format import PackedDelta
    from .delta import delta_linear, delta_linear_gathered
    from .delta_reference import reference_delta_linear, reference_delta_linear_gathered
    from .dispatch import choose_backend, interpret_mode
    from .lowrank import LowRankLinearFunction, lowrank_linear
    from .lowrank_gathered import AdapterSegments, lowrank_linear_gathered, plan_adapter_segments
    from .lowrank_grouped import grouped_lowrank_linear, grouped_shrink, lowrank_expand_linear
    from .reference import (
        dropout_keep_mask,
        reference_lowrank_linear,
        reference_lowrank_linear_gathered,
    )
    from .sign_format import SignDelta

    __all__ = [
        "AdapterSegments",
        "LowRankLinearFunction",
        "PackedDelta",
        "SignDelta",
        "choose_backend",
        "delta_linear",
        "delta_linear_gathered",
        "dropout_keep_mask",
        "grouped_lowrank_linear",
        "grouped_shrink",
        "interpret_mode",
        "lowrank_linear",
        "lowrank_expand_linear",
        "lowrank_linear_gathered",
        "plan_adapter_segments",
        "reference_delta_linear",
        "reference_delta_linear_gathered",
        "reference_lowrank_linear",
        "reference_lowrank_linear_gathered",
    ]

elif __name__ == "kernels":

    def _peft_ext_hand_over(namespace):
        """Load the first top-level `kernels` on sys.path that is neither this folder nor a copy of it, leave it
        in sys.modules["kernels"] and copy its namespace into `namespace` (this module's). False if none."""
        import importlib.machinery
        import importlib.util
        import os
        import sys

        def is_this_folder(origin):
            if os.path.basename(origin) != "__init__.py":
                return False  # a module or an extension module, not a package folder like this one
            try:
                with open(origin, "rb") as init:
                    return b"peft_ext.kernels" in init.read()
            except OSError:
                return False

        for entry in list(sys.path):
            if not isinstance(entry, str):
                continue
            spec = importlib.machinery.PathFinder.find_spec("kernels", [entry])
            if spec is None or spec.loader is None or not spec.has_location or is_this_folder(spec.origin):
                continue  # nothing there, a namespace-package portion, or this folder (the repository root)
            previous = sys.modules.get("kernels")
            loaded_from = getattr(getattr(previous, "__spec__", None), "origin", None)
            if previous is not None and loaded_from == spec.origin and vars(previous) is not namespace:
                namespace.update(vars(previous))  # already loaded (this file run by hand): don't run it twice
                return True
            module = importlib.util.module_from_spec(spec)
            sys.modules["kernels"] = module  # before it runs, as the import system does: kernels.<sub> resolve in it
            try:
                spec.loader.exec_module(module)
            except BaseException:
                if previous is None:
                    sys.modules.pop("kernels", None)
                else:
                    sys.modules["kernels"] = previous
                raise
            # `import kernels` returns sys.modules' entry: the other package. This module object becomes a copy
            # of it for whoever holds it (a spec executed by hand, importlib.reload).
            namespace.update(vars(sys.modules["kernels"]))
            return True
        return False

    if not _peft_ext_hand_over(globals()):
        __file__ = None  # noqa: F811  (transformers: "namespace package shadowing on sys.path, not a real install")
        __path__ = []  # no submodules reachable as kernels.<name>
    del _peft_ext_hand_over

else:  # under another name (a parent folder on sys.path, a test runner): inert
    __file__ = None  # noqa: F811
    __path__ = []
