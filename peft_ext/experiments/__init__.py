"""Small-scale reproductions of the papers behind peft-ext's methods, each runnable as a YAML recipe."""

from .delta_compression import DeltaCompressionConfig, run_delta_compression

__all__ = ["DeltaCompressionConfig", "run_delta_compression"]
