"""SSMLoRA on a bitsandbytes-quantised base (bitsandbytes quantises on CPU), QLoRA-style: a tiny Llama whose q_proj /
v_proj are bnb.nn.Linear4bit (nf4, float32 compute) or bnb.nn.Linear8bitLt, adapted on the paper's alternating q/v
(one chain: q_proj of block 0 -> v_proj of block 1). The output at init is the quantised base, the adapter trains, the
quantised weights never change, merging is refused, unload() gives the quantised layers back, and a saved adapter
reloads bit for bit.

Order matters on CPU: bitsandbytes repacks 4-bit weights for inference at the first eval forward without gradient,
after which its CPU kernel has no backward and state_dict() unpacks them; so each model trains and saves before its
first eval forward, and outputs are compared between models in the same mode."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_ext import SsmLoraConfig
from peft_ext.testing.models import MODELS
from peft_ext.tuners.ssmlora import SsmLoraLayer

bnb = pytest.importorskip("bitsandbytes")

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
    pytest.mark.usefixtures("one_thread"),  # one_thread: tests/conftest.py
]

ATTN = ("q_proj", "v_proj")
ADAPTED = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")  # alternate_qv on 2 blocks
QUANTIZED = {"4bit": (bnb.nn.Linear4bit, torch.uint8), "8bit": (bnb.nn.Linear8bitLt, torch.int8)}
STATE_ACTIVE = "SSMLoRA cannot be merged while its state path is active"
BNB_REFUSED = (
    "SSMLoRA does not merge into bitsandbytes-quantized weights (dequantizing and requantizing is lossy): keep the "
    "adapter unmerged, or merge into the 16-bit model."
)



def quantized_llama(kind: str):
    """The tiny Llama (hidden 64: bitsandbytes' CPU 4-bit kernels need in_features >= 64) with its attention q/v
    linears quantised in place; the same weights every call."""
    model = MODELS["llama"].make(0, hidden=64)
    for block in model.model.layers:
        for name in ATTN:
            dense = getattr(block.self_attn, name)
            if kind == "4bit":
                layer = bnb.nn.Linear4bit(
                    dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
                )
                layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=False, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            setattr(block.self_attn, name, layer.to("cpu"))  # moving to a device quantises
    return model.eval()


def config(**kw):
    return SsmLoraConfig(**{"r": 4, "seed": 0, "task_type": "CAUSAL_LM", **kw})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def quantized_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_ssmlora_on_a_quantized_base(kind, tmp_path):
    layer_cls, dtype = QUANTIZED[kind]
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    base = quantized_llama(kind).train()
    assert {type(getattr(b.self_attn, n)) for b in base.model.layers for n in ATTN} == {layer_cls}
    assert all(getattr(b.self_attn, n).weight.dtype == dtype for b in base.model.layers for n in ATTN)
    base_train = logits(base, ids)

    model = get_peft_model(quantized_llama(kind), config())  # default: alternate_qv, state_dropout 0.1, D random
    wrapped = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, SsmLoraLayer)}
    assert tuple(wrapped) == ADAPTED and all(type(m.get_base_layer()) is layer_cls for m in wrapped.values())
    assert model.peft_config["default"].chain_layout == [list(ADAPTED)]
    assert all(m.ssmlora_A["default"].weight.dtype == torch.float32 for m in wrapped.values())  # the compute dtype
    base_layers = {n: m.get_base_layer() for n, m in wrapped.items()}
    model.train()
    assert torch.equal(logits(model, ids), base_train)  # B = 0: exactly the quantised base at init

    quantized = quantized_weights(model)
    assert len(quantized) == 2 * len(ATTN)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # A, B, D on both modules, C on the second only (the chain's first module has no C)
    kinds = sorted(n.split(".")[-3] for n in adapter)
    assert kinds == sorted(["ssmlora_A", "ssmlora_B", "ssmlora_D"] * 2 + ["ssmlora_C"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:  # one step moves B: the output leaves the base
            assert not torch.equal(logits(model, ids), base_train)
    params = dict(model.named_parameters())
    # after two steps every tensor moved (A and C only get gradient once B is non-zero, at the second step)
    assert [n for n in adapter if torch.equal(adapter[n], params[n])] == []
    assert all(torch.equal(p, quantized[n]) for n, p in quantized_weights(model).items())  # the base never changes

    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match=re.escape(STATE_ACTIVE)):
            merge()
    assert not any(m.merged for m in wrapped.values())
    # save before the first eval forward (bitsandbytes' CPU repacking)
    model.save_pretrained(tmp_path / "adapter")
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model.eval()
    adapted = logits(model, ids)
    reloaded = PeftModel.from_pretrained(quantized_llama(kind), tmp_path / "adapter").eval()
    again = dict(reloaded.named_parameters())
    assert sorted(n for n in again if "ssmlora_" in n) == sorted(trained)
    assert all(torch.equal(again[n], t) for n, t in trained.items())  # the saved adapter, bit for bit
    assert torch.equal(logits(reloaded, ids), adapted)

    base_eval = logits(quantized_llama(kind), ids)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), base_eval)
    unloaded = model.unload()
    modules = dict(unloaded.named_modules())
    for name, layer in base_layers.items():
        assert modules[name] is layer and type(layer) is layer_cls  # the quantised layers themselves
    assert not any(isinstance(m, SsmLoraLayer) for m in unloaded.modules())
    assert not any("ssmlora_" in n for n, _ in unloaded.named_parameters())
    assert torch.equal(logits(unloaded, ids), base_eval)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_a_plain_lora_adapter_still_does_not_merge_into_quantized_weights(kind):
    """C = D = 0 (state_init="zeros", untrained, B random): mergeable as a LoRA on a 16-bit base, refused on a
    quantised one, and nothing is touched."""
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    model = get_peft_model(quantized_llama(kind), config(state_init="zeros", init_weights=False)).train()
    before = logits(model, ids)
    quantized = quantized_weights(model)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match=f"^{re.escape(BNB_REFUSED)}$"):
            merge()
    assert not any(m.merged for m in model.modules() if isinstance(m, SsmLoraLayer))
    assert all(isinstance(m, SsmLoraLayer) for n, m in model.named_modules() if n.endswith(ADAPTED))
    assert all(torch.equal(p, quantized[n]) for n, p in quantized_weights(model).items())
    assert torch.equal(logits(model, ids), before)
