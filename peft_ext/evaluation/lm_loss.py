"""Language-model loss on real text: the mean negative log-likelihood per predicted token (log of perplexity).

A rise after fine-tuning measures forgetting of general language ability, which a change of answer format
cannot hide.
"""

from __future__ import annotations

from .batching import mean_token_nll


def lm_loss(model, tokenizer, texts, max_length: int = 128, batch_size: int = 8) -> float:
    """Mean token NLL (nats) over all `texts`, each cut to its first `max_length` tokens; tokens weigh equally."""
    encoded = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts]
    encoded = [seq for seq in encoded if len(seq) >= 2]  # a single token predicts nothing
    if not encoded:
        raise ValueError("lm_loss needs at least one text of two or more tokens")
    return mean_token_nll(model, tokenizer, [(seq, 1) for seq in encoded], batch_size)
