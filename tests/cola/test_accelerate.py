"""peft_ext.accelerate_lora: PEFT's own LoRA layers on the fused low-rank kernels. Outputs and gradients equal
PEFT's (CPU: the PyTorch reference; TRITON_INTERPRET=1: the Triton kernels themselves), PEFT's semantics kept,
unsupported layers left on PEFT's path, clear errors for a backend that cannot run."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

import peft_ext
from peft_ext import FusedLoraLinear, accelerate_lora, fused_path_report, remove_lora_acceleration
from peft_ext.kernels import dropout_keep_mask
from peft_ext.tuners import lora_fused


def lora_pair(factory, **fields):
    """Two identical PEFT LoRA models (non-trivial adapters); the second accelerated."""
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    config.update(fields)
    ref = get_peft_model(factory(), LoraConfig(**config))
    fused = get_peft_model(factory(), LoraConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accelerate_lora(fused)
    return ref, fused


def loss_and_grads(model, ids):
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@pytest.fixture
def fused_calls(monkeypatch):
    calls = {"dense": 0, "gathered": 0}
    dense, gathered = lora_fused.lowrank_linear, lora_fused.lowrank_linear_gathered

    def count_dense(*a, **k):
        calls["dense"] += 1
        return dense(*a, **k)

    def count_gathered(*a, **k):
        calls["gathered"] += 1
        return gathered(*a, **k)

    monkeypatch.setattr(lora_fused, "lowrank_linear", count_dense)
    monkeypatch.setattr(lora_fused, "lowrank_linear_gathered", count_gathered)
    return calls


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_outputs_and_grads_equal_peft(models, ids, kind, fused_calls):
    ref, fused = lora_pair(models[kind])
    layers = [m for m in fused.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    assert fused_path_report(fused)["peft"] == [] and len(fused_path_report(fused)["fused"]) == len(layers)
    ref_out, ref_grads = loss_and_grads(ref, ids)
    out, grads = loss_and_grads(fused, ids)
    assert fused_calls["dense"] == len(layers)  # every layer ran the fused entry point
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert sorted(grads) == sorted(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_model_and_autocast_stay_close_to_peft(llama, ids):
    # bf16 weights, fp32 adapter weights: the kernels cast the adapter to bf16 where PEFT upcasts x to fp32
    ref, fused = lora_pair(lambda: llama().to(torch.bfloat16))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=3e-2, atol=3e-2)
    ref, fused = lora_pair(llama)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fused(input_ids=ids).logits, ref(input_ids=ids).logits
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


def test_dropout_runs_in_the_kernel_with_torch_rng_mask(llama):
    ref, fused = lora_pair(llama, lora_dropout=0.3)
    layer = fused.base_model.model.model.layers[0].mlp.up_proj
    layer.train()
    x = torch.randn(2, 5, layer.in_features)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    keep = dropout_keep_mask(x, 0.3)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    expected = layer.base_layer(x) + s * ((x * keep / 0.7) @ a.t() @ b.t())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    layer.eval()
    ref_layer = ref.base_model.model.model.layers[0].mlp.up_proj.eval()
    torch.testing.assert_close(layer(x), ref_layer(x), rtol=1e-5, atol=1e-6)


def _two_adapter_pair(factory, other_r=2):
    ref, fused = lora_pair(factory, r=4)
    for model in (ref, fused):
        torch.manual_seed(3)
        model.add_adapter("other", LoraConfig(r=other_r, lora_alpha=2, target_modules="all-linear", init_lora_weights=False))
    accelerate_lora(fused)  # layers that gained an adapter are already fused; idempotent
    return ref.eval(), fused.eval()


@pytest.mark.parametrize("other_r", [2, 4], ids=["ranks-4-2-padded", "equal-ranks"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batch_equals_peft(models, kind, other_r, fused_calls):
    ref, fused = _two_adapter_pair(models[kind], other_r)
    names = ["default", "other", "__base__", "other", "default"]
    ids = torch.randint(0, 64, (len(names), 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(input_ids=ids, adapter_names=names).logits
        got = fused(input_ids=ids, adapter_names=names).logits
    assert fused_calls["gathered"] > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="nope"):  # PEFT's own check of the names
        fused(input_ids=ids, adapter_names=["nope"] * len(names))
    layer = next(m for m in fused.modules() if isinstance(m, FusedLoraLinear))
    with pytest.raises(ValueError, match=r"Length of `adapter_names`"):
        layer(torch.randn(2, 3, layer.in_features), adapter_names=["default"])


def test_peft_semantics_are_kept(llama, ids, tmp_path):
    ref, fused = _two_adapter_pair(llama)
    base_out = llama()(input_ids=ids).logits.detach()
    with torch.no_grad():
        with fused.disable_adapter():
            assert torch.equal(fused(input_ids=ids).logits, base_out)
        # several active adapters: PEFT's own path, unchanged
        for model in (ref, fused):
            model.base_model.set_adapter(["default", "other"])
        assert torch.equal(fused(input_ids=ids).logits, ref(input_ids=ids).logits)
        for model in (ref, fused):
            model.base_model.set_adapter("default")
        # merge / unmerge are PEFT's
        unmerged = fused(input_ids=ids).logits
        fused.merge_adapter()
        ref.merge_adapter()
        assert torch.equal(fused(input_ids=ids).logits, ref(input_ids=ids).logits)
        fused.unmerge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    # the state dict and saved files are PEFT's: a plain PEFT model loads them
    fused.save_pretrained(tmp_path)
    assert sorted(fused.state_dict()) == sorted(ref.state_dict())
    plain = PeftModel.from_pretrained(llama(), tmp_path)
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_layers_the_kernels_cannot_run_stay_on_peft(llama, ids):
    cases = [
        (dict(use_dora=True), "LoRA variant"),
        (dict(r=40, target_modules=["q_proj"]), r"rank 40 > min\(in_features, out_features\) = 32"),
        (dict(lora_bias=True), "lora_bias"),
    ]
    for fields, reason in cases:
        ref = get_peft_model(llama(), LoraConfig(**{"r": 4, "target_modules": "all-linear", "init_lora_weights": False, **fields}))
        fused = copy.deepcopy(ref)
        with pytest.warns(UserWarning, match=f"stay on PEFT's own path.*{reason}"):
            accelerate_lora(fused)
        report = fused_path_report(fused)
        assert report["peft"] and not report["fused"]
        with torch.no_grad():
            assert torch.equal(fused(input_ids=ids).logits, ref(input_ids=ids).logits)
    # other LoRA layer types (here an Embedding) are not touched
    emb = get_peft_model(llama(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.warns(UserWarning, match=r"embed_tokens: peft\.tuners\.lora\.layer\.Embedding is not accelerated"):
        accelerate_lora(emb)


def test_remove_deepcopy_and_idempotence(llama, ids):
    ref, fused = lora_pair(llama)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        accelerate_lora(fused)
        twin = copy.deepcopy(fused)
        assert any(type(m) is FusedLoraLinear for m in twin.modules())
        torch.testing.assert_close(twin(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert remove_lora_acceleration(fused) is fused
        assert all(type(m) is LoraLinear for m in fused.modules() if isinstance(m, LoraLinear))
        assert torch.equal(fused(input_ids=ids).logits, expected)
    assert peft_ext.accelerate is accelerate_lora


def test_backend_errors(llama, ids, monkeypatch, triton_interpreter):
    _, fused = lora_pair(llama)
    with pytest.raises(ValueError, match=r"backend must be None \(automatic\), 'triton' or 'reference'"):
        accelerate_lora(fused, backend="cuda")
    # float64 cannot run on the Triton kernels: refused up front, naming the layer and the dtype
    double = get_peft_model(llama().double(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match=r"layer .*q_proj: its weight is torch\.float64"):
        accelerate_lora(double, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")  # a CPU without the interpreter
    with pytest.raises(RuntimeError, match=r"on cpu \(Triton runs on CUDA, or on the CPU with TRITON_INTERPRET=1\)"):
        accelerate_lora(fused, backend="triton")
    ref, forced = lora_pair(llama)
    accelerate_lora(forced, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(forced(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # a model in float64 on the automatic backend runs on the reference (exact math)
    ref, fused = lora_pair(lambda: llama().double())
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits)


# ------------------------------------------------------------------------------------ Triton interpreter
def test_kernel_path_equals_peft_under_the_interpreter(llama, ids, triton_interpreter, kernel_calls):
    ref, fused = lora_pair(llama)
    ref_out, ref_grads = loss_and_grads(ref, ids)
    out, grads = loss_and_grads(fused, ids)
    assert kernel_calls["dense"] >= 14 * 2  # forward and backward of every layer ran the Triton kernel
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_dropout_kernel_under_the_interpreter(llama, triton_interpreter, kernel_calls):
    _, fused = lora_pair(llama, lora_dropout=0.25)
    layer = fused.base_model.model.model.layers[0].mlp.down_proj.train()
    x = torch.randn(3, 4, layer.in_features, requires_grad=True)
    torch.manual_seed(4)
    y = layer(x)
    y.square().sum().backward()
    assert kernel_calls["dense"] >= 2
    torch.manual_seed(4)
    keep = dropout_keep_mask(x, 0.25)
    a, b, s = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"])
    x2 = x.detach().clone().requires_grad_(True)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    expected = layer.base_layer(x2) + s * ((x2 * keep / 0.75) @ a2.t() @ b2.t())
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-5)


def test_gathered_kernel_under_the_interpreter(llama, triton_interpreter, kernel_calls):
    ref, fused = _two_adapter_pair(llama)
    names = ["other", "__base__", "default", "other"]
    ids = torch.randint(0, 64, (len(names), 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = fused(input_ids=ids, adapter_names=names).logits
        expected = ref(input_ids=ids, adapter_names=names).logits
    assert kernel_calls["gathered"] >= 14
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_compiled_kernels_on_cuda(llama):
    ref, fused = lora_pair(lambda: llama().to("cuda", torch.bfloat16))
    ids = torch.randint(0, 64, (4, 33), device="cuda")
    ref_out, ref_grads = loss_and_grads(ref, ids)
    out, grads = loss_and_grads(fused, ids)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=3e-2, atol=3e-2)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=5e-2, atol=5e-3, msg=name)
    ref2, fused2 = _two_adapter_pair(lambda: llama().to("cuda", torch.bfloat16))
    names = ["default", "other", "__base__", "default"]
    with torch.no_grad():
        torch.testing.assert_close(
            fused2(input_ids=ids, adapter_names=names).logits.float(),
            ref2(input_ids=ids, adapter_names=names).logits.float(), rtol=3e-2, atol=3e-2,
        )  # fmt: skip


def test_kernel_dropout_under_gradient_checkpointing(llama, ids):
    """The recomputed forward draws the same dropout mask (torch's RNG state is restored by checkpointing)."""

    def grads(checkpointing):
        _, fused = lora_pair(llama, lora_dropout=0.2)
        if checkpointing:
            fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(21)
        return loss_and_grads(fused, ids)

    (out, ref), (out_ckpt, ckpt) = grads(False), grads(True)
    torch.testing.assert_close(out_ckpt, out)
    assert sorted(ckpt) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(ckpt[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_an_adapter_index_out_of_range_is_a_clear_error():
    """The mixed-batch entry point the layers call: an index outside [-1, L) never reads outside the stacks."""
    from peft_ext.kernels import lowrank_linear_gathered, plan_adapter_segments

    x, w = torch.randn(3, 4, 16), torch.randn(8, 16)
    a, b = torch.randn(2, 2, 16), torch.randn(2, 8, 2)
    with pytest.raises(ValueError, match=r"adapter_index out of range: got \[2\].*0\.\.1 for a stack of 2 adapters"):
        lowrank_linear_gathered(x, w, None, a, b, [1.0, 1.0], torch.tensor([0, 2, -1]))
    with pytest.raises(ValueError, match=r"adapter_index out of range: got \[-3\]"):
        plan_adapter_segments(torch.tensor([0, -3, 1]), 2, x.shape)


def test_a_4bit_base_stays_on_peft_with_the_reason_and_a_forced_triton_refuses(llama, ids, tmp_path):
    """bitsandbytes 4-bit LoRA layers: no fused path (the kernels need a dense weight). accelerate_lora says so,
    leaves them correct on PEFT's path, and backend='triton' refuses naming the layer."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    llama(hidden=64).save_pretrained(tmp_path / "base")  # the CPU 4-bit kernels need in_features >= 64
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    def model4():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
        torch.manual_seed(0)
        return get_peft_model(base, copy.deepcopy(config)).eval()

    ref, model = model4(), model4()
    with pytest.warns(UserWarning, match=r"stay on PEFT's own path.*bitsandbytes quantized layer"):
        accelerate_lora(model)
    report = fused_path_report(model)
    assert report["fused"] == [] and len(report["peft"]) == 4
    assert all("bitsandbytes quantized" in reason for _, reason in report["peft"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    with pytest.raises(RuntimeError, match=r"backend='triton'.*q_proj.*bitsandbytes quantized.*bf16"):
        accelerate_lora(model4(), backend="triton")


def test_mixed_batch_stacks_are_kept_until_a_factor_changes(llama):
    """The stacked adapters are built once per layer and reused while the parameters keep their values; an
    in-place update (an optimizer step), a new adapter or a stack recorded by autograd rebuilds them."""
    ref, fused = _two_adapter_pair(llama)
    names = ["default", "other", "__base__"]
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    layer = next(m for m in fused.modules() if isinstance(m, FusedLoraLinear))
    with torch.no_grad():
        first = fused(input_ids=ids, adapter_names=names).logits
        stacks = layer._adapter_stacks[2]
        torch.testing.assert_close(fused(input_ids=ids, adapter_names=names).logits, first, rtol=0, atol=0)
        assert layer._adapter_stacks[2] is stacks  # reused, not rebuilt
        for model in (ref, fused):  # the same in-place update on both: the cache must see it
            for name, p in model.named_parameters():
                if "lora_B.other" in name:
                    p.add_(0.5)
        got, expected = fused(input_ids=ids, adapter_names=names).logits, ref(input_ids=ids, adapter_names=names).logits
    assert layer._adapter_stacks[2] is not stacks
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, first)
