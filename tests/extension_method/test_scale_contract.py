"""The contract suite, run on SCALE, a method built only in this folder (scale_method/): one folder and this one
entry are all it takes (peft_ext.testing's plugin is enabled in tests/conftest.py)."""

from peft_ext.testing import BadConfig, MethodEntry, modules_to_save_numel
from peft_ext.testing.contract import *  # noqa: F403
from peft_ext.testing.models import MODELS

from .scale_method import ScaleConfig


def _expected_trainable(base, config) -> int:
    """One scale per output channel of each targeted module, plus modules_to_save copies."""
    total = modules_to_save_numel(base, config.modules_to_save)
    for name in config.target_modules:
        module = base.get_submodule(name)
        total += module.weight.shape[1] if type(module).__name__ == "Conv1D" else module.out_features
    return total


SCALE_ENTRY = MethodEntry(
    name="scale",
    peft_type="SCALE",
    config_cls=ScaleConfig,
    prefix="scale_",
    make_config=lambda kind, **o: ScaleConfig(**{"task_type": MODELS[kind].task_type, **o}),
    expected_trainable=_expected_trainable,
    trained_modules=lambda config: list(config.target_modules),
    nonidentity_overrides={"init_weights": False},
    seed_overrides=lambda seed: {"seed": seed},
    bad_configs=(BadConfig("seed_negative", {"seed": -1}, ValueError, r"seed"),),
    nothing_trainable=BadConfig(
        "matches_nothing", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, ValueError, r"matches no", "inject"
    ),
    card_terms=("scale", "peft-ext"),
)

PEFT_EXT_CONTRACT_METHODS = [SCALE_ENTRY]
