"""compress_delta end to end: budgets, the three methods, folders in and out, loading, merging, and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

import peft_ext
from peft_ext.compression import compress_delta
from peft_ext.tuners.deltacome.representation import build_packed

from .conftest import BANDS, BUDGET, GROUP, input_ids, make_base, make_finetune

PAPER = [[2, 8], [32, 3], [None, 2]]  # the paper's schedule as given (the default scales it to each matrix)


def _compress(pair, tokenizer, tmp_path=None, **kw):
    base, ft = pair
    args = dict(budget=BUDGET, bands=BANDS, group_size=GROUP, tokenizer=tokenizer, calibration_seq_len=32,
                calibration_samples=8, progress=False)
    args.update(kw)
    return compress_delta(base, ft, tmp_path, **args)


@pytest.fixture(scope="module")
def results(pair, tokenizer):
    return {m: _compress(pair, tokenizer, method=m) for m in ("deltacome", "lowrank", "bitdelta")}


def test_every_layer_fits_its_budget(results):
    for method, result in results.items():
        assert len(result.layers) == 14  # 7 linear layers x 2 blocks; the head and embeddings are unchanged
        for row in result.layers:
            limit = (1 / 16 if method == "bitdelta" else BUDGET) * row["dense_fp16_bytes"]
            assert row["bytes"] <= limit + (4 if method == "bitdelta" else 0), (method, row)
        assert result.totals["compressed_bytes"] == sum(r["bytes"] for r in result.layers)


def test_deltacome_keeps_more_of_the_delta_than_the_baselines(results):
    """On deltas with a long-tailed spectrum, at the same budget (BitDelta at its fixed 1/16)."""
    err = {m: r.totals["mean_rel_error"] for m, r in results.items()}
    assert err["deltacome"] < err["lowrank"] and err["deltacome"] < err["bitdelta"], err


def test_stored_tensors_rebuild_the_reported_error(pair, results):
    base, ft = pair
    result = results["deltacome"]
    name = "model.layers.1.mlp.down_proj"
    row = next(r for r in result.layers if r["module"] == name)
    prefix = f"base_model.model.{name}.deltacome_delta."
    tensors = {k[len(prefix):]: v for k, v in result.state_dict.items() if k.startswith(prefix)}
    bands = tuple((bits, n) for n, bits in result.config.layer_bands[name])
    delta = ft.get_submodule(name).weight - base.get_submodule(name).weight
    approx = build_packed(*delta.shape, bands, GROUP, tensors).dense()
    assert abs(float((delta - approx).norm() / delta.norm()) - row["rel_error"]) < 1e-5
    assert row["rel_output_error"] is not None  # GPTQ calibrated on the offline text


@pytest.mark.parametrize("method", ["deltacome", "lowrank", "bitdelta"])
def test_folder_loads_and_approaches_the_finetune(pair, tokenizer, tmp_path, method, results):
    base, ft = pair
    results[method].save(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "compression_report.json"]
    report = json.loads((tmp_path / "compression_report.json").read_text())
    assert report["totals"]["layers"] == 14 and "deltacome" in (tmp_path / "README.md").read_text()
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = input_ids()
    with torch.no_grad():
        y_base, y_ft, y = base(ids).logits, ft(ids).logits, model(ids).logits
        assert (y - y_ft).norm() < 0.7 * (y_base - y_ft).norm()
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, y, rtol=1e-4, atol=1e-5)
    # the norms the fine-tune changed came along whole
    torch.testing.assert_close(merged.model.norm.weight, ft.model.norm.weight, rtol=0, atol=0)
    assert type(merged) is type(base)


def test_folders_in_equal_modules_in(pair, tokenizer, tmp_path):
    base, ft = pair
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    tokenizer.save_pretrained(tmp_path / "ft")
    from_modules = _compress(pair, tokenizer, quantizer="rtn")
    from_folders = compress_delta(
        tmp_path / "base", tmp_path / "ft", tmp_path / "out", budget=BUDGET, bands=BANDS, group_size=GROUP,
        quantizer="rtn", progress=False,
    )
    assert sorted(from_modules.state_dict) == sorted(from_folders.state_dict)
    for key, value in from_modules.state_dict.items():
        assert torch.equal(value, from_folders.state_dict[key]), key
    assert from_folders.config.base_model_name_or_path == str(tmp_path / "base")
    # GPTQ from folders finds the fine-tune's tokenizer in its folder
    gptq = compress_delta(tmp_path / "base", tmp_path / "ft", budget=BUDGET, bands=BANDS, group_size=GROUP,
                          calibration_seq_len=32, calibration_samples=4, progress=False)
    assert all(r["rel_output_error"] is not None for r in gptq.layers)


def test_several_tenants_in_one_batch(pair, tokenizer, tmp_path):
    base, ft = pair
    ft2 = make_finetune(base, seed=7)
    _compress(pair, tokenizer, tmp_path / "math")
    compress_delta(base, ft2, tmp_path / "code", budget=BUDGET, bands=BANDS, group_size=GROUP, quantizer="rtn", progress=False)
    compress_delta(base, ft2, tmp_path / "code_lr", method="lowrank", budget=BUDGET, progress=False)
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "math", adapter_name="math")
    model.load_adapter(tmp_path / "code", adapter_name="code")
    model.load_adapter(tmp_path / "code_lr", adapter_name="code_lr")
    model.eval()
    ids = input_ids(batch=5)
    names = ["code", "math", "__base__", "code_lr", "math"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        single = {}
        for name in ("math", "code", "code_lr"):
            model.set_adapter(name)
            single[name] = model(ids).logits
        single["__base__"] = base(ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single[name][row], rtol=1e-5, atol=1e-5, msg=lambda m: f"row {row} ({name}): {m}")
    assert not torch.allclose(single["math"], single["code"])
    # memory: the tenants are their compressed bytes, not three models
    delta_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".deltacome_delta." in n)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert delta_bytes < 0.5 * base_bytes
    with pytest.raises(ValueError, match=r"unknown adapter.*'nope'"):
        model(ids, adapter_names=["nope"] * 5)


def test_training_mode_with_gradients_is_refused(pair, tokenizer, tmp_path):
    base, _ = pair
    _compress(pair, tokenizer, tmp_path, quantizer="rtn")
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    model.train()
    with pytest.raises(RuntimeError, match=r"inference.*peft-ext compress.*model\.eval\(\)"):
        model(input_ids())
    model.eval()
    assert torch.isfinite(model(input_ids()).logits).all()


# --------------------------------------------------------------------------------------------- bad input
def test_another_base_is_refused_on_load(pair, tokenizer, tmp_path):
    _compress(pair, tokenizer, tmp_path, quantizer="rtn")
    other = make_base(seed=5)
    with pytest.raises(ValueError, match=r"base weights of model\.layers\.0\..* differ .* compressed against"):
        PeftModel.from_pretrained(other, tmp_path)
    smaller = make_base(hidden=32)
    with pytest.raises((ValueError, RuntimeError), match=r"differ|shape|size mismatch"):
        PeftModel.from_pretrained(smaller, tmp_path)


def test_architectures_must_match(pair):
    base, _ = pair
    with pytest.raises(ValueError, match=r"shape .* in the base but .* in the fine-tune"):
        compress_delta(base, make_base(hidden=32), quantizer="rtn", progress=False)


def test_nan_weights_name_the_module(pair):
    base, ft = pair
    broken = copy.deepcopy(ft)
    with torch.no_grad():
        broken.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight holds NaN or inf in the fine-tuned"):
        compress_delta(base, broken, budget=BUDGET, bands=BANDS, group_size=GROUP, quantizer="rtn", progress=False)


def test_budget_too_small_for_the_bands(pair):
    base, ft = pair
    with pytest.raises(ValueError, match=r"budget 0\.0625 .*raise budget"):  # the paper's 2 + 32 fixed bands, as given
        compress_delta(base, ft, budget="1/16", bands=PAPER, quantizer="rtn", progress=False)


def test_the_default_bands_fit_a_small_model(pair, tmp_path):
    """The defaults (budget 1/16, bands "scaled", group 128) on 64-wide layers: before the fix the paper's fixed
    bands, set for 4096-wide matrices, did not fit and the default raised; get_peft_model's default config too."""
    from peft import get_peft_model

    from peft_ext.testing.models import MODELS

    base, ft = pair
    result = compress_delta(base, ft, tmp_path, quantizer="rtn", progress=False)
    assert result.config.bands == "scaled" and len(result.layers) == 14
    for row in result.layers:
        assert row["bytes"] <= row["dense_fp16_bytes"] / 16 and row["bands"][0] == [1, 8], row
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        ids = input_ids()
        assert (model(ids).logits - ft(ids).logits).norm() < (base(ids).logits - ft(ids).logits).norm()
    tiny = get_peft_model(MODELS["llama"].make(0), peft_ext.DeltaComeConfig(task_type="CAUSAL_LM"))
    assert torch.isfinite(tiny(**MODELS["llama"].inputs()).logits).all()


def test_no_delta(pair):
    base, _ = pair
    with pytest.raises(ValueError, match="no delta"):
        compress_delta(base, copy.deepcopy(base), budget=BUDGET, bands=BANDS, group_size=GROUP, quantizer="rtn", progress=False)


def test_gptq_without_tokenizer_says_what_to_pass(pair):
    base, ft = pair
    with pytest.raises(ValueError, match=r"tokenizer=.*quantizer='rtn'"):
        compress_delta(base, ft, budget=BUDGET, bands=BANDS, group_size=GROUP, progress=False)


def test_pickled_checkpoint_folder_is_refused(pair, tmp_path):
    base, ft = pair
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "ft").mkdir()
    torch.save(ft.state_dict(), tmp_path / "ft" / "pytorch_model.bin")
    (tmp_path / "ft" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*pickled checkpoints are never loaded"):
        compress_delta(tmp_path / "base", tmp_path / "ft", quantizer="rtn", progress=False)


def test_top_level_name():
    assert peft_ext.compress_delta is compress_delta


def test_the_loaded_adapter_runs_the_triton_kernels_under_the_interpreter(pair, tokenizer, tmp_path, monkeypatch):
    """The tuner's forward and mixed batches go through peft_ext.kernels' Triton path (TRITON_INTERPRET=1 on the
    CPU) and give the reference's outputs: the layers hold slot layouts (SlotDelta), so the fused decode (15 rows)
    and the gathered slot kernels (mixed batch) run, never the bit-plane kernels."""
    pytest.importorskip("triton")
    from peft_ext.kernels import delta as delta_kernels
    from peft_ext.kernels import delta_decode

    base, ft = pair
    _compress(pair, tokenizer, tmp_path / "a", quantizer="rtn")
    compress_delta(base, make_finetune(base, seed=3), tmp_path / "b", budget=BUDGET, bands=BANDS, group_size=GROUP,
                   quantizer="rtn", progress=False)
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.eval()
    ids, names = input_ids(batch=3, length=5), ["b", "__base__", "a"]
    with torch.no_grad():
        reference = model(ids).logits, model(ids, adapter_names=names).logits
        launches, bitplanes = [], []
        for name in ("_slot_delta_shrink_kernel", "_slot_delta_expand_kernel"):
            monkeypatch.setattr(delta_kernels, name, _Counting(getattr(delta_kernels, name), launches))
        for name in ("_slot_shrink_kernel", "_fused_decode_kernel"):
            monkeypatch.setattr(delta_decode, name, _Counting(getattr(delta_decode, name), launches))
        for name in ("_delta_shrink_kernel", "_delta_expand_kernel"):
            monkeypatch.setattr(delta_kernels, name, _Counting(getattr(delta_kernels, name), bitplanes))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        triton = model(ids).logits, model(ids, adapter_names=names).logits
    assert launches, "the Triton kernels did not run"
    assert not bitplanes, "the tuner's layers hold slot layouts: no bit-plane kernel runs"
    for got, want in zip(triton, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _Counting:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


def test_settings_that_cannot_work_fail_before_any_work(pair):
    """Checked from shapes alone: neither error waits for the weights or the calibration (no tokenizer is given,
    which GPTQ would need later)."""
    base, ft = pair
    with pytest.raises(ValueError, match=r"budget 0\.0625 .*raise budget"):
        compress_delta(base, ft, budget=1 / 16, bands=PAPER, progress=False)
    with pytest.raises(ValueError, match=r"dense_modules names modules .*model\.nope"):
        compress_delta(base, ft, budget=BUDGET, bands=BANDS, group_size=GROUP, dense_modules=["model.nope"], progress=False)


def test_tied_embeddings_in_memory_match_their_saved_folder(tmp_path):
    """An in-memory model lists lm_head.weight (tied to the embeddings); save_pretrained does not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    ft = make_finetune(base)
    ft.save_pretrained(tmp_path / "ft")
    result = compress_delta(base, tmp_path / "ft", method="lowrank", budget=1 / 8, progress=False)
    assert len(result.layers) == 7 and not any("lm_head" in r["module"] for r in result.layers)


def test_tenants_with_different_group_sizes_share_a_batch(pair, tokenizer, tmp_path):
    base, ft = pair
    compress_delta(base, ft, tmp_path / "g32", budget=BUDGET, bands=BANDS, group_size=32, quantizer="rtn", progress=False)
    compress_delta(base, make_finetune(base, seed=9), tmp_path / "g16", budget=BUDGET, bands=BANDS, group_size=16,
                   quantizer="rtn", progress=False)
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "g32", adapter_name="g32")
    model.load_adapter(tmp_path / "g16", adapter_name="g16")
    model.eval()
    ids, names = input_ids(batch=3), ["g16", "g32", "g16"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        single = {}
        for name in ("g32", "g16"):
            model.set_adapter(name)
            single[name] = model(ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single[name][row], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_a_bf16_model_on_cuda_runs_the_compiled_kernels(pair, tokenizer, tmp_path, monkeypatch):
    """On the GPU: the loaded adapter in a bf16 model (Triton kernels) against the same model on the reference."""
    from peft_ext.kernels import delta as delta_kernels

    base, _ = pair
    _compress(pair, tokenizer, tmp_path / "a", quantizer="rtn")
    compress_delta(base, make_finetune(base, seed=3), tmp_path / "b", budget=BUDGET, bands=BANDS, group_size=GROUP,
                   quantizer="rtn", progress=False)
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model = model.to("cuda", torch.bfloat16).eval()
    ids, names = input_ids(batch=3, length=7).cuda(), ["b", "__base__", "a"]
    with torch.no_grad():
        got = model(ids).logits.float(), model(ids, adapter_names=names).logits.float()
        monkeypatch.setattr(delta_kernels, "choose_backend", lambda x, rank, backend=None: "reference")
        want = model(ids).logits.float(), model(ids, adapter_names=names).logits.float()
    for g, w in zip(got, want):
        assert float((g - w).norm() / w.norm()) < 2e-2
