"""YAML recipes on the tiny model: SFT and DPO, HFT and LoRA (and full FT), 2 steps; saved adapters reload exactly."""

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel

import peft_ext
from peft_ext.data.tiny_model import tiny_llama
from peft_ext.recipe import Recipe, build_peft_config, build_trainer, run_recipe
from peft_ext.training import HftReselectCallback
from transformers import AutoModelForCausalLM

PROBE_TEXT = "The capital of the province of Drelmor is Kastavin."
TRAINER_ARGS = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_length": 64}


def write_recipe(tmp_path, name="recipe.yaml", **keys) -> str:
    recipe = {"model": "tiny-llama", "data": "fictional-facts", "trainer": "sft", "trainer_args": dict(TRAINER_ARGS)}
    recipe.update({"output_dir": str(tmp_path / "out"), **keys})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def logits(model) -> torch.Tensor:
    _, tokenizer = tiny_llama()
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokenizer(PROBE_TEXT).input_ids])).logits


@pytest.mark.parametrize(
    "trainer, data, method",
    [
        ("sft", "fictional-facts", {"peft_type": "HFT", "ratio": 0.5}),
        ("sft", "fictional-facts-qa", {"peft_type": "LORA", "r": 4, "target_modules": "all-linear"}),
        ("dpo", "addition-preferences", {"peft_type": "HFT", "ratio": 0.5, "reselect": "never"}),
        ("dpo", "addition-preferences", {"peft_type": "LORA", "r": 4, "target_modules": "all-linear"}),
    ],
)
def test_recipe_trains_saves_and_reloads_the_same_model(tmp_path, trainer, data, method):
    recipe = Recipe.from_yaml(write_recipe(tmp_path, trainer=trainer, data=data, method=method))
    trained = run_recipe(recipe)
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert trained.state.global_step == 2

    reloaded = PeftModel.from_pretrained(tiny_llama()[0], out)
    assert reloaded.peft_config["default"].peft_type == method["peft_type"]
    assert torch.equal(logits(reloaded), logits(trained.model))
    assert not torch.allclose(logits(reloaded), logits(tiny_llama()[0]), atol=1e-4)  # training changed the model


def test_full_fine_tuning_recipe_saves_the_whole_model(tmp_path):
    trained = run_recipe(Recipe.from_yaml(write_recipe(tmp_path)))  # no method: full fine-tuning
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(reloaded), logits(trained.model))


def test_peft_config_comes_from_pefts_registry():
    hft = build_peft_config({"peft_type": "hft", "ratio": 0.25, "seed": 3})
    assert isinstance(hft, peft_ext.HftConfig) and hft.ratio == 0.25 and hft.seed == 3
    lora = build_peft_config({"peft_type": "LORA", "r": 8})
    assert isinstance(lora, LoraConfig) and lora.r == 8 and lora.task_type == "CAUSAL_LM"
    with pytest.raises(ValueError, match="unknown peft_type 'NOPE'.*HFT"):
        build_peft_config({"peft_type": "NOPE"})
    with pytest.raises(ValueError, match="HFT.*not_a_field"):
        build_peft_config({"peft_type": "HFT", "not_a_field": 1})


def test_overrides_and_bad_keys(tmp_path):
    path = write_recipe(tmp_path, method={"peft_type": "HFT"})
    recipe = Recipe.from_yaml(path, ["trainer_args.max_steps=7", "method.ratio=0.25", "trainer_args.learning_rate=3e-4"])
    assert recipe.trainer_args["max_steps"] == 7 and recipe.method == {"peft_type": "HFT", "ratio": 0.25}
    assert recipe.trainer_args["learning_rate"] == 3e-4  # YAML's 3e-4 is a float here, not a string
    with pytest.raises(ValueError, match="unknown recipe key.*'epochs'"):
        Recipe.from_yaml(path, ["epochs=3"])
    with pytest.raises(ValueError, match="trainer must be one of"):
        Recipe.from_yaml(path, ["trainer=ppo"])


@pytest.mark.parametrize("reselect, expected", [("stage", True), ("never", False)])
def test_hft_reselect_callback_is_added_unless_never(tmp_path, reselect, expected):
    trainer = build_trainer(Recipe.from_yaml(write_recipe(tmp_path, method={"peft_type": "HFT", "reselect": reselect})))
    assert any(isinstance(c, HftReselectCallback) for c in trainer.callback_handler.callbacks) == expected


def test_second_stage_from_a_saved_adapter_draws_a_new_half(tmp_path):
    run_recipe(Recipe.from_yaml(write_recipe(tmp_path, method={"peft_type": "HFT"})))
    first = peft_ext.HftConfig.from_pretrained(tmp_path / "out")
    stage2 = write_recipe(tmp_path, "stage2.yaml", adapter=str(tmp_path / "out"), output_dir=str(tmp_path / "out2"))
    trained = run_recipe(Recipe.from_yaml(stage2))
    config = trained.model.peft_config["default"]
    assert config.stage == first.stage + 1
    assert config.selected_modules != first.selected_modules
    assert set(first.selected_modules) <= set(config.trained_modules)  # stage 1's half stays in the model
    reloaded = PeftModel.from_pretrained(tiny_llama()[0], tmp_path / "out2")
    assert torch.equal(logits(reloaded), logits(trained.model))


def test_resume_from_checkpoint_is_checked_before_training(tmp_path):
    common = dict(model="tiny-llama", data="fictional-facts", output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=true, but output_dir .* holds no checkpoint-N"):
        Recipe(**common, resume_from_checkpoint=True)
    (tmp_path / "out").mkdir()  # a folder, but not a Trainer checkpoint
    with pytest.raises(ValueError, match=r"is not a Trainer checkpoint folder \(no trainer_state.json\)"):
        Recipe(**common, resume_from_checkpoint=str(tmp_path / "out"))


def test_a_strategy_of_no_read_by_yaml_as_false_means_no(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: tiny-llama\ndata: fictional-facts\ntrainer_args: {save_strategy: no, logging_strategy: no}\n")
    recipe = Recipe.from_yaml(str(path), ["trainer_args.eval_strategy=no"])
    assert [recipe.trainer_args[k] for k in ("save_strategy", "logging_strategy", "eval_strategy")] == ["no"] * 3


def test_a_recipe_without_model_or_data_names_what_it_needs(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: tiny-llama\n")
    with pytest.raises(ValueError, match=r"r.yaml: the recipe needs \['data'\]"):
        Recipe.from_yaml(str(path))
    path.write_text("model: tiny-llama\nepochs: 3\n")  # unknown keys are named first
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) \['epochs'\]"):
        Recipe.from_yaml(str(path))


def test_recompute_adapter_inputs_trains_the_same_adapter(tmp_path):
    """The recipe key hooks the trainer's adapter layers (peft_ext.recompute_adapter_inputs) and changes no bit of
    the training: the same 2 steps with and without it give equal adapter weights."""
    from peft_ext.tuners.recompute import _adapter_layers

    method = {"peft_type": "LORA", "r": 4, "target_modules": "all-linear"}
    states = []
    for recompute in (False, True):
        out = tmp_path / f"recompute_{recompute}"
        out.mkdir()
        recipe = Recipe.from_yaml(write_recipe(out, method=method, recompute_adapter_inputs=recompute))
        trainer = build_trainer(recipe)
        layers, _ = _adapter_layers(trainer.model)
        hooked = [bool(layer._forward_pre_hooks) for _, layer in layers]
        assert all(hooked) if recompute else not any(hooked)
        trainer.train()
        if recompute:  # the training forwards rebuilt inputs (the norm outputs, the down_proj input)
            report = trainer.model.__dict__["_peft_ext_input_recompute"][1]
            assert sum(len(cov["rebuilt"]) for cov in report.coverage().values()) > 0, report.summary()
        states.append({k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k})
    assert states[0].keys() == states[1].keys() and len(states[0]) > 0
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(v, torch.zeros_like(v)) for k, v in states[0].items() if "lora_B" in k)  # it trained


def test_recompute_adapter_inputs_needs_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="recompute_adapter_inputs=true needs adapter layers to hook: give a `method`"):
        Recipe.from_yaml(write_recipe(tmp_path, recompute_adapter_inputs=True))
    with pytest.raises(ValueError, match="recompute_adapter_inputs must be true or false, got 'yes please'"):
        Recipe.from_yaml(write_recipe(tmp_path, method={"peft_type": "LORA", "r": 4}, recompute_adapter_inputs="yes please"))


def test_recompute_adapter_inputs_with_gradient_checkpointing_is_refused(tmp_path):
    """The trainer turns gradient checkpointing on inside train(), where the option steps aside (saves nothing):
    refused when the recipe is read, naming both keys and the fix. Only an explicit true counts (the device defaults
    set it false)."""
    lora = {"peft_type": "LORA", "r": 4}
    args = {**TRAINER_ARGS, "gradient_checkpointing": True}
    match = r"recompute_adapter_inputs=true and trainer_args gradient_checkpointing=true.*Remove trainer_args"
    with pytest.raises(ValueError, match=match):
        Recipe.from_yaml(write_recipe(tmp_path, method=lora, recompute_adapter_inputs=True, trainer_args=args))
    with pytest.raises(ValueError, match=match):  # the same through an override
        Recipe.from_yaml(write_recipe(tmp_path, method=lora, recompute_adapter_inputs=True),
                         ["trainer_args.gradient_checkpointing=true"])  # fmt: skip
    for keys in ({"recompute_adapter_inputs": False, "trainer_args": args},
                 {"recompute_adapter_inputs": True, "trainer_args": {**TRAINER_ARGS, "gradient_checkpointing": False}},
                 {"recompute_adapter_inputs": True}):  # fmt: skip
        Recipe.from_yaml(write_recipe(tmp_path, method=lora, **keys))
