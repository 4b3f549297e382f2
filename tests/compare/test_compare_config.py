"""A comparison's configuration: methods by name or with fields, learning-rate defaults, the shared budget, the
built-in default, and the bad inputs that must fail before any training."""

from pathlib import Path

import pytest

from peft_ext.compare.config import CompareConfig, builtin_default
from peft_ext.registry import registered_methods

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def specs(methods, **fields):
    return CompareConfig(model="tiny-llama", methods=methods, **fields).method_specs()


def test_methods_by_name_or_with_fields_and_their_learning_rates():
    hft, full, lora, custom = specs(["hft", "FULL", "lora", {"name": "lora-r2", "peft_type": "LORA", "r": 2, "learning_rate": "5e-4"}])
    assert (hft.peft_type, hft.learning_rate, hft.fields) == ("HFT", 1e-4, {})
    assert full.is_full and full.method_dict(0) is None and full.learning_rate == 1e-4
    assert lora.fields == {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"} and lora.learning_rate == 1e-3
    assert custom.name == "lora-r2" and custom.fields == {"r": 2} and custom.learning_rate == 5e-4
    assert hft.method_dict(7) == {"peft_type": "HFT", "seed": 7}  # HFT's selection follows the run's seed
    assert [s.learning_rate for s in CompareConfig(methods=["hft", "lora"]).method_specs("dpo")] == [5e-6, 5e-5]


def test_an_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError) as error:
        specs(["hft", "qlora9"])
    message = str(error.value)
    assert message.startswith("compare methods[1]: unknown method 'qlora9'. Registered peft-ext methods: ")
    usable = message.split("Not listed:")[0]
    for name in sorted(set(registered_methods()) - {"DELTACOME"} | {"LORA", "FULL"}):
        assert name in usable
    assert "DELTACOME" not in usable  # refused (made by `peft-ext compress`, not trained): named only as not listed
    assert "Not listed: DELTACOME (Delta-CoMe adapters are made by compressing a full fine-tune" in message


def test_a_budget_a_method_cannot_meet_fails_before_training():
    with pytest.raises(ValueError, match=r"compare methods\[0\] \(cola\) cannot meet the shared budget of max_steps=4: "
                                         r"ColaConfig.steps_per_link=2 with chain_length=3 needs at least 6 steps"):
        specs([{"peft_type": "COLA", "chain_length": 3, "steps_per_link": 2}], max_steps=4)
    with pytest.raises(ValueError, match=r"cannot meet the shared budget of max_steps=2: ColaConfig.chain_length=3 links"):
        specs([{"peft_type": "COLA", "chain_length": 3}], max_steps=2)
    assert specs([{"peft_type": "COLA", "chain_length": 3}], max_steps=3)[0].peft_type == "COLA"


def test_bad_method_entries_name_the_entry_and_the_fix():
    with pytest.raises(ValueError, match=r"methods\[0\] \(hft\): method HFT: .*unexpected keyword argument 'rank'"):
        specs([{"peft_type": "HFT", "rank": 4}])
    with pytest.raises(ValueError, match=r"methods\[0\] \(deltacome\): DELTACOME cannot be compared by training: .*peft-ext compress"):
        specs(["deltacome"])
    with pytest.raises(ValueError, match=r"full fine-tuning takes no config fields, got \['r'\]"):
        specs([{"peft_type": "full", "r": 2}])
    with pytest.raises(ValueError, match=r"the name\(s\) \['lora'\] repeat; give each entry its own `name:`"):
        specs(["lora", {"peft_type": "LORA", "r": 2}])
    with pytest.raises(ValueError, match="learning_rate must be a number, got 'fast'"):
        specs([{"peft_type": "LORA", "learning_rate": "fast"}])


def test_the_budget_is_shared_and_checked():
    with pytest.raises(ValueError, match=r"trainer_args sets \['learning_rate', 'max_steps'\]: the budget is shared"):
        CompareConfig(trainer_args={"max_steps": 3, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"trainer_args sets \['gradient_accumulation_steps'\]: .* at the top level"):
        CompareConfig(trainer_args={"gradient_accumulation_steps": 2})
    assert CompareConfig(gradient_accumulation_steps=2).gradient_accumulation_steps == 2
    with pytest.raises(ValueError, match="compare max_steps must be a positive integer, got 0"):
        CompareConfig(max_steps=0)
    with pytest.raises(ValueError, match=r"compare seeds repeat a seed: \[1, 1\]"):
        CompareConfig(seeds=[1, 1])
    with pytest.raises(ValueError, match=r"unknown compare key\(s\) \['epochs'\]"):
        CompareConfig.from_dict({"epochs": 3})
    with pytest.raises(ValueError, match=r"compare imports: 'no_such_package_xyz' does not import"):
        CompareConfig(imports=["no_such_package_xyz"])
    with pytest.raises(ValueError, match=r"forgetting\[0\]: unknown key\(s\) \['limit'\]"):
        CompareConfig(forgetting=[{"data": "english-heldout", "limit": 3}])


def test_the_builtin_default_is_the_demo_and_the_recipe_spells_it_out(tmp_path):
    default = builtin_default()
    assert default == CompareConfig.from_yaml(str(RECIPES / "compare_default.yaml"))
    assert CompareConfig.from_yaml(None) == default
    assert (default.model, default.max_steps, default.per_device_train_batch_size) == ("smollm2-135m-instruct", 30, 8)
    assert [s.name for s in default.method_specs()] == ["hft", "full", "lora"]
    assert [p["name"] for p in default.forgetting] == ["english", "world_knowledge"]
    # a file's missing keys take the defaults, but forgetting defaults to the English-text loss alone
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-llama\nmethods: [lora]\n")
    config = CompareConfig.from_yaml(str(path), ["max_steps=5", "seeds=[0,1]"])
    assert config.max_steps == 5 and config.seeds == [0, 1] and [p["name"] for p in config.forgetting] == ["english"]


@pytest.mark.parametrize("name", ["compare_default.yaml", "compare_own_data.yaml", "compare_dpo.yaml"])
def test_shipped_compare_recipes_build_their_methods(name):
    config = CompareConfig.from_yaml(str(RECIPES / name))
    assert len(config.method_specs()) >= 2


def test_the_docs_example_file_is_accepted():
    """docs/compare.md's annotated file is a valid comparison (its methods built, its budget keys where they go)."""
    import yaml

    text = (RECIPES.parent / "docs" / "compare.md").read_text()
    example = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
    config = CompareConfig.from_dict(example)
    assert config.gradient_accumulation_steps == example["gradient_accumulation_steps"]
    assert [s.name for s in config.method_specs()] == ["hft", "lora", "cola-3x8", "full"]


def test_a_probe_without_a_name_is_named_by_its_file_stem_or_set():
    config = CompareConfig(forgetting=[{"data": {"path": "data/mc.jsonl"}}, "world-knowledge-probes",
                                       {"data": {"dataset": "user/old_task", "split": "test"}}, "data/old.csv"])
    assert [p["name"] for p in config.forgetting] == ["mc", "world-knowledge-probes", "old_task", "old"]


def test_the_files_the_docstrings_cite_exist():
    import re

    import peft_ext.compare
    import peft_ext.compare.config

    for doc in (peft_ext.compare.__doc__, peft_ext.compare.config.__doc__):
        for cited in re.findall(r"recipes/[\w.-]+\.yaml", doc):
            assert (RECIPES.parent / cited).is_file(), cited
    assert "compare_own_data.yaml" in peft_ext.compare.__doc__


def test_a_model_path_that_does_not_exist_is_told_apart_from_a_hub_id(tmp_path):
    from peft_ext.compare.config import check_model, looks_like_path

    assert looks_like_path("./m") and looks_like_path("/abs/m") and looks_like_path("models/v1/m")
    assert looks_like_path(f"{tmp_path}/missing") and not looks_like_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    check_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # a Hub id: left to transformers
    check_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"compare model: '\./gone' looks like a local folder but no such folder exists"):
        check_model("./gone")
