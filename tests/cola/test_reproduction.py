"""The COLA-vs-LoRA reproduction runner (peft_ext.experiments.cola_vs_lora) at a tiny scale, and COLA in `peft-ext train` recipes."""

import json
import math

import pytest
import yaml

from peft_ext.experiments.cola_vs_lora import (
    Repro,
    _adapt,
    _tiny_llama,
    _unexplained,
    reproduce,
    teacher_data,
    training_data,
)

TINY = dict(
    steps=4, batch_size=8, seeds=[0], chain_lengths=[2], methods=["lora", "cola", "fft"], cpu_threads=1,
    teacher={"hidden": 32, "ffn": 64, "vocab": 32, "seq": 8, "n_train": 32, "n_eval": 16},
)  # fmt: skip


def test_teacher_task_is_out_of_reach_of_the_base():
    data = teacher_data({**Repro(**TINY).teacher})
    n = data["n_train"]
    # the untrained base's error is 1.0 by construction (train split); the held-out split is close to it
    assert math.isclose(((data["start"][:n] - data["target"][:n]).pow(2).mean() / data["scale"]).item(), 1.0, rel_tol=1e-5)
    assert data["ids"].shape == (48, 8) and data["target"].shape == (48, 8, 32)


def test_reproduction_runs_every_method_and_writes_the_summary(tmp_path):
    results = reproduce(Repro(**TINY), str(tmp_path), log=lambda *a: None)
    assert list(results) == ["lora", "cola-M2", "fft"]
    # the score is the held-out error left unexplained, relative to the teacher's scale: the untrained base's, measured
    # the same way, is the bar every method must pass after its 4 steps
    repro = Repro(**TINY)
    data = teacher_data({**repro.teacher})
    base_score = _unexplained(_tiny_llama(repro.teacher, repro.teacher["seed"]), data)
    for run, per_seed in results.items():
        score = per_seed["0"]["score"]
        assert 0.0 < score < base_score and math.isfinite(per_seed["0"]["train_loss"]), (run, score, base_score)
    # seeded: a second run scores the same
    again = reproduce(Repro(**TINY), None, log=lambda *a: None)
    assert {r: v["0"]["score"] for r, v in again.items()} == {r: v["0"]["score"] for r, v in results.items()}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results)) and saved["recipe"]["r"] == 2
    text = (tmp_path / "results.md").read_text()
    assert "| lora |" in text and "| cola-M2 |" in text and "| fft |" in text
    assert "cola-M2 vs LoRA: below LoRA in" in text


def test_recipe_file_is_valid_and_bad_keys_are_named(tmp_path):
    recipe = Repro.from_yaml("recipes/cola_vs_lora.yaml")
    assert recipe.task == "teacher" and recipe.runs() == [("lora", None), ("cola-M2", 2), ("cola-M3", 3), ("cola-M4", 4), ("fft", None)]
    assert Repro.from_yaml("recipes/cola_vs_lora_smollm2.yaml").task == "sft"
    capacity = Repro.from_yaml("recipes/cola_vs_lora_capacity.yaml")
    assert capacity.runs() == [("lora", None), ("cola-M4", 4), ("lora-r4", None)]
    assert capacity.r * capacity.chain_lengths[0] == capacity.reference_ranks[0]  # the reference is LoRA at M·r
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"task": "teacher", "rank": 4}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rank'\]"):
        Repro.from_yaml(str(path))
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['dora'\]"):
        Repro(methods=["dora"])
    with pytest.raises(ValueError, match=r"unknown teacher key\(s\) \['width'\]"):
        Repro(teacher={"width": 3})


def test_peft_ext_train_recipe_with_cola_gets_the_chain_callback(tmp_path):
    from peft_ext.recipe import Recipe, build_trainer, run_recipe
    from peft_ext.training import ColaChainCallback

    recipe = Recipe(
        model="tiny-llama", data="fictional-facts", output_dir=str(tmp_path),
        method={"peft_type": "COLA", "r": 4, "chain_length": 2, "target_modules": "all-linear"},
        trainer_args={"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_length": 32},
    )  # fmt: skip
    assert any(isinstance(cb, ColaChainCallback) for cb in build_trainer(recipe).callback_handler.callbacks)
    trainer = run_recipe(recipe)
    assert trainer.model.peft_config["default"].current_link == 1
    assert json.loads((tmp_path / "adapter_config.json").read_text())["current_link"] == 1


def test_reference_rank_run_is_lora_at_that_rank_with_the_same_alpha_over_r():
    from peft_ext.data.tiny_model import tiny_llama

    repro = Repro(task="sft", r=1, lora_alpha=2, target_modules=["q_proj"], reference_ranks=[4])
    assert repro.runs()[-1] == ("lora-r4", None)
    config = _adapt(tiny_llama()[0], repro, None, "lora-r4")[0].peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8)
    config = _adapt(tiny_llama()[0], repro, None, "lora")[0].peft_config["default"]
    assert (config.r, config.lora_alpha) == (1, 2)


def test_codebook_data_option(tmp_path):
    data = training_data("codebook-12")
    assert len(data) == 12 and data.column_names == ["prompt", "completion"]
    assert training_data("fictional-facts").column_names == ["text"]
    with pytest.raises(ValueError, match="codebook-N"):
        training_data("codebook-many")
    repro = Repro(
        task="sft", model="tiny-llama", data="codebook-8", methods=["lora", "cola"], chain_lengths=[2],
        reference_ranks=[4], r=2, lora_alpha=4, target_modules="all-linear", steps=2, batch_size=4, seeds=[0],
        max_length=32, cpu_threads=1,
    )  # fmt: skip
    results = reproduce(repro, str(tmp_path), log=lambda *a: None)
    assert list(results) == ["lora", "cola-M2", "lora-r4"]
    assert all(math.isfinite(per_seed["0"]["score"]) for per_seed in results.values())


def test_cli_reproduce_cola_runs_a_recipe_with_overrides(tmp_path, capsys):
    from peft_ext.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "methods": ["lora", "cola"], "output_dir": str(tmp_path / "unused")}))
    out = tmp_path / "out"
    assert main(["reproduce-cola", str(recipe), "--set", "steps=2", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["recipe"]["steps"] == 2 and list(saved["results"]) == ["lora", "cola-M2"]
    assert not (tmp_path / "unused").exists()  # --out wins over the recipe's output_dir

    assert main(["reproduce-cola", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert main(["reproduce-cola", str(recipe), "--set", "rank=4"]) == 2
    assert "unknown key(s) ['rank']" in capsys.readouterr().err
