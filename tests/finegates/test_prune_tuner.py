"""Pruning through the tuner: gates closed by setting logits (-1.0) on whole MLP neurons (up / gate / fc rows, down
columns), whole heads (v rows, o columns, or a mix), whole GQA groups and residual-stream columns / rows, fractional
gates (logits in (-0.45, 0.45)) everywhere else; then merge_and_unload() (prune=True) must give a smaller plain model
whose evaluation output (and greedy generate()) equals the gated model's, with a size report whose numbers are
computed here by hand from the closed sets; save_pruned / load_pruned round-trips it bit for bit and base + saved
adapter prunes again to the same weights. After the prune, unmerge / unload / disable_adapter refuse."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_ext import FineGatesConfig
from peft_ext.testing.models import MODELS
from peft_ext.tuners.finegates.prune import PrunedLinear, load_pruned, save_pruned

from .refs import gated_layers, randomize_biases

ATOL = 1e-5
E, HD, H = 32, 8, 4
CAUSAL = {"llama", "qwen2_gqa", "gpt2"}

# per architecture: intermediate size, kv heads, which linears carry biases, the MLP row modules, the module paths
DIMS = {
    "llama": dict(I=64, NKV=4, qkv_bias=0, o_bias=0, fc_bias=0, down_bias=0, fc=["gate", "up"]),
    "qwen2_gqa": dict(I=64, NKV=2, qkv_bias=1, o_bias=0, fc_bias=0, down_bias=0, fc=["gate", "up"]),
    "gpt2": dict(I=128, NKV=4, qkv_bias=1, o_bias=1, fc_bias=1, down_bias=1, fc=["fc"]),
    "bert_cls": dict(I=64, NKV=4, qkv_bias=1, o_bias=1, fc_bias=1, down_bias=1, fc=["fc"]),
}
_LLAMA = dict(q="model.layers.{i}.self_attn.q_proj", k="model.layers.{i}.self_attn.k_proj",
              v="model.layers.{i}.self_attn.v_proj", o="model.layers.{i}.self_attn.o_proj",
              gate="model.layers.{i}.mlp.gate_proj", up="model.layers.{i}.mlp.up_proj",
              down="model.layers.{i}.mlp.down_proj")
PATHS = {
    "llama": _LLAMA,
    "qwen2_gqa": _LLAMA,
    "gpt2": dict(qkv="transformer.h.{i}.attn.c_attn", o="transformer.h.{i}.attn.c_proj",
                 fc="transformer.h.{i}.mlp.c_fc", down="transformer.h.{i}.mlp.c_proj"),
    "bert_cls": dict(q="bert.encoder.layer.{i}.attention.self.query", k="bert.encoder.layer.{i}.attention.self.key",
                     v="bert.encoder.layer.{i}.attention.self.value",
                     o="bert.encoder.layer.{i}.attention.output.dense", fc="bert.encoder.layer.{i}.intermediate.dense",
                     down="bert.encoder.layer.{i}.output.dense"),
}
R = lambda a, b: list(range(a, b))  # noqa: E731
# the closed gates: per layer {(role, "rows" | "cols"): indices}; GPT-2's c_attn rows: q 0-31, k 32-63, v 64-95
PLANS = {
    "llama": (8, [
        {("up", "rows"): R(0, 6), ("gate", "rows"): [30, 31], ("down", "cols"): R(10, 20),  # 18 dead -> 16 cut
         ("v", "rows"): R(8, 16) + R(24, 28),  # head 1 whole; head 3 half: kept
         ("o", "cols"): R(16, 24),  # head 2
         ("q", "rows"): R(0, 8),  # a zero q head attends uniformly: NOT removable
         ("q", "cols"): R(0, 8), ("up", "cols"): R(0, 8),  # 25 % of the residual inputs: gathered
         ("o", "rows"): R(24, 32), ("down", "rows"): R(0, 4)},  # out rows: 8 gathered; 4 -> padded back to 32
        {("down", "cols"): R(0, 8),  # 8 neurons
         ("o", "cols"): R(0, 4), ("v", "rows"): R(4, 8),  # head 0 by a mix of o columns and v rows
         ("k", "cols"): R(28, 32)},  # 12.5 %, but padding to 8 keeps all 32: zeros
    ]),
    "qwen2_gqa": (1, [
        {("up", "rows"): R(0, 5), ("gate", "rows"): R(5, 10), ("down", "cols"): R(50, 56),  # 16 neurons
         ("v", "rows"): R(8, 12), ("o", "cols"): R(20, 24) + R(28, 32),  # KV group 1 (q heads 2, 3) by a mix
         ("o", "rows"): [10, 11, 12],  # 3 / 32 < 10 %: zeros
         **{(r, "cols"): R(3, 10) for r in ("q", "k", "v", "gate", "up")},  # 7 / 32 = 22 % each: gathered
         ("down", "rows"): R(0, 4)},  # 12.5 %: gathered (multiple_of 1)
        {("v", "rows"): R(0, 8),  # KV group 0 (q heads 0, 1)
         ("o", "cols"): R(16, 24),  # q head 2 zero, but head 3 of its group lives: group kept
         ("gate", "rows"): R(60, 64)},
    ]),
    "gpt2": (4, [
        {("fc", "rows"): R(0, 10), ("down", "cols"): R(100, 106),  # 16 neurons
         ("qkv", "rows"): R(72, 80) + R(24, 32) + R(56, 64),  # v of head 1; q and k of head 3 (kept)
         ("o", "cols"): R(16, 24),  # head 2
         ("qkv", "cols"): R(0, 7), ("fc", "cols"): R(10, 17),  # 7 off -> 25 kept -> padded to 28: 4 gathered
         ("o", "rows"): R(0, 8), ("down", "rows"): [31]},
        {("down", "cols"): R(0, 3),  # 3 dead -> 125 kept -> padded to 128: no cut
         ("o", "cols"): R(0, 8)},  # head 0
    ]),
    "bert_cls": (8, [
        {("fc", "rows"): R(0, 8), ("down", "cols"): R(8, 16),  # 16 neurons
         ("v", "rows"): R(8, 16), ("o", "cols"): R(24, 32),  # heads 1 and 3
         **{(r, "cols"): R(24, 32) for r in ("q", "k", "v", "fc")},  # 25 %: gathered
         ("down", "rows"): R(0, 8)},
        {("o", "cols"): R(0, 32),  # every head removable: one (head 0) is kept
         ("fc", "rows"): R(0, 4)},  # 4 dead -> 60 -> padded to 64: no cut
    ]),
}


def _padded(kept, total, multiple):
    return min(total, -(-kept // multiple) * multiple)


def expected_cuts(kind, residual=True):
    """What the plan removes, by hand: MLP neurons first (their fc rows + biases and down columns), then whole KV
    groups (q, k, v rows + biases, o columns), then gathered residual dims (times the module's remaining other side,
    + bias entries for output rows)."""
    d, (mult, plan) = DIMS[kind], PLANS[kind]
    I, NKV, rep = d["I"], d["NKV"], H // d["NKV"]
    out = dict(params=0, neurons=0, heads=0, groups=0, res_in=0, res_out=0, inter=[], heads_after=[])
    for layer in plan:
        closed = lambda role, side: set(layer.get((role, side), ()))  # noqa: E731
        dead = closed("down", "cols").union(*(closed(r, "rows") for r in d["fc"]))
        kept_n = _padded(I - len(dead), I, mult)
        rn = I - kept_n
        out["params"] += rn * (len(d["fc"]) * (E + d["fc_bias"]) + E)
        out["neurons"] += rn
        v_rows = {r - 2 * E for r in closed("qkv", "rows") if r >= 2 * E} if kind == "gpt2" else closed("v", "rows")
        o_cols = closed("o", "cols")

        def head_zero(h):
            return all((h // rep) * HD + j in v_rows or h * HD + j in o_cols for j in range(HD))

        removable = [all(head_zero(g * rep + j) for j in range(rep)) for g in range(NKV)]
        if all(removable):
            removable[0] = False
        rg = sum(removable)
        rq = rg * rep
        out["params"] += rq * HD * (E + d["qkv_bias"]) + 2 * rg * HD * (E + d["qkv_bias"]) + rq * HD * E
        out["heads"] += rq
        out["groups"] += rg
        q_out, kv_out = (H - rq) * HD, (NKV - rg) * HD
        rows_now = {"q": q_out, "k": kv_out, "v": kv_out, "qkv": q_out + 2 * kv_out, "gate": kept_n, "up": kept_n,
                    "fc": kept_n}
        for role in rows_now:
            n_off = len(closed(role, "cols"))
            if residual and n_off and n_off / E >= 0.10:
                g = E - _padded(E - n_off, E, mult)
                out["params"] += g * rows_now[role]
                out["res_in"] += g
        for role, cols_now, bias in (("o", q_out, d["o_bias"]), ("down", kept_n, d["down_bias"])):
            n_off = len(closed(role, "rows"))
            if residual and n_off and n_off / E >= 0.10:
                g = E - _padded(E - n_off, E, mult)
                out["params"] += g * (cols_now + bias)
                out["res_out"] += g
        out["inter"].append(kept_n)
        out["heads_after"].append(H - rq)
    return out


def _factory(kind):
    def make():
        model = MODELS[kind].make(0)
        randomize_biases(model)
        return model

    return make


def gated_model(kind, **kw):
    """The tuner with the plan's closed gates and fractional gates everywhere else."""
    spec = MODELS[kind]
    mult, plan = PLANS[kind]
    model = get_peft_model(_factory(kind)(), FineGatesConfig(task_type=spec.task_type, seed=0, prune_multiple_of=mult,
                                                             **kw))
    layers = gated_layers(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers.values():  # fractional: gates in (0.08, 0.92)
            for d in (layer.gates_row_logits, layer.gates_col_logits):
                d["default"].copy_(torch.rand(d["default"].shape, generator=g) * 0.9 - 0.45)
        for i, closed in enumerate(plan):
            for (role, side), idx in closed.items():
                layer = layers[PATHS[kind][role].format(i=i)]
                d = layer.gates_row_logits if side == "rows" else layer.gates_col_logits
                d["default"][torch.tensor(idx)] = -1.0
    return model.eval()


def _n(model):
    return sum(p.numel() for p in model.parameters())


def _generate(model, spec):
    ids = spec.inputs(batch=2)["input_ids"][:, :6]
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2_gqa", "gpt2", "bert_cls"])
def test_prune_through_the_tuner(kind, tmp_path):
    spec = MODELS[kind]
    exp = expected_cuts(kind)
    assert exp["params"] > 0 and exp["neurons"] > 0 and exp["heads"] > 0 and exp["res_in"] + exp["res_out"] > 0
    model = gated_model(kind)
    inputs = spec.inputs()
    n_base = _n(_factory(kind)())
    padded = {k: v.clone() for k, v in inputs.items()}
    padded["attention_mask"][0, -3:] = 0  # padding: the attention mask with fewer heads
    padded["attention_mask"][2, -1:] = 0
    with torch.no_grad():
        gated = spec.run(model, inputs)
        gated_padded = spec.run(model, padded)
        base_out = spec.run(_factory(kind)(), inputs)
    assert (gated - base_out).abs().max() > 1e-3
    generated = _generate(model, spec) if kind in CAUSAL else None
    model.save_pretrained(tmp_path / "adapter")

    pruned = model.merge_and_unload()  # prune=True is the default
    assert not gated_layers(pruned) and not isinstance(pruned, PeftModel)
    report = model.base_model.prune_report
    assert report is not None and pruned.finegates_prune_report is report
    assert report.params_before == n_base
    assert report.params_after == _n(pruned)
    assert report.params_before - report.params_after == exp["params"]
    assert report.mlp_neurons_removed == exp["neurons"]
    assert report.heads_removed == exp["heads"] and report.kv_groups_removed == exp["groups"]
    assert report.residual_in_dims_gathered == exp["res_in"]
    assert report.residual_out_dims_gathered == exp["res_out"]
    assert [row["intermediate_after"] for row in report.layers] == exp["inter"]
    assert [row["heads_after"] for row in report.layers] == exp["heads_after"]
    assert sum(report.params_removed_by_category.values()) == exp["params"]

    with torch.no_grad():
        out = spec.run(pruned, inputs)
        padded_out = spec.run(pruned, padded)
    assert out.shape == gated.shape
    assert (out - gated).abs().max() < ATOL
    assert (padded_out - gated_padded).abs().max() < ATOL
    if kind in CAUSAL:
        assert torch.equal(_generate(pruned, spec), generated)

    # the real shapes: intermediate sizes and head counts per layer
    for i in range(2):
        down = pruned.get_submodule(PATHS[kind]["down"].format(i=i))
        inner = down.linear if isinstance(down, PrunedLinear) else down
        n_inter = inner.weight.shape[0] if type(inner).__name__ == "Conv1D" else inner.weight.shape[1]
        assert n_inter == exp["inter"][i]
    assert any(isinstance(m, PrunedLinear) for m in pruned.modules())

    # save_pruned / load_pruned: bit for bit
    save_pruned(pruned, str(tmp_path / "pruned"), report)
    loaded = load_pruned(str(tmp_path / "pruned"))
    a, b = pruned.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(spec.run(loaded.eval(), inputs), spec.run(pruned.eval(), inputs))
    if kind in CAUSAL:
        assert torch.equal(_generate(loaded, spec), generated)

    # base + saved adapter, pruned again: the same weights
    again = PeftModel.from_pretrained(_factory(kind)(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(spec.run(again, inputs), gated)
    repruned = again.merge_and_unload()
    c = repruned.state_dict()
    assert sorted(c) == sorted(a)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert again.base_model.prune_report.to_dict() == report.to_dict()


PRUNED = r"physically pruned by merge_and_unload\(prune=True\).*{what}.*PeftModel\.from_pretrained"


def test_after_a_prune_unmerge_unload_disable_refuse():
    model = gated_model("llama")
    model.merge_and_unload()
    tuner = model.base_model
    for what, call in (("unload()", model.unload), ("unmerge_adapter()", model.unmerge_adapter),
                       ("disable_adapter()", tuner.disable_adapter_layers),
                       ("merge_and_unload()", model.merge_and_unload), ("merge_adapter()", model.merge_adapter),
                       ("set_adapter()", lambda: tuner.set_adapter("default")),
                       ("enable_adapter_layers()", tuner.enable_adapter_layers)):
        with pytest.raises(RuntimeError, match=PRUNED.format(what=re.escape(what))):
            call()
    with pytest.raises(RuntimeError, match=PRUNED.format(what="add_adapter")):
        model.add_adapter("other", FineGatesConfig(task_type="CAUSAL_LM"))


def test_after_a_prune_peft_model_disable_adapter_names_the_prune():
    model = gated_model("llama")
    model.merge_and_unload()
    with pytest.raises(RuntimeError, match=PRUNED.format(what=re.escape("disable_adapter()"))):
        with model.disable_adapter():
            pass


def test_after_a_prune_save_pretrained_refuses_and_the_wrapper_still_runs_the_pruned_model(tmp_path):
    spec = MODELS["llama"]
    model = gated_model("llama")
    model.eval()
    inputs = spec.inputs()
    with torch.no_grad():
        gated = spec.run(model, inputs)
    pruned = model.merge_and_unload()
    with pytest.raises(RuntimeError, match=PRUNED.format(what=re.escape("save_pretrained()")) + r"|save_pruned"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with torch.no_grad():  # the PeftModel wrapper runs the pruned model it now holds
        torch.testing.assert_close(spec.run(model, inputs), gated, rtol=1e-5, atol=1e-5)
        assert torch.equal(spec.run(model, inputs), spec.run(pruned, inputs))


def test_after_a_prune_peft_model_disable_adapter_refuses():
    model = gated_model("llama")
    model.merge_and_unload()
    with pytest.raises((RuntimeError, ValueError)):
        with model.disable_adapter():
            pass


def test_prune_with_several_active_adapters_is_refused_and_prune_false_works():
    spec = MODELS["llama"]
    model = gated_model("llama")
    model.add_adapter("two", FineGatesConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj"],
                                             init_weights=False, seed=3))
    model.base_model.set_adapter(["default", "two"])
    model.eval()
    inputs = spec.inputs()
    with torch.no_grad():
        both = spec.run(model, inputs)
    with pytest.raises(ValueError,
                       match=r"prune=True.*several active adapters.*adapter_names=\[one name\].*prune=False"):
        model.merge_and_unload()
    assert gated_layers(model) and not any(l.merged for l in gated_layers(model).values())  # nothing touched
    merged = model.merge_and_unload(prune=False)
    with torch.no_grad():
        assert (spec.run(merged, inputs) - both).abs().max() < ATOL
    assert _n(merged) == _n(_factory("llama")())


def test_prune_one_of_several_adapters_by_name():
    spec = MODELS["llama"]
    model = gated_model("llama")
    model.add_adapter("two", FineGatesConfig(task_type="CAUSAL_LM", init_weights=False, seed=3))
    model.eval()
    inputs = spec.inputs()
    with torch.no_grad():
        default = spec.run(model, inputs)
    pruned = model.merge_and_unload(adapter_names=["default"])
    assert model.base_model.prune_report.params_before - model.base_model.prune_report.params_after == \
        expected_cuts("llama")["params"]
    with torch.no_grad():
        assert (spec.run(pruned, inputs) - default).abs().max() < ATOL


def test_prune_report_numbers_for_an_untrained_adapter_are_zero():
    """Nothing closed at init: the pruned model is the base (no cut, same outputs)."""
    spec = MODELS["qwen2_gqa"]
    model = get_peft_model(spec.make(0), FineGatesConfig(task_type="CAUSAL_LM")).eval()
    inputs = spec.inputs()
    pruned = model.merge_and_unload()
    report = pruned.finegates_prune_report
    assert report.params_before == report.params_after == _n(spec.make(0))
    with torch.no_grad():
        assert torch.equal(spec.run(pruned, inputs), spec.run(spec.make(0), inputs))
    assert not any(isinstance(m, PrunedLinear) for m in pruned.modules())
    assert all(type(m) is nn.Linear for n, m in pruned.named_modules() if n.endswith("_proj"))


def test_prune_of_an_unknown_architecture_warns_and_keeps_zeros():
    """TinyMLP has no attention / MLP block the pruning knows: it folds, warns, cuts nothing; output unchanged."""
    spec = MODELS["mlp"]
    model = get_peft_model(spec.make(0), FineGatesConfig(target_modules=["lin0", "lin1", "lin2"], init_weights=False,
                                                         seed=0)).eval()
    with torch.no_grad():
        model.base_model.model.lin1.gates_row_logits["default"][:5] = -1.0
        model.base_model.model.lin2.gates_col_logits["default"][10:13] = -1.0
        gated = spec.run(model, spec.inputs())
    with pytest.warns(UserWarning, match="no known attention/MLP blocks in TinyMLP; no structural cuts"):
        pruned = model.merge_and_unload()
    report = pruned.finegates_prune_report
    assert report.unknown_architecture and report.params_before == report.params_after == _n(spec.make(0))
    assert sorted((d["module"], d["side"], d["count"]) for d in report.dims_left_as_zeros) == [
        ("lin1", "out", 5), ("lin2", "in", 3)]
    with torch.no_grad():
        assert (spec.run(pruned, spec.inputs()) - gated).abs().max() < ATOL


def test_prune_after_merge_adapter_and_with_layers_to_transform():
    spec = MODELS["llama"]
    inputs = spec.inputs()
    model = gated_model("llama")
    with torch.no_grad():
        gated = spec.run(model, inputs)
    model.merge_adapter()  # already merged: merge_and_unload folds nothing twice
    pruned = model.merge_and_unload()
    assert pruned.finegates_prune_report.params_removed == expected_cuts("llama")["params"]
    with torch.no_grad():
        assert (spec.run(pruned, inputs) - gated).abs().max() < ATOL

    # LoraConfig's layers_to_transform / layers_pattern: gates on block 1 only, so only block 1 shrinks
    model = get_peft_model(spec.make(0), FineGatesConfig(task_type="CAUSAL_LM", layers_to_transform=[1],
                                                         layers_pattern="layers", seed=0)).eval()
    layers = gated_layers(model)
    assert sorted(layers) == sorted(PATHS["llama"][r].format(i=1) for r in PATHS["llama"])
    with torch.no_grad():
        layers["model.layers.1.mlp.up_proj"].gates_row_logits["default"][:16] = -1.0
        gated = spec.run(model, inputs)
    pruned = model.merge_and_unload()
    assert [row["intermediate_after"] for row in pruned.finegates_prune_report.layers] == [64, 48]
    with torch.no_grad():
        assert (spec.run(pruned, inputs) - gated).abs().max() < ATOL


@pytest.mark.parametrize("kind", ["qwen2_gqa", "bert_cls"])
def test_residual_prune_zeros_cuts_neurons_and_heads_only(kind):
    spec = MODELS[kind]
    model = gated_model(kind, residual_prune="zeros")
    inputs = spec.inputs()
    with torch.no_grad():
        gated = spec.run(model, inputs)
    pruned = model.merge_and_unload()
    report = pruned.finegates_prune_report
    exp = expected_cuts(kind, residual=False)
    assert exp["params"] < expected_cuts(kind)["params"]
    assert report.params_removed == exp["params"] and report.params_after == _n(pruned)
    assert report.residual_in_dims_gathered == report.residual_out_dims_gathered == 0
    assert not any(isinstance(m, PrunedLinear) for m in pruned.modules())
    assert any(d["reason"] == 'residual_prune="zeros"' for d in report.dims_left_as_zeros)
    with torch.no_grad():
        assert (spec.run(pruned, inputs) - gated).abs().max() < ATOL
