"""A FineGates recipe on the tiny model: `peft-ext train` trains with the sparsity loss inside the trainer's loss,
saves the adapter and (pruned_dir) the pruned model, whose outputs equal the gated model's; load_model reads it."""

import json

import pytest
import torch
from peft import PeftModel

from peft_ext.data import load_model
from peft_ext.data.tiny_model import tiny_llama
from peft_ext.recipe import Recipe, run_recipe
from tests.test_recipe import logits, write_recipe

# a large gate learning rate and lambda: the gates close within the few steps (logits ~1 -> below -0.549)
METHOD = {"peft_type": "FINEGATES", "target_sparsity": 0.4, "sparsity_lambda": 50.0, "gates_learning_rate": 0.5,
          "bias": "gates", "seed": 0}  # fmt: skip


def test_finegates_recipe_trains_and_saves_a_smaller_model_with_the_same_outputs(tmp_path):
    recipe = Recipe.from_yaml(
        write_recipe(tmp_path, method=METHOD, pruned_dir=str(tmp_path / "pruned"),
                     trainer_args={"max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                                   "max_length": 64, "logging_steps": 2})  # fmt: skip
    )
    trainer = run_recipe(recipe)
    logged = [entry for entry in trainer.state.log_history if "finegates/removable_fraction" in entry]
    assert logged and all(0.0 <= e["finegates/removable_fraction"] <= 1.0 for e in logged)
    assert logged[-1]["finegates/lambda"] == 50.0

    gated = PeftModel.from_pretrained(tiny_llama()[0], tmp_path / "out")
    stats = gated.base_model.gate_stats()
    assert stats["removable_fraction"] > 0.1, stats  # the gates did close

    pruned, _ = load_model(str(tmp_path / "pruned"))
    manifest = json.loads((tmp_path / "pruned" / "pruned_manifest.json").read_text())
    assert manifest
    n_pruned = sum(p.numel() for p in pruned.parameters())
    n_base = sum(p.numel() for p in tiny_llama()[0].parameters())
    assert n_pruned < n_base
    torch.testing.assert_close(logits(pruned), logits(gated), rtol=1e-5, atol=1e-5)


def test_pruned_dir_needs_a_finegates_method(tmp_path):
    with pytest.raises(ValueError, match=r"pruned_dir.*FineGates"):
        Recipe.from_yaml(write_recipe(tmp_path, method={"peft_type": "LORA", "r": 4}, pruned_dir=str(tmp_path / "p")))
