"""The base fingerprint tells a base from its own fine-tune (issue 11, item 23).

A real fine-tune differs from its base by about 1e-3 of the weights' norm, far inside the tolerance that lets a base
reloaded in bf16 / fp16 match the evenly spaced probes: before the fix the fine-tune itself loaded as the base, and
the delta was applied twice, silently. The adapter now also records, per layer, the positions where the fine-tune
differs most from the base (relative to the weight there) with both values, and loading checks which of the two the
weights hold."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

import peft_ext  # noqa: F401  (registers DELTACOME with PEFT)
from peft_ext.compression import compress_delta
from peft_ext.tuners.deltacome.layer import delta_probes

from .conftest import BANDS, BUDGET, GROUP, input_ids, make_base, make_finetune


@pytest.fixture(scope="module")
def close_pair(tmp_path_factory):
    """A base, its fine-tune at 1e-3 of each layer's weight norm (like a real fine-tune), the adapter folder."""
    base = make_base(seed=11)
    ft = make_finetune(base, seed=12, scale=1e-3)
    folder = tmp_path_factory.mktemp("close") / "delta"
    compress_delta(base, ft, folder, budget=BUDGET, bands=BANDS, group_size=GROUP, quantizer="rtn", progress=False)
    return base, ft, folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finetune_itself_is_refused_as_the_base(close_pair, dtype):
    base, ft, folder = close_pair
    rel = (ft.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight).norm()
    assert rel / base.model.layers[0].self_attn.q_proj.weight.norm() < 2e-3  # the old probes cannot see this
    with pytest.raises(ValueError, match=r"model\.layers\.0\..* hold the fine-tune's values.*twice.*base model"):
        PeftModel.from_pretrained(copy.deepcopy(ft).to(dtype), folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_base_still_loads_in_any_precision(close_pair, dtype):
    base, ft, folder = close_pair
    model = PeftModel.from_pretrained(copy.deepcopy(base).to(dtype), folder).eval()
    if dtype == torch.float32:
        with torch.no_grad():
            ids = input_ids()
            y_base, y_ft, y = base(ids).logits, ft(ids).logits, model(ids).logits
        assert (y - y_ft).norm() < 0.5 * (y_base - y_ft).norm()


def test_probes_are_where_the_finetune_differs_most_relative_to_the_weight():
    base = torch.tensor([[0.5, -0.25, 1e-6], [2.0, 0.0, 0.1]])
    delta = torch.tensor([[1e-3, 0.0, 1e-6], [4e-3, 5e-7, -0.05]])
    probes = delta_probes(base, delta, n=3)
    # relative changes: 2e-3, 0, 1 (1e-6 on 1e-6 ... floored), 2e-3, 1 (b = 0), 1 (0.05 on 0.1): the three largest
    assert sorted((r, c) for r, c, _, _ in probes) == [(0, 2), (1, 1), (1, 2)]
    for r, c, b, d in probes:
        assert b == pytest.approx(float(base[r, c])) and d == pytest.approx(float(delta[r, c]))
    assert delta_probes(base, torch.zeros_like(base), n=3) == []  # no change: nothing to probe


def test_adapters_without_delta_probes_still_load(close_pair, tmp_path):
    """Adapters written before the fix have base_probes only: they load as before (the new check is skipped)."""
    import json
    import shutil

    base, ft, folder = close_pair
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    config = json.loads((old / "adapter_config.json").read_text())
    assert config["delta_probes"]
    del config["delta_probes"]
    (old / "adapter_config.json").write_text(json.dumps(config))
    PeftModel.from_pretrained(copy.deepcopy(base), old)
