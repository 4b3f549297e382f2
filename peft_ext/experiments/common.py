"""Pieces the reproductions share: encoding the generated reviews and reading a classifier's logits on them
(ssmlora_vs_lora, finegates_vs_lora), and writing a run's results (those two and smore_vs_lora)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch


def encode(tokenizer, items: list[dict], max_length: int, who: str = "ssmlora_vs_lora") -> list[dict]:
    """Token ids, attention mask and label of every item; a text longer than `max_length` tokens is an error (`who`
    names the runner in its message), not truncated."""
    rows = []
    for item in items:
        ids = tokenizer(item["text"]).input_ids
        if len(ids) > max_length:
            raise ValueError(
                f"{who}: a review has {len(ids)} tokens, above max_length={max_length}: raise max_length "
                f"or lower the variant's filler"
            )
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": item["label"]})
    return rows


def classification_logits(
    model, tokenizer, items: list[dict], batch_size: int = 25, max_length: int = 4096, who: str = "ssmlora_vs_lora"
) -> torch.Tensor:
    """(len(items), num_labels) logits of a sequence classifier in eval mode, on the CPU (right padding; the model
    reads the last non-padding token), in batches of `batch_size` in the items' order."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    encoded = encode(tokenizer, items, max_length, who)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                width = max(len(x["input_ids"]) for x in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, x in enumerate(chunk):
                    ids[row, : len(x["input_ids"])] = torch.tensor(x["input_ids"])
                    mask[row, : len(x["input_ids"])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                out.append(logits.detach().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def write_run_results(out: Path, text: str, started: float, log: Callable[[str], None], results, **fields) -> None:
    """The end of a run: the printed table `text` with the wall time since `started` appended, written to
    out/results.md and logged; out/results.json holds `fields` (in order), the wall time and `results`."""
    wall = time.time() - started
    text += f"\nWall time {wall / 60:.1f} min.\n"
    saved = {**fields, "wall_seconds": wall, "results": results}
    (out / "results.json").write_text(json.dumps(saved, indent=2, default=str))
    (out / "results.md").write_text(text)
    log(text)
