"""Merging HFT adapters: the merged weights are W0 plus every merged adapter's change, exactly where it applies."""

import pytest
import torch
from peft import get_peft_model

from peft_ext import HftConfig


@pytest.mark.parametrize("strategy", ["param", "matrix"])
def test_two_merged_adapters_add_both_changes_once(llama, input_ids, strategy):
    """Issue 11 item 4: with strategy="param", the second merge counted the first adapter's change twice on the
    rows the second adapter does not own."""
    model = get_peft_model(llama(), HftConfig(strategy=strategy, ratio=1.0 if strategy == "matrix" else 0.5,
                                              init_weights=False, seed=0), adapter_name="a")
    model.add_adapter("b", HftConfig(strategy=strategy, ratio=1.0 if strategy == "matrix" else 0.5,
                                     init_weights=False, seed=1))
    layers = dict(model.base_model.hft_layers())
    expected, originals = {}, {}
    for name, layer in layers.items():
        for pname in layer.hft_weight["a"]:
            w0 = getattr(layer.get_base_layer(), pname).detach().clone()
            deltas = [layer.get_delta_weight(a)[pname] for a in ("a", "b") if a in layer.hft_weight]
            expected[name, pname] = w0 + sum(deltas)
            originals[name, pname] = w0
    model.base_model.merge_adapter(["a", "b"])
    for (name, pname), value in expected.items():
        merged = getattr(layers[name].get_base_layer(), pname)
        torch.testing.assert_close(merged, value, rtol=0, atol=1e-6, msg=f"{name}.{pname}")
    model.base_model.unmerge_adapter()
    for (name, pname), w0 in originals.items():
        assert torch.equal(getattr(layers[name].get_base_layer(), pname), w0)


def test_param_adapter_under_a_merged_one_computes_on_the_pretrained_rows(llama, input_ids):
    """The rows an adapter does not own are the pre-trained ones, even while another adapter is merged."""
    model = get_peft_model(llama(), HftConfig(strategy="param", init_weights=False, seed=0), adapter_name="a")
    model.add_adapter("b", HftConfig(strategy="param", init_weights=False, seed=1))
    model.set_adapter("b")
    layer = next(layer for _, layer in model.base_model.hft_layers())
    before = {n: t.detach().clone() for n, t in layer.adapted_parameters("b").items()}
    model.base_model.merge_adapter(["a"])
    after = layer.adapted_parameters("b")
    assert all(torch.equal(after[n], before[n]) for n in before)
