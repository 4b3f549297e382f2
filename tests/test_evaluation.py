"""The scorers against hand computations on the tiny model: one forward per prefix, no batching, no padding."""

import math

import pytest
import torch

from peft_ext.data.tiny_model import tiny_llama
from peft_ext.evaluation import lm_loss, multiple_choice_accuracy, option_scores, predictions
from peft_ext.evaluation.multiple_choice import encode_option

PROBES = [
    {"question": "The sky is", "options": ["blue", "green", "a big red", "x"], "answer": 0},
    {"question": "Two plus two is", "options": ["four", "five", "22", "fish"], "answer": 0},
    {"question": "Q: pick one. A:", "options": ["yes", "no", "maybe so", "?"], "answer": 0},
]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_llama()
    return model.eval(), tokenizer


def next_token_logprob(model, prefix: list[int], token: int) -> float:
    """log p(token | prefix), from one unpadded forward of the prefix alone."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix])).logits[0, -1].double()
    return (logits.log_softmax(-1)[token]).item()


def hand_option_score(model, tokenizer, question: str, option: str) -> float:
    context = tokenizer(question).input_ids
    continuation = tokenizer(" " + option).input_ids  # char tokenizer: no merges across the space
    return sum(next_token_logprob(model, context + continuation[:i], tok) for i, tok in enumerate(continuation))


def test_option_scores_equal_the_chain_rule_by_hand(tiny):
    model, tokenizer = tiny
    scores = option_scores(model, tokenizer, PROBES, batch_size=5)  # batches cut across probes, ragged lengths
    for probe, got in zip(PROBES, scores):
        expected = [hand_option_score(model, tokenizer, probe["question"], o) for o in probe["options"]]
        assert got == pytest.approx(expected, abs=1e-4)


def test_scores_do_not_depend_on_batch_size(tiny):
    model, tokenizer = tiny
    one = option_scores(model, tokenizer, PROBES, batch_size=1)
    many = option_scores(model, tokenizer, PROBES, batch_size=64)
    assert sum(many, []) == pytest.approx(sum(one, []), abs=1e-4)


def test_accuracy_counts_probes_whose_right_option_scores_highest(tiny):
    model, tokenizer = tiny
    best = predictions(model, tokenizer, PROBES)
    hand_best = [
        max(range(4), key=lambda i: hand_option_score(model, tokenizer, p["question"], p["options"][i])) for p in PROBES
    ]
    assert best == hand_best
    # mark the model's pick right in the first two probes and wrong in the last one: accuracy 2/3
    probes = [dict(p, answer=b if i < 2 else (b + 1) % 4) for i, (p, b) in enumerate(zip(PROBES, best))]
    assert multiple_choice_accuracy(model, tokenizer, probes) == pytest.approx(2 / 3)


def test_option_tokens_are_split_at_the_question(tiny):
    _, tokenizer = tiny
    question, option = encode_option(tokenizer, "The sky is ", "blue")  # a trailing space moves to the option
    assert tokenizer.decode(question) == "The sky is" and tokenizer.decode(option) == " blue"


def test_probes_may_have_different_numbers_of_options(tiny):
    model, tokenizer = tiny
    probes = [dict(PROBES[0], options=["blue", "red"]), PROBES[1], dict(PROBES[2], options=["a", "b", "c", "d", "e"])]
    for batch_size in (1, 3, 64):  # a probe never splits across batches, whatever the size
        scores = option_scores(model, tokenizer, probes, batch_size=batch_size)
        assert [len(s) for s in scores] == [2, 4, 5]
        assert scores[2][4] == pytest.approx(hand_option_score(model, tokenizer, PROBES[2]["question"], "e"), abs=1e-4)


def test_scoring_restores_training_mode_and_needs_data(tiny):
    model, tokenizer = tiny
    model.train()
    multiple_choice_accuracy(model, tokenizer, PROBES[:1])
    lm_loss(model, tokenizer, ["some text"])
    assert model.training
    model.eval()
    with pytest.raises(ValueError):
        multiple_choice_accuracy(model, tokenizer, [])
    with pytest.raises(ValueError, match="empty"):
        option_scores(model, tokenizer, [{"question": "", "options": ["a"], "answer": 0}])


def test_lm_loss_is_the_token_weighted_mean_nll(tiny):
    model, tokenizer = tiny
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello world", "A longer sentence that will be cut short."]
    max_length = 20
    total, count = 0.0, 0
    for text in texts:  # by hand: every next-token log-prob from a separate forward of its prefix
        ids = tokenizer(text).input_ids[:max_length]
        for t in range(1, len(ids)):
            total -= next_token_logprob(model, ids[:t], ids[t])
            count += 1
    got = lm_loss(model, tokenizer, texts, max_length=max_length, batch_size=2)
    assert got == pytest.approx(total / count, abs=1e-4)
    assert math.log(len(tokenizer)) - 0.5 < got < math.log(len(tokenizer)) + 0.5  # a random model: about uniform


def test_lm_loss_agrees_with_transformers_own_loss(tiny):
    model, tokenizer = tiny
    text = "Every token of this sentence is predicted once."
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        expected = model(ids, labels=ids).loss.item()
    assert lm_loss(model, tokenizer, [text]) == pytest.approx(expected, abs=1e-5)
