"""Physical pruning of folded FineGates models (peft_ext.tuners.finegates.prune).

Structured exact zeros are written by hand into tiny fp32 models (what folded closed gates leave), the model is
pruned, and the output must not change (atol 1e-5) while the parameter count drops by exactly the amount computed
here from the masks (formulas written out in this file, not taken from the pruning code).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

from peft_ext.testing.models import MODELS
from peft_ext.tuners.finegates.prune import PrunedLinear, PruneReport, load_pruned, prune_model, save_pruned

E, I, H, HD = 32, 64, 4, 8  # tiny models: hidden, intermediate, heads, head_dim
INTER = {"gpt2": 4 * E}  # GPT-2's n_inner defaults to 4 * n_embd; the others use intermediate_size = 2 * hidden


def inter_size(kind):
    return INTER.get(kind, I)
KINDS = ["llama", "qwen2_gqa", "gpt2", "bert_cls"]
CAUSAL = {"llama", "qwen2_gqa", "gpt2"}
ATOL = dict(atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ helpers
def W(mod):
    """The (out, in) logical weight as a writable view (Conv1D stores (in, out))."""
    return mod.weight.T if type(mod).__name__ == "Conv1D" else mod.weight


def zero_rows(mod, rows, bias=True):
    with torch.no_grad():
        W(mod)[torch.as_tensor(rows)] = 0
        if bias and mod.bias is not None:
            mod.bias[torch.as_tensor(rows)] = 0


def zero_cols(mod, cols):
    with torch.no_grad():
        W(mod)[:, torch.as_tensor(cols)] = 0


def blocks(model, kind):
    """Per layer: the linears by role."""
    out = []
    if kind in ("llama", "qwen2_gqa"):
        for L in model.model.layers:
            a, m = L.self_attn, L.mlp
            out.append(dict(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj, gate=m.gate_proj, up=m.up_proj,
                            down=m.down_proj, attn=a, mlp=m))
    elif kind == "gpt2":
        for L in model.transformer.h:
            out.append(dict(qkv=L.attn.c_attn, o=L.attn.c_proj, gate=L.mlp.c_fc, up=None, down=L.mlp.c_proj,
                            attn=L.attn, mlp=L.mlp))
    else:
        for L in model.bert.encoder.layer:
            s = L.attention.self
            out.append(dict(q=s.query, k=s.key, v=s.value, o=L.attention.output.dense, gate=L.intermediate.dense,
                            up=None, down=L.output.dense, attn=s, mlp=L))
    return out


def make(kind, seed=0, **cfg):
    """A tiny model with every bias randomised (HF initialises biases to 0, which would hide bias handling)."""
    spec = MODELS[kind]
    if cfg:
        torch.manual_seed(seed)
        model = spec.build(hidden=E, **cfg).float().eval()
    else:
        model = spec.make(seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(getattr(mod, "bias", None), nn.Parameter) and mod.bias.dim() == 1:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    return model


def v_rows(b, head, dims, kind):
    """Logical output rows of the value projection for (kv) head `head`, dims `dims`."""
    base = 2 * H * HD if kind == "gpt2" else 0
    return [base + head * HD + d for d in dims]


def v_mod(b, kind):
    return b["qkv"] if kind == "gpt2" else b["v"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def n_kv(kind):
    return 2 if kind == "qwen2_gqa" else H


def apply_plan(model, kind, seed=0, n_res=7, below=2, mlp=True, heads=True, residual=True):
    """Write structured zeros; return the plan (what was zeroed) for the hand-written expected count."""
    g = torch.Generator().manual_seed(seed)
    plan = []
    for li, b in enumerate(blocks(model, kind)):
        p = dict(dead=0, heads_removed=0, groups_removed=0, res_in={}, res_out={})
        gated = b["up"] is not None
        if mlp:
            perm = torch.randperm(inter_size(kind), generator=g).tolist()
            A, B, C = perm[:5], perm[5:10], perm[10:16]
            if gated:
                zero_rows(b["up"], A)
                zero_rows(b["gate"], B)
            else:
                zero_rows(b["gate"], A + B)
            zero_cols(b["down"], C)
            # fractional gates: scaled, not zero -> kept
            with torch.no_grad():
                W(b["up"] if gated else b["gate"])[torch.tensor(perm[16:20])] *= 0.5
                W(b["down"])[:, torch.tensor(perm[20:24])] *= 0.25
            if b["gate"].bias is not None:  # weight row zero, bias not: act(b) != 0 -> NOT dead
                zero_rows(b["gate"], [perm[24]], bias=False)
            p["dead"] = 16
        if heads:
            if kind == "qwen2_gqa":
                if li == 0:  # kv head 1 (q heads 2, 3): whole group removable
                    zero_rows(b["v"], v_rows(b, 1, range(HD), kind))
                    p["heads_removed"], p["groups_removed"] = 2, 1
                else:  # q head 0 removable, but head 1 of its group not -> group kept; zero k head: kept
                    zero_cols(b["o"], [0 * HD + d for d in range(HD)])
                    zero_rows(b["k"], [1 * HD + d for d in range(HD)])
            else:
                full, mixed, partial, qzero = [(1, 2, 3, 0), (0, 2, 3, 1)][li]
                zero_rows(v_mod(b, kind), v_rows(b, full, range(HD), kind))
                zero_rows(v_mod(b, kind), v_rows(b, mixed, range(4), kind))
                zero_cols(b["o"], [mixed * HD + d for d in range(4, HD)])
                zero_rows(v_mod(b, kind), v_rows(b, partial, range(4), kind))  # half the head: kept
                qk_rows = [qzero * HD + d for d in range(HD)]
                if kind == "gpt2":  # zero q and k head: attends uniformly, NOT removable
                    zero_rows(b["qkv"], qk_rows + [H * HD + r for r in qk_rows])
                else:
                    zero_rows(b["q"], qk_rows)
                    zero_rows(b["k"], qk_rows)
                p["heads_removed"] = p["groups_removed"] = 2
        if residual:
            ins = ["qkv"] if kind == "gpt2" else ["q", "k", "v"]
            ins += ["gate", "up"] if gated else ["gate"]
            for role in ins:
                n = below if (li == 1 and role == ("up" if gated else "gate")) else n_res
                zero_cols(b[role], torch.randperm(E, generator=g)[:n])
                p["res_in"][role] = n
            for role in ("o", "down"):
                zero_rows(b[role], torch.randperm(E, generator=g)[:n_res])
                p["res_out"][role] = n_res
        plan.append(p)
    return plan


def expected_removed(kind, plan, threshold=0.10):
    """The parameter count the plan removes, from the masks (multiple_of=1), written out per architecture."""
    total = 0
    gated = kind in ("llama", "qwen2_gqa")
    qkv_bias = kind != "llama"  # qwen2 q/k/v, GPT-2 c_attn, BERT: biases; llama: none
    o_bias = kind in ("gpt2", "bert_cls")
    mlp_bias = not gated
    for p in plan:
        d = p["dead"]
        # MLP neurons: rows of gate+up (or fc, + its bias) and columns of down
        total += d * (2 * E if gated else E + 1) + d * E
        inter = inter_size(kind) - d
        # heads: q/k/v rows (+bias), o columns
        r, gr = p["heads_removed"], p["groups_removed"]
        total += r * HD * (E + qkv_bias)  # q rows
        total += 2 * gr * HD * (E + qkv_bias)  # k and v rows
        total += r * HD * E  # o columns
        q_out = (H - r) * HD
        kv_out = (n_kv(kind) - gr) * HD
        outs = {"q": q_out, "k": kv_out, "v": kv_out, "qkv": q_out + 2 * kv_out, "gate": inter, "up": inter}
        for role, n in p["res_in"].items():
            if n / E >= threshold:
                total += n * outs[role]  # dropped input columns of the module
        ins = {"o": q_out, "down": inter}
        for role, n in p["res_out"].items():
            if n / E >= threshold:
                total += n * (ins[role] + (o_bias if role == "o" else mlp_bias))
    return total


def padded_inputs(kind):
    x = MODELS[kind].inputs()
    x["attention_mask"][0, -3:] = 0
    x["attention_mask"][1, -1:] = 0
    return x


def outputs(model, kind):
    spec = MODELS[kind]
    x = spec.inputs()
    res = [spec.run(model, x), spec.run(model, padded_inputs(kind))]
    for L in (3, 7):
        res.append(spec.run(model, {k: v[:, :L] for k, v in x.items()}))
    return res


def generate(model, kind):
    x = MODELS[kind].inputs(batch=2)
    return model.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=0)


def assert_same(a_list, b_list):
    for a, b in zip(a_list, b_list):
        torch.testing.assert_close(a, b, **ATOL)


# ------------------------------------------------------------------------------------------------ exactness + counts
@pytest.mark.parametrize("kind", KINDS)
def test_prune_exact_and_param_count(kind):
    model = make(kind)
    plan = apply_plan(model, kind)
    impls = ["sdpa", "eager"]
    ref = {}
    for impl in impls:
        model.set_attn_implementation(impl)
        ref[impl] = outputs(model, kind)
    ref_gen = generate(model, kind) if kind in CAUSAL else None
    before = n_params(model)

    report = prune_model(model, multiple_of=1)

    assert isinstance(report, PruneReport)
    assert report.params_before == before
    assert report.params_after == n_params(model)
    assert before - report.params_after == expected_removed(kind, plan)
    assert report.mlp_neurons_removed == sum(p["dead"] for p in plan)
    assert report.heads_removed == sum(p["heads_removed"] for p in plan)
    assert report.kv_groups_removed == sum(p["groups_removed"] for p in plan)
    for impl in impls:
        model.set_attn_implementation(impl)
        assert_same(outputs(model, kind), ref[impl])
    if ref_gen is not None:
        assert torch.equal(generate(model, kind), ref_gen)
    json.dumps(report.to_dict())
    assert "parameters" in str(report)
    # per-layer details
    assert [r["layer"] for r in report.layers] == [0, 1]
    for r, p in zip(report.layers, plan):
        assert (r["intermediate_before"], r["intermediate_after"]) == (inter_size(kind), inter_size(kind) - p["dead"])
        assert (r["heads_before"], r["heads_after"]) == (H, H - p["heads_removed"])


def test_llama_shapes_partial_head_and_zero_q_kept():
    model = make("llama")
    apply_plan(model, "llama", residual=False)
    report = prune_model(model, multiple_of=1)
    qk = [d for d in report.dims_left_as_zeros if d["side"] == "qk_dims"]
    assert [d["count"] for d in qk] == [2 * HD, 2 * HD]  # the zero q and k rows of the kept head, per layer
    for li, b in enumerate(blocks(model, "llama")):
        # 4 heads: one full-v-zero + one mixed v/o removed; the half-zero head and the zero-q/k head stay
        assert b["q"].weight.shape == (2 * HD, E) and b["k"].weight.shape == (2 * HD, E)
        assert b["o"].weight.shape == (E, 2 * HD)
        assert type(b["q"]) is nn.Linear and b["gate"].weight.shape == (I - 16, E)
        assert b["down"].weight.shape == (E, I - 16) and b["mlp"].intermediate_size == I - 16
        # the kept zero-q head (layer 0: head 0 -> new index 0; layer 1: head 1 -> new index 0)
        assert (b["q"].weight[:HD] == 0).all()


def test_gqa_only_whole_groups():
    model = make("qwen2_gqa")
    apply_plan(model, "qwen2_gqa", mlp=False, residual=False)
    report = prune_model(model, multiple_of=1)
    b0, b1 = blocks(model, "qwen2_gqa")
    assert b0["q"].weight.shape == (2 * HD, E) and b0["k"].weight.shape == (HD, E) and b0["v"].weight.shape == (HD, E)
    assert b0["o"].weight.shape == (E, 2 * HD) and b0["attn"].num_key_value_groups == 2
    # layer 1: q head 0 removable alone, its group partner is not -> nothing removed
    assert b1["q"].weight.shape == (4 * HD, E) and b1["k"].weight.shape == (2 * HD, E)
    assert report.kv_groups_removed == 1 and report.heads_removed == 2
    assert any(d["module"].endswith("layers.1.self_attn") and d["side"] == "head_dims"
               for d in report.dims_left_as_zeros)


def test_all_heads_removable_keeps_one_group():
    model = make("qwen2_gqa")
    b0 = blocks(model, "qwen2_gqa")[0]
    zero_rows(b0["v"], range(2 * HD))
    ref = outputs(model, "qwen2_gqa")
    report = prune_model(model, multiple_of=1)
    b0 = blocks(model, "qwen2_gqa")[0]
    assert b0["q"].weight.shape == (2 * HD, E) and b0["k"].weight.shape == (HD, E)
    assert report.kv_groups_removed == 1 and any("kept KV group 0" in n for n in report.notes)
    assert_same(outputs(model, "qwen2_gqa"), ref)


# ------------------------------------------------------------------------------------------------ activation check
def test_activation_nonzero_at_zero_detected():
    model = make("llama", hidden_act="sigmoid")  # sigmoid(0) = 0.5: a zero gate row still contributes
    b = blocks(model, "llama")[0]
    zero_rows(b["gate"], [0, 1, 2])
    zero_rows(b["up"], [10, 11])  # act-independent: cut
    ref = outputs(model, "llama")
    report = prune_model(model, multiple_of=1)
    b = blocks(model, "llama")[0]
    assert b["gate"].weight.shape == (I - 2, E)
    assert report.mlp_neurons_removed == 2
    assert report.activation_not_zero_at_zero == ["model.layers.0.mlp"]
    assert any(d["reason"] == "act(0) != 0" and d["count"] == 3 for d in report.dims_left_as_zeros)
    assert_same(outputs(model, "llama"), ref)

    model = make("llama", hidden_act="sigmoid")
    zero_rows(blocks(model, "llama")[0]["gate"], [0, 1, 2])
    with pytest.raises(ValueError, match="act\\(0\\)"):
        prune_model(model, require_zero_activation=True)


def test_gelu_fc_rows_cut_for_gpt2():
    model = make("gpt2")
    b = blocks(model, "gpt2")[1]
    zero_rows(b["gate"], [3, 4, 5])  # gelu_new(0) == 0 -> dead
    ref = outputs(model, "gpt2")
    report = prune_model(model, multiple_of=1)
    b = blocks(model, "gpt2")[1]
    assert report.mlp_neurons_removed == 3 and b["gate"].weight.shape == (E, 4 * E - 3)  # Conv1D: (in, out)
    assert type(b["gate"]).__name__ == "Conv1D" and b["down"].weight.shape == (4 * E - 3, E)
    assert_same(outputs(model, "gpt2"), ref)


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_multiple_of_padding(kind):
    model = make(kind)
    apply_plan(model, kind, n_res=12, below=12)
    ref = outputs(model, kind)
    report = prune_model(model, multiple_of=8)
    for b in blocks(model, kind):
        inter = b["down"].in_features if isinstance(b["down"], PrunedLinear) else \
            (b["down"].weight.shape[1] if type(b["down"]) is nn.Linear else b["down"].weight.shape[0])
        assert inter % 8 == 0 and inter == inter_size(kind) - 16  # 16 dead: already a multiple of 8
    gathered = [m for m in model.modules() if isinstance(m, PrunedLinear)]
    assert gathered
    for m in gathered:
        assert m.inner_in_features % 8 == 0 and m.inner_out_features % 8 == 0
        assert m.inner_in_features < E or m.inner_out_features < E  # 32 - 12 = 20 -> 24
    assert report.residual_in_dims_gathered > 0
    assert_same(outputs(model, kind), ref)


def test_multiple_of_pads_neurons():
    model = make("llama")
    b = blocks(model, "llama")[0]
    zero_cols(b["down"], range(19))  # 45 alive -> padded to 48
    ref = outputs(model, "llama")
    report = prune_model(model, multiple_of=8)
    b = blocks(model, "llama")[0]
    assert b["down"].weight.shape == (E, 48) and report.mlp_neurons_removed == 16
    assert_same(outputs(model, "llama"), ref)


@pytest.mark.parametrize("kind", ["qwen2_gqa", "bert_cls"])
def test_residual_zeros_keeps_residual_shapes(kind):
    model = make(kind)
    plan = apply_plan(model, kind)
    ref = outputs(model, kind)
    report = prune_model(model, residual_prune="zeros", multiple_of=1)
    assert not any(isinstance(m, PrunedLinear) for m in model.modules())
    for b in blocks(model, kind):
        assert b["q"].in_features == E and b["gate"].in_features == E
        assert b["o"].out_features == E and b["down"].out_features == E
    assert report.residual_in_dims_gathered == report.residual_out_dims_gathered == 0
    assert any(d["reason"] == 'residual_prune="zeros"' for d in report.dims_left_as_zeros)
    no_res = [dict(p, res_in={}, res_out={}) for p in plan]
    assert report.params_before - report.params_after == expected_removed(kind, no_res)
    assert_same(outputs(model, kind), ref)


def test_bad_residual_prune_value():
    with pytest.raises(ValueError, match="residual_prune"):
        prune_model(make("llama"), residual_prune="drop")


def test_modules_restricts_cuts():
    model = make("llama")
    plan = apply_plan(model, "llama")
    ref = outputs(model, "llama")
    allowed = {f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    report = prune_model(model, modules=allowed, multiple_of=1)
    b0, b1 = blocks(model, "llama")
    # layer-0 MLP cut (neurons, then its residual side gathered); attention and layer 1 untouched
    assert isinstance(b0["gate"], PrunedLinear) and b0["gate"].out_features == I - 16
    assert type(b1["gate"]) is nn.Linear and b1["gate"].weight.shape == (I, E)
    assert type(b0["q"]) is nn.Linear and b0["q"].weight.shape == (H * HD, E)
    assert report.heads_removed == 0 and report.mlp_neurons_removed == 16
    expected = 16 * 3 * E + 7 * (I - 16) * 2 + 7 * (I - 16)  # neurons; gate/up columns; down rows
    assert report.params_before - report.params_after == expected
    assert any(d["reason"].startswith("not every") for d in report.dims_left_as_zeros)
    assert_same(outputs(model, "llama"), ref)
    del plan


@pytest.mark.parametrize("kind,name", [("llama", "lm_head"), ("llama", "model.embed_tokens"),
                                       ("gpt2", "lm_head"), ("gpt2", "transformer.wte"),
                                       ("bert_cls", "bert.embeddings.word_embeddings")])
def test_embeddings_and_lm_head_refused(kind, name):
    with pytest.raises(ValueError, match="tied embeddings / lm_head"):
        prune_model(make(kind), modules={name})


def test_unknown_module_name_refused():
    with pytest.raises(ValueError, match="not in the model"):
        prune_model(make("llama"), modules={"model.layers.9.mlp.up_proj"})


def test_unknown_architecture_warns_and_removes_nothing():
    model = MODELS["mlp"].make(0)
    zero_rows(model.lin0, [1, 2])
    with pytest.warns(UserWarning, match="TinyMLP"):
        report = prune_model(model)
    assert report.params_removed == 0 and report.unknown_architecture
    assert report.dims_left_as_zeros and report.dims_left_as_zeros[0]["reason"] == "consumers unknown"


def test_pruned_linear_dense_equivalent():
    lin = nn.Linear(10, 6)
    pl = PrunedLinear(10, 6, in_index=torch.tensor([0, 3, 4]), out_index=torch.tensor([1, 5]), bias=True)
    with torch.no_grad():
        w, b = pl.dense_weight()
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(pl(x), lin(x))
    with pytest.raises(ValueError, match="in_index"):
        PrunedLinear(10, 6, in_index=torch.tensor([0, 10]))


# ------------------------------------------------------------------------------------------------ save / load
def _folded_bias_llama():
    """Llama (config: no biases) whose o_proj gained a bias, as a folded bias delta would give."""
    model = make("llama")
    for b in blocks(model, "llama"):
        old = b["o"]
        new = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.normal_()
        b["attn"].o_proj = new
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip_bit_identical(kind, tmp_path):
    model = _folded_bias_llama() if kind == "llama" else make(kind)
    apply_plan(model, kind)
    report = prune_model(model)  # default multiple_of=8
    x = MODELS[kind].inputs()
    out = MODELS[kind].run(model, x)
    path = str(tmp_path / "pruned")
    save_pruned(model, path, report)
    files = os.listdir(path)
    assert "model.safetensors" in files and "pruned_manifest.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    loaded = load_pruned(path)
    assert not loaded.training and type(loaded) is type(model)
    assert n_params(loaded) == n_params(model)
    assert torch.equal(MODELS[kind].run(loaded, x), out)
    if kind in CAUSAL:
        assert torch.equal(generate(loaded, kind), generate(model, kind))
    if kind == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    manifest = json.load(open(os.path.join(path, "pruned_manifest.json")))
    assert manifest["report"]["params_after"] == report.params_after
    bf16 = load_pruned(path, torch_dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def _saved(tmp_path, kind="llama"):
    model = make(kind)
    apply_plan(model, kind)
    prune_model(model, multiple_of=1)
    path = str(tmp_path / "pruned")
    save_pruned(model, path)
    return path


def test_load_tampered_manifest_index(tmp_path):
    path = _saved(tmp_path)
    mpath = os.path.join(path, "pruned_manifest.json")
    manifest = json.load(open(mpath))
    name = next(n for n, e in manifest["modules"].items() if e["class"] == "PrunedLinear" and e["in_index"])
    manifest["modules"][name]["in_index"] = manifest["modules"][name]["in_index"][:-1]
    json.dump(manifest, open(mpath, "w"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_pruned(path)


def test_load_tampered_manifest_unknown_module(tmp_path):
    path = _saved(tmp_path)
    mpath = os.path.join(path, "pruned_manifest.json")
    manifest = json.load(open(mpath))
    manifest["modules"]["model.layers.7.mlp.up_proj"] = {"class": "Linear", "in_features": 1, "out_features": 1,
                                                         "bias": False}
    json.dump(manifest, open(mpath, "w"))
    with pytest.raises(ValueError, match="model.layers.7.mlp.up_proj"):
        load_pruned(path)


def test_load_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    wpath = os.path.join(path, "model.safetensors")
    state = load_file(wpath)
    key = "model.layers.0.mlp.down_proj.weight"
    if key not in state:
        key = "model.layers.0.mlp.down_proj.linear.weight"
    state["bogus.weight"] = state.pop(key)
    save_file(state, wpath, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys.*down_proj.*unexpected keys.*bogus"):
        load_pruned(path)


def test_load_requires_manifest(tmp_path):
    model = make("llama")
    model.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(FileNotFoundError, match="pruned_manifest"):
        load_pruned(str(tmp_path / "plain"))


def test_no_warning_on_known_arch():
    model = make("bert_cls")
    apply_plan(model, "bert_cls")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = prune_model(model)
    assert not report.unknown_architecture and report.params_removed > 0
