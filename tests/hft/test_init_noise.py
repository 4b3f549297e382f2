"""init_weights=False: the non-identity start follows torch's seed and differs between adapters (issue 11 item 15)."""

import copy

import torch
from peft import get_peft_model

from peft_ext import HftConfig


def _copies(model, adapter):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".hft_weight.{adapter}." in n}


def _noisy(llama, torch_seed, config=None):
    model = llama()
    torch.manual_seed(torch_seed)
    return get_peft_model(model, config or HftConfig(init_weights=False, ratio=1.0))


def test_two_adapters_from_one_config_start_differently(llama):
    config = HftConfig(init_weights=False, ratio=1.0)
    model = get_peft_model(llama(), copy.deepcopy(config), adapter_name="a")
    model.add_adapter("b", copy.deepcopy(config))
    a, b = _copies(model, "a"), _copies(model, "b")
    assert len(a) == len(b) > 0
    assert not any(torch.equal(a[n], b[n.replace(".hft_weight.a.", ".hft_weight.b.")]) for n in a)


def test_noise_follows_torch_manual_seed(llama):
    first, again, other = _noisy(llama, 1), _noisy(llama, 1), _noisy(llama, 2)
    a, b, c = _copies(first, "default"), _copies(again, "default"), _copies(other, "default")
    assert all(torch.equal(a[n], b[n]) for n in a)  # reproducible under the same torch seed
    assert not any(torch.equal(a[n], c[n]) for n in a)
    base = dict(llama().named_parameters())
    base_name = lambda n: n.replace("base_model.model.", "").replace(".hft_weight.default", "")  # noqa: E731
    assert not any(torch.equal(t, base[base_name(n)]) for n, t in a.items())


def test_an_adapter_does_not_depend_on_the_adapters_beside_it(llama):
    """Contract item 5: an adapter built with its own seed equals a model that holds only it."""
    torch.manual_seed(0)
    model = get_peft_model(llama(), HftConfig(init_weights=False, seed=0), adapter_name="a")
    model.add_adapter("b", HftConfig(init_weights=False, seed=1))
    torch.manual_seed(0)
    only_b = get_peft_model(llama(), HftConfig(init_weights=False, seed=1), adapter_name="b")
    b, expected = _copies(model, "b"), _copies(only_b, "b")
    assert b.keys() == expected.keys() and all(torch.equal(b[n], expected[n]) for n in b)
