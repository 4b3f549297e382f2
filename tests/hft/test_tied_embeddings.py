"""Tied input/output embeddings (GPT-2's wte, Llama with tie_word_embeddings=True): issue 11 item 5.

HFT's trained copy of a tied embedding would replace it only on the input side (the output head reads the shared
weight), and merge_and_unload() would tie them again: the merged model would differ from the trained one. Such a
selection is refused at injection, naming the fix; the fix (untie first, or train the head in modules_to_save)
gives a merged model equal to the trained one."""

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_ext import HftConfig


def _tied_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _models(gpt2):
    return {"gpt2": (lambda: gpt2(), "wte"), "llama": (_tied_llama, "embed_tokens")}


def _train_step(model, input_ids):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids, labels=input_ids).loss.backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("strategy", ["matrix", "explicit"])
def test_a_tied_embedding_is_refused_naming_the_fix(gpt2, kind, strategy):
    make, embedding = _models(gpt2)[kind]
    model = make()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if strategy == "explicit":
        name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        config = HftConfig(strategy="explicit", selected_modules=[name])
    else:
        config = HftConfig(target_modules=[embedding], ratio=1.0)
    with pytest.raises(ValueError, match=rf"{embedding}.*tied to lm_head.*tie_word_embeddings = False"):
        get_peft_model(model, config)
    assert not any("hft" in n for n, _ in model.named_modules())


def _untie(model):
    model.config.tie_word_embeddings = False
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("fix", ["untie", "modules_to_save"])
def test_the_named_fixes_merge_to_the_trained_model(gpt2, input_ids, kind, fix):
    make, embedding = _models(gpt2)[kind]
    model = make()
    if fix == "untie":
        _untie(model)
        config = HftConfig(target_modules=[embedding], ratio=1.0)
    else:
        config = HftConfig(target_modules=[embedding], ratio=1.0, modules_to_save=["lm_head"])
    peft_model = get_peft_model(model, config)
    _train_step(peft_model, input_ids)
    with torch.no_grad():
        trained = peft_model(input_ids).logits
        merged = peft_model.merge_and_unload()(input_ids).logits
    assert not torch.equal(trained, make()(input_ids).logits)
    torch.testing.assert_close(merged, trained, rtol=0, atol=1e-5)
