"""Calibration for GPTQ: H = sum x x^T of each targeted layer's inputs, over a small text sample.

The inputs are taken from the *fine-tuned* model (the model the compressed delta has to reproduce). Hessians
cost in_features^2 fp32 each, so layers are processed in chunks that fit `max_bytes` (one forward pass over the
calibration sample per chunk): a 7B model's 224 linear layers do not need 26 GB of Hessians at once.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from peft_ext.tuners.base import in_out_features

Calibration = Union[None, torch.Tensor, Sequence[str]]


def calibration_batches(
    calibration: Calibration, tokenizer, n_samples: int, seq_len: int, batch_size: int = 8
) -> list[torch.Tensor]:
    """Token-id batches: from given ids (n, L), from texts, or (None) from peft_ext's offline English text."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"calibration ids must be an integer tensor (n_samples, seq_len), got {calibration.dtype} {tuple(calibration.shape)}.")
        ids = calibration.long()
    else:
        if tokenizer is None:
            raise ValueError(
                "quantizer='gptq' calibrates on text, which needs a tokenizer: pass tokenizer=, calibration= token "
                "ids (n, seq_len), or use quantizer='rtn' (no calibration)."
            )
        if calibration is None:
            from peft_ext.data.english_text import english_text

            calibration = english_text("train")
        text = "\n\n".join(calibration)
        all_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        n = min(n_samples, all_ids.numel() // seq_len)
        if n < 1:
            raise ValueError(f"the calibration text has {all_ids.numel()} tokens, fewer than one sample of seq_len={seq_len}.")
        ids = all_ids[: n * seq_len].view(n, seq_len)
    return list(ids[:n_samples].split(batch_size))


def layer_inputs(module: nn.Module) -> int:
    return in_out_features(module)[0]


def hessian_chunks(model: nn.Module, names: Sequence[str], max_bytes: int) -> Iterator[list[str]]:
    chunk, used = [], 0
    for name in names:
        size = layer_inputs(model.get_submodule(name)) ** 2 * 4
        if chunk and used + size > max_bytes:
            yield chunk
            chunk, used = [], 0
        chunk.append(name)
        used += size
    if chunk:
        yield chunk


@torch.no_grad()
def collect_hessians(model: nn.Module, names: Sequence[str], batches: list[torch.Tensor], device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """{name: sum over calibration tokens of x x^T} (fp32, on `device`) for the named linear modules of `model`."""
    device = device or next(model.parameters()).device
    hessians: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        hessians[name] = torch.zeros(layer_inputs(module), layer_inputs(module), device=device)

        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(device=device, dtype=torch.float32)
            hessians[name].addmm_(x.T, x)

        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    model_device = next(model.parameters()).device
    try:
        for ids in batches:
            model(input_ids=ids.to(model_device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return hessians
