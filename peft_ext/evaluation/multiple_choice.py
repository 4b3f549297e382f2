"""Multiple-choice accuracy by log-likelihood, as evaluation harnesses score MMLU-style questions.

Each option is scored by the summed log-probability of its tokens after the question; the highest wins. Unlike
greedy generation and exact match, this cannot be faked by a change of answer format (a model fine-tuned on
one-word answers still ranks the options by what it knows).
A probe is a dict: {"question": str, "options": [str, ...], "answer": index of the right option}.
"""

from __future__ import annotations

from .batching import pad_id_of, pad_right, scoring, token_logprobs


def encode_option(tokenizer, question: str, option: str) -> tuple[list[int], int]:
    """(token ids of question + " " + option, how many of them are the question's).

    The option is tokenized in context (the way lm-evaluation-harness does) so that tokenizers which merge
    across the space see the same text as in training.
    """
    context = question.rstrip(" ")
    continuation = " " + option.lstrip(" ")
    whole = tokenizer(context + continuation).input_ids
    n_context = len(tokenizer(context).input_ids)
    if n_context == 0:
        raise ValueError(f"a multiple-choice question must not be empty (option {option!r})")
    if n_context >= len(whole):  # the option merged into the question's last token: score it on its own
        return tokenizer(context).input_ids + tokenizer(continuation, add_special_tokens=False).input_ids, n_context
    return whole, n_context


def option_scores(model, tokenizer, probes, batch_size: int = 16) -> list[list[float]]:
    """Summed log-likelihood of every option of every probe: one list of floats per probe."""
    pairs = [(i, encode_option(tokenizer, p["question"], o)) for i, p in enumerate(probes) for o in p["options"]]
    scores: list[list[float]] = [[] for _ in probes]
    pad_id = pad_id_of(tokenizer)
    with scoring(model) as device:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            ids, mask = pad_right([seq for _, (seq, _) in chunk], pad_id)
            logprobs = token_logprobs(model, ids.to(device), mask.to(device)).cpu()
            for row, (probe_index, (seq, n_context)) in enumerate(chunk):
                # logprobs[:, t - 1] predicts token t; the option is tokens n_context .. len(seq) - 1
                scores[probe_index].append(logprobs[row, n_context - 1 : len(seq) - 1].sum().item())
    return scores


def predictions(model, tokenizer, probes, batch_size: int = 16) -> list[int]:
    """The index of the best-scoring option of each probe."""
    return [max(range(len(s)), key=s.__getitem__) for s in option_scores(model, tokenizer, probes, batch_size)]


def multiple_choice_accuracy(model, tokenizer, probes, batch_size: int = 16) -> float:
    """Fraction of probes whose right option has the highest summed log-likelihood."""
    probes = list(probes)
    if not probes:
        raise ValueError("multiple_choice_accuracy needs at least one probe")
    chosen = predictions(model, tokenizer, probes, batch_size)
    return sum(c == p["answer"] for c, p in zip(chosen, probes)) / len(probes)
