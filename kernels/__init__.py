"""peft_ext.kernels: Triton kernels with plain-PyTorch references.

This folder sits at the repository root but is installed as `peft_ext.kernels`. A Python started in the
repository root (`python -c`, `python -m`, a notebook) also sees it as a top-level `kernels`, the name of Hugging
Face's kernels package, which transformers and bitsandbytes probe for (transformers even imports it when no
metadata is found). Imported under that name it therefore stays inert: nothing to import from it, and no
`__file__`, which is how transformers recognises a folder shadowing a real package.
"""

if __name__ != "peft_ext.kernels":
    __file__ = None  # noqa: F811  (transformers: "namespace package shadowing on sys.path, not a real install")
    __path__ = []  # no submodules reachable as kernels.<name>

if __name__ == "peft_ext.kernels":
    # Low-rank linear y = x W^T + b + s (x A^T) B^T: Triton on CUDA (or under TRITON_INTERPRET=1), else the
    # plain-PyTorch reference. See lowrank.py / lowrank_gathered.py for the design.
    from .dispatch import choose_backend, interpret_mode
    from .lowrank import LowRankLinearFunction, lowrank_linear
    from .lowrank_gathered import AdapterSegments, lowrank_linear_gathered, plan_adapter_segments
    from .reference import (
        dropout_keep_mask,
        reference_lowrank_linear,
        reference_lowrank_linear_gathered,
    )

    __all__ = [
        "AdapterSegments",
        "LowRankLinearFunction",
        "choose_backend",
        "dropout_keep_mask",
        "interpret_mode",
        "lowrank_linear",
        "lowrank_linear_gathered",
        "plan_adapter_segments",
        "reference_lowrank_linear",
        "reference_lowrank_linear_gathered",
    ]
