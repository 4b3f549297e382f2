"""SSMLoRA (peft_ext/tuners/ssmlora): exact checks of the forward against a hand-written reference of the spec's
equations (/work/shared/design/methods/ssmlora.md), the min-max normalisation of the state, identity at init, the
parameter count, merging (refused while the state path is active, a plain LoRA when C = D = 0), and bad inputs.

The references are written from the spec in float64 from the layers' raw parameters (W, b, A, B, C, D), without the
library's helpers:

    u = x A^T;  h' = h + h C^T + u D^T (h = 0 and no C on a chain's first module);
    ĥ = (h' - min) / (max - min + 1e-8) per token over the rank axis;
    y = x W^T + b + alpha (u + leaky_relu(dropout(ĥ))) B^T;  ĥ is handed to the next module of the chain."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peft_ext import SsmLoraConfig
from peft_ext.testing.models import MODELS
from peft_ext.tuners.ssmlora import SsmLoraLayer

EPS = 1e-8  # the spec's normalisation epsilon
PARAMS = ("ssmlora_A", "ssmlora_B", "ssmlora_C", "ssmlora_D")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


# ------------------------------------------------------------------------------------------------ helpers
class TwoLinear(nn.Module):
    """Two linear layers in sequence: with chain="all" they form one chain (first -> second)."""

    def __init__(self, n_in: int = 10, n_mid: int = 9, n_out: int = 7):
        super().__init__()
        self.first = nn.Linear(n_in, n_mid)
        self.second = nn.Linear(n_mid, n_out)

    def forward(self, x):
        return self.second(self.first(x))


def two_linear(seed=0, adapter="default", **cfg):
    torch.manual_seed(seed)
    cfg = {"r": 4, "alpha": 1.5, "target_modules": ["first", "second"], "chain": "all", "state_dropout": 0.0, **cfg}
    model = get_peft_model(TwoLinear(), SsmLoraConfig(**cfg), adapter_name=adapter)
    return model


def llama(n_layers: int = 2, seed: int = 0, hidden: int = 32) -> nn.Module:
    """The tiny Llama of peft_ext.testing.models with `n_layers` decoder layers."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=3, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def ids(batch=2, seq=6, seed=0):
    return torch.randint(4, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def layers(model) -> dict[str, SsmLoraLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, SsmLoraLayer)}


@torch.no_grad()
def randomise(model, adapter="default", seed=1, scale=0.3):
    """A, B, C and D of every module random and non-zero (C only where the module has one)."""
    g = torch.Generator().manual_seed(seed)
    for layer in layers(model).values():
        for attr in PARAMS:
            if adapter in getattr(layer, attr):
                w = getattr(layer, attr)[adapter].weight
                w.copy_(torch.randn(w.shape, generator=g) * scale)


def raw(layer: SsmLoraLayer, adapter="default", grad=False) -> dict:
    """The module's base and adapter parameters as float64 copies (leaves requiring grad when `grad`)."""
    base = layer.get_base_layer()
    out = {"W": base.weight, "b": base.bias}
    for attr in PARAMS:
        if adapter in getattr(layer, attr):
            out[attr[-1]] = getattr(layer, attr)[adapter].weight
    return {k: v.detach().double().clone().requires_grad_(grad and k in "ABCD") for k, v in out.items()}


def received(layer: SsmLoraLayer, adapter="default"):
    """The state `layer` received from the previous module of its chain in the last forward, (tokens, r), float64
    (None for a chain's first module)."""
    h = layer._state_in[adapter]
    return None if h is None else h.double()


def flat(h):
    """(batch, seq, r) -> (tokens, r), the layout the layers hand the state on in."""
    return h.reshape(-1, h.shape[-1])


def normalise(h):
    """min-max over the rank axis (the last one), per token."""
    low = h.min(dim=-1, keepdim=True).values
    high = h.max(dim=-1, keepdim=True).values
    return (h - low) / (high - low + EPS)


def leaky_relu(t, slope=0.01):
    return torch.where(t >= 0, t, slope * t)


def reference_chain(x, modules, alphas, chains, detach=True):
    """The spec's equations along the model's sequence of linear layers. modules: [{adapter: raw params}] in model
    order (the layers feed each other), alphas: {adapter: alpha}, chains: {adapter: [chain index per module]}.
    Returns the output and, per adapter and module, the state ĥ that module computed."""
    states = {a: {} for a in alphas}  # adapter -> chain -> the last ĥ
    seen = {a: [] for a in alphas}
    for i, per_adapter in enumerate(modules):
        base = next(iter(per_adapter.values()))
        y = x @ base["W"].T + base["b"]
        for adapter, p in per_adapter.items():
            chain = chains[adapter][i]
            u = x @ p["A"].T
            h = states[adapter].get(chain)
            if h is None:  # a chain's first module: zero state, no C
                assert "C" not in p
                h_new = u @ p["D"].T
            else:
                h_new = h + h @ p["C"].T + u @ p["D"].T
            h_hat = normalise(h_new)
            y = y + alphas[adapter] * (u + leaky_relu(h_hat)) @ p["B"].T
            states[adapter][chain] = h_hat.detach() if detach else h_hat
            seen[adapter].append(h_hat)
        x = y
    return x, seen


# ------------------------------------------------------------------------------------- the chain of two
@pytest.mark.parametrize("chain", ["all", "per_type"])
def test_chain_of_two_matches_the_spec_reference(chain):
    model = two_linear(chain=chain)
    randomise(model)
    first, second = layers(model)["first"], layers(model)["second"]
    assert "default" not in first.ssmlora_C  # the chain's first module: no C
    assert ("default" in second.ssmlora_C) == (chain == "all")  # per_type: two chains of one ("first", "second")
    x = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)
    ref, states = reference_chain(
        x.double(), [{"default": raw(first)}, {"default": raw(second)}], {"default": 1.5},
        {"default": [0, 0] if chain == "all" else [0, 1]},
    )
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    if chain == "all":  # the second module received the first one's ĥ
        torch.testing.assert_close(received(second), flat(states["default"][0]), rtol=0, atol=1e-6)
    else:
        assert second._state_in["default"] is None
    assert first._state_in["default"] is None


def test_the_link_changes_the_output():
    """Sensitivity of the reference test: the second module's output depends on the first module's state (C
    non-zero), so a chain that handed on nothing would fail it."""
    linked, alone = two_linear(chain="all"), two_linear(chain="all")
    randomise(linked)
    randomise(alone)
    x = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layers(alone)["second"].ssmlora_C["default"].weight.zero_()
        a, b = linked(x), alone(x)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("detach", [True, False])
def test_detach_state_same_values_gradient_through_the_chain(detach):
    """detach_state True / False: the same forward; with False the first module's A and D also get gradient from
    the second module (through the state it hands on). Both gradients match the reference's."""
    model = two_linear(detach_state=detach)
    randomise(model)
    first, second = layers(model)["first"], layers(model)["second"]
    model.train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 10, generator=g)
    weights = torch.randn(2, 5, 7, generator=g)
    (model(x) * weights).sum().backward()

    p1, p2 = raw(first, grad=True), raw(second, grad=True)
    ref, _ = reference_chain(
        x.double(), [{"default": p1}, {"default": p2}], {"default": 1.5}, {"default": [0, 0]}, detach
    )
    (ref * weights.double()).sum().backward()
    for layer, p in ((first, p1), (second, p2)):
        for attr in PARAMS:
            if "default" in getattr(layer, attr):
                got = getattr(layer, attr)["default"].weight.grad
                torch.testing.assert_close(got.double(), p[attr[-1]].grad, rtol=1e-5, atol=1e-5)


def test_detach_state_false_sends_gradient_into_the_first_module():
    grads, outputs = {}, {}
    for detach in (True, False):
        model = two_linear(detach_state=detach)
        randomise(model)
        model.train()
        x = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(4))
        out = model(x)
        out.square().sum().backward()
        outputs[detach] = out.detach()
        first = layers(model)["first"]
        grads[detach] = {a: getattr(first, a)["default"].weight.grad.clone() for a in ("ssmlora_A", "ssmlora_D")}
        grads[detach]["B2"] = layers(model)["second"].ssmlora_B["default"].weight.grad.clone()
    assert torch.equal(outputs[True], outputs[False])  # the same forward values
    assert (grads[True]["ssmlora_D"] - grads[False]["ssmlora_D"]).abs().max() > 1e-4  # D gets the chain's gradient
    assert (grads[True]["ssmlora_A"] - grads[False]["ssmlora_A"]).abs().max() > 1e-4
    torch.testing.assert_close(grads[True]["B2"], grads[False]["B2"], rtol=0, atol=0)  # the second module's B: same


def test_several_active_adapters_add_up_each_on_its_own_chain():
    """set_adapter(["one", "two"]): y = base + delta_a + delta_b per layer, each adapter's state on its own chain."""
    model = two_linear(adapter="one")
    model.add_adapter("two", SsmLoraConfig(r=3, alpha=0.5, target_modules=["first", "second"], chain="all",
                                         state_dropout=0.0))
    randomise(model, "one", seed=1)
    randomise(model, "two", seed=2)
    model.base_model.set_adapter(["one", "two"])
    first, second = layers(model)["first"], layers(model)["second"]
    x = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(x)
    ref, states = reference_chain(
        x.double(),
        [{"one": raw(first, "one"), "two": raw(first, "two")}, {"one": raw(second, "one"), "two": raw(second, "two")}],
        {"one": 1.5, "two": 0.5}, {"one": [0, 0], "two": [0, 0]},
    )
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    for adapter in ("one", "two"):
        torch.testing.assert_close(received(second, adapter), flat(states[adapter][0]), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- min-max normalisation
def test_state_is_min_max_normalised_per_token_over_the_rank_axis():
    model = two_linear(r=5)
    randomise(model)
    # tokens of very different scales: a normalisation over the batch or the sequence would not give [0, 1] each
    x = torch.randn(3, 6, 10, generator=torch.Generator().manual_seed(6))
    x = x * torch.logspace(-2, 2, 6).view(1, 6, 1)
    with torch.no_grad():
        model(x)
    h = received(layers(model)["second"])
    assert h.shape == (3 * 6, 5)  # (tokens, rank): the batch's 3 x 6 tokens
    assert h.min() >= 0 and h.max() <= 1
    assert torch.equal(h.amin(dim=-1), torch.zeros(18, dtype=h.dtype))  # min exactly 0 per token
    # max 1 per token, up to the epsilon: range / (range + 1e-8) (the small tokens' range is ~1e-3)
    torch.testing.assert_close(h.amax(dim=-1), torch.ones(18, dtype=h.dtype), rtol=0, atol=1e-4)
    first = raw(layers(model)["first"])
    expected = normalise((x.double() @ first["A"].T) @ first["D"].T)
    torch.testing.assert_close(h, flat(expected), rtol=0, atol=1e-6)


def test_a_constant_state_normalises_to_zero_not_nan():
    """state_init="zeros" (C = D = 0): h' is 0 everywhere, so ĥ = 0 / 1e-8 = 0 (the epsilon keeps it finite)."""
    model = two_linear(state_init="zeros", init_weights=False)
    with torch.no_grad():
        model(torch.randn(2, 3, 10))
    assert torch.equal(received(layers(model)["second"]), torch.zeros(6, 4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ identity at init
@pytest.mark.parametrize("state_init", ["normal", "zeros"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_identity_at_init(kind, state_init):
    spec = MODELS[kind]
    cfg = {"state_init": state_init, "state_dropout": 0.1, "task_type": spec.task_type}
    if kind == "gpt2":
        cfg["target_modules"] = ["c_attn", "c_fc"]  # Conv1D; GPT-2 has no q_proj / v_proj
    inputs = spec.inputs(batch=2)
    base = spec.make(0)
    with torch.no_grad():
        expected = spec.run(base, inputs)
    model = get_peft_model(spec.make(0), SsmLoraConfig(**cfg))
    assert layers(model)  # something was adapted
    for mode in ("eval", "train"):  # train: the state dropout runs, B = 0 still cancels the update
        getattr(model, mode)()
        with torch.no_grad():
            assert torch.equal(spec.run(model, inputs), expected), mode


# ---------------------------------------------------------------------------------------- parameter count
def expected_trainable(base: nn.Module, chains: list[list[str]], rank) -> int:
    """The spec's count: per module r (in + out) + r^2 (D) + r^2 (C), except a chain's first module (no C)."""
    total = 0
    for chain in chains:
        for i, name in enumerate(chain):
            lin = base.get_submodule(name)
            r = rank(name)
            total += r * (lin.in_features + lin.out_features) + r * r + (r * r if i else 0)
    return total


def trainable(model) -> int:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("ssmlora_" in n for n in names)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def qv(layer_ids, kinds=("q", "v")):
    return [f"model.layers.{i}.self_attn.{k}_proj" for i in layer_ids for k in kinds]


@pytest.mark.parametrize(
    "case",
    [
        # (config, chains by hand, rank of a module)
        ({"insertion": "alternate_qv"}, [["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                                          "model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.v_proj"]], None),
        ({"insertion": "all"}, [qv(range(4), "q"), qv(range(4), "v")], None),  # per_type: 2 chains
        ({"insertion": "all", "chain": "all"}, [qv(range(4))], None),  # one chain in model order
        ({"target_modules": ["q_proj", "v_proj", "up_proj"], "rank_pattern": {"up_proj": 2}},
         [qv(range(4), "q"), qv(range(4), "v"), [f"model.layers.{i}.mlp.up_proj" for i in range(4)]],
         lambda name: 2 if name.endswith("up_proj") else 4),
    ],
    ids=["alternate_qv", "all_per_type", "all_chain_all", "rank_pattern"],
)
def test_trainable_count_is_the_spec_formula(case):
    overrides, chains, rank = case
    model = get_peft_model(llama(4), SsmLoraConfig(r=4, **overrides))
    base = llama(4)
    assert model.peft_config["default"].chain_layout == chains
    assert trainable(model) == expected_trainable(base, chains, rank or (lambda name: 4))
    heads = {c[0] for c in chains}
    for name, layer in layers(model).items():  # C exactly on the modules that are not a chain's first
        assert ("default" in layer.ssmlora_C) == (name not in heads), name


def test_alternate_qv_halves_the_parameters_of_all():
    half = trainable(get_peft_model(llama(4), SsmLoraConfig(r=4)))
    full = trainable(get_peft_model(llama(4), SsmLoraConfig(r=4, insertion="all")))
    assert half == 4 * (4 * 64 + 16) + 3 * 16
    assert full == 8 * (4 * 64 + 16) + 6 * 16


# ------------------------------------------------------------------------------------------------- merging
STATE_ACTIVE = (
    "SSMLoRA cannot be merged while its state path is active (model.layers.0.self_attn.q_proj has a non-zero C or D"
)


def test_merge_with_c_d_zero_is_a_plain_lora():
    x = ids(3, 7)
    cfg = SsmLoraConfig(r=4, alpha=1.5, state_init="zeros", init_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(llama(2), cfg).eval()
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
    targets = sorted(layers(model))
    assert targets == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    lora = get_peft_model(llama(2), LoraConfig(r=4, lora_alpha=1.5 * 4, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, layer in layers(model).items():
            target = lora.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.ssmlora_A["default"].weight)
            target.lora_B["default"].weight.copy_(layer.ssmlora_B["default"].weight)
        as_lora = lora.eval()(input_ids=x).logits
    base = llama(2)
    with torch.no_grad():
        assert (unmerged - base(input_ids=x).logits).abs().max() > 1e-3  # a non-identity adapter
    torch.testing.assert_close(unmerged, as_lora, rtol=0, atol=1e-5)

    model.merge_adapter()  # merge, unmerge: exact
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, unmerged, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, unmerged)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SsmLoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, unmerged, rtol=0, atol=1e-5)


def test_merge_is_refused_while_the_state_path_is_active():
    model = get_peft_model(llama(2), SsmLoraConfig(r=4, init_weights=False))  # default: D ~ N(0, 1/r)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    for merge in (model.merge_adapter, model.merge_and_unload, lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match=re.escape(STATE_ACTIVE)):
            merge()
    assert not any(layer.merged for layer in layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)  # nothing was touched


def test_merge_message_names_an_active_c():
    """C alone non-zero (D = 0) also keeps the state path on."""
    model = get_peft_model(llama(2), SsmLoraConfig(r=4, state_init="zeros"))
    with torch.no_grad():
        layers(model)["model.layers.1.self_attn.v_proj"].ssmlora_C["default"].weight[0, 1] = 0.5
    with pytest.raises(ValueError, match=re.escape("(model.layers.1.self_attn.v_proj has a non-zero C or D")):
        model.merge_and_unload()


def test_unload_and_disable_adapter_are_the_exact_base():
    x = ids()
    base = llama(2)
    with torch.no_grad():
        expected = base(input_ids=x).logits
    model = get_peft_model(llama(2), SsmLoraConfig(r=4, init_weights=False))
    with torch.no_grad():
        assert (model(input_ids=x).logits - expected).abs().max() > 1e-3
        with model.disable_adapter():
            assert torch.equal(model(input_ids=x).logits, expected)
        assert not torch.equal(model(input_ids=x).logits, expected)  # enabled again
    unloaded = model.unload()
    assert not any(isinstance(m, SsmLoraLayer) for m in unloaded.modules())
    assert not any("ssmlora_" in n for n, _ in unloaded.named_parameters())
    assert all(torch.equal(p, base.state_dict()[n]) for n, p in unloaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=x).logits, expected)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "SsmLoraConfig.r must be an integer >= 1, got 0."),
        ({"r": -2}, "SsmLoraConfig.r must be an integer >= 1, got -2."),
        ({"r": 2.5}, "SsmLoraConfig.r must be an integer >= 1, got 2.5."),
        ({"rank_pattern": {"v_proj": 0}}, "SsmLoraConfig.rank_pattern['v_proj'] must be an integer >= 1, got 0."),
        ({"state_dropout": 1.0}, "SsmLoraConfig.state_dropout must be in [0, 1), got 1.0."),
        ({"state_dropout": -0.1}, "SsmLoraConfig.state_dropout must be in [0, 1), got -0.1."),
        ({"alpha": 0}, "SsmLoraConfig.alpha must be a number > 0, got 0."),
        ({"insertion": "every_third"},
         "SsmLoraConfig.insertion='every_third' is not one of ('alternate_qv', 'all'): use 'alternate_qv' (q_proj in "
         "even layers, v_proj in odd ones), 'all' (q_proj and v_proj everywhere), or give target_modules."),
        ({"chain": "per_layer"}, "SsmLoraConfig.chain='per_layer' is not one of ('per_type', 'all')."),
        ({"state_init": "uniform"}, "SsmLoraConfig.state_init='uniform' is not 'normal' or 'zeros'."),
        ({"target_modules": ["q_proj"], "insertion": "all"},
         "SsmLoraConfig: give target_modules or insertion, not both (target_modules=['q_proj'], insertion='all')."),
        ({"seed": -1}, "SsmLoraConfig.seed must be None or an integer >= 0, got -1."),
    ],
    ids=["r0", "r_negative", "r_float", "rank_pattern0", "dropout1", "dropout_negative", "alpha0", "insertion",
         "chain", "state_init", "both_targets", "seed"],
)
def test_bad_config_names_the_field_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SsmLoraConfig(**kwargs)


def test_rank_above_the_layer():
    message = (
        "SsmLoraConfig: rank 33 of model.layers.0.self_attn.q_proj is above the layer's min(in_features, "
        "out_features) = 32: use r (or its rank_pattern entry) <= 32."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_peft_model(llama(2), SsmLoraConfig(r=33))


def test_a_chain_that_mixes_ranks():
    message = (
        "SSMLoRA chain model.layers.0.self_attn.q_proj ... model.layers.3.self_attn.v_proj mixes ranks [4, 8]: a "
        "state is handed from module to module, so every module of a chain needs one rank. Make rank_pattern give "
        "the chain's modules one rank (with insertion='alternate_qv', q_proj and v_proj form one chain), or link "
        "fewer modules (chain='per_type' with insertion='all' or target_modules: one chain per module type)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_peft_model(llama(4), SsmLoraConfig(r=8, insertion="alternate_qv", rank_pattern={"v_proj": 4}))
    # per_type chains of one type each take one rank per type
    model = get_peft_model(llama(4), SsmLoraConfig(r=8, insertion="all", rank_pattern={"v_proj": 4}))
    assert {n: l.rank("default") for n, l in layers(model).items()} == {
        **{n: 8 for n in qv(range(4), "q")}, **{n: 4 for n in qv(range(4), "v")}
    }


def test_alternate_qv_on_a_model_without_q_v():
    message = (
        "SsmLoraConfig(insertion='alternate_qv') matches no module of GPT2LMHeadModel: it adapts q_proj / v_proj "
        "inside numbered blocks. Give target_modules (module names, a regex or 'all-linear') for this architecture."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_peft_model(MODELS["gpt2"].make(0), SsmLoraConfig())


def test_an_adapter_from_another_chain_layout_is_refused(tmp_path):
    model = get_peft_model(llama(2), SsmLoraConfig(r=4, init_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["chain_layout"] == [["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]]
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(llama(4), tmp_path)
    message = str(err.value)
    assert message.startswith(
        "this SSMLoRA adapter was trained with the chains [model.layers.0.self_attn.q_proj ... "
        "model.layers.1.self_attn.v_proj] (2 modules), but on LlamaForCausalLM its modules form "
        "[model.layers.0.self_attn.q_proj ... model.layers.3.self_attn.v_proj] (4 modules)"
    )
    assert "chain layout (insertion / target_modules / chain)" in message
    # the right base loads it, bit for bit
    reloaded = PeftModel.from_pretrained(llama(2), tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, model(input_ids=x).logits)


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
@pytest.mark.parametrize(
    "config",
    [{"chain": "all", "target_modules": "all-linear"}, {"insertion": "all", "chain": "all"}],
    ids=["all_linear", "all_chain_all"],
)
def test_loading_with_a_config_of_another_chain_layout_is_refused(tmp_path, config):
    model = get_peft_model(llama(2), SsmLoraConfig(r=4, insertion="all", init_weights=False))  # 2 chains
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="chain"):
        PeftModel.from_pretrained(llama(2), tmp_path, config=SsmLoraConfig(r=4, **config))
