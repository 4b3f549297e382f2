from __future__ import annotations

import copy
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner

from peft_ext.tuners.base import PeftExtTuner

from .config import HftConfig
from .layer import HftLayer
from .selection import (
    Candidate,
    block_of,
    check_not_tied,
    draw,
    find_candidates,
    is_supported,
    named_base_modules,
    quantized_kind,
    role_of,
)
from .state_dict import deltas_from_weights, weights_for_plain_model, weights_from_deltas

# what a saved stage of an adapter consists of (HftModel.load_selection): its selection and what defines later draws
SELECTION_FIELDS = ("seed", "strategy", "ratio", "candidate_modules", "stage", "selected_modules", "trained_modules",
                    "trained_stages")


class HftModel(PeftExtTuner, BaseTuner):
    """Half Fine-Tuning as a PEFT tuner: wraps the selected modules in `HftLayer` (see `HftConfig`).

    Example:
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_ext.HftConfig(ratio=0.5, seed=0))
        >>> model.print_trainable_parameters()  # about half of the block weights
    """

    prefix: str = "hft_"
    tuner_layer_cls = HftLayer
    target_module_mapping: dict = {}  # the default pool is every linear layer in the blocks (selection.py)

    # ------------------------------------------------------------------------------------------- injection
    def inject_adapter(self, model: torch.nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """Inject into a copy of the adapter's config: PEFT keeps the object the user passed (`get_peft_model`,
        `add_adapter`), and HFT writes its selection and stage into the config, so the user's `HftConfig` stays as
        written and one config can make several models or adapters. The draw's pool is fixed here, before
        target_modules="all-linear" is expanded."""
        config = copy.deepcopy(self.peft_config[adapter_name])
        self.peft_config[adapter_name] = config
        if config.selected_modules is None:
            self._pool(config, model)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _prepare_adapter_config(self, peft_config: HftConfig, model_config: dict) -> HftConfig:
        return peft_config

    @staticmethod
    def _pool(config: HftConfig, model: torch.nn.Module) -> list[Candidate]:
        """The candidates every draw takes its selection from: `config.candidate_modules`, filled in at the first draw
        (from target_modules, exclude_modules, train_norms), in the model's order."""
        if config.candidate_modules is None:
            candidates = find_candidates(model, config)
            config.candidate_modules = sorted(c.name for c in candidates)
            return candidates
        _check_names_exist(model, config.candidate_modules, "candidate_modules")
        modules = dict(named_base_modules(model))
        order = {n: i for i, n in enumerate(modules)}
        names = sorted(config.candidate_modules, key=order.__getitem__)
        return [Candidate(n, block_of(n), role_of(n, modules[n])) for n in names]

    def _prepare_model(self, peft_config: HftConfig, model: torch.nn.Module) -> None:
        """Draw the selection (or check a saved one against this model) before any module is wrapped."""
        if peft_config.selected_modules is None:
            candidates = self._pool(peft_config, model)
            selected = draw(candidates, peft_config.strategy, peft_config.ratio, peft_config.seed + peft_config.stage)
            if not selected:
                raise ValueError(
                    f"HftConfig(ratio={peft_config.ratio}, strategy={peft_config.strategy!r}) selects nothing to "
                    f"train among {len(candidates)} candidate modules (groups too small for that ratio): raise "
                    f"ratio, widen target_modules, or use strategy='param'."
                )
            peft_config.selected_modules = sorted(selected)
        else:
            _check_names_exist(model, peft_config.selected_modules, "selected_modules")
        trained = set(peft_config.trained_modules or ()) | set(peft_config.selected_modules)
        _check_names_exist(model, trained, "trained_modules")
        check_not_tied(model, trained, peft_config.modules_to_save)  # a given or saved selection too
        peft_config.trained_modules = sorted(trained)

    @staticmethod
    def _check_target_module_exists(peft_config: HftConfig, key: str) -> bool:
        return key in (peft_config.trained_modules or ())

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        trainable = current_key in peft_config.selected_modules
        row_fraction = peft_config.ratio if peft_config.strategy == "param" else None
        args = dict(
            trainable=trainable,
            row_fraction=row_fraction,
            seed=peft_config.seed + peft_config.stage,
            name=current_key,
            init_weights=peft_config.init_weights,
        )
        self._add_to_layer(HftLayer, target, adapter_name, parent, target_name, **args)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """fp16 copies become fp32 masters (as PEFT does for adapters): fp16 weights cannot be trained with a
        GradScaler, which is what `Trainer(fp16=True)` uses. bf16 and fp32 copies keep the base weights' dtype, as
        full fine-tuning would (HFT's copies are half the model: upcasting bf16 would double their memory); load
        the model in fp32 for fp32 masters. Copies added later (a re-selection, a resumed checkpoint's stage) get
        the dtype the adapter's first copies got."""
        self.__dict__.setdefault("_hft_autocast", {})[adapter_name] = autocast_adapter_dtype
        if not autocast_adapter_dtype:
            return
        for _, layer in self.hft_layers(adapter_name):
            for p in layer.hft_weight[adapter_name].values():
                if p.dtype == torch.float16:
                    p.data = p.data.float()

    # ------------------------------------------------------------------------------------ stages and reset
    def hft_layers(self, adapter_name: Optional[str] = None):
        """(module name, HftLayer) pairs, restricted to those holding `adapter_name` when given."""
        for name, module in self.model.named_modules():
            if isinstance(module, HftLayer) and (adapter_name is None or adapter_name in module.hft_weight):
                yield name, module

    def reselect(self, adapter_name: Optional[str] = None) -> tuple[list, list]:
        """Start a new stage: draw a new selection (seed + stage) from the adapter's pool (`candidate_modules`, fixed
        at the first draw), keep what earlier stages trained, frozen. New copies of fp16 weights are fp32 masters
        when the first stage's were (`autocast_adapter_dtype`, PEFT's default).

        Returns `(newly_trainable, newly_frozen)` parameter lists: hand them to the optimizer that trains the adapter
        (`peft_ext.training.swap_optimizer_params`; `peft_ext.training.HftReselectCallback` does it for a Trainer), or
        the new half is never trained.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config: HftConfig = self.peft_config[adapter_name]
        if config.strategy in ("explicit", "param"):
            raise ValueError(
                f"HftConfig.strategy={config.strategy!r} has nothing to re-draw: re-selection needs strategy "
                f"'matrix' or 'layer' (or set reselect='never')."
            )
        draft = copy.deepcopy(config)  # the config changes only once the draw succeeded
        draft.stage += 1
        draft.selected_modules = None
        self._prepare_model(draft, self.model)
        for name in ("stage", "selected_modules", "trained_modules", "candidate_modules"):
            setattr(config, name, getattr(draft, name))
        return self._apply_selection(adapter_name)

    def load_selection(self, adapter_name: str, saved: HftConfig, trainable: bool = True) -> tuple[list, list]:
        """Bring `adapter_name` to a saved stage of the same adapter: the selection, stage, finished runs and pool of
        `saved` (e.g. the adapter_config.json of a Trainer checkpoint taken after re-selections), and the seed,
        strategy and ratio that its later draws use. Modules it trained that this adapter does not hold yet are
        wrapped (their values come with the saved weights), so that the checkpoint's weights then load into it;
        this is how a run resumes in a new model built from the same HftConfig (`HftReselectCallback` calls it when
        a Trainer resumes). `trainable=False` leaves every copy frozen. Returns `(newly_trainable, newly_frozen)`.
        """
        config: HftConfig = self.peft_config[adapter_name]
        if not isinstance(saved, HftConfig) or saved.selected_modules is None or saved.trained_modules is None:
            raise ValueError(
                f"load_selection needs the saved HftConfig of a drawn adapter (selected_modules and trained_modules "
                f"filled in, as save_pretrained writes them), got {type(saved).__name__}."
            )
        held = {name for name, _ in self.hft_layers(adapter_name)}
        extra = sorted(held - set(saved.trained_modules))
        if extra:
            raise ValueError(
                f"HFT adapter {adapter_name!r} holds trained copies of {extra[:5]}{' ...' if len(extra) > 5 else ''}, "
                f"which the saved stage (stage {saved.stage}, seed {saved.seed}) never trained: it is not an earlier "
                f"state of this adapter. Resume in a model built with the HftConfig the run started from, or load the "
                f"saved folder as the adapter: PeftModel.from_pretrained(base_model, folder, is_trainable=True)."
            )
        _check_names_exist(self.model, saved.trained_modules, "trained_modules")
        _check_names_exist(self.model, saved.candidate_modules or (), "candidate_modules")
        for name in SELECTION_FIELDS:
            value = getattr(saved, name)
            if value is not None or name != "candidate_modules":  # a file from before the pool was saved keeps this one
                setattr(config, name, copy.deepcopy(value))
        return self._apply_selection(adapter_name, trainable)

    def _apply_selection(self, adapter_name: str, trainable: bool = True) -> tuple[list, list]:
        """Make the layers follow the config's `selected_modules` / `trained_modules`: wrap the trained modules no layer
        holds yet (or add this adapter to another adapter's wrapper), unfreeze the selected ones, freeze the rest.
        Returns `(newly_trainable, newly_frozen)`."""
        config: HftConfig = self.peft_config[adapter_name]
        fp32_masters = self._fp32_masters(adapter_name)
        before = {id(p): p for p in self._trainable_copies(adapter_name)}
        selected = set(config.selected_modules)
        layers = dict(self.hft_layers(adapter_name))
        for key in config.trained_modules:
            if key not in layers:  # first trained in this stage: wrap it (or add this adapter to another's wrapper)
                parent_name, _, target_name = key.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                self._create_and_replace(config, adapter_name, getattr(parent, target_name), target_name, parent, key)
                self.targeted_module_names.append(key)
                layers = dict(self.hft_layers(adapter_name))
            layers[key].set_trainable(adapter_name, trainable and key in selected)
        self._cast_adapter_dtype(adapter_name, fp32_masters)
        after = {id(p): p for p in self._trainable_copies(adapter_name)}
        return [p for i, p in after.items() if i not in before], [p for i, p in before.items() if i not in after]

    def _fp32_masters(self, adapter_name: str) -> bool:
        """Whether this adapter keeps fp32 masters of fp16 weights: as its existing copies do, else as
        `_cast_adapter_dtype` was told (PEFT's default: yes)."""
        for _, layer in self.hft_layers(adapter_name):
            base = layer.get_base_layer()
            for pname, copy_ in layer.hft_weight[adapter_name].items():
                if getattr(base, pname).dtype == torch.float16:
                    return copy_.dtype == torch.float32
        return self.__dict__.get("_hft_autocast", {}).get(adapter_name, True)

    def _trainable_copies(self, adapter_name: str) -> list[torch.nn.Parameter]:
        return [p for _, m in self.hft_layers(adapter_name) if m.is_trainable(adapter_name) for p in m.hft_weight[adapter_name].values()]

    # ------------------------------------------------------------------------------- saving and loading
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        weights = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.save_format == "full":
            return weights
        return deltas_from_weights(model, weights, adapter_name, state_dict)

    @staticmethod
    def state_dict_for_transformers(model, config, state_dict):
        """transformers' `load_adapter` maps file keys to parameters itself: hand it full values, not deltas."""
        return weights_for_plain_model(model, state_dict)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = weights_from_deltas(model, config, state_dict, adapter_name)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _check_names_exist(model: torch.nn.Module, names, field: str) -> None:
    modules = dict(named_base_modules(model))
    missing = sorted(n for n in names if n not in modules)
    if missing:
        raise ValueError(
            f"HftConfig.{field} names modules that {type(model).__name__} does not have: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. This adapter was made for another base model (or architecture): "
            f"load it onto the model it was trained on."
        )
    bad = sorted(f"{n} ({type(modules[n]).__name__})" for n in names if not is_supported(modules[n]) or quantized_kind(modules[n]))
    if bad:
        raise ValueError(
            f"HftConfig.{field} names modules HFT cannot train: {bad[:5]}. HFT trains full-precision nn.Linear, "
            f"Conv1D, nn.Embedding and norm layers."
        )

