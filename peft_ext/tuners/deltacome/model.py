from __future__ import annotations

import math
from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from peft_ext.kernels.delta_format import slot_codes_from_words, words_from_slot_codes
from peft_ext.tuners.base import PeftExtTuner, in_out_features, is_linear_like, logical_weight

from .config import DeltaComeConfig
from .dense_layer import DeltaComeDense
from .layer import DeltaComeLinear, DeltaComeTunerLayer, base_probes, probes_closer_to_the_finetune
from .representation import method_bands

PROBE_RTOL = 1 / 64  # a base reloaded in bf16 / fp16 still matches; another checkpoint does not
PEFT_PREFIX = "base_model.model."  # adapter files' keys: PEFT's prefix, the module's name, the buffer


def _bands_of(model: nn.Module, config: DeltaComeConfig, head: str, adapter_name: Optional[str], key: str) -> tuple:
    """The (bits, n_cols) bands of the module a state-dict key names (`_layer_facts`)."""
    return _layer_facts(model, config, head, adapter_name, key)[0]


def _layer_facts(model: nn.Module, config: DeltaComeConfig, head: str, adapter_name: Optional[str], key: str):
    """(bands, in_features, out_features) of the module a key names: an injected layer's own bands for
    `adapter_name`, else solved from the config as the injection will (transformers' loader, before injection)."""
    module = _find_module(model, head)
    if module is None:
        raise ValueError(
            f"the adapter file has Delta-CoMe tensors for {head.removeprefix(PEFT_PREFIX)} ({key}), which "
            f"{type(model).__name__} does not have: load the adapter onto its own base model "
            f"({config.base_model_name_or_path or 'see adapter_config.json'})."
        )
    if isinstance(module, DeltaComeLinear) and adapter_name in module.delta_meta:
        return module.delta_meta[adapter_name][1], module.in_features, module.out_features
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    in_features, out_features = in_out_features(base)
    name = head.removeprefix(PEFT_PREFIX) if head.startswith(PEFT_PREFIX) else head
    stored = (config.layer_bands or {}).get(name)
    return method_bands(config.method, out_features, in_features, config, name, stored), in_features, out_features


def _slots_from_file(model: nn.Module, config: DeltaComeConfig, state_dict: dict, adapter_name: Optional[str]) -> dict:
    """File keys `<module>.deltacome_delta.v_words` / `u_words` (bit planes) -> `...v_codes` / `u_codes` (slots),
    checked against the module's bands first (a mismatched file raises a ValueError naming the key)."""
    if config.method != "deltacome":
        return state_dict
    out = {}
    for key, value in state_dict.items():
        head, sep, field = key.rpartition(".deltacome_delta.")
        if not sep or field not in ("v_words", "u_words"):
            out[key] = value
            continue
        bands, in_features, out_features = _layer_facts(model, config, head, adapter_name, key)
        d = in_features if field == "v_words" else out_features
        out[f"{head}.deltacome_delta.{field[0]}_codes"] = slot_codes_from_words(value, d, bands, key)
    return out


def _find_module(model: nn.Module, path: str):
    """The module a file key's path names, with or without PEFT's prefix (None if neither)."""
    for candidate in (path, path.removeprefix(PEFT_PREFIX)):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


class DeltaComeModel(PeftExtTuner, BaseTuner):
    """Delta-CoMe as a PEFT tuner: each targeted linear layer becomes a `DeltaComeLinear` holding compressed deltas.

    Example:
        >>> import peft_ext
        >>> peft_ext.compress_delta("base-model", "finetuned-model", "math-delta", budget=1 / 16)
        >>> model = PeftModel.from_pretrained(base_model, "math-delta", adapter_name="math")
        >>> model.load_adapter("code-delta", adapter_name="code")
        >>> model.generate(**batch, adapter_names=["math", "code", "__base__"])  # one batch, three models
    """

    prefix: str = "deltacome_"
    tuner_layer_cls = DeltaComeTunerLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: DeltaComeConfig, model_config: dict) -> DeltaComeConfig:
        if peft_config.target_modules is None:
            raise ValueError("DeltaComeConfig.target_modules is None: give module names or 'all-linear'.")
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        if config.base_probes:  # a compressed adapter names its modules: all must exist in this base
            modules = dict(model.named_modules())
            missing = sorted(n for n in config.base_probes if n not in modules)
            if missing:
                raise ValueError(
                    f"this Delta-CoMe adapter was compressed against a base with modules {missing[:3]}"
                    f"{' ...' if len(missing) > 3 else ''} that {type(model).__name__} does not have: load it onto "
                    f"its base model ({config.base_model_name_or_path or 'see adapter_config.json'})."
                )
        before = {id(m) for m in model.modules()}
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        _follow_the_models_mode(model, before)
        self.training = model.training  # the tuner too: mixed batches (adapter_names=) check its mode

    @staticmethod
    def _check_target_module_exists(peft_config: DeltaComeConfig, key: str) -> bool:
        return key in (peft_config.dense_modules or ()) or bool(check_target_module_exists(peft_config, key))

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if current_key in (peft_config.dense_modules or ()):
            args = dict(init_weights=peft_config.init_weights, seed=peft_config.seed, name=current_key)
            self._add_to_layer(DeltaComeDense, target, adapter_name, parent, target_name, **args)
            return
        kind = type(base).__name__
        if not is_linear_like(base) or kind in ("Linear4bit", "Linear8bitLt"):
            raise ValueError(
                f"Delta-CoMe stores deltas of full-precision linear layers (nn.Linear, Conv1D); {current_key} is a "
                f"{kind}. Leave it out of target_modules (a quantized base: compress against and load onto the "
                f"unquantized base)."
            )
        _check_probe(peft_config, current_key, base)
        in_features, out_features = in_out_features(base)
        stored = (peft_config.layer_bands or {}).get(current_key)
        bands = method_bands(peft_config.method, out_features, in_features, peft_config, current_key, stored)
        args = dict(
            method=peft_config.method, bands=bands, group_size=peft_config.group_size,
            init_weights=peft_config.init_weights, seed=peft_config.seed, name=current_key,
        )
        self._add_to_layer(DeltaComeLinear, target, adapter_name, parent, target_name, **args)

    # ------------------------------------------------------------------------------- saving and loading
    # A layer holds the version-2 slot codes (`v_codes` / `u_codes`, one copy); the files hold version-1 bit planes
    # (`v_words` / `u_words`). These three convert at the file boundary, bitwise both ways.
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names, **kwargs):
        """Saving: the adapter's slot codes go out as the files' bit planes."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names, **kwargs)
        out = {}
        for key, value in selected.items():
            head, sep, field = key.rpartition(".deltacome_delta.")
            side = field.rsplit(".", 1)[-1] if sep else ""
            if side not in ("v_codes", "u_codes"):
                out[key] = value
                continue
            bands = _bands_of(model, config, head, adapter_name, key)
            out[key[: -len(side)] + side[0] + "_words"] = words_from_slot_codes(value, bands)
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Loading through PEFT (from_pretrained, load_adapter, set_peft_model_state_dict): bit planes -> slot codes."""
        state_dict = _slots_from_file(model, config, state_dict, adapter_name)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @staticmethod
    def state_dict_for_transformers(model: nn.Module, config: DeltaComeConfig, state_dict: dict) -> dict:
        """transformers' own `load_adapter` (peft_ext/registry.py `load_adapter_converting`) maps file keys to buffers
        itself: hand it the slot codes the layers hold."""
        return _slots_from_file(model, config, state_dict, None)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for _, p in model.named_parameters():
            p.requires_grad = False


def _follow_the_models_mode(model: nn.Module, before: set) -> None:
    """Modules the injection created start in training mode (nn.Module's default), whatever the model's mode: a
    Delta-CoMe layer (and the buffer dicts of a new adapter in an existing layer) takes the mode of the layer it
    wraps, any other new module (PEFT's modules_to_save wrapper) the model's."""
    inside = set()
    for module in model.modules():
        if isinstance(module, DeltaComeTunerLayer):
            module.train(module.get_base_layer().training)
            inside.update(id(m) for m in module.modules())
    for module in model.modules():
        if id(module) not in before and id(module) not in inside:
            module.training = model.training


def _check_probe(config: DeltaComeConfig, name: str, base: nn.Module) -> None:
    """The base fingerprint: the weights the delta was computed against must be this module's. Two checks: 16 evenly
    spaced weights within 1/64 of the weight scale (another checkpoint fails, the base reloaded in bf16 / fp16
    passes), and, where the adapter has them (delta_probes), the positions where the fine-tune differs most from the
    base: the weights must hold the base's values there, not the fine-tune's (its own fine-tune, which differs from
    the base by ~1e-3, passes the first check)."""
    if not config.base_probes:
        return
    expected = config.base_probes.get(name)
    if expected is None:
        raise ValueError(
            f"{name} is targeted but the adapter has no fingerprint for it (base_probes): the adapter files do not "
            f"match this base's module names; load it onto its own base ({config.base_model_name_or_path})."
        )
    actual = base_probes(base, len(expected))
    scale = max(abs(v) for v in expected) or 1.0
    worst = max(abs(a - e) for a, e in zip(actual, expected))
    if not all(math.isfinite(a) for a in actual) or worst > PROBE_RTOL * scale:
        raise ValueError(
            f"the base weights of {name} differ from those this Delta-CoMe delta was compressed against (largest "
            f"difference {worst:.3g} at a weight scale of {scale:.3g}): a delta only makes sense on its own base. "
            f"Load the base it was made from ({config.base_model_name_or_path or 'see adapter_config.json'})."
        )
    probes = (config.delta_probes or {}).get(name)
    decisive, finetune = probes_closer_to_the_finetune(logical_weight(base), probes or [])
    if decisive and 2 * finetune > decisive:
        raise ValueError(
            f"the weights of {name} are not the base this Delta-CoMe delta was compressed against: at the {decisive} "
            f"positions where the fine-tune differs most from that base, {finetune} hold the fine-tune's values. This "
            f"looks like the fine-tuned model itself; the delta would be applied twice. Load the adapter onto the "
            f"base model ({config.base_model_name_or_path or 'see adapter_config.json'})."
        )

