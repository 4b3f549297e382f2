"""`peft-ext compress`: a real fine-tune of the tiny Llama compressed from local folders, loaded back with PEFT;
bad input gives exit code 2 and a message naming the option."""

import copy
import json
import re

import pytest
import torch
from peft import PeftModel

import peft_ext  # noqa: F401  (registers DELTACOME with PEFT)
from peft_ext.cli import build_parser, format_compression_report, main
from peft_ext.compression import compress_delta
from peft_ext.data.fictional_world import fictional_statements
from peft_ext.data.tiny_model import tiny_llama, tiny_llama_config

SMALL = ["--group-size", "32", "--calibration-samples", "4", "--calibration-seq-len", "64", "--no-progress"]


def finetune(model, tokenizer, steps: int = 8, lr: float = 3e-3):
    """A few real Adam steps on 16 fictional facts, embeddings and head frozen (the delta lives in the blocks)."""
    batch = tokenizer(fictional_statements()[:16], padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base/ (with the tokenizer) and finetuned/ (weights only) saved as safetensors, and the two models."""
    root = tmp_path_factory.mktemp("pair")
    base, tokenizer = tiny_llama()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ft = finetune(copy.deepcopy(base), tokenizer)
    base.save_pretrained(root / "base", safe_serialization=True)
    tokenizer.save_pretrained(root / "base")
    ft.save_pretrained(root / "finetuned", safe_serialization=True)
    return {"base": str(root / "base"), "finetuned": str(root / "finetuned"), "models": (base.eval(), ft, tokenizer)}


def compress_args(folders, out, *extra):
    return ["compress", "--base", folders["base"], "--finetuned", folders["finetuned"], "--out", str(out), *SMALL, *extra]


def test_compress_folders_then_load_with_peft(folders, tmp_path, capsys):
    out = tmp_path / "delta"
    assert main(compress_args(folders, out, "--budget", "1/4", "--bands", "[[2,8],[null,2]]")) == 0
    printed = capsys.readouterr().out
    assert "module" in printed and "rel_output_error" in printed and "Totals (deltacome, budget 0.25)" in printed
    assert "model.layers.1.mlp.down_proj" in printed  # 14 layers: every one is listed
    for name in ("adapter_config.json", "adapter_model.safetensors", "compression_report.json", "README.md"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "compression_report.json").read_text())
    assert len(report["layers"]) == 14 and report["totals"]["ratio"] <= 0.25
    assert all(r["rel_output_error"] is not None for r in report["layers"])  # GPTQ: calibrated on offline text
    assert all(r["bands"][0] == [2, 8] for r in report["layers"])

    base, ft, tokenizer = folders["models"]
    fresh, _ = tiny_llama()  # the same base, rebuilt
    model = PeftModel.from_pretrained(fresh, str(out)).eval()
    ids = tokenizer(["The emblem of the province of Tarsk is the badger.", "Python is a programming language."],
                    padding=True, return_tensors="pt")
    with torch.no_grad():
        y_base, y_ft, y_delta = (m(**ids).logits for m in (base, ft, model))
        assert (y_delta - y_ft).norm() < 0.5 * (y_base - y_ft).norm()  # most of the fine-tune's change is kept
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**ids).logits, y_delta, atol=1e-4, rtol=1e-4)


def test_compress_baselines_and_the_summary_for_many_layers(folders, tmp_path, capsys):
    for method in ("lowrank", "bitdelta"):
        out = tmp_path / method
        assert main(compress_args(folders, out, "--method", method, "--budget", "1/8", "--max-rows", "4")) == 0
        printed = capsys.readouterr().out
        assert "14 layers, by kind:" in printed and "The 4 worst layers by rel_error:" in printed
        assert f"Totals ({method}, budget 0.125)" in printed
        assert ("r=" if method == "lowrank" else "1-bit sign") in printed
        model = PeftModel.from_pretrained(tiny_llama()[0], str(out))
        assert model.peft_config["default"].method == method


def test_compress_accepts_the_offline_model_names(folders, tmp_path, capsys):
    """"tiny-llama" is loaded in-process (the same model as the base folder); RTN needs no tokenizer."""
    out = tmp_path / "delta"
    argv = ["compress", "--base", "tiny-llama", "--finetuned", folders["finetuned"], "--out", str(out),
            "--quantizer", "rtn", "--budget", "1/4", "--bands", "[[null,3]]", *SMALL]
    assert main(argv) == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert all(r["rel_output_error"] is None and r["bands"][0][1] == 3 for r in report["layers"])
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    assert main(["compress", "--base", "tiny-llama", "--finetuned", "tiny-llama", "--out", str(tmp_path / "x"),
                 "--quantizer", "rtn", "--bands", "[[null,2]]", *SMALL]) == 2  # one model twice: no delta
    assert "no delta to compress" in capsys.readouterr().err


def test_mismatched_architectures_exit_2(folders, tmp_path, capsys):
    config = tiny_llama_config(100)
    config.num_hidden_layers = 3
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(config).save_pretrained(tmp_path / "other", safe_serialization=True)
    capsys.readouterr()  # transformers' "Writing model shards" bar, when its progress bars are on
    argv = ["compress", "--base", folders["base"], "--finetuned", str(tmp_path / "other"), "--out", str(tmp_path / "o"), *SMALL]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-ext compress: error:") and "--finetuned" in err and "--base" in err
    assert not (tmp_path / "o").exists()


def test_budget_too_small_for_the_bands_exit_2_before_any_work(folders, tmp_path, capsys):
    # the paper's bands as given at 1/16 on 32 x 32 (the default scales them to each matrix, and fits)
    assert main(compress_args(folders, tmp_path / "o", "--budget", "1/16", "--bands", "[[2,8],[32,3],[null,2]]")) == 2
    err = capsys.readouterr().err
    assert re.search(r"--budget 0\.0625 gives model\.layers\.0\..* --bands=.*raise --budget", err), err
    assert "model.layers.0.self_attn.q_proj" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--budget", "abc"], "--budget"),
        (["--budget", "2"], "--budget"),
        (["--method", "bitdelta", "--budget", "1/32"], "--budget"),
        (["--bands", "[[2,8],"], "--bands"),
        (["--bands", "[[2,99]]"], "--bands"),
        (["--group-size", "0"], "--group-size"),
        (["--calibration-samples", "0"], "--calibration-samples"),
        (["--dense-modules", "model.norm,model.nope"], "--dense-modules"),
    ],
)
def test_bad_options_exit_2_naming_the_option(folders, tmp_path, capsys, extra, flag):
    capsys.readouterr()  # whatever building the folders printed
    assert main(compress_args(folders, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-ext compress: error:") and flag in err, err


def test_unknown_method_and_missing_options_exit_2(folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(compress_args(folders, tmp_path / "o", "--method", "svd"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --method: invalid choice: 'svd'" in err
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["compress", "--base", "b", "--out", "o"])
    assert exit_info.value.code == 2
    assert "--finetuned" in capsys.readouterr().err


def test_missing_folder_and_cuda_without_gpu_exit_2(folders, tmp_path, capsys):
    argv = ["compress", "--base", str(tmp_path / "missing"), "--finetuned", folders["finetuned"], "--out", str(tmp_path / "o"), *SMALL]
    assert main(argv) == 2  # not a folder, and the Hub is offline in tests
    assert "--base" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(compress_args(folders, tmp_path / "o", "--device", "cuda")) == 2
        assert "--device cuda" in capsys.readouterr().err


def test_report_formatting_names_changed_parameters_that_were_not_stored(folders):
    base, ft, _ = folders["models"]
    ft = copy.deepcopy(ft)
    with torch.no_grad():
        ft.get_input_embeddings().weight.add_(0.01)
    result = compress_delta(base, ft, method="lowrank", budget=1 / 8, progress=False)
    text = format_compression_report(result, max_rows=100)
    assert "WARNING: 1 parameters changed by the fine-tune are NOT stored: model.embed_tokens.weight" in text
    assert text.count("model.layers.") == 14


@pytest.mark.slow
def test_compress_against_smollm2_by_name(tmp_path, capsys):
    """SmolLM2 ties its head to its embeddings: by name it is read as its cached folder, so a saved fine-tune (no
    lm_head.weight in the file) pairs with it; 210 layers print as a per-kind summary."""
    from peft_ext.data import load_smollm2

    model, _ = load_smollm2()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.add_(1e-3 * torch.randn_like(layer.mlp.down_proj.weight))
    model.save_pretrained(tmp_path / "ft")
    out = tmp_path / "delta"
    argv = ["compress", "--base", "smollm2-135m-instruct", "--finetuned", str(tmp_path / "ft"), "--out", str(out),
            "--method", "lowrank", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "30 layers, by kind:" in printed and "down_proj" in printed  # only down_proj changed
    assert "180 targeted linear weights were unchanged" in printed
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m-instruct"
