"""peft_ext.kernels: Triton kernels with plain-PyTorch references (filled by the kernel issues).

This folder sits at the repository root but is installed as `peft_ext.kernels`. Imported under the bare name
`kernels` (a script run from the repository root puts this folder on sys.path), it would pose as Hugging Face's
`kernels` package, which transformers and bitsandbytes probe for; refuse that loudly instead.
"""

if __name__ != "peft_ext.kernels":
    raise ImportError(
        "the repository's kernels/ folder is the package peft_ext.kernels, not Hugging Face's `kernels`; "
        "import peft_ext.kernels (and run scripts from outside the repository root or with `pip install .`)"
    )
