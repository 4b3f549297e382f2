"""The `peft-ext` command line: train, demo, eval, push; the shipped recipes; and one end-to-end demo on SmolLM2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peft_ext.cli import build_parser, main
from peft_ext.experiments.demo_config import DemoConfig
from peft_ext.recipe import Recipe, build_peft_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY_DEMO = {
    "model": "tiny-llama",
    "max_steps": 4,
    "per_device_train_batch_size": 2,
    "warmup_steps": 0,
    "english_texts": 4,
    "eval_max_length": 32,
    "learning_rate": {"hft": 1e-2, "fft": 1e-2, "lora": 1e-2},
}


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_help_lists_the_commands(tmp_path):
    script = Path(sys.executable).parent / "peft-ext"  # the console script pip installed
    command = [str(script)] if script.exists() else [sys.executable, "-m", "peft_ext.cli"]
    result = subprocess.run(command + ["--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("train", "demo", "eval", "push", "compress", "reproduce-delta", "recipes/hft_sft.yaml"):
        assert name in result.stdout


def test_flags_share_the_config_names():
    args = build_parser().parse_args(["demo", "--out", "d", "--set", "max_steps=3", "--set", "seeds=[1,2]"])
    assert args.output_dir == "d" and args.overrides == ["max_steps=3", "seeds=[1,2]"]
    assert build_parser().parse_args(["demo", "--output-dir", "e"]).output_dir == "e"


def test_train_then_eval_the_adapter(tmp_path, capsys):
    recipe = write_yaml(
        tmp_path / "r.yaml",
        {"model": "tiny-llama", "data": "fictional-facts", "method": {"peft_type": "HFT"}, "trainer": "sft",
         "trainer_args": {"max_steps": 1, "per_device_train_batch_size": 2}},
    )
    out = tmp_path / "adapter"
    assert main(["train", recipe, "--set", f"output_dir={out}", "--set", "trainer_args.learning_rate=1e-3"]) == 0
    assert (out / "adapter_config.json").is_file()
    assert f"Saved the trained adapter to {out.resolve()}" in capsys.readouterr().out

    assert main(["eval", "--model", "tiny-llama", "--adapter", str(out), "--english-texts", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[-3:]] == [
        "new-task accuracy (48 fictional facts, chance 0.25)",
        "old-knowledge accuracy (45 world-knowledge questions)",
        "LM loss on held-out English text (nats/token)",
    ]
    assert 0.0 <= float(lines[-3].split()[-1]) <= 1.0 and float(lines[-1].split()[-1]) > 0


def test_train_reports_bad_recipes(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    bad = write_yaml(tmp_path / "bad.yaml", {"model": "tiny-llama", "data": "fictional-facts", "epochs": 3})
    assert main(["train", bad]) == 2
    assert "unknown recipe key(s) ['epochs']" in capsys.readouterr().err


def test_demo_on_the_tiny_model_writes_table_files_and_curves(tmp_path, capsys):
    config = write_yaml(tmp_path / "demo.yaml", {**TINY_DEMO, "eval_every": 2})
    out = tmp_path / "demo"
    assert main(["demo", "--config", config, "--out", str(out), "--set", "seeds=[0, 1]"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("method  new-task acc") :].splitlines()
    assert [row.split()[0] for row in table[2:6]] == ["base", "HFT", "FFT", "LoRA"]
    assert "At equal new-task accuracy" in printed
    for name in ("results.json", "results.csv", "training_loss.png", "score_curves.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    finished = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert finished == json.loads(json.dumps(results["runs"]))  # saved as each run ended
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [
        (m, s) for s in (0, 1) for m in ("hft", "fft", "lora")
    ]
    for run in results["runs"]:
        assert [p["step"] for p in run["score_curve"]] == [0, 2, 4] and len(run["loss_curve"]) == 4
        assert run["lm_loss_change"] == pytest.approx(run["lm_loss"] - results["base"]["lm_loss"])
    params = {r["method"]: r["trainable_params"] for r in results["runs"]}
    assert params["fft"] > params["hft"] > params["lora"] > 0
    assert (out / "results.csv").read_text().splitlines()[0].startswith("method,new_task,new_task_std")


def test_demo_stops_at_the_target_score(tmp_path):
    config = DemoConfig(**TINY_DEMO, methods=["fft"], eval_every=1, target_new_task=0.0, stop_at_target=True,
                        output_dir=str(tmp_path))
    from peft_ext.experiments.demo import run_demo

    results = run_demo(config)
    assert results["runs"][0]["steps"] == 1  # any score reaches 0.0: stopped after the first evaluation


def test_push_refuses_what_is_not_an_adapter(tmp_path, capsys):
    assert main(["push", str(tmp_path / "nope"), "--repo-id", "me/x"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "--repo-id", "me/x"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(tmp_path)])  # --repo-id is required
    assert exit_info.value.code == 2


def test_default_demo_recipe_mirrors_the_builtin_default():
    assert DemoConfig.from_yaml(str(RECIPES / "demo_default.yaml")) == DemoConfig()


def test_forgetting_recipe_is_a_multi_seed_curve_run():
    config = DemoConfig.from_yaml(str(RECIPES / "hft_forgetting.yaml"))
    assert len(config.seeds) >= 3 and config.eval_every > 0 and config.target_new_task is not None
    assert config.learning_rate["hft"] == config.learning_rate["fft"]


@pytest.mark.parametrize("name, trainer", [("hft_sft.yaml", "sft"), ("hft_dpo.yaml", "dpo")])
def test_shipped_training_recipes_build(name, trainer):
    recipe = Recipe.from_yaml(str(RECIPES / name))
    assert recipe.trainer == trainer and recipe.model == "smollm2-135m-instruct"
    assert build_peft_config(recipe.method).peft_type == "HFT"
    assert isinstance(recipe.trainer_args["learning_rate"], float)


@pytest.mark.slow
def test_demo_end_to_end_on_smollm2(tmp_path, capsys):
    """The real demo, tiny budget: SmolLM2 (converted on first use), all three methods, 3 steps each."""
    config = write_yaml(
        tmp_path / "small.yaml",
        {"max_steps": 3, "per_device_train_batch_size": 4, "warmup_steps": 0, "english_texts": 8, "eval_max_length": 64},
    )
    assert main(["demo", "--config", config, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    base = results["base"]
    assert base["old_knowledge"] == 1.0  # the kept world-knowledge questions are the ones the base gets right
    assert base["new_task"] < 0.5  # the fictional facts are new (chance: 0.25)
    assert 2.0 < base["lm_loss"] < 4.5  # a real language model on real English
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["fft"]["trainable_params"] == 134_515_008
    assert 0.3 < runs["hft"]["trainable_params"] / runs["fft"]["trainable_params"] < 0.5  # half the blocks
    for run in runs.values():
        assert run["steps"] == 3 and run["lm_loss"] != base["lm_loss"]
        assert run["loss_curve"][-1][1] < run["loss_curve"][0][1] + 0.5
    assert "LoRA" in capsys.readouterr().out
