"""Adapter files hold deltas relative to the base; round trips are bit-exact in every dtype."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_ext import HftConfig


def _train_one_step(model, input_ids, lr=1e-4):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids, labels=input_ids).loss.backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("save_format", ["delta", "full"])
@pytest.mark.parametrize("strategy", ["matrix", "param"])
def test_round_trip_is_bit_exact(llama, input_ids, tmp_path, dtype, save_format, strategy):
    model = get_peft_model(llama().to(dtype), HftConfig(save_format=save_format, strategy=strategy))
    _train_one_step(model, input_ids)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    kinds = {k.split(".hft_")[1].split(".")[0] for k in tensors}
    if save_format == "full":
        assert kinds <= {"weight", "index"}
    elif dtype == torch.bfloat16:  # deltas of 16-bit weights are exact in fp32: every tensor is a delta
        assert "weight" not in kinds and "delta" in kinds
        assert all(t.dtype == torch.float32 for k, t in tensors.items() if ".hft_delta." in k)
    loaded = PeftModel.from_pretrained(llama().to(dtype), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)


def test_deltas_are_the_fine_tune_change(llama, input_ids, tmp_path):
    model = get_peft_model(llama().to(torch.bfloat16), HftConfig())
    _train_one_step(model, input_ids, lr=1e-2)  # bf16 weights: a 1e-4 step would round away on the norms
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if ".hft_delta." in k and "_proj" in k)
    module = model.get_submodule(key.split(".hft_delta.")[0])
    delta = tensors[key]
    expected = module.hft_weight["default"]["weight"].float() - module.get_base_layer().weight.float()
    assert torch.equal(delta, expected) and delta.abs().max() > 0
