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
        "interpret_mode",
        "lowrank_linear",
        "lowrank_linear_gathered",
        "plan_adapter_segments",
        "reference_delta_linear",
        "reference_delta_linear_gathered",
        "reference_lowrank_linear",
        "reference_lowrank_linear_gathered",
    ]
