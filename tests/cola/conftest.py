"""Fixtures for the COLA and LoRA-acceleration tests: tiny models built in-process, one CPU thread, and Triton's
interpreter switched on per test (the way tests/kernels does it: monkeypatch, so nothing leaks to other tests).

One thread: on the shared 2-core machine OpenMP's second thread is often descheduled, and ops with a parallel
region (index_add, ...) then wait on it (10 000x slower here); these tiny models gain nothing from it anyway.
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (tests/conftest.py's `one_thread`)."""
    yield


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run peft_ext.kernels' Triton kernels on the CPU through Triton's interpreter for this test."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from peft_ext.kernels import interpret_mode

    assert interpret_mode()
    yield


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the dense (`shrink_expand`) and gathered Triton kernels."""
    from peft_ext.kernels import lowrank, lowrank_gathered

    calls = {"dense": 0, "gathered": 0}
    shrink_expand = lowrank.shrink_expand

    def counting_shrink_expand(*args, **kwargs):
        calls["dense"] += 1
        return shrink_expand(*args, **kwargs)

    class CountingKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            calls["gathered"] += 1
            return self.kernel[grid]

    monkeypatch.setattr(lowrank, "shrink_expand", counting_shrink_expand)
    monkeypatch.setattr(
        lowrank_gathered, "_gathered_shrink_expand_kernel", CountingKernel(lowrank_gathered._gathered_shrink_expand_kernel)
    )
    return calls


@pytest.fixture
def llama():
    return tiny_llama


@pytest.fixture
def gpt2():
    return tiny_gpt2


@pytest.fixture
def models():
    return MODELS
