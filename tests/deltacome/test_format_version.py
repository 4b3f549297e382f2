"""The saved format's version (DeltaComeConfig.format_version): folders written before the field load as version 1,
an unknown version fails with the version and the fix, and a loaded folder runs the fused decode kernel (Triton
interpreter) on the version-2 slot layout its layers hold (converted at load), matching the reference."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from peft_ext.compression import compress_delta
from peft_ext.kernels import delta_decode
from peft_ext.tuners.deltacome.config import DeltaComeConfig

from .conftest import BANDS, BUDGET, GROUP, input_ids


@pytest.fixture(scope="module")
def folder(pair, tokenizer, tmp_path_factory):
    base, ft = pair
    path = tmp_path_factory.mktemp("deltacome")
    compress_delta(base, ft, path, budget=BUDGET, bands=BANDS, group_size=GROUP, tokenizer=tokenizer, quantizer="rtn",
                   calibration_seq_len=32, calibration_samples=8, progress=False)  # fmt: skip
    return path


def _rewrite_config(src, dst, change):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    change(cfg)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))


def test_new_folders_say_version_1_and_old_ones_load_as_it(pair, folder, tmp_path):
    base, _ = pair
    assert json.loads((folder / "adapter_config.json").read_text())["format_version"] == 1
    old = tmp_path / "old"
    _rewrite_config(folder, old, lambda cfg: cfg.pop("format_version"))  # as written before the field existed
    ids = input_ids()
    with torch.no_grad():
        y_new = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()(ids).logits
        model = PeftModel.from_pretrained(copy.deepcopy(base), old).eval()
        assert model.peft_config["default"].format_version == 1
        torch.testing.assert_close(model(ids).logits, y_new, rtol=0, atol=0)


def test_an_unknown_version_names_it_and_the_fix(pair, folder, tmp_path):
    base, _ = pair
    future = tmp_path / "future"
    _rewrite_config(folder, future, lambda cfg: cfg.update(format_version=3))
    with pytest.raises(ValueError, match=r"format_version=3.*format version 1 \(bit planes\).*compress the fine-tune again"):
        PeftModel.from_pretrained(copy.deepcopy(base), future)
    with pytest.raises(ValueError, match="format_version=2"):
        DeltaComeConfig(format_version=2)


def test_a_loaded_folder_decodes_with_the_fused_kernel(pair, folder, monkeypatch):
    """One token per sequence (decode): every Delta-CoMe layer runs the fused kernel on the slot layout it holds
    (converted from the version-1 files at load); the logits match the plain-PyTorch path."""
    base, _ = pair
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    ids = input_ids(batch=2, length=1)
    with torch.no_grad():
        ref = model(ids).logits  # CPU without the interpreter: the reference
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        launches = []
        real = delta_decode.fused_decode
        monkeypatch.setattr("peft_ext.kernels.delta.fused_decode", lambda *a: launches.append(1) or real(*a))
        y = model(ids).logits
    assert len(launches) == 14  # 7 linear layers x 2 blocks
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
