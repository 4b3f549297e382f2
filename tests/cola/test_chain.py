"""COLA's chain inside the model: each link merged into frozen factors, the forward equal to the sum of the links,
and every PEFT operation (merge, unmerge, disable, unload, mixed batches, save/load) exact with a chain in place."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from peft_ext import ColaConfig
from peft_ext.tuners.cola import ColaChain
from peft_ext.tuners.cola.layer import link_seed
from peft_ext.kernels import dropout_keep_mask

CONFIG = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, seed=0)


def cola_layers(model):
    return [(n.removeprefix("base_model.model."), m) for n, m in model.named_modules() if isinstance(m, ColaChain)]


def perturb_current_link(model, adapter="default", seed=0):
    """Give the link being trained random values (a freshly started link has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in cola_layers(model):
            for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def chain_model(factory, links: int, adapter="default", **fields):
    """A COLA model whose first `links` links are merged (random values), and a record of every link's
    (A, B, scaling) per module."""
    model = get_peft_model(factory(), ColaConfig(**{**CONFIG, **fields}), adapter_name=adapter)
    record = {name: [] for name, _ in cola_layers(model)}
    for k in range(links + 1):
        perturb_current_link(model, adapter, seed=k)
        for name, layer in cola_layers(model):
            record[name].append((layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone(), layer.scaling[adapter]))
        if k < links:
            model.base_model.next_link(adapter)
    return model.eval(), record


def reference_model(factory, record):
    """The base with sum_j s_j B_j A_j added to each weight, computed in float64."""
    model = factory()
    with torch.no_grad():
        for name, links in record.items():
            module = model.get_submodule(name)
            delta = sum(s * b.double() @ a.double() for a, b, s in links)
            if type(module).__name__ == "Conv1D":
                delta = delta.t()
            module.weight += delta.to(module.weight.dtype)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("fields", [{}, {"link_ranks": [4, 2, 3], "use_rslora": True}], ids=["equal-ranks", "link-ranks-rslora"])
def test_forward_equals_the_sum_of_the_links(models, ids, kind, fields):
    model, record = chain_model(models[kind], links=2, **fields)
    assert model.peft_config["default"].current_link == 2
    name, layer = cola_layers(model)[0]
    ranks = fields.get("link_ranks", [4, 4, 4])
    assert layer.merged_rank("default") == sum(ranks[:2]) and layer.r["default"] == ranks[2]
    assert len({s for _, _, s in record[name]}) == (3 if "link_ranks" in fields else 1)  # per-link scaling
    torch.testing.assert_close(logits(model, ids), logits(reference_model(models[kind], record), ids), rtol=1e-5, atol=1e-5)


def test_next_link_merges_exactly_and_restarts_the_link(llama, ids):
    model = get_peft_model(llama(), ColaConfig(**CONFIG))
    perturb_current_link(model)
    before = logits(model, ids)
    trainable = model.get_nb_trainable_parameters()[0]
    old = {n: (l.lora_A["default"].weight.detach().clone(), l.lora_B["default"].weight.detach().clone()) for n, l in cola_layers(model)}
    params = model.base_model.next_link()

    layers = cola_layers(model)
    assert len(params) == 2 * len(layers)
    link_params = [p for _, l in layers for p in (l.lora_A["default"].weight, l.lora_B["default"].weight)]
    assert {id(p) for p in params} == {id(p) for p in link_params}  # the same Parameter objects: an optimizer keeps them
    for name, layer in layers:
        a, b = old[name]
        assert torch.equal(layer.cola_merged_A["default"].weight, a)
        assert torch.equal(layer.cola_merged_B["default"].weight, b * layer.scaling["default"])
        assert not layer.cola_merged_A["default"].weight.requires_grad
        assert torch.equal(layer.lora_B["default"].weight, torch.zeros_like(b))  # a new link starts as an identity
        assert not torch.equal(layer.lora_A["default"].weight, a)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-6)  # merging does not change the model
    assert model.get_nb_trainable_parameters()[0] == trainable
    assert model.peft_config["default"].current_link == 1

    # the new link is drawn from (seed, link, module): the same in another process or a resumed run
    again = get_peft_model(llama(), ColaConfig(**CONFIG))
    again.base_model.next_link()
    for (_, x), (_, y) in zip(cola_layers(model), cola_layers(again)):
        assert torch.equal(x.lora_A["default"].weight, y.lora_A["default"].weight)


def test_a_link_of_another_rank_resizes_the_same_parameters(llama):
    model = get_peft_model(llama(), ColaConfig(**{**CONFIG, "link_ranks": [4, 2, 3]}))
    _, layer = cola_layers(model)[0]
    a = layer.lora_A["default"].weight
    model.base_model.next_link()
    assert layer.lora_A["default"].weight is a and a.shape == (2, layer.in_features)
    assert layer.lora_A["default"].out_features == layer.lora_B["default"].in_features == 2
    assert layer.scaling["default"] == 8 / 2 and layer.r["default"] == 2
    total = sum(2 * (l.in_features + l.out_features) for _, l in cola_layers(model))
    assert model.get_nb_trainable_parameters()[0] == total


def test_dropout_applies_to_the_link_being_trained_only(llama):
    model, _ = chain_model(llama, links=1, lora_dropout=0.5)
    _, layer = cola_layers(model)[0]
    layer.train()
    x = torch.randn(3, 5, layer.in_features)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    keep = dropout_keep_mask(x, 0.5)  # the kernels' mask, from torch's RNG
    base = layer.get_base_layer()
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    ma, mb = layer.cola_merged_A["default"].weight, layer.cola_merged_B["default"].weight
    expected = base(x) + x @ ma.t() @ mb.t() + s * ((x * keep / 0.5) @ a.t() @ b.t())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    layer.eval()  # and no dropout in eval mode: the whole chain in one fused call
    torch.testing.assert_close(layer(x), base(x) + x @ ma.t() @ mb.t() + s * (x @ a.t() @ b.t()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_disable_unload_are_exact_with_a_chain(models, ids, kind):
    model, _ = chain_model(models[kind], links=2)
    base = models[kind]()
    base_out, adapted = logits(base, ids), logits(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():  # the merged weights hold the chain: disabling restores the base bit for bit
        assert torch.equal(logits(model, ids), base_out)
    model.merge_adapter()
    model.unmerge_adapter()
    assert torch.equal(logits(model, ids), adapted)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    model.merge_adapter()
    unloaded = copy.deepcopy(model).unload()  # unload() while merged: still the exact base
    assert all(torch.equal(p, q) for p, q in zip(unloaded.state_dict().values(), base.state_dict().values()))
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)


def test_safe_merge_detects_nan_in_the_merged_links(llama, ids):
    model, _ = chain_model(llama, links=1)
    _, layer = cola_layers(model)[0]
    with torch.no_grad():
        layer.cola_merged_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), logits(llama(), ids))


@pytest.mark.parametrize("r", [2, 16], ids=["fits-the-kernel", "chain-wider-than-the-layer"])
def test_mixed_batch_with_chains_equals_per_adapter_runs(llama, r):
    model, _ = chain_model(llama, links=2, adapter="a", r=r)
    model.add_adapter("b", ColaConfig(**{**CONFIG, "r": r, "seed": 1}))
    perturb_current_link(model, "b", seed=7)
    model.base_model.next_link("b")
    perturb_current_link(model, "b", seed=8)
    model.eval()
    names = ["a", "b", "__base__", "b", "a"]
    ids = torch.randint(0, 64, (len(names), 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        per = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            per[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            per["__base__"] = model(input_ids=ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per[name][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(per["a"], per["b"])


def test_save_and_load_mid_chain(llama, ids, tmp_path):
    model, _ = chain_model(llama, links=1, link_ranks=[4, 2, 3])
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert loaded.peft_config["default"].current_link == 1
    assert torch.equal(logits(loaded, ids), expected)

    # a Trainer resuming from a checkpoint loads the file into an adapter built at link 0: it is reshaped first
    fresh = get_peft_model(llama(), ColaConfig(**{**CONFIG, "link_ranks": [4, 2, 3], "seed": 5}))
    result = set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    assert not result.unexpected_keys
    assert fresh.peft_config["default"].current_link == 1
    assert torch.equal(logits(fresh.eval(), ids), expected)
    assert fresh.get_nb_trainable_parameters()[0] == sum(2 * (l.in_features + l.out_features) for _, l in cola_layers(fresh))


def test_a_checkpoint_of_another_chain_is_refused(llama):
    model, _ = chain_model(llama, links=1, link_ranks=[4, 2, 3])
    other = get_peft_model(llama(), ColaConfig(**{**CONFIG, "link_ranks": [3, 3, 3]}))
    with pytest.raises(ValueError, match=r"not a whole number of links"):
        set_peft_model_state_dict(other, get_peft_model_state_dict(model))


def test_bad_targets_and_ranks(llama):
    with pytest.raises(ValueError, match=r"COLA rank 40 .*larger than layer model\.layers\.\d\.\S+ allows.*min\("):
        get_peft_model(llama(), ColaConfig(r=40, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"link_ranks\[1\]"):
        get_peft_model(llama(), ColaConfig(r=4, link_ranks=[4, 40, 4], target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"COLA wraps nn.Linear and transformers' Conv1D layers; .*embed_tokens is Embedding"):
        get_peft_model(llama(), ColaConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"target_modules=\['nothing_here'\].*matches no"):
        get_peft_model(llama(), ColaConfig(r=4, target_modules=["nothing_here"]))


def test_next_link_errors(llama):
    model = get_peft_model(llama(), ColaConfig(**{**CONFIG, "chain_length": 2}))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model.base_model.next_link()
    model.unmerge_adapter()
    model.base_model.next_link()
    with pytest.raises(ValueError, match=r"last link \(2 of chain_length=2\)"):
        model.base_model.next_link()


@pytest.mark.parametrize("fields", [{"r": 2}, {"r": 8, "lora_dropout": 0.2}], ids=["whole-chain-fused", "dropout-split"])
def test_chain_on_the_triton_kernels_under_the_interpreter(llama, ids, fields, triton_interpreter, kernel_calls, monkeypatch):
    """The same chain through the Triton kernels (interpreted) and through the reference: equal outputs and grads.
    r=2, 2 merged links: one fused call on the whole chain (rank 6); r=8 with dropout: the link with dropout in
    the kernel, the merged links (rank 16) beside it."""
    model, _ = chain_model(llama, links=2, **fields)

    def run():
        model.train()
        torch.manual_seed(9)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out.logits.detach(), grads

    out, grads = run()
    assert kernel_calls["dense"] >= 2 * len(cola_layers(model))
    monkeypatch.delenv("TRITON_INTERPRET")  # now the reference
    calls = kernel_calls["dense"]
    ref_out, ref_grads = run()
    assert kernel_calls["dense"] == calls
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    assert grads and sorted(grads) == sorted(ref_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_a_4bit_base_keeps_its_quantized_weights_and_the_chain_in_the_adapter(llama, ids, tmp_path):
    """bitsandbytes 4-bit base: merging a link would requantize (lossy), so the chain stays frozen factors; the
    quantized weights never change, merging is refused, export / save / unload are exact."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_ext import export_as_lora
    from peft_ext.tuners.cola import ColaLinear4bit

    llama(hidden=64).save_pretrained(tmp_path / "base")  # the CPU 4-bit kernels need in_features >= 64
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)

    def base4():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu").eval()

    config = ColaConfig(**{**CONFIG, "init_lora_weights": True, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    base_out = logits(base4(), ids)
    assert torch.equal(logits(get_peft_model(base4(), config), ids), base_out)  # B = 0: an identity start
    # train first: bitsandbytes repacks 4-bit weights for CPU inference at the first eval forward, after which its
    # CPU kernel has no backward (a bitsandbytes limitation, whatever the adapter)
    model = get_peft_model(base4(), copy.deepcopy(config))
    layers = cola_layers(model)
    assert layers and all(type(layer) is ColaLinear4bit for _, layer in layers)
    quantized = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    perturb_current_link(model)
    model.base_model.next_link()
    perturb_current_link(model, seed=1)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # gradients reach the link, not the merged links
    assert all(layer.lora_A["default"].weight.grad is not None for _, layer in layers)
    assert all(layer.cola_merged_A["default"].weight.grad is None for _, layer in layers)
    assert quantized and all(torch.equal(p, quantized[n]) for n, p in model.named_parameters() if n in quantized)
    # save before any eval forward: bitsandbytes 0.50's CPU repacking (first eval forward) and state_dict() do not
    # mix (a plain 4-bit model's outputs change after model.state_dict(); not COLA's doing)
    model.save_pretrained(tmp_path / "cola")
    export_as_lora(model, tmp_path / "lora")
    model.eval()
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base_out)
    with pytest.raises(ValueError, match="dequantize and requantize"):
        model.merge_and_unload()
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), base_out)
    assert torch.equal(logits(PeftModel.from_pretrained(base4(), tmp_path / "cola"), ids), adapted)
    exported = PeftModel.from_pretrained(base4(), tmp_path / "lora")
    lora_layers = [m for m in exported.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    assert len(lora_layers) == len(layers)
    for (_, cola_layer), lora_layer in zip(layers, lora_layers):  # the exported LoRA is the chain, layer by layer
        x = torch.randn(2, 3, cola_layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(lora_layer(x), cola_layer(x), rtol=1e-5, atol=1e-5)
    # whole model: bitsandbytes' CPU inference kernel rounds activations, so float-rounding differences between the
    # two adapters' arithmetic can move a few outputs by one rounding step downstream
    torch.testing.assert_close(logits(exported, ids), adapted, rtol=0, atol=1e-2)


def test_other_quantized_layers_are_refused_with_advice():
    bnb = pytest.importorskip("bitsandbytes")

    class Quantized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear8bitLt(32, 32, has_fp16_weights=False)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match=r"COLA does not support the quantized layer proj \(Linear8bitLt\).*4, 16 or 32 bits"):
        get_peft_model(Quantized(), ColaConfig(r=4, target_modules=["proj"]))


def test_lora_adapter_arithmetic_is_refused(llama):
    model, _ = chain_model(llama, links=1)
    with pytest.raises(ValueError, match=r"add_weighted_adapter is not supported for COLA adapters"):
        model.add_weighted_adapter(["default"], [1.0], "combined")


def _first_link_a(model):
    return {name: layer.lora_A["default"].weight.detach().clone() for name, layer in cola_layers(model)}


def test_later_links_follow_init_lora_weights(llama):
    """Every link is drawn as init_lora_weights says: with "gaussian", link 2's A is N(0, 1/r) from its link seed (it
    was kaiming-uniform whatever the config said); B = 0."""
    model = get_peft_model(llama(), ColaConfig(**{**CONFIG, "init_lora_weights": "gaussian", "seed": 3}))
    model.base_model.next_link()
    for name, layer in cola_layers(model):
        a = layer.lora_A["default"].weight
        expected = torch.empty(a.shape)
        torch.nn.init.normal_(expected, std=1.0 / a.shape[0], generator=torch.Generator().manual_seed(link_seed(3, 1, name)))
        assert torch.equal(a, expected.to(a.dtype)), name
        assert not layer.lora_B["default"].weight.any()


def test_later_links_vary_with_the_runs_seed_unless_the_config_fixes_one(llama):
    def next_link_a(torch_seed, config_seed=None):
        model = get_peft_model(llama(), ColaConfig(**{**CONFIG, "init_lora_weights": True, "seed": config_seed}))
        torch.manual_seed(torch_seed)  # what the Trainer does with TrainingArguments.seed
        model.base_model.next_link()
        return _first_link_a(model)

    one, two, one_again = next_link_a(1), next_link_a(2), next_link_a(1)
    assert all(not torch.equal(one[n], two[n]) for n in one)  # other run seed: other later links
    assert all(torch.equal(one[n], one_again[n]) for n in one)  # same run seed (a resumed run): the same links
    fixed_a, fixed_b = next_link_a(1, config_seed=7), next_link_a(2, config_seed=7)
    assert all(torch.equal(fixed_a[n], fixed_b[n]) for n in fixed_a)  # a config seed fixes them
