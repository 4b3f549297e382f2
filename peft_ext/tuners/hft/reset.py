"""The observation behind HFT: resetting part of a fine-tuned model to its pre-trained values restores knowledge."""

from __future__ import annotations

import random
from typing import Literal, Optional

import torch
from torch import nn

from .layer import HftLayer


@torch.no_grad()
def reset_fraction(
    model: nn.Module,
    fraction: float,
    seed: int = 0,
    reference: Optional[nn.Module | dict] = None,
    granularity: Literal["matrix", "element"] = "matrix",
    adapter_name: Optional[str] = None,
) -> list[str]:
    """Restore a random `fraction` of the trained parameters to their pre-trained values, in place.

    - On an HFT model (a PeftModel or tuner holding `HftLayer`s): the trained copies of the active adapter (or
      `adapter_name`) are reset to the base weights they replace (also where those are offloaded to the CPU).
    - On any other model: pass the pre-trained model (or its state dict) as `reference`; every floating-point
      tensor that differs from it is a candidate (the paper's "half-reset" of Llama-2-Chat towards Llama-2).

    granularity="matrix" resets whole tensors (the paper's category-level reset); "element" resets a random
    `fraction` of the entries of every candidate tensor. Returns the names of the tensors that were touched
    (as in the base model: `model.layers.0.mlp.up_proj.weight`).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"reset_fraction: fraction must be in [0, 1], got {fraction!r}.")
    if granularity not in ("matrix", "element"):
        raise ValueError(f"reset_fraction: granularity must be 'matrix' or 'element', got {granularity!r}.")
    pairs = _hft_pairs(model, adapter_name) if reference is None else _reference_pairs(model, reference)
    if not pairs:
        raise ValueError(
            "reset_fraction found nothing to reset: pass an HFT model (PeftModel with an HftConfig adapter), or the "
            "pre-trained model as reference= for a plain fine-tuned model."
        )
    rng = random.Random(seed)
    names = sorted(pairs)
    if granularity == "matrix":
        chosen = rng.sample(names, int(round(fraction * len(names))))
        for name in chosen:
            trained, original = pairs[name]
            trained.copy_(original)
        return sorted(chosen)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        trained, original = pairs[name]
        mask = (torch.rand(trained.shape, generator=generator) < fraction).to(trained.device)
        trained.copy_(torch.where(mask, original.to(trained.device, trained.dtype), trained))
    return names


def _hft_pairs(model: nn.Module, adapter_name: Optional[str]) -> dict:
    pairs = {}
    for module_name, layer in model.named_modules():
        if not isinstance(layer, HftLayer):
            continue
        name = adapter_name or next((a for a in layer.active_adapters if a in layer.hft_weight), None)
        if name is None or name not in layer.hft_weight:
            continue
        for pname, trained in layer.hft_weight[name].items():
            original = layer.original_values(name, pname)
            pairs[f"{module_name.removeprefix('base_model.model.')}.{pname}"] = (trained, original)
    return pairs


def _reference_pairs(model: nn.Module, reference) -> dict:
    ref = reference.state_dict() if isinstance(reference, nn.Module) else reference
    pairs = {}
    for name, p in model.named_parameters():
        original = ref.get(name)
        if original is None or not p.is_floating_point() or original.shape != p.shape:
            continue
        if not torch.equal(p.detach().cpu(), original.detach().cpu().to(p.dtype)):
            pairs[name] = (p.data, original.to(p.device))
    return pairs
