"""The S'MoRE-vs-LoRA reproduction runner (peft_ext.experiments.smore_vs_lora) at a tiny scale: the generated task,
the exact-match scorer, the parameter matching, and the whole pipeline through `peft-ext reproduce-smore`."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from peft_ext.data.tiny_model import char_tokenizer, tiny_llama
from peft_ext.data.word_problems import word_problem_splits, word_problems
from peft_ext.experiments.smore_vs_lora import (
    METHODS,
    Repro,
    _RSS,
    adapt,
    exact_match,
    parameter_plan,
    target_shapes,
    trainable_parameters,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = str(RECIPES / "smore_vs_lora_tiny.yaml")
SMOLLM2_MLP = [(f"model.layers.{i}.mlp.{n}", a, b) for i in range(30) for n, a, b in (
    ("gate_proj", 576, 1536), ("up_proj", 576, 1536), ("down_proj", 1536, 576))]  # fmt: skip


# ------------------------------------------------------------------------------------------------- the task
def test_word_problems_are_deterministic_correct_and_held_out_numbers_are_new():
    train, held_out = word_problem_splits(120, 60, seed=3)
    assert (train, held_out) == word_problem_splits(120, 60, seed=3)
    assert word_problem_splits(120, 60, seed=4)[1] != held_out
    assert len(train) == 120 and len(held_out) == 60
    assert {x["op"] for x in held_out} == {"add", "sub", "mul"}
    for item in train + held_out:
        op, a, b = item["key"]
        assert item["answer"] == {"add": a + b, "sub": a - b, "mul": a * b}[op] >= 0
        assert item["completion"] == f" {item['answer']}" and item["prompt"].endswith("\nAnswer:")
        assert f" {a} " in item["prompt"] and f" {b} " in item["prompt"]
    assert not {tuple(x["key"]) for x in train} & {tuple(x["key"]) for x in held_out}
    assert len({x["prompt"] for x in train + held_out}) == 180
    assert word_problems(30, ops=("mul",)) == word_problem_splits(0, 30, ops=("mul",))[1]
    assert all(x["op"] == "mul" for x in word_problems(30, ops=("mul",)))
    with pytest.raises(ValueError, match="unknown operation"):
        word_problem_splits(4, 4, ops=("div",))


class _Peeking(torch.nn.Module):
    """A stand-in LM whose argmax at position t is the input token t + 1 (then `tail`), optionally with one answer
    token or the token after the answer replaced: exact_match's verdict is known for every item."""

    def __init__(self, vocab: int, tail: int, replace: dict | None = None):
        super().__init__()
        self.vocab, self.tail, self.replace = vocab, tail, replace or {}
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        target = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], self.tail)], dim=1)
        next_is_text = attention_mask.roll(-1, 1).bool() & (torch.arange(target.shape[1]) < target.shape[1] - 1)
        target = torch.where(next_is_text, target, self.tail)
        for (row, col), token in self.replace.items():
            target[row, col] = token
        return type("Out", (), {"logits": torch.nn.functional.one_hot(target, self.vocab).float()})()


def test_exact_match_is_greedy_decoding_of_the_number():
    tok = char_tokenizer()
    items = word_problems(5)
    lengths = [len(tok(x["prompt"] + x["completion"]).input_ids) for x in items]
    digit = tok.convert_tokens_to_ids("7")
    # argmax = the next input token, then a non-digit: every answer comes out exactly
    assert exact_match(_Peeking(len(tok), tail=tok.eos_token_id), tok, items, batch_size=2) == [True] * 5
    # a digit after the answer makes another number (e.g. 43 -> 437): wrong
    assert exact_match(_Peeking(len(tok), tail=digit), tok, items, batch_size=5) == [False] * 5
    # one wrong answer token: wrong; batch 5 puts every item in one batch, row = item index
    wrong = {(1, lengths[1] - 2): tok.convert_tokens_to_ids("x")}
    assert exact_match(_Peeking(len(tok), tok.eos_token_id, wrong), tok, items, batch_size=5) == [True, False, True, True, True]
    with pytest.raises(ValueError, match="not a prefix"):
        exact_match(_Peeking(len(tok), tok.eos_token_id), tok, [{"prompt": "a", "completion": ""}])


# ---------------------------------------------------------------------------------------- parameter matching
def test_shipped_recipe_matches_parameters_on_smollm2_shapes():
    repro = Repro.from_yaml(str(RECIPES / "smore_vs_lora.yaml"))
    assert repro.methods == list(METHODS) and repro.seeds == [0, 1, 2] and repro.model == "smollm2-135m-instruct"
    plan = parameter_plan(repro, SMOLLM2_MLP)
    counts = {m: p["params"] for m, p in plan.items()}
    # the spec's numbers: the tree's count, the flat mixture at the same d_L = 32, LoRA's rank by the formula
    assert counts == {"lora": 9_123_840, "flat": 8_976_960, "smore": 9_092_160, "smore-identity": 9_092_160,
                      "smore-noaux": 9_092_160}  # fmt: skip
    assert plan["lora"]["lora_rank"] == round(9_092_160 / (90 * (576 + 1536))) == 48
    assert max(counts.values()) / min(counts.values()) - 1 <= 0.02


def test_parameter_plan_matches_the_models_and_rejects_unequal_budgets():
    repro = Repro.from_yaml(TINY)
    model, _ = tiny_llama()
    shapes = target_shapes(model, repro.target_modules)
    assert len(shapes) == 6 and {(a, b) for _, a, b in shapes} == {(32, 64), (64, 32)}
    plan = parameter_plan(repro, shapes)
    counts = [p["params"] for p in plan.values()]
    assert max(counts) / min(counts) - 1 <= 0.02
    for method in repro.methods:  # the formula is the model's actual count, router included
        peft_model, _ = adapt(tiny_llama()[0], repro, method, plan["lora"]["lora_rank"])
        assert trainable_parameters(peft_model) == plan[method]["params"], method
    with pytest.raises(ValueError, match=r"trainable parameters differ by .* \(> 2 %\)"):
        parameter_plan(Repro.from_yaml(TINY, ["flat_rank=4"]), shapes)
    with pytest.raises(ValueError, match="match no linear layer"):
        parameter_plan(repro, [])


def test_recipe_keys_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['moe'\]"):
        Repro(methods=["lora", "moe"])
    with pytest.raises(ValueError, match=r"unknown data key\(s\) \['size'\]"):
        Repro(data={"size": 3})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"rank": 4}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rank'\]"):
        Repro.from_yaml(str(path))


def test_peak_memory_is_measured():
    rss = _RSS()
    if rss.start() is None:
        pytest.skip("no /proc/self/clear_refs here")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = rss.peak_above_start()
    del block
    assert 60 * 2**20 <= peak <= 200 * 2**20


# ------------------------------------------------------------------------------------------- the pipeline
def test_cli_reproduce_smore_runs_every_method_and_writes_the_tables(tmp_path, capsys):
    from peft_ext.cli import main

    out = tmp_path / "out"
    assert main(["reproduce-smore", TINY, "--out", str(out), "--set", "steps=3"]) == 0
    printed = capsys.readouterr().out
    assert "Trainable parameters by the formulas" in printed
    saved = json.loads((out / "results.json").read_text())
    results, plan = saved["results"], saved["plan"]
    assert saved["recipe"]["steps"] == 3 and list(results) == list(METHODS)
    counts = [plan[m]["params"] for m in METHODS]
    assert max(counts) / min(counts) - 1 <= 0.02
    for method, per_seed in results.items():
        assert list(per_seed) == ["0", "1"]
        for row in per_seed.values():
            assert row["trainable_params"] == plan[method]["params"]
            assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
            assert set(row["accuracy"]) == {"all", "add", "sub", "mul"}
            assert row["step_seconds"] > 0 and row["final_loss"] > 0
            assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] >= 0
            if method == "lora":
                assert "expert_load" not in row
                continue
            layers = row["expert_load"]
            assert [x["layer"] for x in layers] == ([0] if method == "flat" else [0, 1])
            for x in layers:
                assert x["modules"] == 6 and x["experts"] == (8 if method == "flat" else 4)
                assert 0.0 <= x["min_share"] <= x["balanced"] <= x["max_share"] <= 1.0
                assert 0.0 < x["entropy"] <= x["max_entropy"] + 1e-6
    # the load-balance loss reaches the gradient: the same tree and seed without it routes differently
    assert results["smore"]["0"]["expert_load"] != results["smore-noaux"]["0"]["expert_load"]
    assert results["smore"]["0"]["aux_loss_last"] > 0 and results["smore-noaux"]["0"]["aux_loss_last"] == 0

    text = (out / "results.md").read_text()
    assert text in printed
    tables = [[line for line in block.splitlines() if line.startswith("|")] for block in text.split("###")]
    main_table, load_table = tables
    width = main_table[0].count("|")
    assert all(line.count("|") == width for line in main_table) and len(main_table) == 2 + 1 + len(METHODS)
    assert main_table[2].startswith("| base (untrained) |") and main_table[3].startswith("| LoRA | r=")
    assert all(line.count("|") == load_table[0].count("|") for line in load_table)
    assert len(load_table) == 2 + 1 + 2 * 3  # flat: one S'MoRE layer; each tree: two
    assert "S'MoRE tree, tanh vs LoRA:" in text and "Wall time" in text


def test_cli_reproduce_smore_errors_and_help(tmp_path, capsys):
    from peft_ext.cli import build_parser, main

    assert "reproduce-smore" in build_parser().format_help()
    assert main(["reproduce-smore", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert main(["reproduce-smore", TINY, "--set", "rank=4"]) == 2
    assert "unknown key(s) ['rank']" in capsys.readouterr().err
    assert main(["reproduce-smore", TINY, "--set", "flat_rank=4", "--out", str(tmp_path / "o")]) == 2
    assert "trainable parameters differ" in capsys.readouterr().err
