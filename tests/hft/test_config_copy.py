"""get_peft_model / add_adapter work on a copy of the HftConfig they are given: the user's object stays as written."""

from peft import get_peft_model

from peft_ext import HftConfig

PEFTS_OWN = ("base_model_name_or_path", "revision")  # written by PEFT's get_peft_model for every method


def _fields(config):
    return {k: v for k, v in config.to_dict().items() if k not in PEFTS_OWN}


def test_get_peft_model_leaves_the_users_config_untouched(llama):
    config = HftConfig(seed=0, target_modules="all-linear")
    before = _fields(config)
    model = get_peft_model(llama(), config)
    model.base_model.reselect()
    assert model.peft_config["default"] is not config
    assert _fields(config) == before  # no selection, stage 0, target_modules still "all-linear"
    assert config.selected_modules is None and config.stage == 0 and config.target_modules == "all-linear"


def test_one_config_for_two_models_gives_two_independent_adapters(llama):
    config = HftConfig(seed=0)
    first = get_peft_model(llama(), config)
    first.base_model.reselect()  # stage 1 of the first model only
    second = get_peft_model(llama(), config)
    fresh = get_peft_model(llama(), HftConfig(seed=0))
    assert second.peft_config["default"].stage == 0
    assert second.peft_config["default"].selected_modules == fresh.peft_config["default"].selected_modules
    assert first.peft_config["default"].stage == 1
    second.base_model.reselect()
    second.base_model.reselect()
    assert first.peft_config["default"].stage == 1


def test_a_second_adapter_from_the_same_config_starts_at_stage_0(llama):
    config = HftConfig(seed=0)
    model = get_peft_model(llama(), config)
    model.base_model.reselect()
    model.add_adapter("second", config)
    first, second = model.peft_config["default"], model.peft_config["second"]
    assert first is not second and second is not config
    assert (first.stage, second.stage) == (1, 0)
    assert second.selected_modules == get_peft_model(llama(), HftConfig(seed=0)).peft_config["default"].selected_modules
