"""The built-in datasets, by name, in the formats TRL expects; or a local json/jsonl file.

    fictional-facts       {"text"}                            48 statements about a fictional country (new task)
    fictional-facts-qa    {"prompt", "completion"}            the same facts as questions and one-word answers
    addition-preferences  {"prompt", "chosen", "rejected"}    two-digit sums: right vs a plausible wrong (DPO)
    python-docs           {"text"}                            English prose from CPython's docs (training split)

Evaluation data (lists of dicts, for peft_ext.evaluation): `new_task_probes`, `old_knowledge_probes`,
`heldout_english`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .english_text import english_text
from .fictional_world import fictional_probes, fictional_qa, fictional_statements
from .preferences import addition_preferences
from .world_knowledge import world_knowledge_probes

if TYPE_CHECKING:
    from datasets import Dataset

BUILTIN_DATASETS = {
    "fictional-facts": lambda: [{"text": s} for s in fictional_statements()],
    "fictional-facts-qa": fictional_qa,
    "addition-preferences": addition_preferences,
    "python-docs": lambda: [{"text": t} for t in english_text("train")],
}


def builtin_dataset(name: str) -> Dataset:
    from datasets import Dataset  # here, not at the top: the scorers and tokenizers of peft_ext.data do not need it

    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; the built-in ones are {sorted(BUILTIN_DATASETS)}")
    return Dataset.from_list(BUILTIN_DATASETS[name]())


def load_training_data(name_or_path: str) -> Dataset:
    """A built-in dataset by name, or a local .json/.jsonl file (one record per example, TRL's column names)."""
    if name_or_path in BUILTIN_DATASETS:
        return builtin_dataset(name_or_path)
    if os.path.isfile(name_or_path) and name_or_path.endswith((".json", ".jsonl")):
        from datasets import load_dataset

        return load_dataset("json", data_files=name_or_path, split="train")
    raise ValueError(
        f"data {name_or_path!r} is neither a built-in dataset ({', '.join(sorted(BUILTIN_DATASETS))}) nor an "
        f"existing .json/.jsonl file"
    )


def new_task_probes(seed: int = 0) -> list[dict]:
    """Multiple-choice probes of the 48 fictional facts (chance: 25 %)."""
    return fictional_probes(seed)


def old_knowledge_probes(seed: int = 0) -> list[dict]:
    """Multiple-choice world-knowledge probes that the base SmolLM2 answers right (base: 100 %)."""
    return world_knowledge_probes(seed)


def heldout_english(limit: int | None = None) -> list[str]:
    """Held-out English paragraphs for language-model loss."""
    return english_text("heldout", limit)
