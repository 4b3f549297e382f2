"""Padded batches of token ids for scoring a causal LM, and the scoring context (eval mode, no autograd)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with the padding first, so that every sequence ends in the last column."""
    ids, mask = pad_right([s[::-1] for s in sequences], pad_id)
    return ids.flip(1), mask.flip(1)


def pad_id_of(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # masked out anyway


@contextmanager
def scoring(model):
    """Eval mode and no autograd for the duration; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1: shape (batch, T-1), in fp32."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def mean_token_nll(model, tokenizer, sequences: list[tuple[list[int], int]], batch_size: int) -> float:
    """Mean negative log-likelihood (nats) of the tokens of each (ids, start) in `sequences` from position `start`
    on (start >= 1: the first token predicts nothing); every scored token weighs the same."""
    total, count = 0.0, 0
    pad_id = pad_id_of(tokenizer)
    with scoring(model) as device:
        for first in range(0, len(sequences), batch_size):
            chunk = sequences[first : first + batch_size]
            ids, mask = pad_right([seq for seq, _ in chunk], pad_id)
            logprobs = token_logprobs(model, ids.to(device), mask.to(device)).cpu()
            scored = mask[:, 1:].bool()
            for row, (_, start) in enumerate(chunk):
                scored[row, : start - 1] = False  # logprobs[:, t] predicts token t + 1
            total -= logprobs[scored].sum().item()
            count += int(scored.sum())
    return total / count
