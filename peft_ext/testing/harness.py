"""Shared driving code for the contract tests: wrap a tiny model, train one step, snapshot and compare tensors.

Which methods and models a test runs on is the plugin's business (peft_ext.testing.plugin), not this module's.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from peft import get_peft_model
from torch import nn

from .entries import MethodEntry, modules_to_save_names
from .models import ModelSpec

LR = 1e-2
WEIGHT_DECAY = 0.1


def peft_model(entry: MethodEntry, spec: ModelSpec, seed: int = 0, dtype=torch.float32, adapter_name="default", **overrides):
    """(peft model, its config) for a fresh base built from `seed`."""
    config = entry.make_config(spec.kind, **overrides)
    model = get_peft_model(spec.make(seed, dtype), config, adapter_name=adapter_name)
    return model, model.peft_config[adapter_name]


def train_step(spec: ModelSpec, model: nn.Module, seed: int = 7) -> torch.Tensor:
    """One AdamW step (weight decay > 0) on one batch; returns the loss. Leaves the model in eval mode."""
    model.train()
    dtype = next(model.parameters()).dtype  # the MLP takes float features in the model's dtype
    # a method documented as not trainable ("train" in documented_errors) raises its own error in this forward
    loss = spec.loss(model, spec.batch_with_labels(seed=seed, dtype=dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter of the model requires grad")
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.detach()


def trained_peft_model(entry: MethodEntry, spec: ModelSpec, seed: int = 0, **overrides):
    """A peft model after one training step: a non-trivial adapter. A method documented as not trainable gets its
    non-identity init instead."""
    if not entry.supports("train", spec.kind):
        return peft_model(entry, spec, seed=seed, **{**entry.nonidentity_overrides, **overrides})
    model, config = peft_model(entry, spec, seed=seed, **overrides)
    train_step(spec, model)
    return model, config


@torch.no_grad()
def output(spec: ModelSpec, model: nn.Module, inputs: Optional[dict] = None, **kwargs) -> torch.Tensor:
    return spec.run(model, {**(inputs or spec.inputs()), **kwargs})


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-identical (NaN never equals)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.shape, expected.shape)
    if not torch.equal(actual, expected):
        diff = (actual.float() - expected.float()).abs().max().item()
        raise AssertionError(f"{what}: not bit-identical (max abs diff {diff:.3g})")


def assert_state_equal(model: nn.Module, reference: nn.Module, what: str = "") -> None:
    """Same parameter/buffer names and bit-identical values."""
    a, b = model.state_dict(), reference.state_dict()
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        assert_equal(a[key], b[key], f"{what}: {key}")


def module_of_param(param_name: str, prefix: str) -> str:
    """The base-model module that an adapter parameter (or a modules_to_save copy) belongs to."""
    name = param_name.removeprefix("base_model.model.")
    if ".modules_to_save." in name:
        return name.partition(".modules_to_save.")[0]
    match = re.search(r"\." + re.escape(prefix), name)
    return name[: match.start()] if match else name


def adapter_param_names(model: nn.Module, entry: MethodEntry, adapter: str = "default") -> list[str]:
    """Parameters that belong to `adapter`: the method's prefixed tensors and the modules_to_save copies."""
    out = []
    for name, _ in model.named_parameters():
        if f".modules_to_save.{adapter}." in name:
            out.append(name)
        elif "." + entry.prefix in name and re.search(rf"\.{re.escape(adapter)}(\.|$)", name):
            out.append(name)
    return out


def adapter_tensors(model: nn.Module, entry: MethodEntry) -> dict[str, torch.Tensor]:
    """Every tensor an adapter holds: the method's prefixed parameters *and buffers* (an inference-only method keeps
    its adapter in buffers), and the modules_to_save copies."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: t for n, t in named if "." + entry.prefix in n or ".modules_to_save." in n}


def expected_trained_modules(entry: MethodEntry, base: nn.Module, config) -> set[str]:
    """`entry.trained_modules(config)`, or `(config, base)` for an entry whose config keeps short names only."""
    import inspect

    fn = entry.trained_modules
    takes_base = len(inspect.signature(fn).parameters) >= 2
    names = fn(config, base) if takes_base else fn(config)
    return set(names) | set(modules_to_save_names(base, config.modules_to_save))

