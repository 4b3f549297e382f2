"""Where a model's weights come from when compressing: an in-memory nn.Module, a checkpoint folder, or a Hub id.

Folders are read one tensor at a time through safetensors' memory-mapped `safe_open` (sharded checkpoints via
their index), so a 7B base and fine-tune never sit in memory whole. Each read opens the file and closes it again (a
fraction of a millisecond): a handle kept open would keep every page read so far mapped, and the process's resident
size would grow to the size of both checkpoints (reclaimable page cache, but counted as resident memory). Pickled
checkpoints (*.bin) are refused: loading never unpickles.
"""

from __future__ import annotations

import json
import os
from typing import Union

import torch
from torch import nn

ModelRef = Union[str, os.PathLike, nn.Module]


def resolve_folder(ref: Union[str, os.PathLike], role: str) -> str:
    """A local folder as is; anything else is a Hub repo id, downloaded (safetensors and json files only)."""
    path = os.fspath(ref)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{role}={path!r} is a file; give the model's folder (with config.json and *.safetensors).")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "tokenizer*"])
    except Exception as err:  # noqa: BLE001 - re-raised with what to check
        raise ValueError(f"{role}={path!r} is neither a local folder nor a downloadable Hub model: {err}") from err


class WeightSource:
    """Named tensors of a model (state-dict names), read on demand."""

    def __init__(self, ref: ModelRef, role: str):
        self.role = role
        self.module = ref if isinstance(ref, nn.Module) else None
        self.folder = None
        if self.module is not None:
            self._tensors = _untied_state_dict(self.module)
            return
        self.folder = resolve_folder(ref, role)
        self._files = _safetensors_index(self.folder, role)

    def names(self) -> list[str]:
        return list(self._tensors) if self.module is not None else list(self._files)

    def has(self, name: str) -> bool:
        return name in (self._tensors if self.module is not None else self._files)

    def get(self, name: str) -> torch.Tensor:
        if self.module is not None:
            return self._tensors[name].detach()
        from safetensors import safe_open

        with safe_open(os.path.join(self.folder, self._files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.module is not None:
            return tuple(self._tensors[name].shape)
        from safetensors import safe_open

        with safe_open(os.path.join(self.folder, self._files[name]), framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def structure(self) -> nn.Module:
        """The model's modules (to find its linear layers): the module itself, or one built on the meta device."""
        if self.module is not None:
            return self.module
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.folder)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)


def _untied_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of a tied tensor (lm_head.weight tied to the embeddings), as
    save_pretrained writes it: an in-memory model and a saved folder then list the same tensors."""
    out, seen = {}, set()
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _safetensors_index(folder: str, role: str) -> dict[str, str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        pickled = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth")))
        hint = f" It has {pickled[:3]}: pickled checkpoints are never loaded here; re-save with save_pretrained(safe_serialization=True)." if pickled else ""
        raise ValueError(f"{role} folder {folder} has no *.safetensors weights.{hint}")
    from safetensors import safe_open

    out = {}
    for file in files:
        with safe_open(os.path.join(folder, file), framework="pt") as handle:
            out.update({key: file for key in handle.keys()})
    return out
