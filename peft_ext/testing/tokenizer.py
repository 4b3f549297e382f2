"""A char-level tokenizer built in-process (no Hub): WordLevel over single characters, wrapped for transformers.

It has a pad, an eos and an unk token and a minimal chat template, which is all TRL's SFT and DPO trainers need.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<eos>", "<unk>", "<bos>"]
CHARS = string.ascii_lowercase + string.digits + " .,?!:'-\n" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# a chat template in the simplest form: "<role>: <text>\n" per message, eos after each assistant turn
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def vocab() -> dict[str, int]:
    tokens = SPECIAL + [c for c in dict.fromkeys(CHARS)]
    return {t: i for i, t in enumerate(tokens)}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer (vocabulary size `len(vocab())`, < 100)."""
    raw = Tokenizer(models.WordLevel(vocab=vocab(), unk_token="<unk>"))
    # every character is a token; special tokens are matched whole before this split runs
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>",
        model_max_length=64,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


VOCAB_SIZE = len(vocab())
