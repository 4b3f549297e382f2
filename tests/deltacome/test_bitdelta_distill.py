"""BitDelta's scale distillation (peft_ext.compression.bitdelta_distill): on a tiny base / fine-tune pair, the distilled
scales match the fine-tune's outputs better than the closed-form α = mean|ΔW| on the calibration text and on held-out
text; only the scales change; the folder loads with PEFT; compress_delta / `peft-ext compress` / reproduce-delta
wiring; bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

import peft_ext  # noqa: F401  (registers DELTACOME with PEFT)
from peft_ext.compression import compress_delta
from peft_ext.compression.bitdelta_distill import _Student, distill_bitdelta
from peft_ext.data.english_text import english_text
from peft_ext.kernels.sign_format import SignDelta

from .conftest import input_ids

STEPS, LR = 16, 2e-3  # the tiny pair's deltas are far larger than a real fine-tune's: a larger step than BitDelta's 1e-4


def _ids(tokenizer, split: str, n: int, seq_len: int = 128) -> torch.Tensor:
    ids = tokenizer("\n\n".join(english_text(split)), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids[: n * seq_len].view(n, seq_len)


def _logit_mse(model, ft, ids: torch.Tensor) -> float:
    """The output-matching loss measured here, independently of the module: logits of the loaded adapter vs the FT."""
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(model(b).logits, ft(b).logits)) for b in ids.split(4)) / len(ids.split(4))


def _alphas(result) -> dict:
    return {k: float(v) for k, v in result.state_dict.items() if k.endswith("sign_alpha")}


@pytest.fixture(scope="module")
def compressed(pair, tokenizer):
    """The closed-form and the distilled BitDelta adapters of the tiny pair (default calibration: offline English)."""
    base, ft = pair
    closed = compress_delta(base, ft, method="bitdelta", progress=False)
    distilled = compress_delta(base, ft, method="bitdelta", tokenizer=tokenizer, bitdelta_distill_steps=STEPS,
                               bitdelta_distill_lr=LR, progress=False)
    return closed, distilled


def test_distillation_lowers_the_output_loss_on_calibration_and_heldout_text(pair, tokenizer, compressed, tmp_path):
    base, ft = pair
    closed, distilled = compressed
    closed.save(tmp_path / "closed")
    distilled.save(tmp_path / "distilled")
    models = {n: PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / n).eval() for n in ("closed", "distilled")}
    calib, held = _ids(tokenizer, "train", 16), _ids(tokenizer, "heldout", 16)
    for ids in (calib, held):
        before, after = _logit_mse(models["closed"], ft, ids), _logit_mse(models["distilled"], ft, ids)
        assert after < 0.97 * before, (before, after)
    # the report says the same, in its own measure (mean over all calibration / held-out batches)
    t = distilled.totals
    assert t["distill_steps"] == STEPS and t["distill_seq_len"] == 128 and t["distill_samples"] == STEPS * 4
    assert t["distill_loss_after"] < t["distill_loss_before"]
    assert t["distill_heldout_loss_after"] < t["distill_heldout_loss_before"]
    assert t["distill_loss_before"] == pytest.approx(_logit_mse(models["closed"], ft, calib), rel=0.15)
    assert "distill_steps" not in closed.totals and closed.distillation is None


def test_only_the_scales_change(compressed):
    closed, distilled = compressed
    assert sorted(closed.state_dict) == sorted(distilled.state_dict)
    changed = 0
    for key, value in closed.state_dict.items():
        if key.endswith("sign_alpha"):
            assert value.dtype == distilled.state_dict[key].dtype == torch.float32 and value.shape == (1,)
            changed += not torch.equal(value, distilled.state_dict[key])
        else:  # signs, and the norms stored whole
            assert torch.equal(value, distilled.state_dict[key]), key
    assert changed == len(closed.layers) == 14
    report = distilled.distillation
    assert report.alpha_before == pytest.approx({r["module"]: r["alpha"] for r in closed.layers})
    assert {f"base_model.model.{n}.deltacome_delta.sign_alpha": a for n, a in report.alpha_after.items()} == pytest.approx(_alphas(distilled))
    assert len(report.loss_curve) == STEPS


def test_rows_carry_the_distilled_scale_and_its_weight_error(pair, compressed):
    base, ft = pair
    closed, distilled = compressed
    for row, row0 in zip(distilled.layers, closed.layers):
        name = row["module"]
        prefix = f"base_model.model.{name}.deltacome_delta."
        delta = (ft.get_submodule(name).weight - base.get_submodule(name).weight).detach()
        sign = SignDelta(*delta.shape, distilled.state_dict[prefix + "sign_words"], distilled.state_dict[prefix + "sign_alpha"])
        assert row["alpha"] == pytest.approx(float(sign.alpha))
        assert row["rel_error"] == pytest.approx(float((delta - sign.dense()).norm() / delta.norm()), abs=2e-6)
        assert row["alpha_closed_form"] == row0["alpha"] and row["rel_error_closed_form"] == row0["rel_error"]
        assert row["rel_error"] >= row0["rel_error"] - 1e-6  # mean|ΔW| is the weight-space optimum for fixed signs


def test_saved_folder_loads_and_reports_the_distillation(pair, compressed, tmp_path):
    base, ft = pair
    _, distilled = compressed
    distilled.save(tmp_path)
    report = json.loads((tmp_path / "compression_report.json").read_text())
    assert report["totals"]["distill_loss_after"] == distilled.totals["distill_loss_after"]
    assert len(report["distillation"]["loss_curve"]) == STEPS
    assert "BitDelta scales distilled: 16 Adam steps" in (tmp_path / "README.md").read_text()
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = input_ids()
    with torch.no_grad():
        assert (model(ids).logits - ft(ids).logits).norm() < (base(ids).logits - ft(ids).logits).norm()
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_the_optimised_model_is_the_adapters_forward(pair, compressed, tmp_path):
    """The distillation runs the base with W + α·S per layer (functional_call): the same outputs as the PeftModel's own
    DeltaComeLinear forward, for the closed-form and the distilled scales; the base is not modified."""
    base, ft = pair
    ids = input_ids()
    for i, result in enumerate(compressed):
        result.save(tmp_path / str(i))
        model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / str(i)).eval()
        with torch.no_grad():
            torch.testing.assert_close(_Student.of_result(base, result)(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(_Student.of_peft_model(model)(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_peft_model_is_distilled_in_place_like_the_compressed_state(pair, tokenizer, compressed, tmp_path):
    base, ft = pair
    closed, _ = compressed
    closed.save(tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    calib = _ids(tokenizer, "train", 8)
    from_state = copy.deepcopy(closed)
    a = distill_bitdelta(base, ft, from_state, calib, steps=6, lr=LR, progress=False)
    b = distill_bitdelta(None, ft, model, calib, steps=6, lr=LR, progress=False)
    assert a.alpha_after == pytest.approx(b.alpha_after, rel=1e-5) and a.loss_after == pytest.approx(b.loss_after, rel=1e-5)
    buffers = {n: float(t) for n, t in model.named_buffers() if n.endswith("sign_alpha")}
    assert sorted(buffers.values()) == pytest.approx(sorted(b.alpha_after.values()), rel=1e-6)
    assert not model.training and not any(t.requires_grad for t in model.buffers())
    assert _alphas(closed) != _alphas(from_state)  # the copy was distilled, the original not


def test_hidden_state_matching_and_a_constant_lr(pair, tokenizer, compressed):
    base, ft = pair
    result = copy.deepcopy(compressed[0])
    calib = _ids(tokenizer, "train", 8)
    report = distill_bitdelta(base, ft, result, calib, heldout=_ids(tokenizer, "heldout", 4), steps=8, lr=LR,
                              match="hidden", schedule="constant", progress=False)
    assert report.match == "hidden" and report.schedule == "constant" and report.heldout_samples == 4
    assert report.loss_after < report.loss_before and report.heldout_loss_after < report.heldout_loss_before
    assert result.totals["distill_match"] == "hidden"


def test_the_base_comes_back_unchanged(pair, tokenizer):
    base, ft = pair
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = [p.requires_grad for p in base.parameters()]
    types = [type(m) for m in base.modules()]
    base.train()
    try:
        distill_bitdelta(base, ft, compress_delta(base, ft, method="bitdelta", progress=False), _ids(tokenizer, "train", 4),
                         steps=2, progress=False)
        assert base.training and all(m.training for m in base.modules())
    finally:
        base.eval()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert [p.requires_grad for p in base.parameters()] == flags and [type(m) for m in base.modules()] == types
    assert "peft_config" not in vars(base)


def test_gradients_reach_the_scales_through_the_tuner_forward_too(pair, compressed, tmp_path):
    """The tuner's own path would also work (eval mode, grad enabled, sign_alpha requiring grad: the gradient reaches α
    through sign_delta_part), and its training-mode guard is still there."""
    base, _ = pair
    compressed[0].save(tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    alphas = [t for n, t in model.named_buffers() if n.endswith("sign_alpha")]
    for a in alphas:
        a.requires_grad_(True)
    with torch.enable_grad():
        model(input_ids()).logits.pow(2).mean().backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() and float(a.grad) != 0 for a in alphas)
    model.train()
    with pytest.raises(RuntimeError, match=r"inference"):
        model(input_ids())


# --------------------------------------------------------------------------------------------- bad input
def test_no_tokenizer_says_what_to_pass(pair):
    base, ft = pair
    with pytest.raises(ValueError, match=r"needs a tokenizer: pass tokenizer=, calibration= token ids.*bitdelta_distill_steps=0"):
        compress_delta(base, ft, method="bitdelta", bitdelta_distill_steps=5, progress=False)
    with pytest.raises(ValueError, match=r"needs a tokenizer.*steps=0"):
        distill_bitdelta(base, ft, None, steps=5, progress=False)


def test_settings_that_cannot_work(pair, tokenizer, compressed):
    base, ft = pair
    with pytest.raises(ValueError, match=r"bitdelta_distill_steps=5 distils BitDelta's .* 'lowrank'"):
        compress_delta(base, ft, method="lowrank", bitdelta_distill_steps=5, tokenizer=tokenizer, progress=False)
    for steps, lr, match in ((-1, 1e-4, "integer >= 0"), (2.5, 1e-4, "integer >= 0"), (5, 0.0, "positive number"), (5, float("nan"), "positive")):
        with pytest.raises(ValueError, match=rf"bitdelta_distill_(steps|lr) must be .*{match}"):
            compress_delta(base, ft, method="bitdelta", bitdelta_distill_steps=steps, bitdelta_distill_lr=lr, tokenizer=tokenizer, progress=False)
    lowrank = compress_delta(base, ft, method="lowrank", budget=1 / 4, progress=False)
    calib = input_ids(length=16)
    with pytest.raises(ValueError, match=r"CompressionResult of method 'bitdelta'.*'lowrank'"):
        distill_bitdelta(base, ft, lowrank, calib, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"needs the base model"):
        distill_bitdelta(None, ft, compressed[0], calib, steps=1, progress=False)
    for kw, match in (({"match": "kl"}, "match must be one of"), ({"schedule": "linear"}, "schedule must be one of"), ({"steps": 0}, "positive integer")):
        with pytest.raises(ValueError, match=match):
            distill_bitdelta(base, ft, compressed[0], calib, progress=False, **kw)


def test_a_peft_model_of_another_method_is_refused(pair, tmp_path):
    base, ft = pair
    compress_delta(base, ft, tmp_path, method="lowrank", budget=1 / 4, progress=False)
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with pytest.raises(ValueError, match=r"active adapter 'default' is 'lowrank'"):
        distill_bitdelta(None, ft, model, input_ids(length=16), steps=1, progress=False)


# --------------------------------------------------------------------------------------------- wiring
def test_cli_compress_distils_from_folders(pair, tokenizer, tmp_path, capsys):
    from peft_ext.cli import main

    base, ft = pair
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    common = ["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--method", "bitdelta", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "a"), "--bitdelta-distill-steps", "3"]) == 2  # no tokenizer anywhere
    err = capsys.readouterr().err
    assert "--bitdelta-distill-steps matches the fine-tune's outputs on text and needs a tokenizer" in err
    assert "--bitdelta-distill-steps 0" in err
    tokenizer.save_pretrained(tmp_path / "ft")
    assert main(common + ["--out", str(tmp_path / "b"), "--bitdelta-distill-steps", "3", "--bitdelta-distill-lr", "1e-3"]) == 0
    assert "BitDelta scales distilled: 3 steps (lr 0.001)" in capsys.readouterr().out
    totals = json.loads((tmp_path / "b" / "compression_report.json").read_text())["totals"]
    assert totals["distill_steps"] == 3 and totals["distill_heldout_loss_before"] is not None
    assert main(common[:5] + ["--out", str(tmp_path / "c"), "--method", "lowrank", "--bitdelta-distill-steps", "3", "--no-progress"]) == 2
    assert "--bitdelta-distill-steps=0" in capsys.readouterr().err


def test_reproduction_config_and_table_know_bitdelta_distill():
    from peft_ext.experiments import DeltaCompressionConfig
    from peft_ext.experiments.delta_compression import METHODS, format_table

    config = DeltaCompressionConfig.from_dict({"methods": ["bitdelta", "bitdelta-distill"], "budgets": ["1/16"]})
    assert config.bitdelta_distill_steps == 200 and config.bitdelta_distill_lr == 1e-4
    assert METHODS["bitdelta-distill"][0] == "bitdelta"
    with pytest.raises(ValueError, match=r"below BitDelta's fixed 1/16"):
        DeltaCompressionConfig.from_dict({"methods": ["bitdelta-distill"], "budgets": ["1/32"]})
    with pytest.raises(ValueError, match=r"bitdelta_distill_steps must be a positive integer"):
        DeltaCompressionConfig.from_dict({"methods": ["bitdelta-distill"], "bitdelta_distill_steps": 0})
    scores = {"task_acc": 0.5, "task_loss": 1.0, "old_knowledge": 0.5, "lm_loss": 3.0}
    d = {"distill_steps": 200, "distill_lr": 1e-4, "distill_seq_len": 128, "distill_samples": 118,
         "distill_loss_before": 0.5, "distill_loss_after": 0.25, "distill_heldout_loss_before": 0.6, "distill_heldout_loss_after": 0.3}
    row = {**scores, "label": METHODS["bitdelta-distill"][2], "budget": "1/16", "budget_independent": True, "stored_bytes": 1,
           "ratio": 0.0625, "task_acc_vs_finetuned": 0.0, "task_loss_gain_kept": 1.0, "mean_rel_error": 0.6,
           "mean_rel_output_error": 0.4, "not_stored": [], "distillation": d}
    table = format_table({"base": scores, "finetuned": {**scores, "dense_fp16_delta_bytes": 16}, "compressed": [row, dict(row)]})
    assert table.count("| BitDelta (1-bit, distilled α) | 1/16* |") == 2
    assert table.count("BitDelta's distillation (200 Adam steps") == 1 and "0.5 → 0.25 on that text, held-out English 0.6 → 0.3" in table


# ----------------------------------------------------------------------------------- the served function (item 24)
def test_in_bf16_the_distilled_function_is_the_served_one(tmp_path):
    """The served adapter adds α·S·x in fp32 to the bf16 base's output; before the fix the distillation optimised
    W + α·S rounded to bf16, where a real fine-tune's α (here 1/300 of the weights' scale) mostly rounds away: the
    function fitted was nearly the base's, not the one served. Both students (from a CompressionResult and from a
    PeftModel) now compute the served outputs."""
    from .conftest import make_base, make_finetune

    base = make_base(seed=21)
    ft = make_finetune(base, seed=22, scale=3e-3)
    result = compress_delta(base, ft, method="bitdelta", progress=False)
    result.save(tmp_path)
    base16 = copy.deepcopy(base).to(torch.bfloat16)
    model = PeftModel.from_pretrained(copy.deepcopy(base16), tmp_path).eval()
    ids = input_ids(batch=4, length=16)
    with torch.no_grad():
        served, plain = model(ids).logits.float(), base16(ids).logits.float()
        students = _Student.of_result(base16, result)(ids).logits.float(), _Student.of_peft_model(model)(ids).logits.float()
    assert (served - plain).norm() > 0
    for student in students:
        assert float((student - served).norm()) <= 0.02 * float((served - plain).norm()), (student - served).norm()
