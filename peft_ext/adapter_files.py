"""Checks on adapter folders, run before PEFT reads them: safetensors only, and readable.

PEFT falls back to `adapter_model.bin` (a pickle) when no safetensors file is present; peft-ext adapters
never load from pickles. A truncated or corrupt safetensors file gets an error that names the file and the
fix instead of safetensors' bare "Error while deserializing header".
"""

from __future__ import annotations

import os
from typing import Optional

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


class AdapterFileError(ValueError):
    """An adapter folder that cannot be loaded safely or correctly."""


def check_adapter_folder(path: str, subfolder: Optional[str] = None) -> None:
    """Raise `AdapterFileError` if a local adapter folder holds only pickles or a corrupt safetensors file.

    Hub ids (not a local folder) are left to PEFT's download code.
    """
    folder = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(folder):
        return
    weights = os.path.join(folder, SAFETENSORS_NAME)
    if not os.path.exists(weights):
        pickles = [n for n in PICKLE_NAMES if os.path.exists(os.path.join(folder, n))]
        if pickles:
            raise AdapterFileError(
                f"{folder} holds {pickles[0]} but no {SAFETENSORS_NAME}: peft-ext loads safetensors only (a pickle "
                f"can run code). Convert it once, where you trust the file: `safetensors.torch.save_file("
                f"torch.load('{pickles[0]}', weights_only=True), '{SAFETENSORS_NAME}')` in that folder."
            )
        return  # no weights at all: PEFT reports that itself
    check_safetensors_file(weights)


def check_safetensors_file(path: str) -> None:
    """Open the header and every tensor's byte range; raise `AdapterFileError` naming the file if corrupt."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                f.get_slice(key).get_shape()
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({err}). It is truncated or corrupt: save or download "
            f"the adapter again."
        ) from err
