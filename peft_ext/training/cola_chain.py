"""COLA's training driver: merge the link, start the next one and reset its optimizer state at each link boundary."""

from __future__ import annotations

from transformers import TrainerCallback

from peft_ext.tuners.cola import ColaConfig, ColaModel

from .optimizer_params import reset_optimizer_state


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
        for _, name, config in adapters:
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

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        for tuner, name, config in _cola_adapters(model):
            bounds = config.link_boundaries or []
            while config.current_link < len(bounds) and state.global_step >= bounds[config.current_link]:
                params = tuner.next_link(name)
                if optimizer is not None:
                    reset_optimizer_state(optimizer, params)


def _cola_adapters(model):
    """(tuner, adapter name, config) for every active COLA adapter of a PeftModel (or tuner) `model`."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, ColaModel):
        return []
    return [(tuner, n, tuner.peft_config[n]) for n in tuner.active_adapters if isinstance(tuner.peft_config.get(n), ColaConfig)]
