"""SSMLoRA on a CUDA device (skipped without one; run by benchmarks/gpu_session.sh): a bf16 base with fp32 adapters
(PEFT's autocast_adapter_dtype) against the same model in fp32 on the CPU, training step and mixed batch, and
gradient checkpointing leaving the gradients unchanged on the device."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from peft_ext import SsmLoraConfig
from peft_ext.testing.models import MODELS

CONFIG = dict(task_type="CAUSAL_LM", r=4, insertion="all", chain="all", init_weights=False, state_dropout=0.0, seed=0)


def _loss_and_grads(model, batch):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach().float().cpu(), grads


@pytest.mark.gpu
def test_bf16_base_on_cuda_matches_fp32_on_cpu():
    spec = MODELS["llama"]
    reference = get_peft_model(spec.make(0), SsmLoraConfig(**CONFIG))
    device_model = copy.deepcopy(reference)
    device_model.base_model.model.to("cuda", torch.bfloat16)
    for name, p in device_model.named_parameters():  # the adapters stay fp32, as get_peft_model makes them
        if "ssmlora_" in name:
            p.data = p.data.float()
    batch = spec.batch_with_labels()
    loss, grads = _loss_and_grads(reference, batch)
    loss_dev, grads_dev = _loss_and_grads(device_model, {k: v.cuda() for k, v in batch.items()})
    torch.testing.assert_close(loss_dev, loss, rtol=3e-2, atol=3e-2)
    assert sorted(grads_dev) == sorted(grads)
    for name in grads:
        torch.testing.assert_close(grads_dev[name], grads[name], rtol=1e-1, atol=5e-3, msg=name)
    # mixed batch on the device: each row as its own adapter's run
    device_model.add_adapter("other", SsmLoraConfig(**{**CONFIG, "seed": 1}))
    device_model.eval()
    inputs = {k: v.cuda() for k, v in spec.inputs(batch=3).items()}
    with torch.no_grad():
        mixed = device_model(**inputs, adapter_names=["default", "other", "__base__"]).logits
        device_model.set_adapter("other")
        other = device_model(**inputs).logits
    torch.testing.assert_close(mixed[1], other[1], rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_on_cuda_keeps_the_gradients(reentrant):
    spec = MODELS["llama"]
    batch = {k: v.cuda() for k, v in spec.batch_with_labels().items()}

    def run(checkpointing):
        model = get_peft_model(spec.make(0).cuda(), SsmLoraConfig(**CONFIG))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        return _loss_and_grads(model, batch)

    (loss, grads), (loss_ckpt, grads_ckpt) = run(False), run(True)
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
