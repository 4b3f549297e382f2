from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from peft_ext.tuners.base import PeftExtTuner, is_linear_like

from .config import TARGET_MODULES_MAPPING, SmoreConfig
from .layer import MERGE_ERROR, SmoreLayer, SmoreRun, inject_aux


class SmoreModel(PeftExtTuner, BaseTuner):
    """S'MoRE as a PEFT tuner: each targeted linear layer becomes a `SmoreLayer` (see `SmoreConfig`).

    The load-balance loss needs no change to a training script: with aux_loss_mode="add_to_loss" (default) the
    wrapped model's forward adds the summed auxiliary loss to `outputs.loss` whenever it trains; where the trainer
    builds its loss itself, the auxiliary loss rides on what that loss is built from (an autograd identity whose
    backward also backpropagates it): TRL's fused LM head output `log_probs` (SFTTrainer, DPOTrainer, KTO, GRPO in
    TRL 1.16), else the logits of a forward without a loss (`compute_loss_func`, custom losses).
    aux_loss_mode="inject" does that in every layer's output instead. `peft_ext.training.SmoreCallback` logs the auxiliary loss, each gate's expert load and
    router entropy, and warns when an expert starves.

    Example:
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_ext.SmoreConfig(num_experts=[4, 4], num_active=[2, 2]))
        >>> SFTTrainer(model=model, ...).train()  # the load-balance loss trains with the LM loss
    """

    prefix: str = "smore_"
    tuner_layer_cls = SmoreLayer
    target_module_mapping = TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, **kwargs) -> None:
        self.smore_run = SmoreRun()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        self._smore_hooks = [
            self.model.register_forward_pre_hook(self._smore_pre_forward, with_kwargs=True),
            self.model.register_forward_hook(self._smore_post_forward, with_kwargs=True, always_call=True),
        ]

    # ------------------------------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: SmoreConfig, model_config: dict) -> SmoreConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in TARGET_MODULES_MAPPING:
                raise ValueError(
                    f"SmoreConfig.target_modules is None and there is no default for model_type={model_type!r} (the "
                    f"defaults: {', '.join(sorted(TARGET_MODULES_MAPPING))}): give the linear layers to adapt, by the "
                    f"names of their modules (model.named_modules(); the paper adapts the feed-forward projections) "
                    f"or target_modules='all-linear'."
                )
            peft_config.target_modules = sorted(TARGET_MODULES_MAPPING[model_type])
        return peft_config

    def _check_new_adapter_config(self, config) -> None:
        if not isinstance(config, SmoreConfig):
            raise TypeError(f"an S'MoRE model takes SmoreConfig adapters, got {type(config).__name__}.")
        super()._check_new_adapter_config(config)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not (is_linear_like(base) or _is_bnb(base)):
            raise ValueError(
                f"S'MoRE wraps linear layers (nn.Linear, transformers' Conv1D, bitsandbytes 4/8-bit); {current_key} is "
                f"a {type(base).__name__}. Leave it out of target_modules (use exclude_modules)."
            )
        new = self._add_to_layer(SmoreLayer, target, adapter_name, parent, target_name, config=peft_config, name=current_key)
        new.smore_run = self.smore_run

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if self.prefix not in name:
                p.requires_grad = False

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check the file's tensors against this model's S'MoRE layers before anything is loaded: another base (other
        widths or module names) or another S'MoRE shape (num_experts, expert_ranks, router sizes) is a clear error
        instead of torch's size mismatch or silently missing keys."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        params = dict(model.named_parameters())
        strip = lambda k: k.removeprefix("base_model.model.")  # noqa: E731
        by_plain = {strip(k): p for k, p in params.items()}
        shape_fields = "num_experts, num_active, expert_ranks, router_dim, router_down_dim, gate_type, shared_expert_pool"
        for key, tensor in state_dict.items():
            if f".{SmoreModel.prefix}" not in key:
                continue
            target = params.get(key, by_plain.get(strip(key)))
            if target is None:
                raise ValueError(
                    f"the S'MoRE adapter file holds {strip(key)}, which this {type(model).__name__} does not have: the "
                    f"adapter was trained on another base model, or with another S'MoRE shape ({shape_fields}). Load "
                    f"it onto the base it was trained on, with its own adapter_config.json."
                )
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"the S'MoRE adapter file's {strip(key)} has shape {tuple(tensor.shape)}, but this model's has "
                    f"{tuple(target.shape)}: the adapter was trained on another base model (other layer widths) or "
                    f"with another S'MoRE shape ({shape_fields}). Load it onto the base it was trained on, with its "
                    f"own adapter_config.json."
                )
        return state_dict

    # -------------------------------------------------------------------------------------------- merging
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise ValueError(MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise ValueError(MERGE_ERROR)
        model = super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        for handle in self._smore_hooks:
            handle.remove()
        self._smore_hooks = []
        return model

    def unmerge_adapter(self) -> None:  # never merged
        return None

    # ------------------------------------------------------------------------------------ auxiliary loss
    def _smore_pre_forward(self, module, args, kwargs):
        run = self.smore_run
        run.aux = []
        run.aux_seen = []
        run.in_forward = True
        mask = kwargs.get("attention_mask")
        encoder_decoder = bool(getattr(getattr(module, "config", None), "is_encoder_decoder", False))
        # an encoder-decoder's attention_mask is the encoder's: the decoder's layers would be masked by it
        usable = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not encoder_decoder
        run.token_mask = mask if usable else None
        run.loss_weight = _loss_share(kwargs)

    def _smore_post_forward(self, module, args, kwargs, output):
        run = self.smore_run
        run.in_forward = False
        run.token_mask = None
        if run.aux_seen:
            run.last_aux = torch.stack([a.detach().float() for a in run.aux_seen]).sum()
        run.aux_seen = []
        if not run.aux or not self.model.training:
            run.aux = []
            return output
        total = torch.stack([a.float() for a in run.aux]).sum()
        run.aux = []
        # without gradient here (reentrant checkpointing) the layers inject it in their recomputation, with
        # run.pending_coef
        log_probs = _get(output, "log_probs")
        if isinstance(log_probs, torch.Tensor) and log_probs.requires_grad:
            # TRL's fused LM head (`model(..., fused_lm_head=True)`: SFT, DPO, KTO, GRPO) builds the trainer's loss from
            # the per-token log_probs and leaves outputs.loss unused: the aux's gradient rides on log_probs
            return self._inject(output, "log_probs", log_probs, total)
        loss = _get(output, "loss")
        if loss is not None:
            new_loss = loss + run.loss_weight * total.to(loss.dtype)
            if not total.requires_grad and new_loss.requires_grad:
                run.pending_coef = run.loss_weight  # times the scale the backward sends into the loss:
                new_loss.register_hook(self._record_loss_scale)
            return _set(output, "loss", new_loss)
        logits = _get(output, "logits")
        if logits is None and isinstance(output, torch.Tensor):
            return self._inject(output, None, output, total)
        if logits is not None:  # a trainer that builds its loss from the logits (compute_loss_func, custom losses)
            return self._inject(output, "logits", logits, total)
        warnings.warn(
            "S'MoRE: the model's output has neither a loss nor logits to carry the load-balance loss; it is not "
            "trained. Use SmoreConfig(aux_loss_mode='inject').",
            stacklevel=2,
        )
        return output

    def _inject(self, output, key, tensor, total):
        """The aux's gradient rides on `tensor` (a copy: in-place safe), weighted by run.inject_scale."""
        run = self.smore_run
        if not tensor.requires_grad:
            return output
        run.check_inject_scale()
        if not total.requires_grad:
            run.pending_coef = run.inject_scale
            return output
        injected = inject_aux(tensor, total, run.inject_scale, copy=True)
        return injected if key is None else _set(output, key, injected)

    def _record_loss_scale(self, grad: torch.Tensor) -> None:
        """Reentrant checkpointing: the gradient arriving at outputs.loss (the trainer's division by the accumulation
        steps, the fp16 loss scale, ...) runs before the checkpointed layers recompute and inject the aux."""
        self.smore_run.pending_coef = self.smore_run.loss_weight * float(grad)

    def set_aux_inject_scale(self, scale: float) -> None:
        """The weight of the auxiliary loss's gradient where it is injected (inject mode, and add_to_loss through
        log_probs / logits): SmoreCallback sets 1 / gradient_accumulation_steps (times the fp16 loss scale), as the
        trainer divides its own loss."""
        self.smore_run.inject_scale = float(scale)
        self.smore_run.inject_scale_set = True

    def smore_stats(self) -> dict:
        """The last training forward's auxiliary loss (a float, or None) and, per adapted module and adapter, each
        gate's expert load (share of picks per expert) and router entropy (detached tensors)."""
        aux = self.smore_run.last_aux
        return {"aux_loss": None if aux is None else float(aux), "layers": dict(self.smore_run.stats)}


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and "bitsandbytes" in type(module).__module__


def _loss_share(kwargs: dict) -> float:
    """This micro-batch's weight for the auxiliary loss: when the trainer passes `num_items_in_batch` it normalises
    the LM loss over the whole accumulated batch and does not divide by the accumulation steps, so the auxiliary
    loss gets this micro-batch's share of the label tokens (the same count the trainer makes); otherwise 1."""
    total = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2:
            labels = labels[..., 1:]
    if total is None or not isinstance(labels, torch.Tensor):
        return 1.0
    total = float(total.sum() if isinstance(total, torch.Tensor) else total)
    return float(labels.ne(-100).sum()) / total if total > 0 else 1.0


def _get(output, key):
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output.get(key) if hasattr(output, "get") else None
    if isinstance(output, tuple) and key == "loss" and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
        return output[0]
    return None


def _set(output, key, value):
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return (value, *output[1:])
    output[key] = value
    return output


__all__ = ["SmoreModel"]
