"""COLA's training driver: merge the link, start the next one and reset its optimizer state at each link boundary."""

from __future__ import annotations

from transformers import TrainerCallback

from peft_ext.tuners.cola import ColaConfig, ColaModel

from .optimizer_params import editable, reset_optimizer_state


class ColaChainCallback(TrainerCallback):
    """Drives every active COLA adapter of the model along its chain (see `peft_ext.ColaConfig`).

    - At the start of training: resolves the schedule for the run's max_steps (`ColaConfig.link_boundaries`),
      raising a ValueError that names the field if it does not fit, and checks that the adapter is at the link the
      schedule expects at this global step (a run resumed from a Trainer checkpoint mid-chain: the checkpoint's
      adapter file carries its merged links, which PEFT's load restores).
    - After each optimizer step that reaches a boundary: merges the link into the adapter's frozen factors, draws
      the next link (A random, B = 0) into the same parameters and drops their optimizer state, so that the next
      step starts with fresh moments; the learning-rate schedule goes on. The trainer is not rebuilt, and its
      optimizer keeps its parameter groups (a checkpoint taken later still resumes).

    Several processes (docs/distributed.md): under DDP every rank merges the same link and draws the same next link
    (its seed comes from the config's seed or the run's, the same on every rank), so the replicas stay identical.
    What cannot change the model mid-run is refused at the start of training, before any step, naming the fix:
    a link whose rank differs from the previous one under several processes (DDP's gradient buckets are sized once),
    a sharded model (FSDP1's flat parameters, FSDP2's DTensors: the merge would resize what the sharding owns), and
    an optimizer whose state peft-ext cannot reach (DeepSpeed ZeRO keeps flat partitions). Should a boundary find the
    new link's parameters outside the optimizer's groups, it raises instead of training them with stale moments.

    Works with `Trainer`, TRL's `SFTTrainer` and `DPOTrainer` (the DPO reference, `disable_adapter()`, is the
    base model whatever the chain holds):

        trainer = SFTTrainer(model, args, train_dataset=..., peft_config=ColaConfig(r=8, chain_length=3),
                             callbacks=[ColaChainCallback()])
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        adapters = _cola_adapters(model)
        if not adapters:
            raise ValueError(
                "ColaChainCallback: the model holds no active COLA adapter (get_peft_model(model, ColaConfig(...)) or "
                "SFTTrainer(..., peft_config=ColaConfig(...))); remove the callback for other methods."
            )
        for tuner, name, config in adapters:
            config.link_boundaries = config.boundaries_for(state.max_steps)
            expected = sum(step <= state.global_step for step in config.link_boundaries)
            if config.current_link != expected:
                where = "at the start of a run" if state.global_step == 0 else f"at global step {state.global_step}"
                raise ValueError(
                    f"COLA adapter {name!r} has {config.current_link} merged link(s), but {where} the schedule "
                    f"(merges after steps {config.link_boundaries}) expects {expected}. Resume a chain with "
                    f"trainer.train(resume_from_checkpoint=...) and the same ColaConfig and max_steps; start a new "
                    f"run from a fresh adapter (current_link=0)."
                )
            if config.current_link < len(config.link_boundaries):  # this run merges at least one link
                _check_merges_can_run(tuner, name, config, model, kwargs.get("optimizer"))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        for tuner, name, config in _cola_adapters(model):
            bounds = config.link_boundaries or []
            while config.current_link < len(bounds) and state.global_step >= bounds[config.current_link]:
                params = tuner.next_link(name)
                if optimizer is not None:
                    _check_in_optimizer(optimizer, params, name)
                    reset_optimizer_state(optimizer, params)


def _cola_adapters(model):
    """(tuner, adapter name, config) for every active COLA adapter of a PeftModel (or tuner) `model`."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, ColaModel):
        return []
    return [(tuner, n, tuner.peft_config[n]) for n in tuner.active_adapters if isinstance(tuner.peft_config.get(n), ColaConfig)]


_FIX = "train a COLA chain on one process or under DDP (accelerate's MULTI_GPU / MULTI_CPU, torchrun)"


def _check_merges_can_run(tuner, name: str, config: ColaConfig, model, optimizer) -> None:
    """Raise, before the first step, what would stop this run at a link boundary (see ColaChainCallback)."""
    if optimizer is not None and not editable(optimizer):
        raise ValueError(
            f"COLA adapter {name!r}: at each link boundary the new link's optimizer state is reset, but this run's "
            f"optimizer ({type(optimizer).__name__}, DeepSpeed ZeRO or another wrapper that keeps flat copies of the "
            f"parameters) holds state peft-ext cannot reach: the new link would start from the old link's moments. "
            f"{_FIX[0].upper() + _FIX[1:]}, with a torch optimizer."
        )
    if _fsdp1_wrapped(model):
        raise ValueError(
            f"COLA adapter {name!r}: the model is sharded with FSDP1 (FullyShardedDataParallel), whose flat parameters "
            f"own the link's storage, so merging a link and drawing the next one mid-run is not possible. {_FIX}; "
            f"under FSDP, train each link as a run of its own (save the adapter, call model.base_model.next_link() on "
            f"the unsharded model, shard it again)."
        )
    from peft_ext.tuners.cola.layer import FSDP2_LINK_MERGE, _refuse_sharded

    try:
        _refuse_sharded(*(p for p in tuner.parameters() if p.requires_grad))
    except RuntimeError:
        raise ValueError(f"COLA adapter {name!r}: {FSDP2_LINK_MERGE}") from None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    changes = [
        (k + 1, ranks[k], ranks[k + 1])
        for ranks in _link_rank_lists(tuner, name)
        for k in range(config.current_link, len(config.link_boundaries))
        if ranks[k + 1] != ranks[k]
    ]
    if changes:
        link, old, new = changes[0]
        raise ValueError(
            f"COLA adapter {name!r}: link {link + 1} of the chain (counted from 1) has rank {new} where link {link} "
            f"has rank {old} "
            f"(ColaConfig.link_ranks={config.link_ranks}), and this run has {dist.get_world_size()} processes: "
            f"DDP sizes its gradient buckets once, so a link cannot change shape mid-run. Use one rank for every link "
            f"(link_ranks=None, or equal values), or train this chain on one process."
        )


def _link_rank_lists(tuner, name: str):
    """The per-link ranks of every COLA layer of adapter `name` (each module's, with rank_pattern applied)."""
    seen = set()
    for _, layer in tuner.cola_layers(name):
        ranks = tuple(layer.cola_link_ranks[name])
        if ranks not in seen:
            seen.add(ranks)
            yield list(ranks)


def _fsdp1_wrapped(model) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - a torch without torch.distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _check_in_optimizer(optimizer, params, name: str) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    outside = [p for p in params if id(p) not in held]
    if outside:
        raise RuntimeError(
            f"COLA adapter {name!r}: the optimizer does not hold the new link's parameters ({len(outside)} of "
            f"{len(params)} are in none of its param groups), so their optimizer state cannot be reset and they would "
            f"not train. Build the optimizer from the model's trainable parameters after the adapter is added (the "
            f"Trainer does), and do not replace them in the model afterwards."
        )
