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
