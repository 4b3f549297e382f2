"""Change which parameters an existing optimizer (and its LR scheduler) trains, without rebuilding the Trainer.

HFT's stage re-selection freezes the previous half and unfreezes a new one mid-run; a Trainer built its
optimizer from the parameters that required grad at the start, so the new ones must join it and the old ones
leave (with their Adam moments, which would otherwise keep memory and keep decaying them).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def swap_optimizer_params(
    optimizer: torch.optim.Optimizer,
    added: Iterable[torch.nn.Parameter],
    removed: Iterable[torch.nn.Parameter],
    lr_scheduler: Optional[object] = None,
) -> None:
    """Remove `removed` from every param group (dropping their state); add `added` as a new group that copies the
    hyper-parameters of the first group, and extend the scheduler so the new group follows the same schedule."""
    removed_ids = {id(p) for p in removed}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in removed_ids]
    state = optimizer.state
    for p in [p for p in state if id(p) in removed_ids]:
        del state[p]
    added = [p for p in added if not any(p is q for g in optimizer.param_groups for q in g["params"])]
    if not added:
        return
    template = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    optimizer.add_param_group({**template, "params": added})
    if lr_scheduler is None:
        return
    base_lrs = getattr(lr_scheduler, "base_lrs", None)
    if base_lrs is not None and len(base_lrs) == len(optimizer.param_groups) - 1:
        base_lrs.append(base_lrs[0])
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if lambdas is not None and len(lambdas) == len(optimizer.param_groups) - 1:
        lambdas.append(lambdas[0])


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> int:
    """Forget the optimizer state (Adam moments, step count, momentum buffers) of `params`, which stay in their
    param groups: their next step starts fresh, as for new parameters. For parameters re-initialised in place (COLA's
    next link), this keeps the optimizer's group layout, so a Trainer checkpoint of it still loads. Works through
    accelerate's AcceleratedOptimizer (its `state` is the wrapped optimizer's). Returns how many states were dropped."""
    state = optimizer.state
    dropped = 0
    for p in params:
        if p in state:
            del state[p]
            dropped += 1
    return dropped
