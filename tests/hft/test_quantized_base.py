"""A bitsandbytes 4-bit base has no full-precision weights for HFT to train: refused before anything changes."""

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_ext import HftConfig


@pytest.mark.parametrize("quantization", [dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), dict(load_in_8bit=True)])
def test_quantized_base_is_refused_with_the_fix(llama, tmp_path, quantization):
    llama(layers=2).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(**quantization), device_map="cpu", dtype=torch.float32
    )
    kinds = {type(m.weight).__name__ for m in model.modules() if hasattr(m, "weight")}
    assert kinds & {"Params4bit", "Int8Params"}  # the base really is quantised
    with pytest.raises(ValueError, match=r"cannot train bitsandbytes-quantised layers.*Load the model in bf16 or fp32"):
        get_peft_model(model, HftConfig())
    assert not any("hft" in n for n, _ in model.named_modules())


def test_norms_of_a_quantised_base_can_still_be_trained(llama, tmp_path):
    llama(layers=2, hidden=64, intermediate=128).save_pretrained(tmp_path)  # bnb's CPU 4-bit matmul needs >= 64
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu", dtype=torch.float32
    )
    peft_model = get_peft_model(model, HftConfig(target_modules=["input_layernorm", "post_attention_layernorm"]))
    selected = peft_model.peft_config["default"].selected_modules
    assert [n.split(".")[2] for n in selected] == ["0", "1"]  # one norm per block
    assert all(n.endswith("layernorm") for n in selected)
    x = torch.randint(0, 64, (2, 6))
    peft_model(x, labels=x).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
