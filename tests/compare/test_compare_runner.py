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
    # the printed table's cells are the summary's numbers
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in table[2:6]}
    headers = [h.strip() for h in table[0].split("|")[2:-1]]
    assert cells["base"][0] == f"{results['base']['score']:.3f}"
    for method in ("hft", "full", "lora"):
        stats = results["summary"][method]
        row = dict(zip(headers, cells[method]))
        assert row["score"] == f"{stats['score']['mean']:.3f} \u00b1 {stats['score']['std']:.3f}"
        assert row["\u0394 english"] == f"{stats['english_change']['mean']:+.3f} \u00b1 " + f"{stats['english_change']['std']:.3f}"
        assert row["trainable params"].startswith(f"{stats['trainable_params']['mean']:,.0f}")
        assert row["train time s"].startswith(f"{stats['train_time_s']['mean']:.1f} \u00b1 ")
    assert results["launch"] == {"processes": 1, "gradient_accumulation_steps": 1, "global_batch": 2, "precision": "fp32"}
    assert all((r["processes"], r["global_batch"], r["precision"]) == (1, 2, "fp32") for r in results["runs"])
    assert "3 steps x batch 2 x 64 tokens, fp32" in printed and "3 steps, batch 2, 64 tokens" in report
    assert "Total wall time" in report and "reused" not in report
    assert csv_lines[-1].endswith('"[0, 1]"')  # the seeds, not their count

    # a rerun skips every finished run and gives the same table
    assert main(["compare", config]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 6
    again = json.loads((out / "results.json").read_text())
    assert again["skipped_runs"] == 6 and again["runs"] == results["runs"]
    report = (out / "report.md").read_text()  # the runs' own train times and dates, not the rerun's second
    train_total = sum(r["train_time_s"] for r in results["runs"])
    assert f"6 run(s), {train_total:.0f} s of training in all" in report
    assert "6 of them were reused from an earlier invocation" in report and results["runs"][0]["finished_at"] in report

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


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded or a trainer built: bad input must be refused before either."""
    import peft_ext.data
    import peft_ext.recipe

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or a trainer built before the bad input was refused")

    monkeypatch.setattr(peft_ext.data, "load_model", refuse)
    monkeypatch.setattr(peft_ext.recipe, "build_trainer", refuse)


def bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Sky?", "options": ["blue", "green"], "answer": "red"}])
    return str(empty), mc


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scorer": "multiple_choice"}, "eval_data: scorer multiple_choice does not fit prompt completion data"),
        ({"scorer": "exact_mach"}, "compare scorer: unknown scorer 'exact_mach'; choose one of ['exact_match', 'loss'"),
        ({"methods": ["hft", "nope"]}, "compare methods[1]: unknown method 'nope'. Registered peft-ext methods: COLA"),
        ({"methods": [{"peft_type": "COLA", "chain_length": 4}]}, "cannot meet the shared budget of max_steps=3"),
        ({"forgetting": [{"data": "fictional-facts-probes", "scorer": "exact_match"}]},
         "forgetting[0]: scorer exact_match does not fit multiple choice data"),
        ({"forgetting": [{"data": "english-heldout", "scorer": "los"}]}, "compare forgetting[0].scorer: unknown scorer 'los'"),
        ({"forgetting": [{"data": "MC"}]}, "forgetting[0] row 0: answer 'red' is neither one of its options"),
        ({"eval_data": "EMPTY"}, "empty.jsonl is empty; it needs at least one row"),
        ({"model": "./no_such_model_dir"}, "compare model: './no_such_model_dir' looks like a local folder but no such "
                                           "folder exists"),
        ({"gradient_accumulation_steps": 0}, "compare gradient_accumulation_steps must be a positive integer, got 0"),
    ],
)
def test_bad_input_fails_before_a_model_is_loaded(tmp_path, own_data, capsys, no_model, change, message):
    empty, mc = bad_files(tmp_path)
    text = yaml.safe_dump({**own_data, **change}).replace("EMPTY", empty).replace("MC", mc)
    (tmp_path / "bad.yaml").write_text(text)
    assert main(["compare", str(tmp_path / "bad.yaml")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing scored, trained or written


def test_a_max_length_that_cuts_every_answer_fails_before_training(tmp_path, own_data, capsys, monkeypatch):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "train", lambda *a, **k: pytest.fail("training started"))
    config = write_yaml(tmp_path / "bad.yaml", {**own_data, "max_length": 8})
    assert main(["compare", config]) == 2
    assert "train_data: no example keeps a token to learn from after TRL cut it to max_length=8" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("runs/*/*/run.json"))


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


def test_the_fingerprint_holds_the_launch_processes_precision_and_accumulation(tmp_path, monkeypatch):
    """A run made under another launch (2 processes, bf16, gradient accumulation) is not reused."""
    from peft_ext.compare.runner import launch, run_fingerprint

    for name in ("WORLD_SIZE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    config = CompareConfig(model="tiny-llama", methods=["lora"], per_device_train_batch_size=4)
    lora = config.method_specs()[0]
    single = run_fingerprint(config, lora, 0)
    assert launch(config) == {"processes": 1, "gradient_accumulation_steps": 1, "global_batch": 4, "precision": "fp32"}
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun --nproc_per_node 2
    assert launch(config)["global_batch"] == 8
    two = run_fingerprint(config, lora, 0)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert launch(config)["precision"] == "bf16"
    two_bf16 = run_fingerprint(config, lora, 0)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    fp16 = CompareConfig(model="tiny-llama", methods=["lora"], per_device_train_batch_size=4, trainer_args={"fp16": True})
    accumulating = CompareConfig(model="tiny-llama", methods=["lora"], per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2)
    assert launch(fp16)["precision"] == "fp16" and launch(accumulating)["global_batch"] == 8
    prints = {single, two, two_bf16, run_fingerprint(fp16, lora, 0), run_fingerprint(accumulating, lora, 0)}
    assert len(prints) == 5 and run_fingerprint(config, lora, 0) == single


def test_compare_applies_overrides_to_a_config_object(tmp_path):
    from peft_ext.compare import compare

    config = CompareConfig(model="tiny-llama", methods=["lora"])
    with pytest.raises(ValueError, match="compare max_steps must be a positive integer, got 0"):
        compare(config, ["max_steps=0"])  # applied (and checked), not ignored
    assert config.with_overrides(["max_steps=7", "seeds=[3]"]) == CompareConfig(model="tiny-llama", methods=["lora"],
                                                                              max_steps=7, seeds=[3])


def test_loss_curves_plot_finegates_task_loss_and_merge_notes_end_at_a_word():
    from peft_ext.compare.runner import first_sentence, loss_curves

    history = [{"step": 1, "loss": 30.5, "finegates/lambda": 50.0, "finegates/sparsity_loss": 0.6},
               {"step": 2, "loss": 2.0}, {"step": 2, "train_runtime": 1.0}]
    curves = loss_curves(history)
    assert curves["loss_curve"] == [(1, pytest.approx(0.5)), (2, 2.0)] and curves["regularizer_curve"] == [(1, 30.0)]
    assert loss_curves([{"step": 1, "loss": 2.0}]) == {"loss_curve": [(1, 2.0)]}
    long = "SMoRE cannot merge its routed experts into the base weights: " + "the router picks experts per token " * 12
    note = first_sentence(long + "\nsecond line")
    assert len(note) <= 304 and note.endswith(" ...") and long.startswith(note[:-4]) and note[-5] != " "
    assert long[len(note) - 4] == " "  # cut at a word boundary
    assert first_sentence("short.\nmore") == "short."


def test_a_method_that_never_moves_from_the_base_is_flagged_and_cola_counts_every_link(tmp_path, own_data, capsys):
    """FineGates' gates start open: in 2 steps none closes, so its trained model is the base bit for bit; the output
    and the report say so instead of showing 'no forgetting'. Its curve is the task loss (the logged loss has
    lambda x sparsity in it). COLA's count holds the merged link. Gradient accumulation is a budget key."""
    config = {**own_data, "methods": [{"peft_type": "FINEGATES"}, {"peft_type": "COLA", "r": 2, "chain_length": 2},
                                      {"peft_type": "LORA", "r": 2, "learning_rate": 1e-2}],
              "max_steps": 2, "seeds": [0], "latency": False, "gradient_accumulation_steps": 2}
    assert main(["compare", write_yaml(tmp_path / "c.yaml", config)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    gates, cola, lora = runs["finegates"], runs["cola"], runs["lora"]
    assert gates["score"] == results["base"]["score"] and gates["english"] == results["base"]["english"]
    assert "gates start open" in gates["unchanged_from_base"] and "Raise gates_learning_rate" in gates["unchanged_from_base"]
    assert lora["english"] != results["base"]["english"] and "unchanged_from_base" not in lora
    assert "WARNING: finegates seed 0 scores exactly as the base" in printed
    assert "WARNING: finegates (seed 0) scores exactly as the base" in (out / "report.md").read_text()
    assert len(gates["regularizer_curve"]) == 2 and all(term > 0 for _, term in gates["regularizer_curve"])
    assert max(loss for _, loss in gates["loss_curve"]) < 2 * max(loss for _, loss in lora["loss_curve"])
    assert cola["trainable_params"] == 2 * cola["trainable_params_now"]  # the merged link and the last one
    assert (gates["gradient_accumulation_steps"], gates["global_batch"]) == (2, 4)
    assert "2 steps x global batch 4 (2 per device x 1 process(es) x 2 accumulation step(s))" in printed


def test_a_rerun_that_wants_adapters_trains_again_the_runs_saved_without(tmp_path, own_data, capsys):
    config = {**own_data, "methods": [{"peft_type": "LORA", "r": 2}], "forgetting": [], "max_steps": 1, "seeds": [0],
              "latency": False, "save_adapters": False}
    adapter = tmp_path / "out" / "runs" / "lora" / "seed0" / "adapter"
    assert main(["compare", write_yaml(tmp_path / "c.yaml", config)]) == 0 and not adapter.exists()
    assert main(["compare", write_yaml(tmp_path / "c.yaml", {**config, "save_adapters": True})]) == 0
    assert "finished earlier, skipped" not in capsys.readouterr().out
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert main(["compare", write_yaml(tmp_path / "c.yaml", {**config, "save_adapters": True})]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 1
