"""Gradient checkpointing with training noise: the gates' noise is drawn with torch's RNG inside each block, and the
checkpoint's recomputation replays the RNG state, so the gradients with checkpointing (reentrant and not) equal
those without, from the same seed."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_ext import FineGatesConfig
from peft_ext.testing.models import MODELS


def _grads(checkpointing, seed=7):
    spec = MODELS["llama"]
    base = spec.make(0)
    if checkpointing is not None:
        kwargs = {"use_reentrant": checkpointing == "reentrant"}
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # gates on the clamp's slope (mean 0.6, noise 0.3): the task gradient reaches most gates, and depends on the noise
    config = FineGatesConfig(task_type="CAUSAL_LM", seed=0, gate_init_mean=0.6, gate_noise_std=0.3, lora_r=2,
                             bias="gates", init_weights=True)
    model = get_peft_model(base, config).train()
    calls = []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(seed)
    loss = spec.loss(model, spec.batch_with_labels()) + 10.0 * model.base_model.sparsity_loss()
    loss.backward()
    # checkpointing recomputes the block in the backward: the gated layer runs (and draws its noise) twice
    assert len(calls) == (1 if checkpointing is None else 2)
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointed_gradients_equal_plain_ones(mode):
    loss, plain = _grads(None)
    loss_ckpt, ckpt = _grads(mode)
    assert torch.equal(loss, loss_ckpt)
    assert sorted(plain) == sorted(ckpt)
    logit_grads = [n for n in plain if "gates_row_logits" in n or "gates_col_logits" in n]
    assert logit_grads and all(plain[n].abs().sum() > 0 for n in logit_grads)
    for name in plain:
        assert torch.allclose(ckpt[name], plain[name], rtol=1e-5, atol=1e-8), name
    # the noise matters: another seed gives other gradients (so equality above is not vacuous)
    _, other = _grads(None, seed=8)
    assert any(not torch.allclose(other[n], plain[n], rtol=1e-3, atol=1e-6) for n in logit_grads)
