from __future__ import annotations

import copy
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from peft_ext.tuners.base import PeftExtTuner, is_linear_like

from .config import DEFAULT_TARGETS, FineGatesConfig
from .layer import FineGatesLayer, is_quantized, keep_probability, quantized_merge_error

PRUNED_ERROR = (
    "this FineGates model was physically pruned by merge_and_unload(prune=True): the cut rows, columns, neurons and "
    "heads are gone, and the adapter with them, so {what} has nothing to work on. Save the pruned model with "
    "peft_ext.save_pruned(model, folder); for the base or the adapter, load them again (PeftModel.from_pretrained): "
    "pruning them again gives the same pruned model."
)


class FineGatesModel(PeftExtTuner, BaseTuner):
    """FineGates as a PEFT tuner: each gated linear layer becomes a `FineGatesLayer` (see `FineGatesConfig`).

    Beyond PEFT's tuner API:
        - `sparsity_loss()`: the model's sparsity loss (mean over gated layers) for the active adapters, to add to
          the task loss times lambda (`peft_ext.training.with_finegates` does it inside a Trainer's loss).
        - `gate_stats()`: open row / column fractions and the removable fraction of the gated weights.
        - `merge_and_unload(prune=True)`: fold the gates in and cut what they closed (a smaller plain model; the
          size report in `prune_report`).

    Example:
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_ext.FineGatesConfig(target_sparsity=0.3))
    """

    prefix: str = "gates_"
    tuner_layer_cls = FineGatesLayer
    target_module_mapping: dict = DEFAULT_TARGETS

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, **kwargs) -> None:
        self.prune_report = None
        self._pruned = False
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)

    # ------------------------------------------------------------------------------------------ injection
    @staticmethod
    def _prepare_adapter_config(peft_config: FineGatesConfig, model_config: dict) -> FineGatesConfig:
        if peft_config.target_modules is None:
            model_type = (model_config or {}).get("model_type")
            if model_type not in DEFAULT_TARGETS:
                raise ValueError(
                    f"FineGatesConfig.target_modules is None and there is no default for model_type={model_type!r} "
                    f"(defaults exist for {sorted(DEFAULT_TARGETS)}): give target_modules (module names, a regex or "
                    f"'all-linear')."
                )
            default = DEFAULT_TARGETS[model_type]
            peft_config.target_modules = default if isinstance(default, str) else sorted(default)
        return peft_config

    def _check_new_adapter_config(self, config) -> None:
        if not isinstance(config, FineGatesConfig):
            raise TypeError(f"a FineGates model takes FineGatesConfig adapters, got {type(config).__name__}.")
        if self._pruned:
            raise RuntimeError(PRUNED_ERROR.format(what="add_adapter"))
        # not BaseTuner's check: it reads `bias` as LoRA's (base biases made trainable: one adapter only), while
        # FineGates' bias="gates" is a delta of each adapter's own, so any number of adapters may have one

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        ours = {
            id(p) for m in model.modules() if isinstance(m, FineGatesLayer)
            for d in m.adapter_layer_names for p in getattr(m, d).parameters()
        }  # fmt: skip
        clash = [n for n, p in model.named_parameters() if self.prefix in n and id(p) not in ours]
        if clash:
            raise ValueError(
                f"the base model has parameters whose names contain {self.prefix!r} ({clash[0]}): FineGates marks its "
                f"own parameters by that prefix, so they would be taken for adapter parameters. Rename them first."
            )
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not (is_linear_like(base) or is_quantized(base)):
            raise ValueError(
                f"FineGates gates linear layers (nn.Linear, transformers' Conv1D, bitsandbytes 4/8-bit); "
                f"{current_key} is a {type(base).__name__}. Leave it out of target_modules (use exclude_modules)."
            )
        get_output = getattr(self.model, "get_output_embeddings", None)
        head = get_output() if callable(get_output) else None
        if head is not None and (base is head or target is head):
            raise ValueError(
                f"FineGates does not gate the LM head / tied embeddings ({current_key}): closing its rows would cut "
                f"vocabulary entries, and with tied weights the input embeddings too. Leave {target_name} out of "
                f"target_modules (or add it to exclude_modules)."
            )
        if peft_config.kurtosis and is_quantized(base):
            raise ValueError(
                f"FineGatesConfig.kurtosis=True needs the dense weight of {current_key}, a bitsandbytes-quantized "
                f"layer: use kurtosis=False on a quantized base."
            )
        if peft_config.kurtosis and peft_config.sparsity_objective != "target":
            raise ValueError(
                "FineGatesConfig.kurtosis=True weights the 'target' objective's means: use sparsity_objective='target' "
                "with it, or kurtosis=False."
            )
        self._add_to_layer(FineGatesLayer, target, adapter_name, parent, target_name, config=peft_config, name=current_key)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if self.prefix not in name:
                p.requires_grad = False

    # ------------------------------------------------------------------------------------------- the loss
    def _gated_layers(self):
        for name, module in self.model.named_modules():
            if isinstance(module, FineGatesLayer):
                yield name, module

    def _trained_adapters(self, module: FineGatesLayer) -> list[str]:
        return [a for a in module.active_adapters if a in module.gates_settings]

    def sparsity_loss(self) -> torch.Tensor:
        """The mean over gated layers (and active adapters) of each layer's sparsity loss (FineGatesConfig): the term
        the training objective adds times lambda. Differentiable w.r.t. the gate logits."""
        losses = [m.sparsity_loss(a) for _, m in self._gated_layers() for a in self._trained_adapters(m)]
        if not losses:
            raise ValueError("sparsity_loss(): no FineGates adapter is active (call set_adapter with a FineGates adapter).")
        device = losses[0].device
        return torch.stack([l.to(device) for l in losses]).mean()

    @torch.no_grad()
    def gate_stats(self) -> dict[str, float]:
        """Of the active adapters' evaluation gates: the fraction of all row and column gates that are exactly 0
        (`closed_fraction`: what target_sparsity aims at), the open row and column fractions, the mean keep
        probability of rows and columns, the removable weight entries of the gated layers (count and fraction: about
        1 - (1 - s)^2 for a closed fraction s of rows and columns)."""
        counts = {"rows": 0, "cols": 0, "open_rows": 0, "open_cols": 0, "removable": 0, "entries": 0}
        keep = {"rows": [], "cols": []}
        for _, module in self._gated_layers():
            for a in self._trained_adapters(module):
                c = module.gate_counts(a)
                for k in ("rows", "cols", "open_rows", "open_cols", "removable"):
                    counts[k] += c[k]
                counts["entries"] += c["rows"] * c["cols"]
                sigma = module.gates_settings[a]["reg_sigma"]
                for side, d in (("rows", module.gates_row_logits), ("cols", module.gates_col_logits)):
                    if a in d:
                        keep[side].append(keep_probability(d[a], sigma))
        if not counts["entries"]:
            raise ValueError("gate_stats(): no FineGates adapter is active.")
        gates = counts["rows"] + counts["cols"]
        return {
            "closed_fraction": (gates - counts["open_rows"] - counts["open_cols"]) / gates,
            "open_rows": counts["open_rows"] / counts["rows"],
            "open_cols": counts["open_cols"] / counts["cols"],
            "removable_fraction": counts["removable"] / counts["entries"],
            "removed_params": counts["removable"],
            "mean_keep_rows": float(torch.cat(keep["rows"]).mean()) if keep["rows"] else 1.0,
            "mean_keep_cols": float(torch.cat(keep["cols"]).mean()) if keep["cols"] else 1.0,
        }

    # -------------------------------------------------------------------------------------------- merging
    def _check_not_pruned(self, what: str) -> None:
        if self._pruned:
            raise RuntimeError(PRUNED_ERROR.format(what=what))

    def _check_mergeable(self, adapter_names: Optional[list[str]]) -> None:
        for name, module in self._gated_layers():
            if is_quantized(module.get_base_layer()):
                raise ValueError(quantized_merge_error(name))

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_not_pruned("merge_adapter()")
        self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._check_not_pruned("unmerge_adapter()")
        super().unmerge_adapter()

    def disable_adapter_layers(self) -> None:
        self._check_not_pruned("disable_adapter()")
        # not BaseTuner's: it warns that an adapter with `bias` set does not disable to the base (LoRA's bias
        # trains the base's own biases); a FineGates bias delta is the adapter's, and disabling gives the exact base
        self._enable_adapter_layers(enabled=False)

    def enable_adapter_layers(self) -> None:
        self._check_not_pruned("enable_adapter_layers()")
        super().enable_adapter_layers()

    def unload(self) -> nn.Module:
        self._check_not_pruned("unload()")
        return super().unload()

    def set_adapter(self, adapter_name, *args, **kwargs) -> None:
        self._check_not_pruned("set_adapter()")
        super().set_adapter(adapter_name, *args, **kwargs)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
        prune: bool = True,
    ) -> nn.Module:  # fmt: skip
        """Fold the gates (and bias delta, LoRA) into the base weights and return the plain model; with `prune=True`
        (default) also cut what the gates closed (see `peft_ext.tuners.finegates.prune.prune_model`): a physically
        smaller model whose outputs equal this model's evaluation outputs, its size report in `self.prune_report`
        (and `model.finegates_prune_report`). After a prune, unmerge / unload / disable_adapter() raise."""
        self._check_not_pruned("merge_and_unload()")
        self._check_mergeable(adapter_names)
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        if prune and len(names) > 1:
            raise ValueError(
                f"merge_and_unload(prune=True) with several active adapters {names}: pruning cuts what one adapter's "
                f"gates closed. Pass adapter_names=[one name], or merge_and_unload(prune=False) to fold them all."
            )
        config = self.peft_config[names[0]] if names and names[0] in self.peft_config else None
        if prune:
            self._check_activations(names)
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        _declare_added_biases(model, pruned=prune)
        if not prune:
            return model
        from .prune import prune_model

        report = prune_model(
            model,
            residual_prune=config.residual_prune if config else "gather",
            multiple_of=config.prune_multiple_of if config else 8,
            require_zero_activation=True,
        )
        self._pruned = True
        self.prune_report = report
        model.finegates_prune_report = report
        # PEFT's own entry points (disable_adapter(), save_pretrained, get_model_status) look for tuner layers under
        # this tuner: this one answers with the pruned model's error instead of "No adapter layers found"
        self._modules["finegates_pruned"] = _PrunedMarker()
        return model

    @torch.no_grad()
    def _check_activations(self, names: list[str]) -> None:
        """Before anything is folded: refuse a prune whose closed gate_proj / c_fc rows would need act(0) = 0 under an
        activation with act(0) != 0 (prune_model refuses it too, but by then the adapter would be merged away)."""
        from .prune import activation_blocks

        def closed(module_name: str, side: str) -> Optional[torch.Tensor]:
            layer = self.model.get_submodule(module_name)
            if not isinstance(layer, FineGatesLayer):
                return None
            result = None
            for name in names:
                if name in layer.gates_settings:
                    rows, cols = layer.gates(name, sample=False)
                    gate = rows if side == "rows" else cols
                    if gate is not None:
                        result = (gate == 0) if result is None else result | (gate == 0)
            return result

        for block, gate_name, partners, down, act_ok in activation_blocks(self.model):
            if act_ok:
                continue
            gate_dead = closed(gate_name, "rows")
            if gate_dead is None or not bool(gate_dead.any()):
                continue
            dead = closed(down, "cols")
            dead = torch.zeros_like(gate_dead) if dead is None else dead.to(gate_dead.device)
            for partner in partners:
                rows = closed(partner, "rows")
                if rows is not None:
                    dead = dead | rows.to(gate_dead.device)
            extra = int((gate_dead & ~dead).sum())
            if extra:
                raise ValueError(
                    f"merge_and_unload(prune=True): {block}'s activation has act(0) != 0, so the {extra} neurons whose "
                    f"{gate_name.rsplit('.', 1)[-1]} row gates are closed are not dead and cannot be cut. Nothing was "
                    f"merged. Use merge_and_unload(prune=False) (the gates folded, same shapes), or leave "
                    f"{gate_name.rsplit('.', 1)[-1]} out of FineGatesConfig.target_modules (gate the up/down side)."
                )

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names, **kwargs):
        """save_pretrained / get_peft_model_state_dict: refused after a physical prune (it would write an adapter
        without tensors)."""
        if getattr(getattr(model, "base_model", None), "_pruned", False):
            raise RuntimeError(PRUNED_ERROR.format(what="save_pretrained()"))
        return super()._get_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names, **kwargs,
        )  # fmt: skip

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._check_mergeable(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _declare_added_biases(model: nn.Module, pruned: bool) -> None:
    """A bias delta merged into layers without a bias gave them one (bias="gates"). Where the architecture's config can
    say so (Llama-style `attention_bias` / `mlp_bias`, when every such projection now has a bias) it is set, so that
    save_pretrained + from_pretrained keeps them; otherwise a warning names the way that does."""
    added = [n for n, m in model.named_modules() if getattr(m, "_finegates_added_bias", False)]
    if not added:
        return
    config = getattr(model, "config", None)
    undeclared = set(added)
    for flag, names in (("attention_bias", _ATTENTION), ("mlp_bias", _MLP)):
        if config is None or getattr(config, flag, None) is not False:
            continue
        group = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]
        if group and all(getattr(m, "bias", None) is not None for _, m in group):
            setattr(config, flag, True)
            undeclared -= {n for n, _ in group}
    for name in added:
        delattr(model.get_submodule(name), "_finegates_added_bias")
    if undeclared and not pruned:
        import warnings

        warnings.warn(
            f"merge_and_unload(prune=False): the bias deltas (FineGatesConfig.bias='gates') gave {len(undeclared)} "
            f"layers a bias that {type(model).__name__}'s config does not declare (e.g. {sorted(undeclared)[0]}): "
            f"model.save_pretrained + from_pretrained would drop them. Save with peft_ext.save_pruned(model, folder) "
            f"(a shape manifest; load_pruned reads it), or keep the base and the adapter.",
            stacklevel=3,
        )


class _PrunedMarker(nn.Module, BaseTunerLayer):
    """Left under a FineGatesModel by merge_and_unload(prune=True): PEFT's functions that walk the tuner for its layers
    (PeftModel.disable_adapter() -> get_model_status(), ...) read `adapter_layer_names` and get the pruned error."""

    @property
    def adapter_layer_names(self):
        raise RuntimeError(PRUNED_ERROR.format(what="disable_adapter()"))

    def forward(self, *args, **kwargs):
        raise RuntimeError(PRUNED_ERROR.format(what="the adapter"))

__all__ = ["FineGatesModel"]
