"""The public extension API: a user's own method (SCALE, built in scale_method/ only) registers with
`peft_ext.register_method`, works through PEFT's own entry points and `peft-ext train` (its training companion
attached without any switch in peft-ext), and bad registrations or unknown adapter types fail clearly."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import yaml
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from peft.utils import PeftType
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback

import peft_ext
from peft_ext.registry import RegistrationError, UnknownPeftTypeError, register_method, registered_methods
from peft_ext.training import attach_companions

from .scale_method import ScaleConfig, ScaleModel
from .scale_method.training import ScaleLogCallback


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def test_a_users_method_is_a_peft_citizen(tmp_path):
    assert PeftType("SCALE") is PeftType.SCALE and registered_methods()["SCALE"] is ScaleConfig
    config = ScaleConfig(init_weights=False)
    assert config.peft_type is PeftType.SCALE  # set by the registration, not by the config class
    model = get_peft_model(tiny_llama(), config)
    expected = model(IDS).logits.detach()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    # the requirement stamp names the package that registered the method (no distribution provides this test
    # folder, so its import name; an installed one gives "dist>=version", see the entry-point test)
    assert saved["peft_type"] == "SCALE" and saved["peft_ext_requirement"] == "tests"
    card = (tmp_path / "README.md").read_text()
    assert "peft-ext" in card and "scale" in card  # the shared tuner base tags the model card
    assert type(PeftConfig.from_pretrained(tmp_path)) is ScaleConfig
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(reloaded(IDS).logits, expected)


def test_registering_again_is_harmless_and_a_clash_names_the_package():
    assert register_method("SCALE", ScaleConfig, ScaleModel) is PeftType.SCALE

    @dataclass
    class OtherScaleConfig(peft_ext.PeftExtConfig):
        pass

    with pytest.raises(RegistrationError, match=r"'SCALE', registered by the package 'tests'.*choose another name"):
        register_method("SCALE", OtherScaleConfig, ScaleModel)
    with pytest.raises(RegistrationError, match=r"'HFT', registered by the package 'peft_ext'"):
        register_method("HFT", OtherScaleConfig, ScaleModel)
    with pytest.raises(RegistrationError, match=r"'LORA', registered by the package 'peft'"):
        register_method("LORA", OtherScaleConfig, LoraModel)
    assert registered_methods()["SCALE"] is ScaleConfig


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"config_cls": None}, TypeError, r"config_cls=.*PeftExtConfig.*got None"),
        ({"model_cls": None}, TypeError, r"model_cls=.*BaseTuner.*got None"),
        ({"config_cls": dict}, TypeError, r"config_cls="),
        ({"prefix": "other_"}, ValueError, r"prefix='other_'.*differs from ScaleModel.prefix"),
        ({"model_cls": type("BadPrefixModel", (ScaleModel,), {"prefix": "scale"})}, ValueError, r"prefix=.*ending in '_'"),
        ({"name": "SCALE3"}, RegistrationError, r"ScaleConfig is already registered as 'SCALE'"),
        ({"name": "scale2"}, ValueError, r"name=.*upper-case"),
        ({"name": "SCALE2_"}, ValueError, r"name=.*not ending in '_'"),
    ],
)
def test_a_registration_missing_or_misnaming_a_part_is_refused(kwargs, error, match):
    args = {"name": "SCALE2", "config_cls": ScaleConfig, "model_cls": ScaleModel, **kwargs}
    with pytest.raises(error, match=match):
        register_method(**args)
    assert not {"SCALE2", "SCALE3"} & set(PeftType._member_map_)  # nothing half-registered


def test_a_config_class_that_was_never_registered_says_how():
    @dataclass
    class UnregisteredConfig(peft_ext.PeftExtConfig):
        pass

    with pytest.raises(RegistrationError, match=r"UnregisteredConfig is not registered.*peft_ext.register_method"):
        UnregisteredConfig()


def test_an_adapter_folder_of_an_unknown_peft_type_names_the_field_and_package(tmp_path):
    model = get_peft_model(tiny_llama(), ScaleConfig())
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data.update(peft_type="MADE_UP_METHOD", peft_ext_requirement="peft-ext>=9.1")
    config_file.write_text(json.dumps(data))
    for load in (lambda: PeftModel.from_pretrained(tiny_llama(), tmp_path), lambda: PeftConfig.from_pretrained(tmp_path)):
        with pytest.raises(UnknownPeftTypeError, match=r"peft_type 'MADE_UP_METHOD'.*no installed package.*pip install -U 'peft-ext>=9.1'"):
            load()
    data.pop("peft_ext_requirement")  # made by some other plugin: no requirement recorded
    config_file.write_text(json.dumps(data))
    with pytest.raises(KeyError, match=r"peft_type 'MADE_UP_METHOD'.*Install \(and import\) the package that defines it"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


class _MarkerMixin:
    """A trainer mixin companion (what FineGates' loss wrapper will be)."""

    peft_ext_marker = True


@dataclass
class _MixinScaleConfig(ScaleConfig):
    def training_companions(self):
        return (f"{__name__}:_MarkerMixin", "tests.extension_method.scale_method.training:ScaleLogCallback")


def test_companions_are_callbacks_or_trainer_mixins():
    trainer_cls, callbacks = attach_companions(Trainer, ScaleConfig())
    assert trainer_cls is Trainer and [type(c) for c in callbacks] == [ScaleLogCallback]
    trainer_cls, callbacks = attach_companions(Trainer, _MixinScaleConfig())
    assert issubclass(trainer_cls, Trainer) and issubclass(trainer_cls, _MarkerMixin) and trainer_cls.peft_ext_marker
    assert [type(c) for c in callbacks] == [ScaleLogCallback] and isinstance(callbacks[0], TrainerCallback)
    assert attach_companions(Trainer, None) == (Trainer, [])
    assert attach_companions(Trainer, peft_ext.HftConfig(reselect="never")) == (Trainer, [])

    @dataclass
    class BrokenConfig(ScaleConfig):
        def training_companions(self):
            return ("tests.extension_method.scale_method.training:NoSuchCallback",)

    with pytest.raises(ValueError, match=r"BrokenConfig.training_companions\(\) names .*NoSuchCallback.*does not import"):
        attach_companions(Trainer, BrokenConfig())


def test_peft_ext_train_attaches_a_third_party_methods_companion(tmp_path):
    from peft_ext.recipe import Recipe, build_trainer

    recipe = {
        "model": "tiny-llama", "data": "fictional-facts", "trainer": "sft", "output_dir": str(tmp_path / "out"),
        "method": {"peft_type": "SCALE", "init_weights": False},
        "trainer_args": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 32, "logging_steps": 1},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    trainer = build_trainer(Recipe.from_yaml(str(tmp_path / "recipe.yaml")))
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, ScaleLogCallback)]
    trainer.train()
    assert callback.seen and all(v > 0 for v in callback.seen)  # the step log and the run summary


def test_a_recipe_import_that_fails_names_the_field():
    from peft_ext.recipe import Recipe

    with pytest.raises(ValueError, match=r"recipe imports: 'no_such_method_package' does not import"):
        Recipe(model="tiny-llama", data="fictional-facts", imports=["no_such_method_package"])
