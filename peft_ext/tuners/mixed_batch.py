"""`adapter_names=` (one adapter per row of a batch) for tuners built on BaseTuner: checks, then hooks that hand
the names to every layer of the tuner and to modules_to_save copies (a classification head routes rows too)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

from peft.utils import AuxiliaryTrainingWrapper


@contextmanager
def adapter_names_hooks(tuner, layer_cls, adapter_names, merged: bool, num_beams: int = 1):
    """Used by a tuner's `_enable_peft_forward_hooks`: `merged` says whether some adapter is merged in."""
    if adapter_names is None:
        yield
        return
    if tuner.training:
        raise ValueError("adapter_names= (mixed-adapter batches) is for inference: call model.eval() first.")
    unknown = sorted({a for a in adapter_names if a != "__base__"} - set(tuner.peft_config))
    if unknown:
        raise ValueError(
            f"adapter_names= names unknown adapter(s) {unknown}; this model has {sorted(tuner.peft_config)} "
            f"(and '__base__' for the base model)."
        )
    if merged:
        raise ValueError(
            "adapter_names= cannot run while an adapter is merged into the base weights (every row would see "
            "it): call model.unmerge_adapter() first."
        )
    if num_beams > 1:  # generate() repeats each row once per beam
        adapter_names = [name for name in adapter_names for _ in range(num_beams)]
    hook = partial(_inject_adapter_names, adapter_names=adapter_names)
    handles = [
        module.register_forward_pre_hook(hook, with_kwargs=True)
        for module in tuner.model.modules()
        if isinstance(module, (layer_cls, AuxiliaryTrainingWrapper))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def route_rows(x, adapter_names, run):
    """A mixed batch computed one adapter at a time: `run(name, x_rows)` on the rows (dim 0) of each adapter named
    in `adapter_names` (one per row), the results put back in row order."""
    import torch

    if len(adapter_names) != x.shape[0]:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows.")
    result = None
    for name in dict.fromkeys(adapter_names):
        rows = torch.tensor([i for i, a in enumerate(adapter_names) if a == name], device=x.device)
        out = run(name, x[rows])
        if result is None:
            result = out.new_empty((x.shape[0], *out.shape[1:]))
        result[rows] = out
    return result
