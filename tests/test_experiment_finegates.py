"""The FineGates-vs-LoRA reproduction runner (peft_ext.experiments.finegates_vs_lora) at a tiny scale: the parameter
formulas, the optimizer groups and schedules of its own training loop, the sparsity term in the loss, and the whole
pipeline through `peft-ext reproduce-finegates` (gated -> dense and pruned models with the same logits, latency)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from peft_ext.experiments.finegates_vs_lora import (
    BLOCK_LINEARS,
    METHODS,
    Repro,
    adapt,
    batches,
    block_linear_shapes,
    load_classifier,
    param_groups,
    parameter_plan,
    train,
    trainable_parameters,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = str(RECIPES / "finegates_vs_lora_tiny.yaml")
# SmolLM2-135M: 30 blocks of q 576->576, k 576->192, v 576->192, o 576->576, gate 576->1536, up 576->1536,
# down 1536->576; score head 576 x 2
SMOLLM2 = [
    (f"model.layers.{i}.{kind}", a, b) for i in range(30)
    for kind, a, b in (("self_attn.q_proj", 576, 576), ("self_attn.k_proj", 576, 192), ("self_attn.v_proj", 576, 192),
                       ("self_attn.o_proj", 576, 576), ("mlp.gate_proj", 576, 1536), ("mlp.up_proj", 576, 1536),
                       ("mlp.down_proj", 1536, 576))
]  # fmt: skip


def test_shipped_recipe_runs_every_method_on_smollm2():
    repro = Repro.from_yaml(str(RECIPES / "finegates_vs_lora.yaml"))
    assert repro.model == "smollm2-135m-instruct" and repro.methods == list(METHODS)
    assert repro.r == 8 and repro.sparsity_lambda == 50.0 and repro.finegates_lora_target == 0.3
    assert repro.gates_learning_rate > repro.learning_rate
    plan = parameter_plan(repro, SMOLLM2, head=576 * 2)
    per_block_in_out = 2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)
    per_block_out = 576 + 192 + 192 + 576 + 1536 + 1536 + 576
    assert plan["lora"]["adapter"] == 30 * 8 * per_block_in_out == 2_442_240 and plan["lora"]["modules"] == 210
    gates = 30 * (per_block_in_out + per_block_out)  # a gate per row and column, a bias delta per row
    assert plan["finegates-0.3"]["adapter"] == gates == 460_800
    assert plan["finegates-0.2"] == {**plan["finegates-0.3"], "config": "target 0.2, bias deltas"}
    assert plan["finegates-lora"]["adapter"] == gates + plan["lora"]["adapter"]
    assert plan["finegates-lora"]["config"] == "target 0.3, bias deltas, LoRA r=8 (scale 2)"
    assert 0.18 < plan["finegates-0.3"]["params"] / plan["lora"]["params"] < 0.2  # ~5x fewer than LoRA


def test_parameter_plan_is_each_models_actual_count_and_the_head_is_trained():
    repro = Repro.from_yaml(TINY)
    model, _ = load_classifier("tiny-llama", 2, seed=0)
    shapes = block_linear_shapes(model)
    assert len(shapes) == 2 * len(BLOCK_LINEARS)
    plan = parameter_plan(repro, shapes, head=model.score.weight.numel())
    for method in METHODS:
        peft_model = adapt(load_classifier("tiny-llama", 2, seed=0)[0], repro, method)
        assert trainable_parameters(peft_model) == plan[method]["params"], method
        trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        assert any("score" in n for n in trained), method
        groups = param_groups(peft_model, 1e-3, 0.5)
        if method == "lora":
            assert len(groups) == 1 and groups[0]["lr"] == 1e-3
        else:  # the gate logits alone in a group of their own, weight decay 0; bias deltas, LoRA, head in the other
            assert [g["lr"] for g in groups] == [1e-3, 0.5] and all(g["weight_decay"] == 0.0 for g in groups)
            gate_ids = {id(p) for p in groups[1]["params"]}
            logits = {id(p) for n, p in peft_model.named_parameters() if "_logits." in n}
            assert gate_ids == logits
            assert sum(p.numel() for g in groups for p in g["params"]) == plan[method]["params"]
    config = adapt(load_classifier("tiny-llama", 2, seed=0)[0], repro, "finegates-0.4").peft_config["default"]
    assert config.target_sparsity == 0.4 and config.bias == "gates" and config.lora_r == 0
    config = adapt(load_classifier("tiny-llama", 2, seed=0)[0], repro, "finegates-lora").peft_config["default"]
    assert config.target_sparsity == 0.3 and config.lora_r == repro.r and config.lora_alpha == repro.lora_alpha


def test_batches_cover_every_row_once_per_epoch_in_a_seeded_order():
    a = list(batches(10, 4, 5, seed=0))
    assert a == list(batches(10, 4, 5, seed=0)) and a != list(batches(10, 4, 5, seed=1))
    assert all(len(b) == 4 for b in a)
    flat = [i for b in a for i in b]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch (then a fresh shuffle)


def test_the_loop_adds_lambda_times_the_sparsity_loss_and_moves_the_gates_at_their_own_rate():
    """With lr 0 for everything but the gates and a constant gates' schedule, only the gate logits move, by about
    their learning rate per step (Adam), and downward: the sparsity term pulls the open gates toward the target."""
    from peft_ext.data.review_votes import review_vote_splits
    from peft_ext.experiments.common import encode

    repro = Repro.from_yaml(TINY, ["steps=2", "learning_rate=0.0", "gates_learning_rate=0.01"])
    model, tok = load_classifier("tiny-llama", 2, seed=0)
    peft_model = adapt(model, repro, "finegates-0.3")
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    rows = encode(tok, review_vote_splits(8, 0, 0, 3)[0], 512)
    out = train(peft_model, repro, "finegates-0.3", 0, rows, tok.pad_token_id, log=lambda *_: None)
    assert [h["step"] for h in out["loss_history"]] == [1, 2] and out["step_seconds"] > 0
    assert out["loss_history"][0]["sparsity_loss"] > 0.2  # all gates open: |0.99 - 0.7| on both sides
    for name, p in peft_model.named_parameters():
        if name not in before:
            continue
        change = p.detach() - before[name]
        if "_logits." in name:
            assert (change < 0).float().mean() > 0.9 and change.abs().max() <= 0.021
        else:
            assert torch.equal(change, torch.zeros_like(change)), name


def test_recipe_keys_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['finegates-0.5'\]"):
        Repro(methods=["lora", "finegates-0.5"])
    with pytest.raises(ValueError, match=r"unknown data key\(s\) \['size'\]"):
        Repro(data={"size": 3})
    with pytest.raises(ValueError, match="latency_seeds"):
        Repro(seeds=[0, 1], latency_seeds=[2])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"rank": 4}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rank'\]"):
        Repro.from_yaml(str(path))


# ------------------------------------------------------------------------------------------- the pipeline
def test_cli_reproduce_finegates_runs_every_method_prunes_exactly_and_writes_the_tables(tmp_path, capsys):
    from peft_ext.cli import main

    out = tmp_path / "out"
    assert main(["reproduce-finegates", TINY, "--out", str(out), "--set", "steps=5"]) == 0
    printed = capsys.readouterr().out
    assert "Trainable parameters by the formulas" in printed
    saved = json.loads((out / "results.json").read_text())
    results, plan = saved["results"], saved["plan"]
    assert saved["recipe"]["steps"] == 5 and list(results) == list(METHODS)
    some_cut = False
    for method, per_seed in results.items():
        assert list(per_seed) == ["0", "1"]
        for row in per_seed.values():
            assert row["trainable_params"] == plan[method]["params"]
            assert 0.0 <= row["accuracy"]["all"] <= 1.0 and row["step_seconds"] > 0 and row["final_loss"] > 0
            assert [h["step"] for h in row["loss_history"]][-1] == 5
            if method == "lora":
                assert "prune_report" not in row and "latency" not in row
                continue
            stats, report = row["gate_stats"], row["prune_report"]
            assert 0.0 <= stats["removable_fraction"] <= 1.0
            assert stats["removed_params"] == round(stats["removable_fraction"] * row["gated_weights"])
            # the pruned model computes the gated model's evaluation logits (fp32)
            assert row["max_diff_pruned_vs_gated"] <= 1e-5
            assert row["params_dense"] == report["params_before"] and row["params_pruned"] == report["params_after"]
            assert report["params_removed"] == row["params_dense"] - row["params_pruned"] >= 0
            assert sum(report["params_removed_by_category"].values()) == report["params_removed"]
            if stats["removed_params"] == 0:  # nothing closed, nothing cut
                assert report["params_removed"] == 0
            assert 0.0 <= row["pruned_accuracy"] <= 1.0
            some_cut |= report["params_removed"] > 0
            for lat in (row["latency"], row["latency_min"]):
                assert set(lat) == {"dense", "pruned"}
                for side in lat.values():
                    assert set(side) == {"prefill 1x16", "prefill 2x16", "decode"} and all(t > 0 for t in side.values())
            assert all(len(v) == 1 for side in row["latency_raw"].values() for v in side.values())  # 1 repeat
            assert row["latency_min"]["pruned"]["decode"] <= row["latency"]["pruned"]["decode"]
    assert some_cut  # the tiny recipe's large gates' lr closes gates within the run: something is cut
    # the same seed trains the same head and data order, but the methods differ: different losses
    assert results["lora"]["0"]["loss_history"] != results["finegates-0.3"]["0"]["loss_history"]
    assert results["finegates-0.2"]["0"]["loss_history"] != results["finegates-0.4"]["0"]["loss_history"]

    text = (out / "results.md").read_text()
    assert text in printed
    main_table = [line for line in text.split("What the pruning cut")[0].splitlines() if line.startswith("|")]
    width = main_table[0].count("|")
    assert all(line.count("|") == width for line in main_table) and len(main_table) == 2 + len(METHODS)
    header = [c.strip() for c in main_table[0].split("|")[1:-1]]
    assert header[:5] == ["method", "config", "trainable params (adapter + head)", "vs LoRA", "accuracy (mean ± std)"]
    assert "max abs diff pruned vs gated" in header and "gated weights removable" in header
    assert main_table[2].startswith("| LoRA | r=4, lora_alpha=8 (scale 2) |")
    for line in main_table[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert 0.0 <= float(cells[4].split("±")[0]) <= 1.0
        if not line.startswith("| LoRA"):
            assert float(cells[-1]) <= 1e-5
    assert "What the pruning cut" in text
    assert "CPU latency (median), dense (merged, unpruned) → pruned" in text and "CPU latency (min)" in text
    assert text.count("| FineGates 0.3 | 0, 1 |") == 2
    assert "FineGates 0.4 vs LoRA:" in text and "Wall time" in text


def test_cli_reproduce_finegates_errors_and_help(tmp_path, capsys):
    from peft_ext.cli import build_parser, main

    assert "reproduce-finegates" in build_parser().format_help()
    assert main(["reproduce-finegates", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert main(["reproduce-finegates", TINY, "--set", "rank=4"]) == 2
    assert "unknown key(s) ['rank']" in capsys.readouterr().err
    assert main(["reproduce-finegates", TINY, "--set", "max_length=20", "--out", str(tmp_path / "o")]) == 2
    assert "finegates_vs_lora: a review has" in capsys.readouterr().err
