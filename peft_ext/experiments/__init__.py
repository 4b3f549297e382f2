"""The demo (`peft-ext demo`) and small-scale reproductions of the papers behind peft-ext's methods, each run from a
YAML recipe (`peft-ext reproduce-cola`, `peft-ext reproduce-delta`)."""

from .delta_compression import DeltaCompressionConfig, run_delta_compression

__all__ = ["DeltaCompressionConfig", "run_delta_compression"]
