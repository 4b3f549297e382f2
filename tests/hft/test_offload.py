"""offload_originals (issue 11 item 11): the pre-trained weights of the wrapped modules leave the accelerator
while training; an active adapter never reads them, and everything that needs them still gets them.

No GPU here: "meta" stands in for host memory where only the training path runs (a meta tensor has no data, so a
read of an original would fail), and the paths that need the originals are checked with the layer marked as
offloaded while its originals stay on the CPU."""

import pytest
import torch
from peft import get_peft_model

from peft_ext import HftConfig
from peft_ext.tuners.hft.layer import HftLayer, offload_originals, onload_originals


def _train(model, input_ids, steps=2, checkpointing=False):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    model.eval()
    return torch.stack(losses)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, HftLayer)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_never_reads_the_offloaded_originals(llama, input_ids, checkpointing):
    reference = get_peft_model(llama(), HftConfig())
    model = get_peft_model(llama(), HftConfig())
    moved = offload_originals(model, device="meta")
    originals = [p for m in _layers(model) for p in m.get_base_layer().parameters(recurse=False)]
    assert moved == sum(p.numel() * p.element_size() for p in originals) > 0
    assert all(p.device.type == "meta" for p in originals)
    expected = _train(reference, input_ids, checkpointing=checkpointing)
    assert torch.equal(_train(model, input_ids, checkpointing=checkpointing), expected)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reference(input_ids).logits)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.device.type == "cpu" for p in trained.values())


def _offloaded_in_place(model):
    """Mark every layer offloaded, its originals staying on the CPU: the forward then takes the offloaded path."""
    for layer in _layers(model):
        layer.hft_compute_device = torch.device("cpu")


def test_disabled_adapter_base_rows_merge_and_unload_use_the_originals(llama, input_ids):
    base_out = llama()(input_ids).logits
    reference = get_peft_model(llama(), HftConfig(init_weights=False))
    model = get_peft_model(llama(), HftConfig(init_weights=False)).eval()
    _offloaded_in_place(model)
    with torch.no_grad():
        adapted = model(input_ids).logits
        assert torch.equal(adapted, reference(input_ids).logits)
        with model.disable_adapter():
            assert torch.equal(model(input_ids).logits, base_out)
        names = ["default", "__base__", "default"]
        mixed = model(input_ids, adapter_names=names).logits
        torch.testing.assert_close(mixed[1], base_out[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[0], adapted[0], rtol=1e-5, atol=1e-6)
    # a module the active adapter does not train, in training: gradients flow through the originals' copies
    model.add_adapter("other", HftConfig(target_modules=["q_proj"], ratio=1.0, train_norms=False))
    model.set_adapter("other")
    _offloaded_in_place(model)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    model.set_adapter("default")
    model.eval()
    with torch.no_grad():
        merged = model.merge_and_unload()(input_ids).logits
        expected = reference.merge_and_unload()(input_ids).logits
    assert torch.equal(merged, expected)


def test_onload_puts_the_originals_back_and_param_layers_keep_theirs(llama):
    model = get_peft_model(llama(), HftConfig(strategy="param"))
    assert offload_originals(model, device="meta") == 0  # strategy "param" reads the pre-trained rows every forward
    model = get_peft_model(llama(), HftConfig())
    _offloaded_in_place(model)
    onload_originals(model)
    assert all(layer.hft_compute_device is None for layer in _layers(model))
