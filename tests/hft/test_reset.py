"""reset_fraction: the paper's pilot observation as a utility."""

import pytest
import torch
from peft import get_peft_model

from peft_ext import HftConfig, reset_fraction


def _trained_hft(llama):
    model = get_peft_model(llama(), HftConfig(ratio=1.0, train_norms=False, init_weights=False))
    return model


def _is_base(layer, pname):
    return torch.equal(layer.hft_weight["default"][pname], getattr(layer.get_base_layer(), pname))


def test_matrix_reset_restores_whole_tensors_of_an_hft_adapter(llama):
    model = _trained_hft(llama)
    layers = dict(model.base_model.hft_layers("default"))
    assert not any(_is_base(m, "weight") for m in layers.values())
    reset = reset_fraction(model, 0.5, seed=0)
    assert len(reset) == len(layers) // 2
    for name, layer in layers.items():
        assert _is_base(layer, "weight") == (f"{name}.weight" in reset)
    assert reset_fraction(_trained_hft(llama), 0.5, seed=0) == reset  # seeded


def test_element_reset_restores_about_the_fraction_of_entries(llama):
    model = _trained_hft(llama)
    reset_fraction(model, 0.3, seed=0, granularity="element")
    same = total = 0
    for _, layer in model.base_model.hft_layers():
        w = layer.hft_weight["default"]["weight"]
        same += (w == layer.get_base_layer().weight).sum().item()
        total += w.numel()
    assert 0.25 < same / total < 0.35


def test_reset_of_a_plain_fine_tuned_model_against_its_reference(llama):
    base, tuned = llama(seed=0), llama(seed=0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1.0)
    reset = reset_fraction(tuned, 1.0, reference=base)
    assert reset == sorted(n for n, _ in tuned.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(tuned.parameters(), base.parameters()))


def test_reset_of_a_param_strategy_adapter_uses_the_selected_rows(llama):
    model = get_peft_model(llama(), HftConfig(strategy="param", init_weights=False))
    reset_fraction(model, 1.0)
    for _, layer in model.base_model.hft_layers():
        effective = layer.adapted_parameters("default")
        assert all(torch.equal(t, getattr(layer.get_base_layer(), n)) for n, t in effective.items())


@pytest.mark.parametrize("kwargs, pattern", [(dict(fraction=1.5), "fraction"), (dict(fraction=0.5, granularity="row"), "granularity")])
def test_reset_bad_arguments(llama, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        reset_fraction(_trained_hft(llama), **kwargs)


def test_reset_of_a_model_without_hft_needs_a_reference(llama):
    with pytest.raises(ValueError, match="reference="):
        reset_fraction(llama(), 0.5)
