"""FineGates forwards against float64 references written by hand:
y = z_r * ((x * z_c) (W + s B A)^T + b + delta) for nn.Linear and GPT-2's Conv1D (stored (in, out)); several active
adapters compose as merging them in order would; mixed batches (`adapter_names=`) give every row its own gates."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_ext.testing.models import MODELS

from .refs import F64, adapter_parts, config, eval_gate, gated_layers, gated_linear, net, randomize_biases

ATOL = 1e-5


def _x(shape, seed=3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("extras", ["gates_only", "bias_delta", "lora", "lora_and_bias_delta"])
def test_linear_forward_reference(bias, extras):
    kw = {"init_weights": False}  # fractional gates, random delta and LoRA B: every term visible
    if "lora" in extras:
        kw.update(lora_r=3, lora_alpha=7.5)
    if "bias" in extras:
        kw["bias"] = "gates"
    model = get_peft_model(net(bias=bias), config(**kw)).eval()
    scale = 7.5 / 3 if "lora" in extras else 1.0
    x = _x((2, 5, 16))
    h = x
    for name in ("lin", "lin2"):
        layer = gated_layers(model)[name]
        base = layer.get_base_layer()
        parts = adapter_parts(layer, "default", scale)
        assert ("default" in layer.gates_lora_A) == ("lora" in extras)
        assert ("default" in layer.gates_bias) == ("bias" in extras)
        if "bias" in extras:
            assert parts["delta"].abs().min() > 0
        ref = gated_linear(h, base.weight, base.bias, parts["zr"], parts["zc"], parts["lora"], parts["delta"])
        with torch.no_grad():
            y = layer(h)
        assert y.dtype == torch.float32
        assert (y.to(F64) - ref).abs().max() < ATOL, name
        assert (ref - base(h).to(F64)).abs().max() > 1e-2  # not the base
        h = torch.relu(y)
    with torch.no_grad():
        assert (model(x) - y).abs().max() == 0


@pytest.mark.parametrize("lora", [0, 2])
def test_conv1d_forward_reference(lora):
    """GPT-2's c_attn (Conv1D, weight stored (in, out) = (32, 96)):
    y = z_r * ((x * z_c)(W_stored + s (B A)^T) + b + d)."""
    spec = MODELS["gpt2"]
    kw = dict(lora_r=lora, lora_alpha=3.0) if lora else {}
    model = get_peft_model(spec.make(0), config(target_modules=["c_attn"], init_weights=False, bias="gates",
                                                task_type="CAUSAL_LM", **kw)).eval()
    layer = gated_layers(model)["transformer.h.0.attn.c_attn"]
    conv = layer.get_base_layer()
    assert type(conv).__name__ == "Conv1D" and tuple(conv.weight.shape) == (32, 96)
    with torch.no_grad():
        conv.bias.normal_(0, 0.2)
    th_r, th_c = layer.gates_row_logits["default"], layer.gates_col_logits["default"]
    assert (th_r.numel(), th_c.numel()) == (96, 32)
    zr, zc = eval_gate(th_r), eval_gate(th_c)
    w = conv.weight.detach().to(F64)  # (in, out)
    if lora:
        a = layer.gates_lora_A["default"].weight.detach().to(F64)  # (r, in)
        b = layer.gates_lora_B["default"].weight.detach().to(F64)  # (out, r)
        w = w + (3.0 / lora) * (b @ a).T
    delta = layer.gates_bias["default"].detach().to(F64)
    x = _x((2, 6, 32))
    ref = (((x.to(F64) * zc) @ w) + conv.bias.detach().to(F64) + delta) * zr
    with torch.no_grad():
        y = layer(x)
    assert (y.to(F64) - ref).abs().max() < ATOL


def _two_adapters(model_factory, target_modules, task_type=None, lora_a=True):
    model = get_peft_model(model_factory(), config(target_modules=target_modules, init_weights=False, bias="gates",
                                                   task_type=task_type, seed=1,
                                                   **({"lora_r": 2, "lora_alpha": 3.0} if lora_a else {})),
                           adapter_name="one")
    model.add_adapter("two", config(target_modules=target_modules, init_weights=False, lora_r=3, seed=2,
                                  gate_columns=False, task_type=task_type))
    return model.eval()


@pytest.mark.parametrize("order", [["one", "two"], ["two", "one"]])
def test_several_active_adapters_compose_like_merging_in_order(order):
    """set_adapter([first, second]): y = z_r^2 * ( z_r^1 * ((x z_c^2 z_c^1)(W + L_1)^T + b + d_1)
    + (x z_c^2) L_2^T + d_2 ), written out; and the same as merge_adapter([first, second])."""
    model = _two_adapters(net, ["lin"])
    layer = gated_layers(model)["lin"]
    base = layer.get_base_layer()
    model.base_model.set_adapter(order)
    scales = {"one": 3.0 / 2, "two": 1.0}
    p1, p2 = (adapter_parts(layer, name, scales[name]) for name in order)
    x = _x((3, 4, 16)).to(F64)
    w, b0 = base.weight.detach().to(F64), base.bias.detach().to(F64)
    u2 = x * p2["zc"]  # what the second (outer) adapter's LoRA sees
    u1 = u2 * p1["zc"]  # what the first one's LoRA and the base see
    inner = p1["zr"] * (u1 @ (w + p1["lora"]).T + b0 + p1["delta"])
    ref = p2["zr"] * (inner + u2 @ p2["lora"].T + p2["delta"])
    with torch.no_grad():
        y = layer(x.float())
    assert (y.to(F64) - ref).abs().max() < ATOL
    single = gated_linear(x, w, b0, p1["zr"], p1["zc"], p1["lora"], p1["delta"])
    assert (ref - single).abs().max() > 1e-2  # the second adapter matters

    out = model(x.float()).detach()
    model.merge_adapter(order)
    assert layer.merged and layer.merged_adapters == order
    with torch.no_grad():
        merged_out = model(x.float())
        assert (layer(x.float()).to(F64) - ref).abs().max() < ATOL
    assert (merged_out - out).abs().max() < ATOL
    model.unmerge_adapter()


def test_several_active_adapters_on_llama_equal_merge_adapter():
    spec = MODELS["llama"]
    model = _two_adapters(lambda: spec.make(0), ["q_proj", "v_proj", "up_proj", "down_proj"], "CAUSAL_LM")
    model.base_model.set_adapter(["one", "two"])
    inputs = spec.inputs()
    with torch.no_grad():
        both = spec.run(model, inputs)
        model.set_adapter("one")
        only_a = spec.run(model, inputs)
        model.base_model.set_adapter(["one", "two"])
        model.merge_adapter(["one", "two"])
        merged = spec.run(model, inputs)
    assert (both - only_a).abs().max() > 1e-3
    assert (merged - both).abs().max() < ATOL


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert_cls"])
def test_mixed_batch_rows_equal_single_adapter_runs(kind):
    spec = MODELS[kind]

    def factory():
        m = spec.make(0)
        randomize_biases(m)
        return m

    targets = {"llama": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"],
               "bert_cls": ["query", "value", "dense"]}[kind]
    model = _two_adapters(factory, targets, spec.task_type)
    inputs = spec.inputs(batch=5)
    names = ["one", "__base__", "two", "one", "two"]
    with torch.no_grad():
        mixed = spec.run(model, {**inputs, "adapter_names": names})
        single = {}
        for name in ("one", "two"):
            model.set_adapter(name)
            single[name] = spec.run(model, inputs)
        with model.disable_adapter():
            single["__base__"] = spec.run(model, inputs)
        base = spec.run(factory(), inputs)
    assert torch.equal(single["__base__"], base)
    assert (single["one"] - single["two"]).abs().max() > 1e-3 and (single["one"] - base).abs().max() > 1e-3
    for row, name in enumerate(names):
        assert (mixed[row] - single[name][row]).abs().max() < 1e-6, (row, name)


def test_mixed_batch_with_an_adapter_that_lacks_a_layer():
    """Adapter "two" gates up_proj only: its rows see the base everywhere else."""
    spec = MODELS["llama"]
    model = get_peft_model(spec.make(0), config(target_modules=None, task_type="CAUSAL_LM", init_weights=False,
                                                lora_r=2, seed=1), adapter_name="one")
    model.add_adapter("two", config(target_modules=["up_proj"], task_type="CAUSAL_LM", init_weights=False,
                                    bias="gates", seed=2))
    model.eval()
    inputs = spec.inputs(batch=4)
    names = ["two", "one", "__base__", "two"]
    with torch.no_grad():
        mixed = spec.run(model, {**inputs, "adapter_names": names})
        single = {}
        for name in ("one", "two"):
            model.set_adapter(name)
            single[name] = spec.run(model, inputs)
        single["__base__"] = spec.run(spec.make(0), inputs)
    for row, name in enumerate(names):
        assert (mixed[row] - single[name][row]).abs().max() < 1e-6, (row, name)


def test_mixed_batch_is_refused_in_training_mode():
    model = _two_adapters(net, ["lin"]).train()
    with pytest.raises(ValueError, match="adapter_names.*inference.*eval"):
        model(_x((2, 16)), adapter_names=["one", "two"])
