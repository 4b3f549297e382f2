"""A base / fine-tune pair whose deltas look like a fine-tune's: a long-tailed singular spectrum per layer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_ext.data.tiny_model import char_tokenizer

BUDGET = 1 / 4
BANDS = [[2, 8], [8, 3], [None, 2]]
GROUP = 32


def make_base(seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
        bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def make_finetune(base: LlamaForCausalLM, seed: int = 1, scale: float = 0.3) -> LlamaForCausalLM:
    """base + U diag(s) V^T per block linear layer (s decaying from 1 to 1e-3, times `scale` of the weight's
    norm), and slightly changed norms; embeddings and head unchanged."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in ft.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                out_f, in_f = module.weight.shape
                k = min(out_f, in_f)
                u = torch.linalg.qr(torch.randn(out_f, k, generator=g))[0]
                v = torch.linalg.qr(torch.randn(in_f, k, generator=g))[0]
                s = torch.logspace(0, -3, k)
                delta = (u * s) @ v.T
                module.weight += delta * (scale * module.weight.norm() / delta.norm())
            elif "Norm" in type(module).__name__:
                module.weight += 0.01 * torch.randn(module.weight.shape, generator=g)
    return ft.eval()


@pytest.fixture(scope="module")
def pair():
    base = make_base()
    return base, make_finetune(base)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def input_ids(seed: int = 0, batch: int = 3, length: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 90, (batch, length), generator=g)
