"""Multiple-choice accuracy by log-likelihood, as evaluation harnesses score MMLU-style questions.

Each option is scored by the summed log-probability of its tokens after the question; the highest wins. Unlike
greedy generation and exact match, this cannot be faked by a change of answer format (a model fine-tuned on
one-word answers still ranks the options by what it knows).
A probe is a dict: {"question": str, "options": [str, ...], "answer": index of the right option}.
The question is run once per probe and its key/value cache shared by the options (a 2-3x saving: questions
are most of the tokens).
"""

from __future__ import annotations

import torch

from .batching import pad_id_of, pad_left, pad_right, scoring


def encode_option(tokenizer, question: str, option: str) -> tuple[list[int], list[int]]:
    """(question token ids, option token ids), split the way lm-evaluation-harness does.

    The option is tokenized in context (the whole text, minus the question's tokens), so tokenizers that merge
    across the space see the same text as in training.
    """
    context = question.rstrip(" ")
    continuation = " " + option.lstrip(" ")
    context_ids = tokenizer(context).input_ids
    if not context_ids:
        raise ValueError(f"a multiple-choice question must not be empty (option {option!r})")
    option_ids = tokenizer(context + continuation).input_ids[len(context_ids) :]
    if not option_ids:  # the option merged into the question's last token: tokenize it on its own
        option_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    return context_ids, option_ids


def _probe_chunks(probes, batch_size: int):
    """Consecutive runs of probes with at most `batch_size` options in all (at least one probe each)."""
    chunk, size = [], 0
    for index, probe in enumerate(probes):
        if chunk and size + len(probe["options"]) > batch_size:
            yield chunk
            chunk, size = [], 0
        chunk.append(index)
        size += len(probe["options"])
    if chunk:
        yield chunk


def _score_chunk(model, device, pad_id, encoded) -> list[list[float]]:
    """Scores of the options of a few probes: one forward of the questions, one of all the options."""
    contexts = [options[0][0] for options in encoded]
    context_ids, context_mask = pad_left(contexts, pad_id)  # left: every question ends in the last column
    out = model(
        input_ids=context_ids.to(device),
        attention_mask=context_mask.to(device),
        position_ids=_positions(context_mask).to(device),
        use_cache=True,
    )
    rows = torch.tensor([p for p, options in enumerate(encoded) for _ in options])
    first = out.logits[:, -1].float().log_softmax(-1).cpu()[rows]  # predicts each option's first token
    cache = out.past_key_values
    cache.reorder_cache(rows.to(device))  # one copy of its question's keys/values per option
    option_ids, option_mask = pad_right([ids for options in encoded for _, ids in options], pad_id)
    mask = torch.cat([context_mask[rows], option_mask], dim=1)
    logits = model(
        input_ids=option_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=_positions(mask)[:, context_mask.shape[1] :].to(device),
        past_key_values=cache,
        use_cache=True,  # else a model whose config says use_cache=False (as some trainers leave it) drops the cache
    ).logits
    rest = logits[:, :-1].float().log_softmax(-1).cpu().gather(-1, option_ids[:, 1:, None]).squeeze(-1)
    scores, row = [], 0
    for options in encoded:
        scores.append([])
        for _, ids in options:
            scores[-1].append(first[row, ids[0]].item() + rest[row, : len(ids) - 1].sum().item())
            row += 1
    return scores


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding must not shift the real tokens' positions


def option_scores(model, tokenizer, probes, batch_size: int = 64) -> list[list[float]]:
    """Summed log-likelihood of every option of every probe: one list of floats per probe.

    `batch_size` bounds the options scored in one forward.
    """
    probes = list(probes)
    encoded = [[encode_option(tokenizer, p["question"], o) for o in p["options"]] for p in probes]
    scores: list[list[float]] = []
    pad_id = pad_id_of(tokenizer)
    with scoring(model) as device:
        for chunk in _probe_chunks(probes, batch_size):
            scores.extend(_score_chunk(model, device, pad_id, [encoded[i] for i in chunk]))
    return scores


def predictions(model, tokenizer, probes, batch_size: int = 64) -> list[int]:
    """The index of the best-scoring option of each probe."""
    return [max(range(len(s)), key=s.__getitem__) for s in option_scores(model, tokenizer, probes, batch_size)]


def multiple_choice_accuracy(model, tokenizer, probes, batch_size: int = 64) -> float:
    """Fraction of probes whose right option has the highest summed log-likelihood."""
    probes = list(probes)
    if not probes:
        raise ValueError("multiple_choice_accuracy needs at least one probe")
    chosen = predictions(model, tokenizer, probes, batch_size)
    return sum(c == p["answer"] for c, p in zip(chosen, probes)) / len(probes)
