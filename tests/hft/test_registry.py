"""peft-ext's peft types are PEFT citizens: enum members, mappings, idempotent registration, clash detection."""

import copy
import importlib
import json
import pickle
from dataclasses import dataclass

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_ext
from peft_ext.registry import RegistrationError, add_peft_type, register_method, registered_methods


def test_hft_is_a_peft_type_member():
    member = PeftType("HFT")
    assert member is PeftType.HFT is PeftType["HFT"]
    assert isinstance(member, PeftType) and member == "HFT"
    assert member in list(PeftType)
    assert json.dumps({"peft_type": member}) == '{"peft_type": "HFT"}'
    assert pickle.loads(pickle.dumps(member)) is member
    assert copy.deepcopy(member) is member
    with pytest.raises(AttributeError):
        PeftType.HFT = "something else"


def test_hft_is_in_every_peft_mapping():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HFT] is peft_ext.HftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HFT] is peft_ext.HftModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.HFT] == "hft_"
    assert registered_methods()["HFT"] is peft_ext.HftConfig
    # PEFT's own config dispatch, as used by PeftConfig.from_pretrained
    assert type(PeftConfig.from_peft_type(peft_type="HFT")) is peft_ext.HftConfig


def test_registration_is_idempotent_and_survives_reload():
    n_members = len(PeftType)
    assert add_peft_type("HFT") is PeftType.HFT
    register_method("HFT", peft_ext.HftConfig, peft_ext.HftModel, "hft_")
    hft = importlib.import_module("peft_ext.tuners.hft")
    reloaded = importlib.reload(hft)  # re-runs registration with fresh class objects
    try:
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HFT] is reloaded.HftConfig
        assert len(PeftType) == n_members
    finally:  # point PEFT back at the classes the rest of the test session uses
        register_method("HFT", peft_ext.HftConfig, peft_ext.HftModel, "hft_")
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HFT] is peft_ext.HftConfig


def test_a_different_method_under_a_taken_name_is_refused():
    @dataclass
    class OtherConfig(PeftConfig):
        pass

    with pytest.raises(RegistrationError, match=r"already has a method called 'HFT'"):
        register_method("HFT", OtherConfig, peft_ext.HftModel, "hft_")
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HFT] is peft_ext.HftConfig
    with pytest.raises(RegistrationError, match=r"'LORA'"):
        register_method("LORA", OtherConfig, peft_ext.HftModel, "lora_")


def test_peft_type_names_are_checked():
    with pytest.raises(ValueError, match="upper-case"):
        add_peft_type("hft")
