"""FineGates: stochastic row / column gates that adapt a frozen model and prune it (Svirsky, Refael, Lindenbaum).
Importing this package registers the peft type "FINEGATES" with PEFT."""

from peft_ext.registry import register_method

from .config import FineGatesConfig
from .layer import FineGatesLayer
from .model import FineGatesModel
from .prune import PrunedLinear, PruneReport, load_pruned, prune_model, save_pruned

PEFT_TYPE = register_method("FINEGATES", FineGatesConfig, FineGatesModel)

__all__ = [
    "FineGatesConfig",
    "FineGatesLayer",
    "FineGatesModel",
    "PruneReport",
    "PrunedLinear",
    "load_pruned",
    "prune_model",
    "save_pruned",
]
