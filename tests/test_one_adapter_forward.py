"""The forward protocol HFT and Delta-CoMe layers share (peft_ext.tuners.one_adapter_forward): one adapter at a time
or one per row; two active adapters are refused with the fix named; Delta-CoMe refuses a training forward."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_ext
from peft_ext.tuners.deltacome.dense_layer import DeltaComeDense


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


CONFIGS = {
    "HFT": lambda seed: peft_ext.HftConfig(ratio=0.5, seed=seed),
    "Delta-CoMe": lambda seed: peft_ext.DeltaComeConfig(
        init_weights=False, seed=seed, dense_modules=["model.layers.0.input_layernorm"], budget=1 / 4,
        bands=[[2, 8], [None, 2]], group_size=16,
    ),
}
IDS = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))


def two_adapter_model(method: str):
    model = get_peft_model(tiny_llama(), CONFIGS[method](0), adapter_name="one")
    model.add_adapter("two", CONFIGS[method](1))
    if method == "HFT":  # an HFT adapter equals the base until trained: make the two differ
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".hft_weight." in name:
                    p.add_(0.05 * torch.randn_like(p) * (1 if ".one." in name else -1))
    return model.eval()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_two_active_adapters_are_refused_and_one_per_row_works(method):
    model = two_adapter_model(method)
    with torch.no_grad():
        base = model.get_base_model()
        with model.disable_adapter():
            y_base = model(IDS).logits
        model.set_adapter("one")
        y_a = model(IDS).logits
        model.set_adapter("two")
        y_b = model(IDS).logits
        assert not torch.allclose(y_a, y_b) and not torch.allclose(y_a, y_base)

        model.base_model.set_adapter(["one", "two"])
        with pytest.raises(ValueError, match=rf"{method} runs one adapter at a time, but \[.one., .two.\] are active .*"
                                              r"model.set_adapter\(name\) with one name.*adapter_names="):
            model(IDS)

        y_mixed = model(IDS, adapter_names=["two", "__base__", "one"]).logits
        torch.testing.assert_close(y_mixed[0], y_b[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y_mixed[1], y_base[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y_mixed[2], y_a[2], atol=1e-5, rtol=1e-5)
    assert base is model.get_base_model()


def test_deltacome_dense_modules_follow_the_same_protocol():
    model = two_adapter_model("Delta-CoMe")
    dense = model.get_base_model().model.layers[0].input_layernorm
    assert isinstance(dense, DeltaComeDense)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        dense.set_adapter("one")
        y_a = dense(x)
        weight, eps = dense.deltacome_dense["one"]["weight"], dense.get_base_layer().variance_epsilon
        expected = torch.nn.functional.rms_norm(x, (32,), weight, eps)
        torch.testing.assert_close(y_a, expected)
        dense.set_adapter(["one", "two"])
        refused = r"Delta-CoMe runs one adapter at a time, but \[.one., .two.\] are active on LlamaRMSNorm"
        with pytest.raises(ValueError, match=refused):
            dense(x)
        torch.testing.assert_close(dense(x, adapter_names=["__base__", "one"])[1], y_a[1])
    dense.train()
    with pytest.raises(RuntimeError, match=r"cannot be trained .*LlamaRMSNorm.*call model.eval\(\)"):
        dense(x, adapter_names=["one", "two"])
    with torch.no_grad():  # inference under no_grad is fine even in training mode
        dense.set_adapter("one")
        torch.testing.assert_close(dense(x), y_a)
