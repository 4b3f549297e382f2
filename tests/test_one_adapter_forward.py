"""The forward protocol HFT and Delta-CoMe layers share (peft_ext.tuners.one_adapter_forward): one adapter, one per row,
or several active at once, computed as merging them all would (W0 plus each adapter's change; before, the forward
refused what merge_adapter() stacked); a layer without a stacked forward refuses with the fix named; Delta-CoMe
refuses a training forward."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_ext
from peft_ext.tuners.base import PeftExtLayer
from peft_ext.tuners.deltacome.dense_layer import DeltaComeDense
from peft_ext.tuners.one_adapter_forward import OneAdapterForward


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
def test_two_active_adapters_run_as_merged_and_one_per_row_works(method):
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
        y_both = model(IDS).logits
        assert not torch.allclose(y_both, y_a) and not torch.allclose(y_both, y_b)
        model.merge_adapter()
        torch.testing.assert_close(model(IDS).logits, y_both, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()

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
        dense.set_adapter(["one", "two"])  # W0 + (W_one - W0) + (W_two - W0)
        w0 = dense.get_base_layer().weight
        stacked = weight + (dense.deltacome_dense["two"]["weight"] - w0)
        torch.testing.assert_close(dense(x), torch.nn.functional.rms_norm(x, (32,), stacked, eps))
        torch.testing.assert_close(dense(x, adapter_names=["__base__", "one"])[1], y_a[1])
    dense.train()
    with pytest.raises(RuntimeError, match=r"cannot be trained .*LlamaRMSNorm.*call model.eval\(\)"):
        dense(x, adapter_names=["one", "two"])
    with torch.no_grad():  # inference under no_grad is fine even in training mode
        dense.set_adapter("one")
        torch.testing.assert_close(dense(x), y_a)


class _OneAtATime(OneAdapterForward, PeftExtLayer):
    """A layer of the protocol that does not define a stacked forward: two active adapters are refused."""

    adapter_layer_names = ("toy_value",)
    method_label = "Toy"

    def update_layer(self, adapter_name):
        self.toy_value[adapter_name] = torch.nn.Linear(1, 1)

    def _single_forward(self, adapter_name, x, *args, **kwargs):
        return self.base_layer(x) + 1


def test_a_layer_without_a_stacked_forward_refuses_two_active_adapters():
    layer = _OneAtATime(torch.nn.Linear(4, 4), "one")
    layer.update_layer("one")
    layer.update_layer("two")
    layer.set_adapter(["one", "two"])
    with pytest.raises(ValueError, match=r"Toy runs one adapter at a time, but \[.one., .two.\] are active on Linear: "
                                         r"call model.set_adapter\(name\) with one name, or pass adapter_names="):
        layer(torch.randn(2, 4))
    layer.set_adapter("one")
    torch.testing.assert_close(layer(torch.ones(2, 4)), layer.base_layer(torch.ones(2, 4)) + 1)

