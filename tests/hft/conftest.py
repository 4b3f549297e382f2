import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(layers: int = 4, seed: int = 0, hidden: int = 32, intermediate: int = 48) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=64)).eval()


@pytest.fixture
def llama():
    return tiny_llama


@pytest.fixture
def gpt2():
    return tiny_gpt2


@pytest.fixture
def input_ids():
    return torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
