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
    model: Optional[torch.nn.Module] = None,
) -> None:
    """Remove `removed` from every param group (dropping their state) and put `added` into the groups, so that the
    optimizer is the one a new transformers Trainer would build for the model as it is now:

    - A Trainer's optimizer (two groups: weight decay, then none): each added parameter joins the group of its kind
      by the Trainer's own rule (`decay_parameter_names(model)`: no weight decay for biases and norms).
    - Another layout: a decayed parameter joins group 0; a no-decay one the first group without weight decay, else
      a new group copying group 0 with weight_decay=0, which the scheduler (`lr_scheduler`) then follows as well.
    - With `model`, every group lists its parameters in the model's order, as a new Trainer does, so that a Trainer
      checkpoint of this optimizer loads into the optimizer of a resumed run.

    Without `model`, every added parameter counts as decayed (joins group 0). Works through accelerate's
    AcceleratedOptimizer. Earlier versions added the new parameters as a new group copying group 0 (the Trainer's
    weight-decay group), which decayed norms and biases and made checkpoints that a resumed run could not load.
    """
    removed_ids = {id(p) for p in removed}
    groups = optimizer.param_groups
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) not in removed_ids]
    state = optimizer.state
    for p in [p for p in state if id(p) in removed_ids]:
        del state[p]
    present = {id(p) for g in groups for p in g["params"]}
    new = list({id(p): p for p in added if id(p) not in present}.values())
    if new:
        no_decay = set() if model is None else _no_decay_ids(model)
        decayed = [p for p in new if id(p) not in no_decay]
        undecayed = [p for p in new if id(p) in no_decay]
        groups[0]["params"].extend(decayed)
        if undecayed:
            if len(groups) == 2 and groups[1].get("weight_decay") == 0.0:  # the Trainer's layout
                target = groups[1]
            else:
                target = next((g for g in groups if g.get("weight_decay", 0.0) == 0.0), None)
            if target is not None:
                target["params"].extend(undecayed)
            else:
                _add_group(optimizer, undecayed, lr_scheduler, weight_decay=0.0)
    if model is not None:
        rank = {id(p): i for i, p in enumerate(model.parameters())}
        for group in optimizer.param_groups:
            group["params"].sort(key=lambda p: rank.get(id(p), len(rank)))


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """The names of the parameters of `model` that a transformers Trainer gives weight decay: its own rule
    (`Trainer.get_decay_parameter_names`, which needs no trainer: not biases, not norm layers)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def _no_decay_ids(model: torch.nn.Module) -> set[int]:
    decay = decay_parameter_names(model)
    return {id(p) for n, p in model.named_parameters() if n not in decay}


def _add_group(optimizer, params, lr_scheduler, **overrides) -> None:
    template = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    optimizer.add_param_group({**template, **overrides, "params": params})
    if lr_scheduler is None:
        return
    base_lrs = getattr(lr_scheduler, "base_lrs", None)
    if base_lrs is not None and len(base_lrs) == len(optimizer.param_groups) - 1:
        base_lrs.append(base_lrs[0])
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if lambdas is not None and len(lambdas) == len(optimizer.param_groups) - 1:
        lambdas.append(lambdas[0])


def editable(optimizer) -> bool:
    """Whether `swap_optimizer_params` can change what `optimizer` trains: a torch optimizer (also inside accelerate's
    AcceleratedOptimizer), not DeepSpeed's, which keeps flat copies of the parameters it was built with. DeepSpeed
    anywhere along the `.optimizer` chain counts: under accelerate the Trainer's optimizer is a
    DeepSpeedOptimizerWrapper around DeepSpeed's ZeRO optimizer, which itself holds the torch optimizer it was
    built from (`.optimizer`), so the innermost object alone looks editable."""
    chain, inner, seen = [optimizer], optimizer, set()
    while getattr(inner, "optimizer", None) is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.optimizer
        chain.append(inner)
    if any(type(o).__module__.split(".")[0] == "deepspeed" for o in chain):
        return False
    return isinstance(inner, torch.optim.Optimizer) and isinstance(optimizer, torch.optim.Optimizer)


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
