"""`peft-ext compare` end to end on the tiny in-process model: a user-written YAML on local files, three methods and
two seeds through the recipe code, the table and files it writes, the rerun that skips finished runs, preference
data trained with DPO, the `demo` alias, and bad input refused before any training."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from peft_ext.cli import main
from peft_ext.compare import CompareConfig, run_compare

WORDS = ["amber", "basil", "cedar", "delta", "ember", "fjord", "gravel", "hazel", "iris", "juniper", "kelp", "lilac"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def own_data(tmp_path):
    """A user's files: a code-word task (prompt -> completion) to train on and a held-out file to score on."""
    rows = [{"prompt": f"Code of {w}:", "completion": f" {w[::-1]}"} for w in WORDS]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    test = write_jsonl(tmp_path / "test.jsonl", rows[8:])
    return {
        "model": "tiny-llama",
        "train_data": {"path": train},
        "eval_data": {"path": test},
        "scorer": "exact_match",
        "forgetting": [{"name": "english", "data": {"builtin": "english-heldout", "limit": 2}, "scorer": "loss"}],
        "methods": ["hft", "full", {"peft_type": "LORA", "r": 4, "learning_rate": 1e-2}],
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "max_length": 64,
        "warmup_steps": 0,
        "seeds": [0, 1],
        "eval_max_length": 32,
        "latency_batch": 2,
        "output_dir": str(tmp_path / "out"),
    }


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_three_methods_two_seeds_table_files_and_resume(tmp_path, own_data, capsys):
    config = write_yaml(tmp_path / "compare.yaml", own_data)
    out = tmp_path / "out"
    assert main(["compare", config]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("| method | score | \u0394 english |"):].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:6]] == ["base", "hft", "full", "lora"]
    for name in ("results.json", "results.csv", "report.md", "loss_curves.png", "pareto.png", "base.json"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["trainer"] == "sft" and results["skipped_runs"] == 0
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [(m, s) for s in (0, 1) for m in ("hft", "full", "lora")]
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    for run in results["runs"]:
        assert run["steps"] == 3 and len(run["loss_curve"]) == 3 and 0.0 <= run["score"] <= 1.0
        assert run["english_change"] == pytest.approx(run["english"] - results["base"]["english"])
        assert run["train_time_s"] > 0 and run["peak_memory_mb"] >= 0 and run["latency_ms_unmerged"] > 0
    full, hft, lora = runs[("full", 0)], runs[("hft", 0)], runs[("lora", 0)]
    assert full["trainable_params"] > hft["trainable_params"] > lora["trainable_params"] > 0
    assert full["size_kind"] == "full model weights" and full["adapter_mb"] == pytest.approx(full["trainable_params"] * 4 / 2**20)
    adapter = out / "runs" / "lora" / "seed0" / "adapter" / "adapter_model.safetensors"
    assert lora["size_kind"] == "adapter safetensors" and lora["adapter_mb"] == adapter.stat().st_size / 2**20
    assert lora["latency_ms_merged"] > 0 and hft["latency_ms_merged"] > 0
    assert full["latency_ms_merged"] is None and full["merge_note"] == "no adapter"
    assert runs[("hft", 0)]["loss_curve"] != runs[("hft", 1)]["loss_curve"]  # the seed changes the run
    mean = results["summary"]["lora"]["english_change"]["mean"]
    assert mean == pytest.approx((runs[("lora", 0)]["english_change"] + runs[("lora", 1)]["english_change"]) / 2)
    assert results["summary"]["lora"]["score"]["n"] == 2
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,score,score_std,english_change,english_change_std,train_time_s")
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["base", "hft", "full", "lora"]
    report = (out / "report.md").read_text()
    assert "## Method comparison (peft-ext compare)" in report and "| lora |" in report and "2 seed(s) [0, 1]" in report

    # a rerun skips every finished run and gives the same table
    assert main(["compare", config]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 6
    again = json.loads((out / "results.json").read_text())
    assert again["skipped_runs"] == 6 and again["runs"] == results["runs"]

    # a changed method reruns that method only
    own_data["methods"][2]["learning_rate"] = 5e-3
    assert main(["compare", write_yaml(tmp_path / "compare.yaml", own_data)]) == 0
    changed = json.loads((out / "results.json").read_text())
    assert changed["skipped_runs"] == 4
    assert [r["learning_rate"] for r in changed["runs"] if r["method"] == "lora"] == [5e-3, 5e-3]


def test_preference_data_trains_with_dpo_on_a_model_folder(tmp_path):
    from peft_ext.data.tiny_model import tiny_llama

    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "model")  # a user's local model folder (a Hub id goes the same from_pretrained way)
    tokenizer.save_pretrained(tmp_path / "model")
    config = CompareConfig(
        model=str(tmp_path / "model"),
        train_data={"builtin": "addition-preferences", "limit": 8},
        eval_data={"builtin": "addition-preferences", "limit": 4},  # preference accuracy: chosen vs rejected
        scorer="multiple_choice",
        forgetting=[],
        methods=["lora", {"peft_type": "HFT", "learning_rate": 1e-3}],
        max_steps=2, per_device_train_batch_size=2, max_length=64, warmup_steps=0,
        latency=False, save_adapters=False, output_dir=str(tmp_path / "out"),
    )
    results = run_compare(config)
    assert results["trainer"] == "dpo" and results["probes"] == {}
    lora, hft = results["runs"]
    assert lora["learning_rate"] == 5e-5 and hft["learning_rate"] == 1e-3  # DPO's default adapter rate; the file's
    assert lora["steps"] == hft["steps"] == 2 and lora["score"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert lora["latency_ms_unmerged"] is None and not (tmp_path / "out" / "runs" / "lora" / "seed0" / "adapter").exists()
    assert lora["adapter_mb"] > 0  # measured before the adapter folder was removed


def test_demo_is_the_builtin_comparison(tmp_path, capsys):
    out = tmp_path / "demo"
    sets = ["model=tiny-llama", "max_steps=1", "per_device_train_batch_size=2", "max_length=128", "warmup_steps=0",
            "methods=[lora]", "eval_data={builtin: fictional-facts-probes, limit: 4}", "eval_max_length=32",
            "forgetting=[{name: english, data: {builtin: english-heldout, limit: 2}, scorer: loss}]", "latency_batch=2"]
    assert main(["demo", "--out", str(out)] + [a for s in sets for a in ("--set", s)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["train_data"] == "fictional-facts" and results["config"]["scorer"] == "multiple_choice"
    assert [r["method"] for r in results["runs"]] == ["lora"]
    assert "| lora |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scorer": "multiple_choice"}, "eval_data: scorer multiple_choice does not fit prompt completion data"),
        ({"methods": ["hft", "nope"]}, "compare methods[1]: unknown method 'nope'. Registered peft-ext methods: COLA"),
        ({"methods": [{"peft_type": "COLA", "chain_length": 4}]}, "cannot meet the shared budget of max_steps=3"),
        ({"forgetting": [{"data": "fictional-facts-probes", "scorer": "exact_match"}]},
         "forgetting[0]: scorer exact_match does not fit multiple choice data"),
        ({"max_length": 8}, "train_data: no example keeps a token to learn from after TRL cut it to max_length=8"),
    ],
)
def test_bad_input_fails_before_any_training(tmp_path, own_data, capsys, change, message):
    config = write_yaml(tmp_path / "bad.yaml", {**own_data, **change})
    assert main(["compare", config]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("runs/*/*/run.json"))  # no run finished (none trained)


def test_training_data_in_no_known_format_names_the_columns(tmp_path, own_data, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input": "a", "target": "b"}])
    assert main(["compare", write_yaml(tmp_path / "bad.yaml", {**own_data, "train_data": bad})]) == 2
    err = capsys.readouterr().err
    assert "train_data: columns ['input', 'target'] match no known format. Expected columns:" in err
    assert "prompt + completion" in err and not (tmp_path / "out" / "base.json").exists()


def test_an_edited_data_file_or_method_changes_the_run_fingerprint(tmp_path):
    from peft_ext.compare.runner import run_fingerprint

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "one"}])
    config = CompareConfig(model="tiny-llama", train_data=data, eval_data=data, scorer="loss", methods=["lora", "hft"])
    lora, hft = config.method_specs()
    first = run_fingerprint(config, lora, 0)
    assert run_fingerprint(config, lora, 0) == first
    assert len({first, run_fingerprint(config, lora, 1), run_fingerprint(config, hft, 0)}) == 3
    write_jsonl(tmp_path / "train.jsonl", [{"text": "one, edited"}])
    assert run_fingerprint(config, lora, 0) != first


def test_a_model_that_learned_its_answers_scores_full_exact_match(tmp_path):
    """Full fine-tuning memorises four code words: greedy generation then returns every answer (the base none), so
    the scorer, TRL's end-of-answer token and the generation's stop agree."""
    rows = [{"prompt": f"Code of {w}:", "completion": f" {w[::-1]}"} for w in WORDS[:4]]
    data = write_jsonl(tmp_path / "words.jsonl", rows)
    results = run_compare(CompareConfig(
        model="tiny-llama", train_data=data, eval_data=data, scorer="exact_match", forgetting=[],
        methods=[{"peft_type": "full", "learning_rate": 3e-3}], max_steps=80, per_device_train_batch_size=4,
        max_length=64, warmup_steps=0, latency=False, output_dir=str(tmp_path / "out"),
    ))
    assert results["base"]["score"] == 0.0 and results["runs"][0]["score"] == 1.0
    assert results["runs"][0]["loss_curve"][-1][1] < 0.2


def test_command_line_flags(tmp_path, capsys):
    from peft_ext.cli import build_parser

    args = build_parser().parse_args(["compare"])
    assert args.config is None and args.output_dir is None and args.overrides == [] and args.imports == []
    args = build_parser().parse_args(["compare", "c.yaml", "--out", "d", "--set", "max_steps=3", "--import", "pkg"])
    assert (args.config, args.output_dir, args.overrides, args.imports) == ("c.yaml", "d", ["max_steps=3"], ["pkg"])
    assert main(["compare", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert main(["compare", "--set", "max_steps=0"]) == 2  # checked before the model loads
    assert "compare max_steps must be a positive integer, got 0" in capsys.readouterr().err


def test_a_comparison_under_accelerates_bf16_mixed_precision_scores_the_trained_model(tmp_path):
    """`accelerate launch` with mixed_precision: bf16 (recipes/accelerate/ddp.yaml) leaves a trained model whose
    forward ignores a passed key/value cache unless asked to use it; the multiple-choice scorer shares its questions'
    cache, so it failed there with a shape error. A fresh process: the environment variable sets accelerate's state."""
    script = (
        "from peft_ext.compare import CompareConfig, run_compare\n"
        "r = run_compare(CompareConfig(model='tiny-llama', train_data={'builtin': 'fictional-facts-qa', 'limit': 4}, "
        "eval_data={'builtin': 'fictional-facts-probes', 'limit': 2}, forgetting=[], methods=['full'], max_steps=1, "
        f"per_device_train_batch_size=2, max_length=128, warmup_steps=0, latency=False, output_dir={str(tmp_path)!r}))\n"
        "print('SCORE', r['runs'][0]['score'])\n"
    )
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split("SCORE")[-1]) in (0.0, 0.5, 1.0)
