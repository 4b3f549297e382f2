"""peft-ext compare's loaders: local JSON/JSONL/CSV/Parquet files and folders through `datasets`, built-in sets,
column renames and limits, and the format each set is read as (or a clear error naming the expected columns)."""

import json

import pytest
from datasets import Dataset

from peft_ext.compare.data import detect_format, load_data, normalize_spec, training_format

ROWS = [{"prompt": f"Q{i}?", "completion": f" A{i}"} for i in range(5)]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        Dataset.from_list(rows).to_csv(str(path))
    else:
        Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_files_of_every_type_load_with_their_rows(tmp_path, suffix):
    path = write(tmp_path / f"train{suffix}", ROWS)
    dataset, fmt = load_data(path, "train_data")
    assert fmt == "prompt_completion" and dataset.to_list() == ROWS
    dataset, _ = load_data({"path": path, "limit": 2}, "train_data")
    assert dataset.to_list() == ROWS[:2]


def test_a_datasets_id_or_folder_goes_through_load_dataset_with_its_split(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write(folder / "train.jsonl", ROWS)
    write(folder / "test.jsonl", ROWS[:3])
    test, fmt = load_data({"dataset": str(folder), "split": "test"}, "eval_data")
    assert fmt == "prompt_completion" and test.to_list() == ROWS[:3]
    train, _ = load_data(str(folder), "train_data")  # a plain path: the train split
    assert len(train) == 5


def test_columns_are_renamed_to_the_format_names(tmp_path):
    path = write(tmp_path / "qa.jsonl", [{"input": "2+2=", "output": "4", "id": 1}])
    dataset, fmt = load_data({"path": path, "columns": {"prompt": "input", "completion": "output"}}, "eval_data")
    assert fmt == "prompt_completion" and dataset[0]["prompt"] == "2+2=" and dataset[0]["completion"] == "4"
    with pytest.raises(ValueError, match=r"eval_data.columns renames \['question'\], which the data does not have"):
        load_data({"path": path, "columns": {"prompt": "question"}}, "eval_data")


def test_columns_matching_no_format_name_the_expected_columns(tmp_path):
    path = write(tmp_path / "odd.jsonl", [{"input": "x", "output": "y"}])
    with pytest.raises(ValueError) as error:
        load_data(path, "train_data")
    message = str(error.value)
    assert message.startswith("train_data: columns ['input', 'output'] match no known format")
    for expected in ("text", "messages", "prompt + completion", "prompt + chosen + rejected", "question + options + answer"):
        assert expected in message


def test_formats_and_trainers():
    assert detect_format(["prompt", "chosen", "rejected", "extra"], "d") == "preference"
    assert detect_format(["question", "options", "answer"], "d") == "multiple_choice"
    assert detect_format(["messages"], "d") == "messages"
    assert training_format("preference") == "dpo" and training_format("text") == "sft"
    with pytest.raises(ValueError, match="train_data is multiple choice data, which cannot be trained on"):
        training_format("multiple_choice")


def test_builtin_sets_and_bad_specs(tmp_path):
    probes, fmt = load_data("fictional-facts-probes", "eval_data")
    assert fmt == "multiple_choice" and len(probes) == 48
    prefs, fmt = load_data({"builtin": "addition-preferences", "limit": 4}, "train_data")
    assert fmt == "preference" and len(prefs) == 4
    with pytest.raises(ValueError, match=r"'nope' is neither a built-in data set .* For a `datasets` id write "
                                         r"train_data: \{dataset: nope, split: train\}"):
        normalize_spec("nope", "train_data")
    with pytest.raises(ValueError, match="exactly one of builtin, path or dataset"):
        normalize_spec({"split": "train"}, "eval_data")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"x.txt is a .txt file; give a .json/.jsonl/.csv/.parquet file"):
        normalize_spec({"path": str(tmp_path / "x.txt")}, "eval_data")
    with pytest.raises(ValueError, match="eval_data.limit must be a positive integer"):
        normalize_spec({"builtin": "english-heldout", "limit": 0}, "eval_data")


def test_an_empty_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"eval_data: .*empty.jsonl is empty; it needs at least one row"):
        load_data(str(tmp_path / "empty.jsonl"), "eval_data")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"train_data: .*blank.jsonl is empty"):
        load_data({"path": str(tmp_path / "blank.jsonl")}, "train_data")


def test_a_datasets_id_in_offline_mode_names_offline_mode(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"eval_data: cannot load the `datasets` id 'nobody-xyz/no-such-set': offline "
                                         r"mode is on \(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE\).*\{path: your_file.jsonl\}"):
        load_data({"dataset": "nobody-xyz/no-such-set", "split": "test"}, "eval_data")
