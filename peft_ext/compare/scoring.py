"""A comparison's scorers: the evaluation data turned into probes for one of peft_ext.evaluation's scorers.

    exact_match       greedy generation == reference    prompt + completion, or messages ending in an assistant turn
    multiple_choice   right option most likely           question + options + answer, or preference data (chosen
                                                          vs rejected: the preference accuracy)
    loss              held-out NLL per token (lower       text (every token), prompt + completion / messages /
                      is better)                          preference (the completion or chosen answer's tokens)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from peft_ext.evaluation import completion_loss, exact_match, lm_loss, multiple_choice_accuracy

SCORERS = {
    "exact_match": ("prompt_completion", "messages"),
    "multiple_choice": ("multiple_choice", "preference"),
    "loss": ("text", "prompt_completion", "messages", "preference"),
}


def default_scorer(fmt: str) -> str:
    return "multiple_choice" if fmt in SCORERS["multiple_choice"] else "loss"


def check_fit(scorer: str, fmt: str, field: str) -> None:
    if scorer not in SCORERS:
        raise ValueError(f"{field}: unknown scorer {scorer!r}; choose one of {sorted(SCORERS)}")
    if fmt not in SCORERS[scorer]:
        fits = sorted(s for s, formats in SCORERS.items() if fmt in formats)
        raise ValueError(
            f"{field}: scorer {scorer} does not fit {fmt.replace('_', ' ')} data: it needs "
            f"{' or '.join(f.replace('_', ' ') for f in SCORERS[scorer])} data. For this data use scorer: "
            f"{' or '.join(fits)}, or give data in the format {scorer} needs."
        )


@dataclass
class Scorer:
    """One number of a model on one data set. `texts`: a few of its inputs (for timing inference)."""

    name: str
    kind: str
    size: int
    score: Callable
    texts: list[str]

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "loss"

    def __call__(self, model) -> float:
        return float(self.score(model))


def check_chat_template(tokenizer, field: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{field} is in the messages format, but the model's tokenizer has no chat template to render it: give "
            f"prompt + completion (or text) data, or a model whose tokenizer has a chat template"
        )


def _split_messages(tokenizer, messages, field: str) -> dict:
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"{field}: every messages row must end in an assistant turn (the answer that is scored)")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return {"prompt": prompt, "completion": messages[-1]["content"]}


def answer_index(answer, options: list[str]) -> int | None:
    """The right option of a multiple-choice row. An answer equal to an option's text (compared as text, so 2 and
    "2" both match the option "2"; exactly, else with surrounding spaces ignored) is that option; otherwise an integer
    (or an integer-like string) is an index. Where both readings are possible the text wins: options ["1", "2", "3"]
    with answer "2" (or 2) mean the option "2". None when neither reading fits."""
    if answer is None or isinstance(answer, bool):
        return None
    text = str(answer)
    for candidates in (options, [o.strip() for o in options]):
        key = text if candidates is options else text.strip()
        if candidates.count(key) == 1:
            return candidates.index(key)
    try:
        number = int(answer) if not isinstance(answer, float) or answer.is_integer() else None
    except (TypeError, ValueError):
        number = None
    return number if number is not None and 0 <= number < len(options) else None


def _mc_probe(row: dict, index: int, field: str) -> dict:
    options, answer = row["options"], row["answer"]
    if isinstance(options, str):  # a CSV cell: a JSON list
        try:
            options = json.loads(options)
        except ValueError:
            options = None
    if not isinstance(options, (list, tuple)):
        raise ValueError(f"{field} row {index}: options must be a list of strings (in a CSV file a JSON list such as "
                         f'["Paris", "Rome"]), got {row["options"]!r}')
    options = [str(o) for o in options]
    if len(options) < 2:
        raise ValueError(f"{field} row {index}: a multiple-choice row needs at least 2 options, got {options}")
    answer = answer_index(answer, options)
    if answer is None:
        raise ValueError(f"{field} row {index}: answer {row['answer']!r} is neither one of its options {options} (as "
                         f"text) nor an index 0..{len(options) - 1} of them")
    return {"question": str(row["question"]), "options": [str(o) for o in options], "answer": answer}


def check_rows(kind: str, dataset, fmt: str, field: str) -> None:
    """The rows' checks that need no tokenizer (text columns are strings, multiple-choice answers name an option,
    messages end in an assistant turn), so that bad evaluation data fails before the model is loaded."""
    rows = dataset.to_list()
    for index, row in enumerate(rows):
        for column in FORMAT_TEXT_COLUMNS.get(fmt, ()):
            if not isinstance(row[column], str):
                raise ValueError(f"{field} row {index}: column {column} must be a string, got {type(row[column]).__name__}")
        if fmt == "messages":
            messages = row["messages"]
            if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
                raise ValueError(f"{field}: every messages row must end in an assistant turn (the answer that is "
                                 f"scored); row {index} does not")
        if kind == "multiple_choice" and fmt == "multiple_choice":
            _mc_probe(row, index, field)


def make_scorer(name: str, kind: str, dataset, fmt: str, tokenizer, field: str, max_length: int = 128,
                max_new_tokens: int | None = None, batch_size: int = 16) -> Scorer:
    """The scorer `kind` on `dataset` (of format `fmt`); a scorer that does not fit the data is an error."""
    check_fit(kind, fmt, field)
    rows = dataset.to_list()
    if fmt == "messages":
        check_chat_template(tokenizer, field)
        rows = [_split_messages(tokenizer, r["messages"], field) for r in rows]
        fmt = "prompt_completion"
    if fmt == "preference":
        if kind == "multiple_choice":
            rows = [{"question": r["prompt"], "options": [r["chosen"], r["rejected"]], "answer": 0} for r in rows]
            fmt = "multiple_choice"
        else:
            rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
            fmt = "prompt_completion"
    for index, row in enumerate(rows):
        for column in FORMAT_TEXT_COLUMNS.get(fmt, ()):
            if not isinstance(row[column], str):
                raise ValueError(f"{field} row {index}: column {column} must be a string, got {type(row[column]).__name__}")
    if kind == "multiple_choice":
        probes = [_mc_probe(r, i, field) for i, r in enumerate(rows)]
        score = lambda model: multiple_choice_accuracy(model, tokenizer, probes, batch_size=4 * batch_size)
        texts = [p["question"] for p in probes]
    elif kind == "exact_match":
        score = lambda model: exact_match(model, tokenizer, rows, max_new_tokens, batch_size)
        texts = [r["prompt"] for r in rows]
    elif fmt == "text":
        texts = [r["text"] for r in rows]
        score = lambda model: lm_loss(model, tokenizer, texts, max_length, batch_size=max(1, batch_size // 2))
    else:
        score = lambda model: completion_loss(model, tokenizer, rows, max_length, batch_size=max(1, batch_size // 2))
        texts = [r["prompt"] + r["completion"] for r in rows]
    return Scorer(name, kind, len(rows), score, texts)


FORMAT_TEXT_COLUMNS = {"prompt_completion": ("prompt", "completion"), "text": ("text",), "multiple_choice": ("question",)}
