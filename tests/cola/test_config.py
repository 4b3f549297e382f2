"""ColaConfig: the LoRA options it extends, its checks (each error names the field), the chain schedule, and the
config's round trip through adapter_config.json (PEFT's own loading, with the peft-ext requirement stamp)."""

import json

import pytest
from peft import LoraConfig, PeftConfig
from peft.utils import PeftType

import peft_ext
from peft_ext import ColaConfig
from peft_ext.tuners.config_base import REQUIREMENT, PeftExtConfig


def test_is_a_lora_config_with_its_own_peft_type_and_the_requirement_stamp():
    config = ColaConfig(r=4, target_modules=["v_proj", "q_proj"])
    assert isinstance(config, LoraConfig) and isinstance(config, PeftExtConfig)
    assert config.peft_type == PeftType.COLA == "COLA"
    assert config.peft_ext_requirement == REQUIREMENT
    assert (config.chain_length, config.current_link, config.steps_per_link, config.merge_every) == (3, 0, None, None)
    assert config.target_modules == ["q_proj", "v_proj"]  # sorted list: stable JSON
    assert LoraConfig(r=4).peft_type == PeftType.LORA  # LoRA itself is untouched
    assert peft_ext.registered_methods()["COLA"] is ColaConfig


def test_round_trip_through_adapter_config_json(tmp_path):
    config = ColaConfig(r=4, lora_alpha=8, chain_length=4, steps_per_link=[1, 2, 3, 4], link_ranks=[4, 2, 2, 8],
                        target_modules=["q_proj"], seed=3, use_rslora=True)  # fmt: skip
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "COLA" and raw["peft_ext_requirement"] == REQUIREMENT
    assert raw["steps_per_link"] == [1, 2, 3, 4] and raw["link_ranks"] == [4, 2, 2, 8] and raw["chain_length"] == 4
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is ColaConfig
    assert loaded.to_dict() == config.to_dict()


BAD = [
    ({"r": 0}, r"ColaConfig\.r\b"),
    ({"chain_length": 0}, r"chain_length"),
    ({"chain_length": 2.5}, r"chain_length"),
    ({"steps_per_link": [5, 5]}, r"steps_per_link has 2 entries but chain_length=3"),
    ({"steps_per_link": [5, 0, 5]}, r"steps_per_link\[1\]"),
    ({"steps_per_link": -1}, r"steps_per_link"),
    ({"merge_every": 1.0}, r"merge_every"),
    ({"merge_every": 0.5}, r"merge_every=0.5 with chain_length=3"),
    ({"merge_every": 0.2, "steps_per_link": 4}, r"not both"),
    ({"link_ranks": [4, 4]}, r"link_ranks"),
    ({"link_ranks": [4, 0, 4]}, r"link_ranks\[1\]"),
    ({"link_ranks": [4, 4, 4], "rank_pattern": {"q_proj": 2}}, r"link_ranks or rank_pattern"),
    ({"current_link": 3}, r"current_link"),
    ({"seed": -1}, r"seed"),
    ({"use_dora": True}, r"use_dora"),
    ({"lora_bias": True}, r"lora_bias"),
    ({"init_lora_weights": "olora"}, r"init_lora_weights"),
    ({"layer_replication": [(0, 1)]}, r"layer_replication"),
]


@pytest.mark.parametrize("overrides, match", BAD, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(BAD)])
def test_bad_values_raise_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        ColaConfig(**overrides)


@pytest.mark.parametrize(
    "fields, max_steps, expected",
    [
        ({}, 10, [3, 7]),  # equal split: round(10/3), round(20/3)
        ({}, 3, [1, 2]),
        ({"chain_length": 1}, 5, []),
        ({"chain_length": 4}, 100, [25, 50, 75]),
        ({"steps_per_link": 3}, 9, [3, 6]),
        ({"steps_per_link": 3}, 11, [3, 6]),  # the last link trains to the end
        ({"steps_per_link": [2, 3, 5]}, 10, [2, 5]),
        ({"merge_every": 0.25}, 100, [25, 50]),
        ({"merge_every": 0.25}, 3, [1, 2]),
    ],
)
def test_schedule(fields, max_steps, expected):
    assert ColaConfig(**fields).boundaries_for(max_steps) == expected


@pytest.mark.parametrize(
    "fields, max_steps, match",
    [
        ({"steps_per_link": 4}, 10, r"steps_per_link=4 with chain_length=3 needs at least 12 steps.*max_steps=10"),
        ({"steps_per_link": [2, 3, 5]}, 11, r"steps_per_link=\[2, 3, 5\] sums to 10 steps.*max_steps=11"),
        ({"merge_every": 0.25}, 2, r"merge_every=0.25 gives links of 0 steps"),
        ({}, 2, r"chain_length=3 links do not fit in a run of max_steps=2"),
        ({}, 0, r"max_steps >= 1"),
    ],
)
def test_schedule_that_does_not_fit_the_run(fields, max_steps, match):
    with pytest.raises(ValueError, match=match):
        ColaConfig(**fields).boundaries_for(max_steps)


def test_ranks_and_scaling_per_link():
    assert ColaConfig(r=4).ranks_for(4) == [4, 4, 4]
    assert ColaConfig(r=4).ranks_for(2) == [2, 2, 2]  # a rank_pattern entry
    assert ColaConfig(link_ranks=[8, 4, 2]).ranks_for(4) == [8, 4, 2]
    assert ColaConfig.link_scaling(8, 4, False) == 2.0
    assert ColaConfig.link_scaling(8, 4, True) == 4.0
