"""Turning a full fine-tune into a compressed delta adapter on its base (Delta-CoMe and its baselines)."""

from .bitdelta_distill import BitDeltaDistillation, distill_bitdelta
from .compress import CompressionResult, compress_delta

__all__ = ["BitDeltaDistillation", "CompressionResult", "compress_delta", "distill_bitdelta"]
