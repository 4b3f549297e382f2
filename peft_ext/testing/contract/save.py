"""Contract item 3: save_pretrained -> from_pretrained round trip, the folder's files, and the low-level API."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

from ..harness import adapter_tensors, assert_equal, output, train_step, trained_peft_model
from ..marks import per_model

__all__ = [
    "test_save_and_reload_is_bit_identical",
    "test_low_level_api_round_trip",
    "test_save_and_reload_two_adapters",
    "test_transformers_load_adapter_gives_the_saved_model",
]


def _config_fields(config) -> dict:
    d = config.to_dict()
    # written by PEFT's save_pretrained on the saved copy only, by design: inference mode, and for a model that
    # is not a transformers model, the class to rebuild it with
    d.pop("inference_mode", None)
    d.pop("auto_mapping", None)
    # a config may keep target_modules as a set (PEFT's LoraConfig does) or a sorted list: the same field
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@per_model()
def test_save_and_reload_is_bit_identical(entry, spec, dtype, tmp_adapter_dir):
    model, config = trained_peft_model(entry, spec, dtype=dtype)
    inputs = spec.inputs(dtype=dtype)
    expected = output(spec, model, inputs)
    doc = entry.documented_error("save", spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            model.save_pretrained(tmp_adapter_dir)
        return
    model.save_pretrained(tmp_adapter_dir)

    files = sorted(p.name for p in tmp_adapter_dir.iterdir())
    assert "adapter_model.safetensors" in files, files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files), files
    assert "adapter_config.json" in files and "README.md" in files, files

    # the config round-trips: right class, same fields
    raw = json.loads((tmp_adapter_dir / "adapter_config.json").read_text())
    assert raw["peft_type"] == entry.peft_type
    loaded_config = PeftConfig.from_pretrained(tmp_adapter_dir)
    assert type(loaded_config) is entry.config_cls
    assert _config_fields(loaded_config) == _config_fields(config)

    # the model card names the method and the package a user needs
    card = (tmp_adapter_dir / "README.md").read_text().lower()
    for term in entry.card_terms:
        assert term.lower() in card, f"README.md does not mention {term!r}"

    # a fresh base built from the same seed + the folder == the trained model, bit for bit
    reloaded = PeftModel.from_pretrained(spec.make(0, dtype), tmp_adapter_dir)
    assert type(reloaded.peft_config["default"]) is entry.config_cls
    assert_equal(output(spec, reloaded, inputs), expected, "reloaded vs trained")
    # and the reloaded adapter's tensors equal the trained ones
    trained = adapter_tensors(model, entry)
    loaded = adapter_tensors(reloaded, entry)
    assert trained, "no adapter tensors found"
    for name, p in trained.items():
        assert_equal(loaded[name].detach(), p.detach(), name)
    # the reloaded adapter is frozen (inference) by default; is_trainable=True makes it trainable again
    assert not any(p.requires_grad for p in reloaded.parameters())
    again = PeftModel.from_pretrained(spec.make(0, dtype), tmp_adapter_dir, is_trainable=True)
    n_trainable = sum(p.numel() for p in again.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@per_model()
def test_low_level_api_round_trip(entry, spec):
    """inject_adapter_in_model + get_peft_model_state_dict + set_peft_model_state_dict, without PeftModel."""
    doc = entry.documented_error("low_level_api", spec.kind)
    model = spec.make(0)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            inject_adapter_in_model(entry.make_config(spec.kind), model)
        return
    trains = entry.supports("train", spec.kind)
    model = inject_adapter_in_model(entry.make_config(spec.kind, **({} if trains else entry.nonidentity_overrides)), model)
    if trains:
        if entry.supports("identity_init", spec.kind) and entry.init_atol == 0.0:
            assert_equal(output(spec, model), output(spec, spec.make(0)), "injected at init vs base")
        train_step(spec, model)
    expected = output(spec, model)
    state = get_peft_model_state_dict(model)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())

    fresh = spec.make(0)
    fresh = inject_adapter_in_model(entry.make_config(spec.kind), fresh)
    assert not torch.equal(output(spec, fresh), expected)
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys, result.unexpected_keys
    assert_equal(output(spec, fresh), expected, "set_peft_model_state_dict vs trained")


@per_model()
def test_save_and_reload_two_adapters(entry, spec, tmp_adapter_dir):
    """save_pretrained of a model with two adapters writes the second into a subfolder; both reload exactly."""
    model, _ = trained_peft_model(entry, spec)
    model.add_adapter("b", entry.make_config(spec.kind, **entry.nonidentity_overrides, **entry.seed_overrides(1)))
    out_default = output(spec, model)
    model.set_adapter("b")
    out_b = output(spec, model)
    assert not torch.equal(out_default, out_b)
    model.save_pretrained(tmp_adapter_dir)
    assert (tmp_adapter_dir / "adapter_model.safetensors").exists()
    assert (tmp_adapter_dir / "b" / "adapter_model.safetensors").exists()
    assert not list(tmp_adapter_dir.rglob("*.bin"))
    loaded = PeftModel.from_pretrained(spec.make(0), tmp_adapter_dir)
    loaded.load_adapter(tmp_adapter_dir / "b", adapter_name="b")
    assert_equal(output(spec, loaded), out_default, "default adapter reloaded")
    loaded.set_adapter("b")
    assert_equal(output(spec, loaded), out_b, "adapter b reloaded")


@per_model(transformers_only=True)
def test_transformers_load_adapter_gives_the_saved_model(entry, spec, tmp_adapter_dir):
    """transformers' own `model.load_adapter(folder)` (also behind `AutoModelForCausalLM.from_pretrained(folder)`)
    loads adapter files with its own weight loader, not PEFT's: the result must be the saved model all the same (HFT's
    delta files once loaded nothing there, which a seeded non-identity init hid)."""
    doc = entry.documented_error("save", spec.kind)
    if doc is not None:
        return  # test_save_and_reload_is_bit_identical asserts the documented error
    model, _ = trained_peft_model(entry, spec, seed=0)
    _move_off_any_init(model, entry)
    expected = output(spec, model)
    model.save_pretrained(tmp_adapter_dir)
    base = spec.make(0)
    assert not torch.equal(output(spec, base), expected), "adapter is trivial"
    base.load_adapter(str(tmp_adapter_dir))
    base.eval()
    assert_equal(output(spec, base), expected, "transformers load_adapter vs the saved model")



def _move_off_any_init(model, entry) -> None:
    """Nudge every floating tensor the adapter saves (its persistent, prefixed parameters and buffers): a loader that
    loads nothing and rebuilds the adapter from the saved config's seed (an untrained, seeded adapter, e.g.
    Delta-CoMe's) would otherwise give the saved output all the same."""
    g = torch.Generator().manual_seed(1)
    saved = set(model.state_dict())
    with torch.no_grad():
        for name, t in adapter_tensors(model, entry).items():
            if name in saved and t.is_floating_point() and t.numel():
                t.add_((torch.randn(t.shape, generator=g) * 1e-2).to(t))
