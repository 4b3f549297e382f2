"""Turning a full fine-tune into a compressed delta adapter on its base (Delta-CoMe and its baselines)."""

from .compress import CompressionResult, compress_delta

__all__ = ["CompressionResult", "compress_delta"]
