"""Held-out loss of completions given their prompts: the mean negative log-likelihood per completion token.

A probe is {"prompt": str, "completion": str}; only the completion's tokens are scored (as SFT trains on
prompt-completion data), split from the prompt the way multiple_choice.encode_option splits an option.
"""

from __future__ import annotations

from .batching import mean_token_nll


def _encode(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """(token ids of prompt + completion, index of the first completion token), cut to the last max_length tokens."""
    prompt_ids = tokenizer(prompt).input_ids
    full = tokenizer(prompt + completion).input_ids
    start = len(prompt_ids)
    if full[:start] != prompt_ids:  # the completion merged into the prompt's last token: tokenize it on its own
        full = prompt_ids + tokenizer(completion, add_special_tokens=False).input_ids
    cut = max(0, len(full) - max_length)
    return full[cut:], max(1, start - cut)


def completion_loss(model, tokenizer, probes, max_length: int = 128, batch_size: int = 8) -> float:
    """Mean token NLL (nats) of every probe's completion given its prompt; tokens weigh equally."""
    encoded = [_encode(tokenizer, p["prompt"], p["completion"], max_length) for p in probes]
    encoded = [(ids, start) for ids, start in encoded if len(ids) > start]
    if not encoded:
        raise ValueError("completion_loss needs at least one probe with a non-empty completion")
    return mean_token_nll(model, tokenizer, encoded, batch_size)
