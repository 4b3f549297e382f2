"""Folding FineGates into the weights without pruning: merge_and_unload(prune=False) keeps every shape and the
evaluation output, with W' = diag(z_r)(W + s B A)diag(z_c) and b' = z_r * (b + delta) checked weight by weight
against a float64 reference; merge_adapter / unmerge_adapter restore the base bit for bit; a bias delta merged into
a bias-less layer creates a bias that unmerge removes; disable_adapter() and unload() give the exact base."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_ext.testing.models import MODELS

from .refs import F64, adapter_parts, config, dense_weight, folded_weight, gated_layers, randomize_biases

ATOL = 1e-5


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _base(kind, seed=0):
    model = MODELS[kind].make(seed)
    randomize_biases(model)
    return model


@pytest.mark.parametrize("kind,kw", [
    ("llama", dict(lora_r=2, lora_alpha=5.0)),
    ("qwen2_gqa", dict(lora_r=2, bias="gates", target_modules=["q_proj", "k_proj", "v_proj"])),  # biased layers
    ("gpt2", dict(bias="gates", lora_r=3)),  # Conv1D
    ("bert_cls", dict(bias="gates")),
])
def test_merge_and_unload_without_pruning_folds_the_gates(kind, kw):
    spec = MODELS[kind]
    base = _base(kind)
    base_state = _state(base)
    model = get_peft_model(_base(kind), config(task_type=spec.task_type, init_weights=False,
                                               **{"target_modules": None, **kw})).eval()
    scale = kw.get("lora_alpha", kw.get("lora_r", 1)) / kw["lora_r"] if "lora_r" in kw else 1.0
    expected = {}
    for name, layer in gated_layers(model).items():
        parts = adapter_parts(layer, "default", scale)
        b = layer.get_base_layer().bias
        assert b is not None or "bias" not in kw  # every layer here that gets a delta has a bias of its own
        expected[name] = (folded_weight(dense_weight(layer.get_base_layer()), parts["zr"], parts["zc"], parts["lora"]),
                          None if b is None else parts["zr"] * (b.detach().to(F64) + parts["delta"]))
    inputs = spec.inputs()
    with torch.no_grad():
        gated = spec.run(model, inputs)
    assert (gated - spec.run(base, inputs)).abs().max() > 1e-3
    merged = model.merge_and_unload(prune=False)
    assert not gated_layers(merged)
    assert getattr(merged, "finegates_prune_report", None) is None and model.base_model.prune_report is None
    state = merged.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in base_state.items()}
    with torch.no_grad():
        assert (spec.run(merged, inputs) - gated).abs().max() < ATOL
    for name, (w_ref, b_ref) in expected.items():
        mod = merged.get_submodule(name)
        assert (dense_weight(mod) - w_ref).abs().max() < 1e-6, name
        if b_ref is not None:
            assert (mod.bias.detach().to(F64) - b_ref).abs().max() < 1e-6, name
    untouched = [k for k in base_state if not any(k.startswith(n + ".") for n in expected)]
    assert untouched
    for k in untouched:  # embeddings, norms, heads, ungated linears: bit for bit
        if kind == "bert_cls" and k.startswith("classifier."):
            continue  # the trained copy (modules_to_save) comes back: here it equals the base's
        assert torch.equal(state[k], base_state[k]), k


def test_closed_gates_fold_to_structured_zeros():
    spec = MODELS["llama"]
    model = get_peft_model(spec.make(0), config(task_type="CAUSAL_LM", target_modules=None, lora_r=2,
                                                init_weights=False)).eval()
    up = gated_layers(model)["model.layers.0.mlp.up_proj"]
    with torch.no_grad():
        up.gates_row_logits["default"][[1, 4]] = -1.0
        up.gates_col_logits["default"][[0, 31]] = -0.7
    merged = model.merge_and_unload(prune=False)
    w = merged.model.layers[0].mlp.up_proj.weight
    assert not w[[1, 4]].any() and not w[:, [0, 31]].any()
    assert (w[[0, 2, 3]][:, 1:31] != 0).all()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_adapter_and_unmerge_restore_the_base_bit_for_bit(kind):
    spec = MODELS[kind]
    model = get_peft_model(_base(kind), config(task_type=spec.task_type, target_modules=None, init_weights=False,
                                               lora_r=2, bias="gates" if kind == "gpt2" else "none")).eval()
    base_state = _state(model.get_base_model())
    inputs = spec.inputs()
    with torch.no_grad():
        gated = spec.run(model, inputs)
        model.merge_adapter()
        assert all(l.merged for l in gated_layers(model).values())
        merged = spec.run(model, inputs)
        model.unmerge_adapter()
        again = spec.run(model, inputs)
    assert (merged - gated).abs().max() < ATOL
    assert torch.equal(again, gated)
    _assert_same_state(_state(model.get_base_model()), base_state)


def test_bias_delta_on_a_bias_less_layer_creates_and_removes_a_bias():
    """Llama's linears have no bias: merging bias="gates" gives each gated layer a bias z_r * delta (base bias 0);
    unmerge removes it again (bias is None); disable_adapter() is the exact base, merged or not."""
    spec = MODELS["llama"]
    base = spec.make(0)
    model = get_peft_model(spec.make(0), config(task_type="CAUSAL_LM", target_modules=["o_proj", "down_proj"],
                                                init_weights=False, bias="gates")).eval()
    layers = gated_layers(model)
    assert all(l.get_base_layer().bias is None for l in layers.values())
    inputs = spec.inputs()
    with torch.no_grad():
        base_out = spec.run(base, inputs)
        gated = spec.run(model, inputs)
        with model.disable_adapter():
            assert torch.equal(spec.run(model, inputs), base_out)
        model.merge_adapter()
        for name, layer in layers.items():
            parts = adapter_parts(layer, "default")
            bias = layer.get_base_layer().bias
            assert bias is not None and not bias.requires_grad, name
            assert (bias.detach().to(F64) - parts["zr"] * parts["delta"]).abs().max() < 1e-7, name
        assert (spec.run(model, inputs) - gated).abs().max() < ATOL
        model.unmerge_adapter()
        assert all(l.get_base_layer().bias is None for l in layers.values())
        assert "bias" not in dict(model.get_base_model().named_parameters()).keys()
        assert torch.equal(spec.run(model, inputs), gated)
        # disabling while merged unmerges (and drops the created bias) first
        model.merge_adapter()
        with model.disable_adapter():
            assert torch.equal(spec.run(model, inputs), base_out)
            assert all(l.get_base_layer().bias is None for l in layers.values())
        assert torch.equal(spec.run(model, inputs), gated)
    # merge_and_unload keeps the created biases
    merged = model.merge_and_unload(prune=False)
    assert merged.model.layers[0].self_attn.o_proj.bias is not None
    with torch.no_grad():
        assert (spec.run(merged, inputs) - gated).abs().max() < ATOL


@pytest.mark.parametrize("kind", ["llama", "qwen2_gqa", "gpt2", "bert_cls"])
def test_unload_and_disable_before_pruning_are_the_base(kind):
    spec = MODELS[kind]
    base = _base(kind)
    base_state = _state(base)
    model = get_peft_model(_base(kind), config(task_type=spec.task_type, target_modules=None, init_weights=False,
                                               lora_r=2, bias="gates")).eval()
    inputs = spec.inputs()
    with torch.no_grad():
        base_out = spec.run(base, inputs)
        assert (spec.run(model, inputs) - base_out).abs().max() > 1e-3
        with model.disable_adapter():
            assert torch.equal(spec.run(model, inputs), base_out)
    model.merge_adapter()
    unloaded = model.unload()  # unmerges first
    assert not gated_layers(unloaded)
    state = unloaded.state_dict()
    if kind == "bert_cls":  # the classifier copy is dropped, the original stays
        state = {k: v for k, v in state.items()}
    _assert_same_state(state, base_state)
    with torch.no_grad():
        assert torch.equal(spec.run(unloaded, inputs), base_out)


def test_several_adapters_merge_without_pruning():
    spec = MODELS["llama"]
    model = get_peft_model(spec.make(0), config(task_type="CAUSAL_LM", target_modules=None, init_weights=False,
                                                lora_r=2, seed=1), adapter_name="one")
    model.add_adapter("two", config(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj"], init_weights=False,
                                    seed=2, bias="gates"))
    model.base_model.set_adapter(["one", "two"])
    model.eval()
    inputs = spec.inputs()
    with torch.no_grad():
        both = spec.run(model, inputs)
    merged = model.merge_and_unload(prune=False)
    with torch.no_grad():
        assert (spec.run(merged, inputs) - both).abs().max() < ATOL
    assert merged.model.layers[0].mlp.up_proj.weight.shape == (64, 32)


def test_two_bias_deltas_merged_into_a_bias_less_layer():
    """b'' = z_r^2 * (z_r^1 * delta_1 + delta_2) on a bias-less layer; unmerge: no bias again, weights bit for bit."""
    spec = MODELS["llama"]
    model = get_peft_model(spec.make(0), config(task_type="CAUSAL_LM", target_modules=["down_proj"],
                                                init_weights=False, bias="gates", seed=1), adapter_name="one")
    model.add_adapter("two", config(task_type="CAUSAL_LM", target_modules=["down_proj"], init_weights=False,
                                    bias="gates", seed=2))
    model.base_model.set_adapter(["one", "two"])
    model.eval()
    base_state = _state(model.get_base_model())
    inputs = spec.inputs()
    with torch.no_grad():
        both = spec.run(model, inputs)
        model.merge_adapter(["one", "two"])
        for name, layer in gated_layers(model).items():
            p1, p2 = adapter_parts(layer, "one"), adapter_parts(layer, "two")
            expected = p2["zr"] * (p1["zr"] * p1["delta"] + p2["delta"])
            assert (layer.get_base_layer().bias.detach().to(F64) - expected).abs().max() < 1e-7, name
        assert (spec.run(model, inputs) - both).abs().max() < ATOL
        model.unmerge_adapter()
        assert all(l.get_base_layer().bias is None for l in gated_layers(model).values())
        _assert_same_state(_state(model.get_base_model()), base_state)
        assert torch.equal(spec.run(model, inputs), both)


def test_bias_deltas_merged_without_pruning_survive_save_pretrained(tmp_path):
    """Llama: every q/k/v/o and gate/up/down got a bias from its delta, so the merge declares attention_bias and
    mlp_bias in the config and save_pretrained + from_pretrained keeps them (they were dropped silently before)."""
    from transformers import AutoModelForCausalLM

    spec = MODELS["llama"]
    model = get_peft_model(spec.make(0), config(task_type="CAUSAL_LM", target_modules=None, bias="gates", init_weights=False, seed=1))
    model.eval()
    inputs = spec.inputs()
    with torch.no_grad():
        gated = spec.run(model, inputs)
    merged = model.merge_and_unload(prune=False)
    assert merged.config.attention_bias is True and merged.config.mlp_bias is True
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(spec.run(reloaded, inputs), gated, rtol=1e-5, atol=1e-5)


def test_bias_deltas_the_config_cannot_declare_warn():
    """Qwen2's o_proj has no bias and no config flag for one: the merge warns, naming save_pruned."""
    spec = MODELS["qwen2_gqa"]
    model = get_peft_model(spec.make(0), config(task_type="CAUSAL_LM", target_modules=None, bias="gates", init_weights=False, seed=1))
    with pytest.warns(UserWarning, match=r"bias='gates'.*does not declare.*save_pretrained.*drop them.*save_pruned"):
        model.merge_and_unload(prune=False)
