"""A Delta-CoMe adapter's life in a PeftModel (issue 11): the mode of new layers, the inference-only guard,
delete_adapter, and the random contents of init_weights=False."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_ext
from peft_ext.testing.models import MODELS
from peft_ext.tuners.deltacome.layer import DeltaComeLinear, DeltaComeTunerLayer

SPEC = MODELS["llama"]


def _config(**overrides):
    kwargs = dict(task_type="CAUSAL_LM", budget=1.0, bands=[[1, 8], [None, 4]], group_size=16, init_weights=False)
    kwargs.update(overrides)
    return peft_ext.DeltaComeConfig(**kwargs)


def _adapter_modules(model):
    """Every module the tuner added: the Delta-CoMe layers and the per-adapter buffer dicts inside them."""
    return [m for layer in model.modules() if isinstance(layer, DeltaComeTunerLayer) for m in layer.modules()]


def _delta_buffers(model, adapter: str) -> dict:
    return {n: b for n, b in model.named_buffers() if f".deltacome_delta.{adapter}." in n}


# ------------------------------------------------------------------------------------------ 19: the mode
def test_new_layers_follow_an_eval_model_and_its_forward_runs_with_autograd_on():
    """Before the fix the wrapped layers started in training mode under a model in eval mode: the first plain
    forward (autograd on, as in any script without torch.no_grad) raised the inference-only error, and so did a
    mixed batch ("call model.eval() first") on a model that was in eval mode."""
    model = get_peft_model(SPEC.make(0), _config())  # make() returns the base in eval mode
    assert _adapter_modules(model) and not any(m.training for m in _adapter_modules(model))
    assert not model.base_model.training  # the tuner follows the model too (mixed batches check it)
    inputs = SPEC.inputs()
    y = SPEC.run(model, inputs)
    assert torch.isfinite(y).all() and not y.requires_grad
    model.add_adapter("b", _config(seed=1))
    assert not any(m.training for m in _adapter_modules(model))
    names = ["default", "b", "__base__", "b"][: inputs["input_ids"].shape[0]]
    assert torch.isfinite(SPEC.run(model, {**inputs, "adapter_names": names})).all()


def test_new_layers_follow_a_model_in_training_mode_and_the_guard_refuses_a_training_forward():
    model = get_peft_model(SPEC.make(0).train(), _config())
    assert all(m.training for m in _adapter_modules(model))
    with pytest.raises(RuntimeError, match=r"inference.*peft-ext compress.*model\.eval\(\)"):
        SPEC.run(model, SPEC.inputs())
    with torch.no_grad():  # no gradients: a training-mode forward is inference all the same
        assert torch.isfinite(SPEC.run(model, SPEC.inputs())).all()
    model.eval()
    model.add_adapter("b", _config(seed=1))
    assert not any(m.training for m in _adapter_modules(model))
    model.train()
    assert all(m.training for m in _adapter_modules(model))


# --------------------------------------------------------------------------------- 20: delete_adapter
def test_delete_adapter_removes_its_packed_metadata():
    model = get_peft_model(SPEC.make(0), _config(), adapter_name="x")
    model.add_adapter("b", _config(method="lowrank"))
    layers = [m for m in model.modules() if isinstance(m, DeltaComeLinear)]
    assert layers and all(set(m.delta_meta) == {"x", "b"} for m in layers)
    model.delete_adapter("b")
    assert all(set(m.delta_meta) == {"x"} for m in layers), [sorted(m.delta_meta) for m in layers][:2]
    # a new "b" of another method is built from its own config, nothing of the old one left over
    model.add_adapter("b", _config(method="bitdelta"))
    assert all(m.delta_meta["b"][0] == "bitdelta" for m in layers)
    model.set_adapter("b")
    assert torch.isfinite(SPEC.run(model, SPEC.inputs())).all()


# ------------------------------------------------------------------- 15: random contents (init_weights=False)
def test_random_contents_follow_torch_rng_and_differ_per_adapter():
    """seed=None (the default): the contents are drawn from torch's RNG, so torch.manual_seed reproduces them and
    two adapters built from one config differ. Before the fix every adapter of a config was the same draw (a
    fixed seed 0 and the layer's name), whatever torch's RNG and the adapter's name."""
    config = _config()
    assert config.seed is None
    model = get_peft_model(SPEC.make(0), config, adapter_name="x")  # make(0) seeds torch's RNG with 0
    model.add_adapter("b", config)
    a, b = _delta_buffers(model, "x"), _delta_buffers(model, "b")
    assert len(a) == len(b) > 0
    assert not any(torch.equal(a[n], b[n.replace(".x.", ".b.")]) for n in a if n.endswith(("sigma", "v_scales")))
    # torch's RNG decides: the same state, the same contents (whatever the adapter's name); another state, others
    twin = _delta_buffers(get_peft_model(SPEC.make(0), config, adapter_name="z"), "z")
    assert sorted(twin) == sorted(n.replace(".x.", ".z.") for n in a)
    assert all(torch.equal(twin[n.replace(".x.", ".z.")], value) for n, value in a.items())
    base = SPEC.make(0)
    torch.manual_seed(1)
    other = _delta_buffers(get_peft_model(base, config, adapter_name="x"), "x")
    assert not any(torch.equal(other[n], a[n]) for n in a if n.endswith("sigma"))


def test_random_contents_ignore_torchs_rng_with_an_explicit_seed():
    """An explicit seed gives the same contents whatever torch's RNG and the adapter's name (what the contract
    suite's "a model holding only adapter a" comparisons rely on); another seed gives others."""
    one = _delta_buffers(get_peft_model(SPEC.make(0), _config(seed=3), adapter_name="x"), "x")
    base = SPEC.make(0)
    torch.manual_seed(456)
    two = _delta_buffers(get_peft_model(base, _config(seed=3), adapter_name="y"), "y")
    assert sorted(n.replace(".x.", ".y.") for n in one) == sorted(two)
    assert all(torch.equal(value, two[n.replace(".x.", ".y.")]) for n, value in one.items())
    three = _delta_buffers(get_peft_model(SPEC.make(0), _config(seed=4), adapter_name="x"), "x")
    assert not any(torch.equal(three[n], one[n]) for n in one if n.endswith("sigma"))


def test_random_contents_of_stored_whole_modules_differ_per_module_and_adapter():
    config = _config(dense_modules=["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"])
    model = get_peft_model(SPEC.make(0), config, adapter_name="x")
    model.add_adapter("b", config)
    dense = {n: b for n, b in model.named_buffers() if ".deltacome_dense." in n}
    base0 = SPEC.make(0).model.layers[0].input_layernorm.weight
    base1 = SPEC.make(0).model.layers[1].input_layernorm.weight
    a0 = dense["base_model.model.model.layers.0.input_layernorm.deltacome_dense.x.weight"] - base0
    a1 = dense["base_model.model.model.layers.1.input_layernorm.deltacome_dense.x.weight"] - base1
    b0 = dense["base_model.model.model.layers.0.input_layernorm.deltacome_dense.b.weight"] - base0
    assert a0.abs().max() > 0 and not torch.allclose(a0, a1) and not torch.allclose(a0, b0)
