"""The test suite, a package so that its sub-packages import as tests.<name> (tests/kernels must never be a
top-level `kernels` module: that name is Hugging Face's kernels package, which transformers and bitsandbytes probe for)."""
