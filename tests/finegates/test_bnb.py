"""FineGates on a bitsandbytes-quantised base, QLoRA-style, on CPU (bitsandbytes quantises on CPU): a tiny Llama
(hidden 64: the CPU 4-bit kernels need in_features >= 64) whose q_proj / v_proj / up_proj are bnb.nn.Linear4bit
(nf4, float32 compute) or Linear8bitLt. The gates and the LoRA inside them train (task + lambda * sparsity loss),
the quantised weights and every other base tensor never change, the evaluation output follows the gate formula on the
quantised layer, any merge is refused with a message naming the fix, disable_adapter() / unload() give the base.

As in tests/ssmlora/test_ssmlora_bnb.py: bitsandbytes repacks 4-bit weights at the first eval forward without
gradient (after which its CPU kernel has no backward and state_dict() unpacks them), so each model trains and saves
before its first eval forward."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_ext import FineGatesConfig
from peft_ext.testing.models import MODELS

from .refs import F64, eval_gate, gated_layers

bnb = pytest.importorskip("bitsandbytes")

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
    pytest.mark.usefixtures("one_thread"),  # one_thread: tests/conftest.py
]

TARGETS = ("q_proj", "v_proj", "up_proj")
QUANTIZED = {"4bit": (bnb.nn.Linear4bit, torch.uint8), "8bit": (bnb.nn.Linear8bitLt, torch.int8)}
REFUSED = (r"FineGates cannot merge into a bitsandbytes-quantized base \(.*\): folding the gates would dequantize "
           r"and requantize the weights \(lossy\).*Keep the adapter unmerged, or load the base in 16/32-bit")


def _quantize(dense, kind):
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")  # moving to a device quantises


@pytest.fixture(scope="module", autouse=True)
def _bnb_builds_on_cpu():
    try:
        layer = _quantize(torch.nn.Linear(64, 64, bias=False), "4bit")
        layer(torch.randn(2, 64))
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"bitsandbytes cannot build / run 4-bit layers on CPU here: {err!r}")



def quantized_llama(kind):
    model = MODELS["llama"].make(0, hidden=64)
    for block in model.model.layers:
        for name in TARGETS:
            parent = block.self_attn if name in ("q_proj", "v_proj") else block.mlp
            setattr(parent, name, _quantize(getattr(parent, name), kind))
    return model.eval()


def config(**kw):
    return FineGatesConfig(**{"target_modules": list(TARGETS), "task_type": "CAUSAL_LM", "seed": 0, "lora_r": 2,
                              "lora_alpha": 4.0, **kw})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def quantized_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_gates_and_lora_train_on_a_quantized_base(kind, tmp_path):
    layer_cls, qdtype = QUANTIZED[kind]
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(quantized_llama(kind), config())
    layers = gated_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    assert all(type(l.get_base_layer()) is layer_cls for l in layers.values())
    assert all(l.get_base_layer().weight.dtype == qdtype for l in layers.values())
    for l in layers.values():  # fp32 gates; the LoRA in the compute dtype; identity at init
        assert l.gates_row_logits["default"].dtype == torch.float32 and l.gates_row_logits["default"].min() >= 0.55
        assert l.gates_lora_A["default"].weight.dtype == torch.float32
        assert not l.gates_lora_B["default"].weight.any()
        assert (l.in_features, l.out_features) in {(64, 64), (64, 128)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".gates_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantized = quantized_weights(model)
    assert len(quantized) == 2 * len(TARGETS)

    model.train()
    sparsity_at_init = model.base_model.sparsity_loss().item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(3):
        task = model(input_ids=ids, labels=ids).loss
        loss = task + 50.0 * model.base_model.sparsity_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] != losses[-1] and all(map(lambda v: v == v, losses))
    assert model.base_model.sparsity_loss().item() < sparsity_at_init  # the gates moved toward the target
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable  # gates (sparsity loss), LoRA B (task), LoRA A (from the second step): all moved
    assert all(torch.equal(p, quantized[n]) for n, p in quantized_weights(model).items())

    for merge in (model.merge_and_unload, lambda: model.merge_and_unload(prune=False), model.merge_adapter):
        with pytest.raises(ValueError, match=REFUSED):
            merge()
    assert not any(l.merged for l in layers.values()) and gated_layers(model)
    model.save_pretrained(tmp_path / "adapter")  # before the first eval forward (bitsandbytes' CPU repacking)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model.eval()
    # the gate formula on the quantised layer itself: y = z_r * (Q(x z_c) + s B A (x z_c))
    layer = layers["model.layers.0.mlp.up_proj"]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    zr, zc = eval_gate(layer.gates_row_logits["default"]), eval_gate(layer.gates_col_logits["default"])
    with torch.no_grad():
        u = x * zc.float()
        low = layer.gates_lora_B["default"].weight @ layer.gates_lora_A["default"].weight
        ref = zr * (layer.get_base_layer()(u).to(F64) + 2.0 * (u @ low.T).to(F64))
        assert (layer(x).to(F64) - ref).abs().max() < 1e-5
        assert (layer(x) - layer.get_base_layer()(x)).abs().max() > 1e-4  # trained: not the base
    adapted = logits(model, ids)

    reloaded = PeftModel.from_pretrained(quantized_llama(kind), tmp_path / "adapter").eval()
    again = dict(reloaded.named_parameters())
    assert all(torch.equal(again[n], t) for n, t in trained.items())
    assert torch.equal(logits(reloaded, ids), adapted)

    base_eval = logits(quantized_llama(kind), ids)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), base_eval)
    base_layers = {n: l.get_base_layer() for n, l in layers.items()}
    unloaded = model.unload()
    modules = dict(unloaded.named_modules())
    assert all(modules[n] is layer for n, layer in base_layers.items())
    assert not gated_layers(unloaded)
    assert torch.equal(logits(unloaded, ids), base_eval)


def test_kurtosis_is_refused_on_a_quantized_layer():
    with pytest.raises(ValueError, match=r"kurtosis=True needs the dense weight of .*q_proj.*use kurtosis=False"):
        get_peft_model(quantized_llama("4bit"), config(kurtosis=True))


def test_merge_is_refused_on_a_partly_quantized_model():
    """Gates on both quantised and dense layers: still no merge (none of the layers is touched)."""
    model = get_peft_model(quantized_llama("4bit"), config(target_modules=["q_proj", "k_proj"], init_weights=False))
    dense = model.base_model.model.model.layers[0].self_attn.k_proj.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match=REFUSED):
        model.merge_and_unload(prune=False)
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.k_proj.get_base_layer().weight, dense)
    assert len(gated_layers(model)) == 4 and not any(l.merged for l in gated_layers(model).values())
