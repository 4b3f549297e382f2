"""S'MoRE on a bitsandbytes-quantised base (bitsandbytes quantises on CPU): a tiny Llama whose MLP projections are
bnb.nn.Linear4bit (nf4, float32 compute) or bnb.nn.Linear8bitLt. The adapter trains, the quantised weights never
change, merging is refused, unload() gives the quantised layers back, and a saved adapter reloads bit for bit.

Order matters on CPU: bitsandbytes repacks 4-bit weights for inference at the first eval forward without gradient,
after which its CPU kernel has no backward and state_dict() unpacks them; so each model trains and saves before its
first eval forward, and outputs are compared between models in the same mode."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_ext import SmoreConfig
from peft_ext.testing.models import MODELS
from peft_ext.tuners.smore import SmoreLayer

bnb = pytest.importorskip("bitsandbytes")

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
    pytest.mark.usefixtures("one_thread"),  # one_thread: tests/conftest.py
]

MLP = ("gate_proj", "up_proj", "down_proj")
CONFIG = dict(
    target_modules=list(MLP), num_experts=[2, 2], num_active=[1, 1], expert_ranks=[2, 2], router_dim=8,
    router_down_dim=8, seed=0,
)
QUANTIZED = {"4bit": (bnb.nn.Linear4bit, torch.uint8), "8bit": (bnb.nn.Linear8bitLt, torch.int8)}



def quantized_llama(kind: str):
    """The tiny Llama (hidden 64: bitsandbytes' CPU 4-bit kernels need in_features >= 64) with its MLP linears
    quantised in place; the same weights every call."""
    model = MODELS["llama"].make(0, hidden=64)
    for block in model.model.layers:
        for name in MLP:
            dense = getattr(block.mlp, name)
            if kind == "4bit":
                layer = bnb.nn.Linear4bit(
                    dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
                )
                layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=False, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            setattr(block.mlp, name, layer.to("cpu"))  # moving to a device quantises
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def quantized_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_smore_on_a_quantized_base(kind, tmp_path):
    layer_cls, dtype = QUANTIZED[kind]
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    base = quantized_llama(kind).train()
    assert {type(getattr(b.mlp, n)) for b in base.model.layers for n in MLP} == {layer_cls}
    assert all(getattr(b.mlp, n).weight.dtype == dtype for b in base.model.layers for n in MLP)
    base_train = logits(base, ids)

    model = get_peft_model(quantized_llama(kind), SmoreConfig(**CONFIG))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, SmoreLayer)}
    assert len(wrapped) == 2 * len(MLP) and all(type(m.get_base_layer()) is layer_cls for m in wrapped.values())
    base_layers = {n: m.get_base_layer() for n, m in wrapped.items()}
    model.train()
    assert torch.equal(logits(model, ids), base_train)  # P = 0: exactly the quantised base at init

    quantized = quantized_weights(model)
    assert len(quantized) == 2 * len(MLP)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all("smore_" in n for n in adapter)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:  # one step moves the adapter: the output leaves the base
            assert not torch.equal(logits(model, ids), base_train)
    params = dict(model.named_parameters())
    assert [n for n in adapter if torch.equal(adapter[n], params[n])] == []  # after two steps every tensor moved
    assert all(torch.equal(p, quantized[n]) for n, p in quantized_weights(model).items())  # the base never changes

    with pytest.raises(ValueError, match="S'MoRE cannot be merged"):
        model.merge_and_unload()
    # save before the first eval forward (bitsandbytes' CPU repacking)
    model.save_pretrained(tmp_path / "adapter")
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model.eval()
    adapted = logits(model, ids)
    reloaded = PeftModel.from_pretrained(quantized_llama(kind), tmp_path / "adapter").eval()
    again = dict(reloaded.named_parameters())
    assert sorted(n for n in again if "smore_" in n) == sorted(trained)
    assert all(torch.equal(again[n], t) for n, t in trained.items())  # the saved adapter, bit for bit
    assert torch.equal(logits(reloaded, ids), adapted)

    base_eval = logits(quantized_llama(kind), ids)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), base_eval)
    unloaded = model.unload()
    modules = dict(unloaded.named_modules())
    for name, layer in base_layers.items():
        plain = name.removeprefix("base_model.model.")
        assert modules[plain] is layer and type(layer) is layer_cls  # the quantised layers themselves
    assert not any(isinstance(m, SmoreLayer) for m in unloaded.modules())
    assert not any("smore_" in n for n, _ in unloaded.named_parameters())
    assert torch.equal(logits(unloaded, ids), base_eval)
