"""HftLayer as PEFT and user code see it (issue 11 item 13)."""

import pytest
import torch
from peft import get_peft_model

from peft_ext import HftConfig
from peft_ext.tuners.hft import HftLayer


@pytest.mark.parametrize("strategy", ["matrix", "param"])
def test_linear_like_layers_expose_in_and_out_features(llama, gpt2, strategy):
    """nn.Linear and GPT-2's Conv1D (weight stored as (in, out)): the base layer's logical shape."""
    for make in (llama, gpt2):
        model = get_peft_model(make(), HftConfig(ratio=1.0, strategy=strategy, train_norms=False))
        layers = [m for m in model.modules() if isinstance(m, HftLayer)]
        assert layers
        for layer in layers:
            base = layer.get_base_layer()
            shape = base.weight.shape if isinstance(base, torch.nn.Linear) else base.weight.shape[::-1]  # Conv1D
            out_features, in_features = shape
            assert (layer.in_features, layer.out_features) == (in_features, out_features)


def test_norm_layers_have_no_linear_features(llama):
    model = get_peft_model(llama(), HftConfig(target_modules=["input_layernorm"], ratio=1.0))
    layers = [m for m in model.modules() if isinstance(m, HftLayer)]
    assert layers and not any(hasattr(m, "in_features") for m in layers)
