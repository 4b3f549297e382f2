"""The comparison's scorers on the tiny in-process model: exact match (greedy generation round trip), completion
loss (against a hand-written NLL), multiple choice from preference data, and scorers that do not fit the data."""

import math

import pytest
import torch
from datasets import Dataset

from peft_ext.compare.scoring import answer_index, check_fit, make_scorer
from peft_ext.data.tiny_model import tiny_llama
from peft_ext.evaluation import completion_loss, exact_match, option_scores
from peft_ext.evaluation.multiple_choice import predictions
from peft_ext.evaluation.exact_match import greedy_generations, is_match


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def test_exact_match_counts_references_equal_to_the_greedy_generation(tiny):
    model, tokenizer = tiny
    prompts = ["The capital is", "Two plus two is"]
    generated = greedy_generations(model, tokenizer, prompts, max_new_tokens=5)
    assert all(len(g) > 0 for g in generated)
    # the same prompt alone (no left padding) generates the same text: padding does not leak into generation
    assert greedy_generations(model, tokenizer, prompts[1:], max_new_tokens=5) == generated[1:]
    probes = [{"prompt": p, "completion": g} for p, g in zip(prompts, generated)]
    assert exact_match(model, tokenizer, probes, max_new_tokens=5) == 1.0
    probes[1]["completion"] = generated[1] + "zz"
    assert exact_match(model, tokenizer, probes, max_new_tokens=5) == 0.5
    assert is_match("  Paris \n more text", "Paris") and not is_match("Paris\nmore", "Paris\nless")


def test_completion_loss_is_the_nll_of_the_completion_tokens_only(tiny):
    model, tokenizer = tiny
    probes = [{"prompt": "Question: 1+1?", "completion": " 2"}, {"prompt": "Say hi:", "completion": " hello there"}]
    total, count = 0.0, 0
    for p in probes:
        ids = tokenizer(p["prompt"] + p["completion"]).input_ids
        start = len(tokenizer(p["prompt"]).input_ids)
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        for t in range(start, len(ids)):
            total -= logprobs[t - 1, ids[t]].item()
            count += 1
    assert completion_loss(model, tokenizer, probes, batch_size=1) == pytest.approx(total / count, rel=1e-5)
    assert completion_loss(model, tokenizer, probes, batch_size=2) == pytest.approx(total / count, rel=1e-5)
    assert count == len(" 2") + len(" hello there")  # one token per character, the prompts not counted


def test_preference_data_scores_as_multiple_choice_and_as_loss(tiny):
    model, tokenizer = tiny
    rows = [{"prompt": "Q: 12 + 30 =", "chosen": " 42", "rejected": " 43"}, {"prompt": "Q: 1 + 1 =", "chosen": " 2", "rejected": " 3"}]
    scorer = make_scorer("pref", "multiple_choice", Dataset.from_list(rows), "preference", tokenizer, "eval_data")
    scores = option_scores(model, tokenizer, [{"question": r["prompt"], "options": [r["chosen"], r["rejected"]]} for r in rows])
    assert scorer(model) == sum(s[0] > s[1] for s in scores) / 2 and scorer.higher_is_better
    loss = make_scorer("pref", "loss", Dataset.from_list(rows), "preference", tokenizer, "eval_data")
    chosen = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    assert loss(model) == pytest.approx(completion_loss(model, tokenizer, chosen)) and not loss.higher_is_better


def test_multiple_choice_answers_by_text_or_index_and_bad_answers(tiny):
    model, tokenizer = tiny
    rows = [{"question": "Sky?", "options": ["blue", "green"], "answer": "blue"},
            {"question": "Grass?", "options": ["blue", "green"], "answer": 1}]
    data = Dataset.from_list([{**r, "answer": str(r["answer"])} for r in rows])  # one column type, as in a CSV
    chosen = predictions(model, tokenizer, [{"question": r["question"], "options": r["options"]} for r in rows])
    score = make_scorer("mc", "multiple_choice", data, "multiple_choice", tokenizer, "eval_data")(model)
    assert score == ((chosen[0] == 0) + (chosen[1] == 1)) / 2
    from_csv = Dataset.from_list([{"question": "Sky?", "options": '["blue", "green"]', "answer": "0"}])
    assert make_scorer("mc", "multiple_choice", from_csv, "multiple_choice", tokenizer, "eval_data").size == 1
    not_a_list = Dataset.from_list([{"question": "Sky?", "options": "blue or green", "answer": "0"}])
    with pytest.raises(ValueError, match=r"eval_data row 0: options must be a list of strings \(in a CSV file a JSON list"):
        make_scorer("mc", "multiple_choice", not_a_list, "multiple_choice", tokenizer, "eval_data")
    bad = Dataset.from_list([{"question": "Sky?", "options": ["blue", "green"], "answer": "red"}])
    with pytest.raises(ValueError, match=r"eval_data row 0: answer 'red' is neither one of its options \['blue', 'green'\] "
                                         r"\(as text\) nor an index 0..1 of them"):
        make_scorer("mc", "multiple_choice", bad, "multiple_choice", tokenizer, "eval_data")


def test_a_digit_answer_that_is_an_options_text_means_that_option(tiny):
    """Answer "2" among ["1", "2", "3"] is the option "2" (the text wins over the index 2); "42" among 41/42/43 is
    the option "42" (not an index out of range); a number that is no option's text is an index."""
    assert answer_index("2", ["1", "2", "3"]) == 1 and answer_index(2, ["1", "2", "3"]) == 1
    assert answer_index("42", ["41", "42", "43"]) == 1 and answer_index("42", [" 41", " 42", " 43"]) == 1
    assert answer_index("1", ["a", "b"]) == 1 and answer_index(0, ["a", "b"]) == 0
    assert answer_index("2", ["a", "b"]) is None and answer_index("c", ["a", "b"]) is None
    model, tokenizer = tiny
    options = ["1", "2", "3"]
    chosen = predictions(model, tokenizer, [{"question": "One plus one is", "options": options}])[0]
    for answer in range(3):  # the scorer marks right exactly the option whose text is the answer
        data = Dataset.from_list([{"question": "One plus one is", "options": options, "answer": options[answer]}])
        scorer = make_scorer("mc", "multiple_choice", data, "multiple_choice", tokenizer, "eval_data")
        assert scorer(model) == float(chosen == answer)
    data = Dataset.from_list([{"question": "The answer is", "options": ["41", "42", "43"], "answer": "42"}])
    chosen = predictions(model, tokenizer, [{"question": "The answer is", "options": ["41", "42", "43"]}])[0]
    assert make_scorer("mc", "multiple_choice", data, "multiple_choice", tokenizer, "eval_data")(model) == float(chosen == 1)


def test_messages_are_split_into_prompt_and_the_last_assistant_turn(tiny):
    model, tokenizer = tiny
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    scorer = make_scorer("em", "exact_match", Dataset.from_list(rows), "messages", tokenizer, "eval_data")
    assert scorer.texts == ["<|user|>Hi</s>\n<|assistant|>"] and scorer(model) == 0.0
    value = make_scorer("l", "loss", Dataset.from_list(rows), "messages", tokenizer, "eval_data")(model)
    assert math.isfinite(value) and value > 0
    no_template = tiny_llama()[1]
    no_template.chat_template = None
    with pytest.raises(ValueError, match="eval_data is in the messages format, but the model's tokenizer has no chat template"):
        make_scorer("em", "exact_match", Dataset.from_list(rows), "messages", no_template, "eval_data")
    bad = [{"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(ValueError, match="every messages row must end in an assistant turn"):
        make_scorer("em", "exact_match", Dataset.from_list(bad), "messages", tokenizer, "eval_data")


def test_a_scorer_that_does_not_fit_the_data_says_which_does():
    with pytest.raises(ValueError, match="eval_data: scorer exact_match does not fit text data: it needs prompt completion "
                                         "or messages data. For this data use scorer: loss"):
        check_fit("exact_match", "text", "eval_data")
    with pytest.raises(ValueError, match="scorer multiple_choice does not fit prompt completion data.*use scorer: "
                                         "exact_match or loss"):
        check_fit("multiple_choice", "prompt_completion", "eval_data")
    with pytest.raises(ValueError, match=r"unknown scorer 'bleu'; choose one of \['exact_match', 'loss', 'multiple_choice'\]"):
        check_fit("bleu", "text", "eval_data")

