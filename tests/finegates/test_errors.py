"""Bad inputs are refused with messages that name the field and the fix: target_sparsity outside [0, 0.84), gates
on the LM head / tied or plain embeddings, pruning neurons by gate rows when act(0) != 0, and other config errors.
(Merging on a bitsandbytes base: test_bnb.py; unmerge / unload / disable_adapter after a prune and prune=True with
several active adapters: test_prune_tuner.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_ext import FineGatesConfig
from peft_ext.testing.models import MODELS

from .refs import gated_layers, net


@pytest.mark.parametrize("value", [-0.01, -1.0, 0.84, 0.85, 0.9, 1.0, math.nan, math.inf])
def test_target_sparsity_outside_the_reachable_range(value):
    with pytest.raises(ValueError, match=r"FineGatesConfig\.target_sparsity=.* is outside \[0, 0\.84\).*Phi\(-1\)"
                                         r".*Use a value such as"):
        FineGatesConfig(target_sparsity=value)


@pytest.mark.parametrize("value", [0.0, 0.3, 0.8399])
def test_target_sparsity_inside_the_range(value):
    assert FineGatesConfig(target_sparsity=value).target_sparsity == value


@pytest.mark.parametrize("kind,targets", [
    ("llama", ["q_proj", "lm_head"]),  # untied head
    ("gpt2", ["c_attn", "lm_head"]),  # head tied to the input embeddings
])
def test_gates_on_the_lm_head_are_refused(kind, targets):
    spec = MODELS[kind]
    with pytest.raises(ValueError, match=r"does not gate the LM head / tied embeddings \(lm_head\).*Leave lm_head out "
                                         r"of target_modules.*exclude_modules"):
        get_peft_model(spec.make(0), FineGatesConfig(task_type="CAUSAL_LM", target_modules=targets))


@pytest.mark.parametrize("kind,name", [("llama", "embed_tokens"), ("gpt2", "wte"), ("bert_cls", "word_embeddings")])
def test_gates_on_embeddings_are_refused(kind, name):
    spec = MODELS[kind]
    with pytest.raises(ValueError, match=rf"FineGates gates linear layers.*{name} is a Embedding.*Leave it out of "
                                         r"target_modules \(use exclude_modules\)"):
        get_peft_model(spec.make(0), FineGatesConfig(task_type=spec.task_type, target_modules=[name]))


def test_all_linear_leaves_the_tied_head_alone():
    spec = MODELS["gpt2"]
    model = get_peft_model(spec.make(0), FineGatesConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    names = set(gated_layers(model))
    assert names and not any("lm_head" in n or "wte" in n for n in names)


def _sigmoid_llama():
    spec = MODELS["llama"]
    torch.manual_seed(0)
    return spec.build(hidden=32, hidden_act="sigmoid").eval()  # act(0) = 0.5


def test_neuron_pruning_by_gate_rows_needs_act_zero_at_zero():
    model = get_peft_model(_sigmoid_llama(), FineGatesConfig(task_type="CAUSAL_LM", seed=0))
    with torch.no_grad():
        gated_layers(model)["model.layers.0.mlp.gate_proj"].gates_row_logits["default"][:8] = -1.0
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp's activation has act\(0\) != 0, so the 8 neurons whose "
                                         r"gate_proj row gates are closed.*prune=False.*leave gate_proj out of "
                                         r"FineGatesConfig\.target_modules"):
        model.merge_and_unload()


def test_act_nonzero_at_zero_is_fine_for_up_rows_and_down_columns():
    spec = MODELS["llama"]
    model = get_peft_model(_sigmoid_llama(), FineGatesConfig(task_type="CAUSAL_LM", seed=0)).eval()
    layers = gated_layers(model)
    with torch.no_grad():
        layers["model.layers.0.mlp.up_proj"].gates_row_logits["default"][:8] = -1.0
        layers["model.layers.0.mlp.down_proj"].gates_col_logits["default"][8:16] = -1.0
        gated = spec.run(model, spec.inputs())
    pruned = model.merge_and_unload()
    assert pruned.model.layers[0].mlp.up_proj.weight.shape == (48, 32)
    with torch.no_grad():
        assert (spec.run(pruned, spec.inputs()) - gated).abs().max() < 1e-5


def test_a_refused_prune_leaves_the_adapter_in_place():
    model = get_peft_model(_sigmoid_llama(), FineGatesConfig(task_type="CAUSAL_LM", seed=0))
    with torch.no_grad():
        gated_layers(model)["model.layers.0.mlp.gate_proj"].gates_row_logits["default"][:8] = -1.0
    spec = MODELS["llama"]
    model.eval()
    with torch.no_grad():
        before = spec.run(model, spec.inputs())
    with pytest.raises(ValueError, match=r"act\(0\) != 0.*Nothing was merged.*prune=False"):
        model.merge_and_unload()
    assert gated_layers(model)
    assert not any(layer.merged for layer in gated_layers(model).values())
    with torch.no_grad():
        assert torch.equal(spec.run(model, spec.inputs()), before)
    folded = model.merge_and_unload(prune=False)  # the fold alone needs no act(0) = 0
    with torch.no_grad():
        torch.testing.assert_close(spec.run(folded, spec.inputs()), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,pattern", [
    ({"gate_init_mean": 0.3}, r"gate_init_mean=0\.3 with init_weights=True.*Use gate_init_mean >= 0\.55"),
    ({"lora_alpha": 8.0}, r"lora_alpha is set but lora_r=0.*set lora_r > 0 or drop lora_alpha"),
    ({"gate_rows": False, "gate_columns": False}, r"gate_rows=False and gate_columns=False.*keep at least one True"),
    ({"sparsity_objective": "l1"}, r"sparsity_objective='l1' is not one of \('target', 'l0'\)"),
    ({"bias": "all"}, r"FineGatesConfig\.bias='all' is not one of \('none', 'gates'\)"),
    ({"residual_prune": "drop"}, r"residual_prune='drop' is not one of"),
    ({"reg_sigma": 0.0}, r"reg_sigma must be a number > 0"),
    ({"kurtosis_tau": 0.0}, r"kurtosis_tau must be a number >= 0 \(and > 0\)"),
    ({"prune_multiple_of": 0}, r"prune_multiple_of must be an integer >= 1"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
])
def test_config_errors_name_the_field(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        FineGatesConfig(**kw)


def test_kurtosis_needs_the_target_objective():
    with pytest.raises(ValueError, match=r"kurtosis=True weights the 'target' objective.*sparsity_objective='target'"):
        get_peft_model(net(), FineGatesConfig(target_modules=["lin"], kurtosis=True, sparsity_objective="l0"))


def test_no_default_targets_for_an_unknown_architecture():
    with pytest.raises(ValueError, match=r"target_modules is None and there is no default for "
                                         r"model_type='custom'.*give target_modules"):
        get_peft_model(MODELS["mlp"].make(0), FineGatesConfig())


def test_base_parameter_names_with_the_prefix_are_refused():
    model = net()
    model.gates_scale = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"parameters whose names contain 'gates_' \(gates_scale\).*Rename them"):
        get_peft_model(model, FineGatesConfig(target_modules=["lin"]))


def test_non_linear_targets_are_refused():
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

    with pytest.raises(ValueError, match=r"norm is a LayerNorm.*use exclude_modules"):
        get_peft_model(WithNorm(), FineGatesConfig(target_modules=["lin", "norm"]))
