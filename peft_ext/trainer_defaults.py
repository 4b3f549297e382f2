"""Trainer arguments that suit the machine, under the user's own: TRL defaults to bf16 and gradient checkpointing
even on a CPU, where bf16 autocast changes results and checkpointing only costs time (design/platform.md, s. 2)."""

from __future__ import annotations

import torch


def device_defaults() -> dict:
    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported(), "gradient_checkpointing": False}
    return {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}


def quiet_defaults() -> dict:
    """No checkpoints, no experiment trackers: the caller saves what it needs."""
    return {"save_strategy": "no", "report_to": "none", "logging_steps": 1}
