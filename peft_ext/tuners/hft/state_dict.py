"""HFT's adapter files hold deltas: W_ft - W_0 of the trained tensors, relative to the base they were trained on.

Saving turns each `<module>.hft_weight.<adapter>.<param>` into `<module>.hft_delta.<adapter>.<param>`; loading
adds the base tensor back. The delta is stored in the trained tensor's own dtype (bf16 for a bf16 model, fp32 for
fp32 weights and for the fp32 masters of an fp16 model), so it is never larger than the full values, and it is kept
only if `base + delta` (computed in that dtype, as loading does) rebuilds the trained tensor bit for bit; any other
tensor is saved with its full values under its `hft_weight` key, so a save/load round trip is always exact. Files
written before (fp32 deltas of 16-bit weights) still load: a delta is added in its own dtype, then cast.
"""

from __future__ import annotations

from typing import Optional

import torch

from .layer import HftLayer

WEIGHT, DELTA, INDEX = ".hft_weight.", ".hft_delta.", ".hft_index."
_PEFT_PREFIX = "base_model.model."


def deltas_from_weights(model: torch.nn.Module, weights: dict, adapter_name: str, state_dict: Optional[dict] = None) -> dict:
    """The adapter's tensors (`weights`, keys with the adapter name) with each trained tensor turned into its delta.

    W_0 is read from `state_dict` (the whole model's state dict that `weights` was taken from) where it holds the
    base parameter, `<module>.base_layer.<param>`, and the module does not hold an adapter merged into it: a state
    dict gathered for saving (FSDP2's `get_model_state_dict(full_state_dict=True)`, accelerate's `get_state_dict`)
    holds full tensors while the module's own parameters are still sharded. Otherwise from the module, a sharded
    DTensor gathered whole (a collective: every rank must save, as FSDP2's own state-dict gathering requires)."""
    out = {}
    for key, value in weights.items():
        if WEIGHT not in key:
            out[key] = value
            continue
        module_path, _, rest = key.partition(WEIGHT)
        pname = rest.rpartition(".")[2]
        layer = _layer(model, module_path)
        saved = None if state_dict is None else state_dict.get(f"{module_path}.base_layer.{pname}")
        base = layer.original_values(adapter_name, pname, original=_original(layer, pname, saved, value))
        delta, exact = _delta(value, base)
        out[module_path + DELTA + rest if exact else key] = delta if exact else value
    return out


def weights_from_deltas(model: torch.nn.Module, config, state_dict: dict, adapter_name: str) -> dict:
    """Checkpoint keys (no adapter name) -> full values, with every shape checked against this model."""
    out = {}
    for key, value in state_dict.items():
        kind = DELTA if DELTA in key else WEIGHT if WEIGHT in key else None
        if kind is None:
            out[key] = value
            continue
        module_path, _, pname = key.partition(kind)
        layer = _layer(model, module_path)
        expected = layer.hft_weight[adapter_name][pname]
        if tuple(value.shape) != tuple(expected.shape):
            raise ValueError(
                f"The adapter file's tensor {key} has shape {tuple(value.shape)}, but {module_path.removeprefix(_PEFT_PREFIX)} "
                f"of this base model needs {tuple(expected.shape)}: the adapter was trained on another base model. "
                f"Load it onto the model it was trained on."
            )
        if kind == DELTA:
            base = layer.original_values(adapter_name, pname, rows=state_dict.get(module_path + INDEX + "rows"))
            value = (base.to(value.dtype) + value.to(base.device)).to(expected.dtype)
        out[module_path + WEIGHT + pname] = value
    _check_complete(config, out)
    return out


def weights_for_plain_model(model: torch.nn.Module, state_dict: dict) -> dict:
    """An adapter file's tensors with every delta turned into full values, computed from `model` before any HFT
    layer is injected (or with some already there): what transformers' own adapter loader can map to parameters."""
    out = {}
    for key, value in state_dict.items():
        if DELTA not in key:
            out[key] = value
            continue
        module_path, _, pname = key.partition(DELTA)
        module = _find_module(model, module_path)
        if module is None:
            raise ValueError(
                f"The adapter file has HFT tensors for {module_path.removeprefix(_PEFT_PREFIX)}, which this model does "
                f"not have: the adapter was trained on another base model. Load it onto the model it was trained on."
            )
        if isinstance(module, HftLayer):
            base = module.original_base_value(pname).detach()
            module = module.get_base_layer()
        else:
            base = getattr(module, pname).detach()
        rows = state_dict.get(module_path + INDEX + "rows")
        if rows is not None:
            from peft_ext.tuners.base import output_dim

            base = base.index_select(output_dim(module, pname, base), rows.to(base.device))
        if tuple(base.shape) != tuple(value.shape):
            raise ValueError(
                f"The adapter file's tensor {key} has shape {tuple(value.shape)}, but this base model's needs "
                f"{tuple(base.shape)}: the adapter was trained on another base model. Load it onto the model it was "
                f"trained on."
            )
        out[module_path + WEIGHT + pname] = base.to(value.dtype) + value.to(base.device)
    return out


def _original(layer: HftLayer, pname: str, saved: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """W0 of the base parameter `pname` of `layer`, to compute the delta of the saved tensor `value` from: the state
    dict's base parameter `saved` unless an adapter is merged into the module (it then holds merged values, and the
    layer keeps W0 aside), else the module's. A sharded W0 (an FSDP2 DTensor) is gathered whole (a collective) unless
    `value` is sharded too."""
    original = saved if saved is not None and not layer._holds_original(pname) else layer.original_base_value(pname)
    original = original.detach()
    if _is_dtensor(original) and not _is_dtensor(value):
        original = original.full_tensor()
    return original


def _is_dtensor(value: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without torch.distributed
        return False
    return isinstance(value, DTensor)


def _delta(value: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(W_ft - W_0 in W_ft's dtype, whether loading rebuilds W_ft from it bit for bit)."""
    base = base.to(device=value.device, dtype=value.dtype)
    wide = torch.promote_types(value.dtype, torch.float32)  # the difference rounded once, to value's dtype
    delta = (value.to(wide) - base.to(wide)).to(value.dtype)
    return delta, torch.equal(base + delta, value)  # what weights_from_deltas computes


def _find_module(model: torch.nn.Module, module_path: str):
    """The module a file key's path names, with or without PEFT's "base_model.model." prefix (None if neither)."""
    for path in (module_path, module_path.removeprefix(_PEFT_PREFIX)):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None


def _layer(model: torch.nn.Module, module_path: str) -> HftLayer:
    module = _find_module(model, module_path)
    if isinstance(module, HftLayer):
        return module
    raise ValueError(
        f"The adapter file has HFT tensors for {module_path.removeprefix(_PEFT_PREFIX)}, which this model does not "
        f"train under the adapter's config (selected/trained_modules): the file and adapter_config.json do not match. "
        f"Save the adapter again, or load the folder it came from."
    )


def _check_complete(config, weights: dict) -> None:
    present = {k.partition(WEIGHT)[0].removeprefix(_PEFT_PREFIX) for k in weights if WEIGHT in k}
    missing = sorted(set(config.trained_modules or ()) - present)
    if missing:
        raise ValueError(
            f"The adapter file lacks the trained tensors of {missing[:5]}{' ...' if len(missing) > 5 else ''}, which "
            f"its adapter_config.json lists in trained_modules: the file is incomplete or from another adapter."
        )
