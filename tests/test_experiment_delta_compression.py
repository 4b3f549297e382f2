"""The Delta-CoMe reproduction pipeline (`peft-ext reproduce-delta`) end to end on the tiny Llama, and its recipe."""

import json
from pathlib import Path

import pytest
import yaml

from peft_ext.cli import main
from peft_ext.experiments import DeltaCompressionConfig

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "deltacome_reproduction.yaml"
TINY = {
    "model": "tiny-llama",
    "max_steps": 6,
    "learning_rate": 3e-3,
    "warmup_steps": 0,
    "methods": ["deltacome", "lowrank", "bitdelta"],
    "budgets": ["1/2", "1/4"],
    "bands": [[2, 8], [None, 2]],  # the paper's 32 3-bit directions do not fit a 32 x 32 layer at 1/4
    "group_size": 32,
    "calibration_samples": 4,
    "calibration_seq_len": 64,
    "english_texts": 4,
    "eval_max_length": 32,
}
HEADER = (
    "| method | budget | stored bytes | ratio | task acc | Δ acc vs FT | task loss | FT loss gain kept | "
    "world-knowledge acc | English LM loss | mean layer rel. error | mean layer rel. output error |"
)


def test_reproduce_delta_end_to_end_on_the_tiny_model(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    assert main(["reproduce-delta", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert HEADER in printed

    table = (out / "results.md").read_text().splitlines()
    assert table[0] == HEADER
    rows = [line.split(" | ")[:2] for line in table[2:] if line.startswith("| ")]
    assert rows == [
        ["| base (no delta)", "–"], ["| fine-tune (uncompressed)", "1"],
        ["| Delta-CoMe (GPTQ)", "1/2"], ["| low-rank (fp16)", "1/2"], ["| BitDelta (1-bit)", "1/2*"],
        ["| Delta-CoMe (GPTQ)", "1/4"], ["| low-rank (fp16)", "1/4"], ["| BitDelta (1-bit)", "1/4*"],
    ]

    results = json.loads((out / "results.json").read_text())
    base, ft, rows = results["base"], results["finetuned"], results["compressed"]
    assert ft["steps"] == 6 and ft["task_loss"] < base["task_loss"]  # the fine-tune fits its own training text
    assert 0 < ft["trainable_params"] and results["config"]["freeze_embeddings"] is True
    for r in rows:
        assert 0.0 <= r["task_acc"] <= 1.0 and r["not_stored"] == []  # embeddings frozen: the adapter holds it all
        assert r["task_acc_vs_finetuned"] == pytest.approx(r["task_acc"] - ft["task_acc"])
        assert r["dense_fp16_delta_bytes"] == ft["dense_fp16_delta_bytes"]
        if r["method"] != "bitdelta":
            assert r["ratio"] <= r["budget_fraction"]  # exact budget bookkeeping
        assert (Path(r["adapter_dir"]) / "adapter_model.safetensors").is_file()
    bitdelta = [r for r in rows if r["method"] == "bitdelta"]
    assert bitdelta[0]["task_loss"] == bitdelta[1]["task_loss"] and bitdelta[0]["adapter_dir"] == bitdelta[1]["adapter_dir"]
    assert rows[0]["mean_rel_output_error_calibration"] is not None  # GPTQ ran on calibration text
    assert rows[1]["mean_rel_output_error_calibration"] is None
    assert all(r["mean_rel_output_error"] >= 0 for r in rows)  # measured for every method, on held-out text


def test_output_error_is_0_for_the_fine_tune_and_1_for_the_base():
    import copy

    import torch

    from peft_ext.data.tiny_model import tiny_llama
    from peft_ext.experiments.delta_compression import heldout_hessians, output_errors

    base, tokenizer = tiny_llama()
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.model.layers[0].mlp.down_proj.weight.add_(0.05)
        ft.model.layers[1].self_attn.q_proj.weight.mul_(1.5)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    hessians = heldout_hessians(ft, tokenizer, names, DeltaCompressionConfig(calibration_samples=2, calibration_seq_len=32))
    assert output_errors(base, ft, ft, hessians, names) == {n: 0.0 for n in names}
    assert output_errors(base, ft, base, hessians, names) == pytest.approx({n: 1.0 for n in names})
    halfway = copy.deepcopy(ft)
    with torch.no_grad():
        halfway.model.layers[0].mlp.down_proj.weight.sub_(0.025)
    assert output_errors(base, ft, halfway, hessians, names[:1]) == pytest.approx({names[0]: 0.5})


def test_recipe_is_the_default_configuration():
    assert DeltaCompressionConfig.from_yaml(str(RECIPE)) == DeltaCompressionConfig()
    config = DeltaCompressionConfig.from_yaml(str(RECIPE), ["budgets=[1/16]", "methods=[deltacome,deltacome-rtn]"])
    assert config.budgets == ["1/16"] and config.freeze_embeddings and config.model == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "override, message",
    [
        ("methods=[svd]", "methods must be a non-empty list"),
        ("budgets=[1/32]", "below BitDelta's fixed 1/16"),
        ("budgets=[3]", "budget"),
        ("data=python-docs", "data must be one of"),
        ("epochs=3", "unknown reproduce-delta config key(s) ['epochs']"),
    ],
)
def test_bad_configs_exit_2(tmp_path, capsys, override, message):
    assert main(["reproduce-delta", "--set", override, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
