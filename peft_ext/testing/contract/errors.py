"""Contract item 8: bad inputs each raise a clear error (type, and a message that names the problem)."""

from __future__ import annotations

import pytest
from peft import PeftConfig, PeftModel, get_peft_model

from ..harness import assert_equal, output, trained_peft_model
from ..marks import per_bad_config, per_method, per_model
from ..models import MODELS

__all__ = [
    "test_unknown_target_module",
    "test_out_of_range_config",
    "test_selection_with_nothing_trainable",
    "test_adapter_from_another_base_model",
    "test_adapter_from_another_architecture",
    "test_truncated_safetensors_is_named",
    "test_pickle_only_folder_is_refused",
    "test_unsafe_save_is_refused_before_writing",
    "test_load_adapter_checks_the_folder_too",
]


@per_model()
def test_unknown_target_module(entry, spec):
    config = entry.make_config(spec.kind, target_modules=["nonexistent"])
    with pytest.raises(ValueError, match=r"nonexistent") as info:
        get_peft_model(spec.make(0), config)
    assert "target_modules" in str(info.value)


@per_bad_config
def test_out_of_range_config(entry, bad):
    spec = MODELS["llama"]
    if bad.when == "config":
        with pytest.raises(bad.error, match=bad.match):
            entry.make_config(spec.kind, **bad.overrides)
    else:
        config = entry.make_config(spec.kind, **bad.overrides)
        with pytest.raises(bad.error, match=bad.match):
            get_peft_model(spec.make(0), config)


@per_method
def test_selection_with_nothing_trainable(entry):
    """On the 2-layer Llama: a pool and ratio that leave no module to train must not give a silent no-op."""
    bad = entry.nothing_trainable
    spec = MODELS["llama"]
    assert bad is not None, f"{entry.name}: give nothing_trainable (a config that trains nothing) in its MethodEntry"
    config = entry.make_config(spec.kind, **bad.overrides)
    with pytest.raises(bad.error, match=bad.match):
        get_peft_model(spec.make(0), config)


def _saved(entry, spec, path, pickled: bool = False):
    """A trained adapter saved to `path`; `pickled=True` leaves only adapter_model.bin (a pickle, as made by other
    tools or older versions: peft-ext itself refuses to write one) beside adapter_config.json."""
    model, _ = trained_peft_model(entry, spec)
    model.save_pretrained(path)
    if pickled:
        import torch
        from safetensors.torch import load_file

        weights = path / "adapter_model.safetensors"
        torch.save(load_file(weights), path / "adapter_model.bin")
        weights.unlink()
    return model


@per_method
def test_adapter_from_another_base_model(entry, tmp_adapter_dir):
    """Saved on hidden size 32, loaded onto hidden size 16: the error says so (shape / another base model)."""
    spec = MODELS["llama"]
    _saved(entry, spec, tmp_adapter_dir)
    other = spec.make(0, hidden=16)
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)shape|another base model") as info:
        PeftModel.from_pretrained(other, tmp_adapter_dir)
    assert "another base model" in str(info.value) or "shape" in str(info.value)


@per_method
def test_adapter_from_another_architecture(entry, tmp_adapter_dir):
    """Saved on the tiny Llama, loaded onto GPT-2: module names do not exist there."""
    _saved(entry, MODELS["llama"], tmp_adapter_dir)
    with pytest.raises(ValueError, match=r"(?i)another base model|does not have|not found|match"):
        PeftModel.from_pretrained(MODELS["gpt2"].make(0), tmp_adapter_dir)


@per_method
def test_truncated_safetensors_is_named(entry, tmp_adapter_dir):
    spec = MODELS["llama"]
    _saved(entry, spec, tmp_adapter_dir)
    weights = tmp_adapter_dir / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors") as info:
        PeftModel.from_pretrained(spec.make(0), tmp_adapter_dir)
    assert str(weights) in str(info.value) and "corrupt" in str(info.value).lower()
    # the config file itself is fine and still readable on its own
    assert type(PeftConfig.from_pretrained(tmp_adapter_dir)) is entry.config_cls
    # a corrupt header (not just a short file)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors"):
        PeftModel.from_pretrained(spec.make(0), tmp_adapter_dir)


@per_method
def test_pickle_only_folder_is_refused(entry, tmp_adapter_dir):
    spec = MODELS["llama"]
    model = _saved(entry, spec, tmp_adapter_dir, pickled=True)
    files = sorted(p.name for p in tmp_adapter_dir.iterdir())
    assert "adapter_model.bin" in files and "adapter_model.safetensors" not in files, files
    with pytest.raises(ValueError, match=r"(?i)adapter_model\.bin.*safetensors"):
        PeftModel.from_pretrained(spec.make(0), tmp_adapter_dir)
    # the same folder, converted to safetensors as the message says, loads exactly
    import torch
    from safetensors.torch import save_file

    expected = output(spec, model)
    pickle_file = tmp_adapter_dir / "adapter_model.bin"
    save_file(torch.load(pickle_file, weights_only=True), tmp_adapter_dir / "adapter_model.safetensors")
    pickle_file.unlink()
    assert_equal(output(spec, PeftModel.from_pretrained(spec.make(0), tmp_adapter_dir)), expected, "converted")


@per_method
def test_unsafe_save_is_refused_before_writing(entry, tmp_path):
    """Loading never unpickles, so saving a pickle is refused up front, naming the fix (safetensors, the default)."""
    spec = MODELS["llama"]
    model, _ = trained_peft_model(entry, spec)
    folder = tmp_path / "adapter"
    with pytest.raises(ValueError, match=r"safe_serialization=True"):
        model.save_pretrained(folder, safe_serialization=False)
    assert not folder.exists() or not any(folder.iterdir()), "files were written before the refusal"


@per_method
def test_load_adapter_checks_the_folder_too(entry, tmp_path):
    """PeftModel.load_adapter (a second adapter from a folder) goes through the same checks."""
    spec = MODELS["llama"]
    good, bad = tmp_path / "good", tmp_path / "bad"
    model = _saved(entry, spec, good)
    _saved(entry, spec, bad, pickled=True)
    loaded = PeftModel.from_pretrained(spec.make(0), good)
    with pytest.raises(ValueError, match=r"(?i)adapter_model\.bin.*safetensors"):
        loaded.load_adapter(bad, adapter_name="other")
    assert set(loaded.peft_config) == {"default"}
    loaded.load_adapter(good, adapter_name="again")
    loaded.set_adapter("again")
    assert_equal(output(spec, loaded), output(spec, model), "load_adapter")

