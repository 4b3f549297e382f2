"""A tiny random-init Llama and a character tokenizer, built in-process: the "tiny-llama" model of tests and recipes.

Everything is deterministic (fixed seed, fixed vocabulary), so two calls give bit-identical models: a test can
train an adapter on one and reload it onto another.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
CHARACTERS = sorted(set(string.printable) - set("\x0b\x0c\r"))


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (anything else is <unk>); no merges, so counts are easy to check."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    # the same two-role format as SmolLM2's template, so conversational data works on the tiny model too
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, tokenizer): a 2-layer Llama (hidden 32) with random weights drawn from `seed`."""
    tokenizer = char_tokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    return model.to(dtype), tokenizer
