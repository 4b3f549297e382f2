"""The SSMLoRA-vs-LoRA reproduction runner (peft_ext.experiments.ssmlora_vs_lora) at a tiny scale: the generated
classification task, the parameter formulas (SSMLoRA on alternating q/v ~ half of LoRA on every q/v), the scorer,
and the whole pipeline through `peft-ext reproduce-ssmlora`."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from peft_ext.data.review_votes import NEGATIVE, POSITIVE, review_vote_splits, review_votes
from peft_ext.data.tiny_model import char_tokenizer
from peft_ext.experiments.ssmlora_vs_lora import (
    METHODS,
    Repro,
    _qv_shapes,
    accuracy,
    adapt,
    load_classifier,
    parameter_plan,
    predict,
    trainable_parameters,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = str(RECIPES / "ssmlora_vs_lora_tiny.yaml")
# SmolLM2-135M: 30 blocks, q_proj 576 -> 576, v_proj 576 -> 192 (3 key/value heads of 64); score head 576 x 2
SMOLLM2_QV = [(i, kind, 576, out) for i in range(30) for kind, out in (("q_proj", 576), ("v_proj", 192))]


# ------------------------------------------------------------------------------------------------- the task
def _opinion_signs(text: str) -> list[int]:
    words = re.findall(r"[a-z]+", text.lower())
    return [1 if w in POSITIVE else 0 for w in words if w in POSITIVE or w in NEGATIVE]


def test_reviews_are_deterministic_balanced_and_labelled_by_the_majority():
    train, held_out = review_vote_splits(40, 30, seed=3, opinions=5)
    assert (train, held_out) == review_vote_splits(40, 30, seed=3, opinions=5)
    assert review_vote_splits(40, 30, seed=4, opinions=5)[1] != held_out
    assert len(train) == 40 and len(held_out) == 30
    assert [x["label"] for x in train] == [0, 1] * 20  # balanced, alternating
    assert not {x["text"] for x in train} & {x["text"] for x in held_out}
    assert len({x["text"] for x in train + held_out}) == 70
    for item in train + held_out:
        signs = _opinion_signs(item["text"])
        assert len(signs) == 5 and sum(signs) == item["positives"]
        assert 1 <= item["positives"] <= 4  # never one-sided
        assert item["label"] == int(sum(signs) >= 3)
        assert item["text"].startswith("Review: ") and item["text"].endswith("\nOverall, the stay was")
    assert review_votes(10, seed=3) == review_vote_splits(0, 10, seed=3)[1]


def test_the_long_variant_keeps_the_opinions_and_adds_neutral_filler():
    short, long = review_votes(20, filler=0), review_votes(20, filler=12)
    tok = char_tokenizer()
    mean = lambda items: sum(len(tok(x["text"]).input_ids) for x in items) / len(items)  # noqa: E731
    assert mean(long) > 3 * mean(short)
    for item in long:  # the filler carries no opinion word: the label is still the opinions' majority
        signs = _opinion_signs(item["text"])
        assert len(signs) == 5 and item["label"] == int(sum(signs) >= 3)
    with pytest.raises(ValueError, match="odd integer"):
        review_vote_splits(4, 4, opinions=4)
    with pytest.raises(ValueError, match="filler"):
        review_vote_splits(4, 4, filler=-1)


# ---------------------------------------------------------------------------------------- parameter counts
def test_shipped_recipe_compares_half_the_parameters_at_the_same_scale():
    repro = Repro.from_yaml(str(RECIPES / "ssmlora_vs_lora.yaml"))
    assert repro.model == "smollm2-135m-instruct" and repro.seeds == [0, 1, 2]
    assert repro.methods[:2] == ["lora", "ssmlora"] and set(repro.variants) == {"short", "long"}
    assert repro.r == 8 and repro.lora_alpha == 16
    assert repro.ssm_alpha == repro.lora_alpha / repro.r == 2.0  # the same effective scale as LoRA's
    plan = parameter_plan(repro, SMOLLM2_QV, head=576 * 2)
    # LoRA: 30 x 8 x ((576 + 576) + (576 + 192)); SSMLoRA: q in 15 even blocks, v in 15 odd ones, + D each, + C
    # on all but the chain's first module
    assert plan["lora"] == {"params": 460_800 + 1_152, "adapter": 460_800, "head": 1_152, "modules": 60,
                            "config": "r=8, lora_alpha=16 (scale 2)"}  # fmt: skip
    ssm = plan["ssmlora"]
    assert ssm["adapter"] == 15 * 8 * 1152 + 15 * 8 * 768 + 30 * 64 + 29 * 64 == 234_176
    assert ssm["modules"] == 30 and ssm["config"] == "r=8, alpha=2 (scale 2)"
    assert 0.49 < ssm["adapter"] / plan["lora"]["adapter"] < 0.52  # about half


def test_parameter_plan_is_each_models_actual_count():
    repro = Repro.from_yaml(TINY)
    assert repro.methods == list(METHODS)
    model, _ = load_classifier("tiny-llama", 2, seed=0)
    shapes = _qv_shapes(model)
    assert [(i, k) for i, k, _, _ in shapes] == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    plan = parameter_plan(repro, shapes, head=model.score.weight.numel())
    assert plan["head"]["params"] == 64 and plan["head"]["adapter"] == 0
    assert plan["ssmlora"]["params"] == plan["ssmlora-a16"]["params"] < plan["lora"]["params"]
    adapted = {}
    for method in METHODS:
        peft_model = adapt(load_classifier("tiny-llama", 2, seed=0)[0], repro, method)
        assert trainable_parameters(peft_model) == plan[method]["params"], method
        trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        assert any("score" in n for n in trained), method  # every method trains the score head
        adapted[method] = sorted({re.search(r"layers\.\d+\.self_attn\.[qv]_proj", n).group(0) for n in trained
                                  if "_proj" in n})  # fmt: skip
    # LoRA on SSMLoRA's points adapts exactly SSMLoRA's modules: q in block 0, v in block 1
    assert adapted["lora-alt"] == adapted["lora-alt-init"] == adapted["ssmlora"] == [
        "layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj"]  # fmt: skip
    assert len(adapted["lora"]) == 4 and adapted["head"] == []
    ssm = adapt(load_classifier("tiny-llama", 2, seed=0)[0], repro, "ssmlora")
    assert ssm.peft_config["default"].alpha == repro.ssm_alpha and ssm.peft_config["default"].insertion == "alternate_qv"


def test_lora_alt_init_draws_a_as_ssmlora_does():
    """lora-alt-init = SSMLoRA without its link: A ~ N(0, 1/r) as SSMLoRA's (PEFT's kaiming-uniform A is smaller)."""
    repro = Repro.from_yaml(TINY, ["r=8"])
    stds = {}
    for method, key in (("lora-alt", ".lora_A."), ("lora-alt-init", ".lora_A."), ("ssmlora", ".ssmlora_A.")):
        model = adapt(load_classifier("tiny-llama", 2, seed=0)[0], repro, method)
        weights = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if key in n])
        stds[method] = float(weights.std())
        assert all(not p.any() for n, p in model.named_parameters() if ".lora_B." in n or ".ssmlora_B." in n)
    assert abs(stds["lora-alt-init"] - 8**-0.5) < 0.06 and abs(stds["ssmlora"] - 8**-0.5) < 0.06
    assert stds["lora-alt"] < 0.6 * stds["lora-alt-init"]  # kaiming-uniform: 1 / sqrt(3 * 32) on the tiny model


def test_the_score_head_depends_on_the_seed_only():
    a, b, c = (load_classifier("tiny-llama", 2, seed=s)[0] for s in (0, 0, 1))
    assert torch.equal(a.score.weight, b.score.weight) and not torch.equal(a.score.weight, c.score.weight)
    assert torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)


# ------------------------------------------------------------------------------------------------ scoring
class _Counter(torch.nn.Module):
    """A stand-in classifier: class 1 iff the last non-padding token of the row is `token`."""

    def __init__(self, token: int):
        super().__init__()
        self.token = token
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        last = input_ids.gather(1, (attention_mask.sum(1, keepdim=True) - 1)).squeeze(1)
        logits = torch.stack([torch.zeros(len(last)), (last == self.token).float()], dim=1)
        return type("Out", (), {"logits": logits})()


def test_predict_reads_the_last_real_token_and_accuracy_splits_close_calls():
    tok = char_tokenizer()
    items = [dict(text="ab", label=1, positives=3, opinions=5), dict(text="abcb", label=1, positives=5, opinions=5),
             dict(text="abc", label=0, positives=2, opinions=5), dict(text="b", label=0, positives=0, opinions=5)]  # fmt: skip
    predicted = predict(_Counter(tok.convert_tokens_to_ids("b")), tok, items, batch_size=3)
    assert predicted == [1, 1, 0, 1]  # right padding does not hide the last real token
    assert accuracy(items, predicted) == {"all": 0.75, "close": 1.0, "clear": 0.5}
    with pytest.raises(ValueError, match="above max_length"):
        predict(_Counter(0), tok, items, max_length=3)


def test_recipe_keys_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['dora'\]"):
        Repro(methods=["lora", "dora"])
    with pytest.raises(ValueError, match=r"unknown data key\(s\) \['size'\]"):
        Repro(data={"size": 3})
    with pytest.raises(ValueError, match="takes only 'filler'"):
        Repro(variants={"long": {"length": 3}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"rank": 4}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rank'\]"):
        Repro.from_yaml(str(path))


# ------------------------------------------------------------------------------------------- the pipeline
def test_cli_reproduce_ssmlora_runs_every_method_and_writes_the_table(tmp_path, capsys):
    from peft_ext.cli import main

    out = tmp_path / "out"
    assert main(["reproduce-ssmlora", TINY, "--out", str(out), "--set", "steps=3"]) == 0
    printed = capsys.readouterr().out
    assert "Trainable parameters by the formulas" in printed
    saved = json.loads((out / "results.json").read_text())
    results, plan = saved["results"], saved["plan"]
    assert saved["recipe"]["steps"] == 3 and list(results) == ["short", "long"]
    assert saved["lengths"]["long"] > saved["lengths"]["short"]
    for variant, per_method in results.items():
        assert list(per_method) == list(METHODS)
        for method, per_seed in per_method.items():
            assert list(per_seed) == ["0", "1"]
            for row in per_seed.values():
                assert row["trainable_params"] == plan[method]["params"]
                assert all(a is None or 0.0 <= a <= 1.0 for a in row["accuracy"].values())
                assert 0.0 <= row["accuracy"]["all"] <= 1.0
                assert row["step_seconds"] > 0 and row["final_loss"] > 0
                assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] >= 0
    # the same seed trains the same head and data order, but the methods differ: different losses
    short = results["short"]
    assert short["lora"]["0"]["loss_history"] != short["ssmlora"]["0"]["loss_history"]
    assert short["ssmlora"]["0"]["loss_history"] != short["ssmlora-a16"]["0"]["loss_history"]

    text = (out / "results.md").read_text()
    assert text in printed
    table = [line for line in text.splitlines() if line.startswith("|")]
    width = table[0].count("|")
    assert all(line.count("|") == width for line in table) and len(table) == 2 + 2 * len(METHODS)
    assert table[2].startswith("| short (") and "| LoRA | q, v every layer (4) |" in table[2]
    assert "| SSMLoRA | q even, v odd (2) | r=4, alpha=2 (scale 2) |" in table[3]
    for line in table[2:]:
        mean = float(line.split("|")[7].split("±")[0])
        assert 0.0 <= mean <= 1.0
    assert "short: SSMLoRA vs LoRA:" in text and "long: SSMLoRA vs LoRA:" in text
    assert "SSMLoRA − LoRA on long minus on short" in text and "Wall time" in text


def test_cli_reproduce_ssmlora_errors_and_help(tmp_path, capsys):
    from peft_ext.cli import build_parser, main

    assert "reproduce-ssmlora" in build_parser().format_help()
    assert main(["reproduce-ssmlora", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert main(["reproduce-ssmlora", TINY, "--set", "rank=4"]) == 2
    assert "unknown key(s) ['rank']" in capsys.readouterr().err
    assert main(["reproduce-ssmlora", TINY, "--set", "max_length=20", "--out", str(tmp_path / "o")]) == 2
    assert "above max_length=20" in capsys.readouterr().err
