"""The data of a comparison, loaded through `datasets`: training data (SFT or preference format), evaluation data
and forgetting probes, from a built-in set, a local JSON/JSONL/CSV/Parquet file or folder, or a `datasets` id.

A data spec is a string (a built-in name or a local path) or a mapping:

    {path: data/train.jsonl}                       a local file (.json .jsonl .csv .parquet) or a dataset folder
    {dataset: user/name, split: train, name: cfg}  load_dataset(user/name, cfg, split=train): a Hub id (or a folder)
    {builtin: english-heldout}                     a built-in set (BUILTIN_DATA)
  and, with any of them: limit: N (the first N rows), columns: {prompt: input, completion: output} (rename a
  column of the file to the name the format expects: new name: name in the file).

Formats (columns): text | messages | prompt + completion (SFT); prompt + chosen + rejected (preference, DPO);
question + options + answer (multiple choice, for evaluation: answer is the right option's index or text).
"""

from __future__ import annotations

import os
from pathlib import Path

from peft_ext.data import BUILTIN_DATASETS, builtin_dataset, heldout_english, new_task_probes, old_knowledge_probes
from peft_ext.data.preferences import addition_probes

FORMATS = {  # name -> the columns it needs, in the order they are checked (preference before prompt + completion)
    "preference": ("prompt", "chosen", "rejected"),
    "multiple_choice": ("question", "options", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}
TRAIN_FORMATS = ("preference", "prompt_completion", "messages", "text")
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_DATA = {  # built-in evaluation sets, beside the training sets of peft_ext.data.BUILTIN_DATASETS
    "fictional-facts-probes": new_task_probes,  # 48 multiple-choice questions on the fictional-facts data
    "world-knowledge-probes": old_knowledge_probes,  # 45 questions SmolLM2 answers right (old knowledge)
    "english-heldout": lambda: [{"text": t} for t in heldout_english()],  # CPython-docs prose, held out of python-docs
    "addition-probes": addition_probes,  # two-digit sums as multiple choice (the addition-preferences task)
}
BUILTIN_DATA = sorted([*BUILTIN_DATASETS, *EVAL_DATA])
SPEC_KEYS = {"path", "dataset", "builtin", "split", "name", "limit", "columns"}


def describe_formats() -> str:
    return "; ".join(f"{name}: {' + '.join(cols)}" for name, cols in FORMATS.items())


def normalize_spec(spec, field: str) -> dict:
    """A data spec as a mapping with exactly one of builtin / path / dataset; errors name `field`."""
    if isinstance(spec, (str, os.PathLike)):
        spec = str(spec)
        if spec in BUILTIN_DATA:
            return {"builtin": spec}
        if os.path.exists(spec):
            return {"path": spec}
        raise ValueError(
            f"{field}: {spec!r} is neither a built-in data set ({', '.join(BUILTIN_DATA)}) nor an existing local file "
            f"or folder. For a `datasets` id write {field}: {{dataset: {spec}, split: train}}."
        )
    if not isinstance(spec, dict):
        raise ValueError(f"{field} must be a name, a path or a mapping such as {{path: data.jsonl}}, got {spec!r}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"{field}: unknown key(s) {unknown}; known keys: {sorted(SPEC_KEYS)}")
    sources = [k for k in ("builtin", "path", "dataset") if spec.get(k) is not None]
    if len(sources) != 1:
        raise ValueError(f"{field} needs exactly one of builtin, path or dataset, got {sources or 'none'}")
    spec = dict(spec)
    if "builtin" in sources and spec["builtin"] not in BUILTIN_DATA:
        raise ValueError(f"{field}: unknown built-in data set {spec['builtin']!r}; the built-in ones are {BUILTIN_DATA}")
    if "path" in sources:
        path = Path(spec["path"])
        if not path.exists():
            raise ValueError(f"{field}: {path} does not exist")
        if path.is_file() and path.suffix.lower() not in FILE_TYPES:
            raise ValueError(f"{field}: {path} is a {path.suffix or 'suffix-less'} file; give a {'/'.join(FILE_TYPES)} file")
    limit = spec.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"{field}.limit must be a positive integer, got {limit!r}")
    return spec


def load_data(spec, field: str):
    """(datasets.Dataset, format name) of a data spec; the columns must match one of FORMATS."""
    from datasets import Dataset, load_dataset

    spec = normalize_spec(spec, field)
    if "builtin" in spec:
        name = spec["builtin"]
        dataset = builtin_dataset(name) if name in BUILTIN_DATASETS else Dataset.from_list(EVAL_DATA[name]())
    elif "path" in spec:
        path = Path(spec["path"])
        if path.is_file():
            if not path.read_bytes().strip():
                raise ValueError(f"{field}: {path} is empty; it needs at least one row ({describe_formats()})")
            try:
                dataset = load_dataset(FILE_TYPES[path.suffix.lower()], data_files=str(path), split="train")
            except StopIteration:  # what `datasets` raises on a file without a row
                raise ValueError(f"{field}: {path} holds no rows ({describe_formats()})") from None
        else:
            dataset = load_dataset(str(path), spec.get("name"), split=spec.get("split", "train"))
    else:  # a `datasets` id: the Hub (or a local folder of that name), exactly as load_dataset reads it
        dataset = _load_dataset_id(spec, field)
    renames = spec.get("columns") or {}
    missing = sorted(src for src in renames.values() if src not in dataset.column_names)
    if missing:
        raise ValueError(f"{field}.columns renames {missing}, which the data does not have (its columns: {dataset.column_names})")
    if renames:
        dataset = dataset.rename_columns({src: new for new, src in renames.items()})
    if spec.get("limit") is not None:
        dataset = dataset.select(range(min(spec["limit"], len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{field}: the data has no rows")
    return dataset, detect_format(dataset.column_names, field)


def hub_offline() -> bool:
    """Whether `datasets` / huggingface_hub run in offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    import datasets.config

    flags = [getattr(datasets.config, "HF_HUB_OFFLINE", False), getattr(datasets.config, "HF_DATASETS_OFFLINE", False)]
    flags += [os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    return any(flags)


def _load_dataset_id(spec: dict, field: str):
    from datasets import load_dataset

    name = spec["dataset"]
    try:
        return load_dataset(name, spec.get("name"), split=spec.get("split", "train"))
    except OSError as error:  # ConnectionError, and DatasetNotFoundError (a FileNotFoundError)
        cause = (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), and this data set is not in the local cache"
            if hub_offline() else "the Hugging Face Hub could not be reached, or has no such data set"
        )
        raise ValueError(
            f"{field}: cannot load the `datasets` id {name!r}: {cause} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Download it once where you have the Hub (it is "
            f"cached), or save it as a local file and give {field}: {{path: your_file.jsonl}}."
        ) from None


def detect_format(columns, field: str) -> str:
    for name, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    raise ValueError(
        f"{field}: columns {sorted(columns)} match no known format. Expected columns: {describe_formats()}. "
        f"Rename yours with {field}: {{path: ..., columns: {{prompt: your_input_column, completion: your_output_column}}}}."
    )


def training_format(fmt: str, field: str = "train_data") -> str:
    """The trainer of a training format: "sft" or "dpo"."""
    if fmt not in TRAIN_FORMATS:
        raise ValueError(
            f"{field} is {fmt.replace('_', ' ')} data, which cannot be trained on. Training data needs "
            + "; ".join(f"{n}: {' + '.join(FORMATS[n])}" for n in TRAIN_FORMATS)
        )
    return "dpo" if fmt == "preference" else "sft"


def training_columns(dataset, fmt: str):
    """Only the columns TRL's trainer reads (extra columns of a user's file would reach the collator)."""
    return dataset.select_columns(list(FORMATS[fmt]))
