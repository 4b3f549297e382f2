"""Contract item 6: fp32/bf16/fp16 models, CPU autocast, gradient checkpointing, torch.compile."""

from __future__ import annotations

import pytest
import torch

from ..harness import assert_equal, output, peft_model, snapshot, train_step
from ..marks import per_method, per_model
from ..models import MODELS

__all__ = [
    "test_half_precision_model",
    "test_cpu_bf16_autocast",
    "test_gradient_checkpointing_same_grads",
    "test_torch_compile_forward_matches_eager",
    "test_torch_compile_training_step_matches_eager",
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@per_model()
def test_half_precision_model(entry, spec, dtype):
    """A 16-bit base: the adapter computes in that dtype, equals the base at init, and trains one step.

    fp16 on CPU: torch 2.13's CPU kernels cover fp16 matmul, softmax and norms, so the tiny models run forward and
    backward in fp16 here (this test asserts that they do, rather than assuming an error). The fp16 step uses SGD:
    AdamW on fp16 tensors is not a valid recipe for any fp16 parameter (its eps=1e-8 underflows to 0 in fp16 and
    grad**2 underflows, so 0/0 gives NaN; full fine-tuning in pure fp16 does the same), and a method that keeps its
    trainable tensors in the base dtype (HFT does, by design) meets exactly that."""
    item = "bf16" if dtype == torch.bfloat16 else "fp16"
    doc = entry.documented_error(item, spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            model, _ = peft_model(entry, spec, dtype=dtype)
            output(spec, model, spec.inputs(dtype=dtype))
        return
    inputs = spec.inputs(dtype=dtype)
    base_out = output(spec, spec.make(0, dtype), inputs)
    model, _ = peft_model(entry, spec, dtype=dtype)
    out = output(spec, model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if entry.supports("identity_init", spec.kind) and entry.init_atol == 0.0:
        assert_equal(out, base_out, f"{item} peft model at init vs base")
    if not entry.trainable:  # an inference-only method: a non-trivial adapter runs in that dtype too
        model, _ = peft_model(entry, spec, dtype=dtype, **entry.nonidentity_overrides)
        out = output(spec, model, inputs)
        assert out.dtype == dtype and torch.isfinite(out).all() and not torch.equal(out, base_out)
        return
    # one step in that dtype: finite loss and gradients, the adapter moves, the frozen weights do not
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if dtype == torch.bfloat16:
        loss = train_step(spec, model)
    else:
        model.train()
        loss = spec.loss(model, spec.batch_with_labels(dtype=dtype))
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        torch.optim.SGD(params, lr=0.1).step()
        model.eval()
    assert torch.isfinite(loss)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    assert torch.isfinite(output(spec, model, inputs)).all()


@per_model()
def test_cpu_bf16_autocast(entry, spec):
    doc = entry.documented_error("autocast", spec.kind)
    inputs = spec.inputs()
    model, _ = peft_model(entry, spec)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match), torch.autocast("cpu", dtype=torch.bfloat16):
            output(spec, model, inputs)
        return
    base = spec.make(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base_out = output(spec, base, inputs)
        out = output(spec, model, inputs)
    assert torch.isfinite(out).all()
    if entry.supports("identity_init", spec.kind) and entry.init_atol == 0.0:
        assert_equal(out, base_out, "autocast peft model at init vs autocast base")
    if not entry.trainable:
        return
    # and training under autocast (as TRL's default bf16=True does) gives finite fp32 gradients to the adapter
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = spec.loss(model, spec.batch_with_labels())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# gradient_checkpointing_enable() is a transformers PreTrainedModel feature: the plain torch MLP has no such switch
# (and no blocks to checkpoint), so the item runs on the transformers models only
@per_model(transformers_only=True)
def test_gradient_checkpointing_same_grads(entry, spec):
    def grads(checkpointing: bool):
        model, _ = peft_model(entry, spec, **entry.nonidentity_overrides)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.get_base_model().is_gradient_checkpointing
        model.train()
        loss = spec.loss(model, spec.batch_with_labels())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    doc = entry.documented_error("gradient_checkpointing", spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            grads(True)
        return
    loss_ref, ref = grads(False)
    loss_ckpt, ckpt = grads(True)
    torch.testing.assert_close(loss_ckpt, loss_ref, rtol=1e-6, atol=1e-6)
    assert sorted(ckpt) == sorted(ref) and ref
    for name in ref:
        torch.testing.assert_close(ckpt[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in ref.values())


@per_method
def test_torch_compile_forward_matches_eager(entry):
    """One model (the tiny Llama: linear layers and norms) with inductor on CPU; compile takes ~25 s here with a cold
    inductor cache, ~5 s warm."""
    spec = MODELS["llama"]
    model, _ = peft_model(entry, spec, **entry.nonidentity_overrides)
    inputs = spec.inputs()
    eager = output(spec, model, inputs)
    doc = entry.documented_error("compile", spec.kind)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            output(spec, compiled, inputs)
        return
    out = output(spec, compiled, inputs)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert not torch.equal(eager, output(spec, spec.make(0), inputs)), "adapter is trivial"


@per_method
def test_torch_compile_training_step_matches_eager(entry):
    """A compiled training step: forward and backward through dynamo and AOTAutograd give the eager loss and
    gradients (backend "aot_eager" keeps this to seconds on a CPU; inductor's code generation is what the forward
    test above covers)."""
    spec = MODELS["llama"]
    if not entry.supports("train", spec.kind):
        return  # not trainable by design: test_one_step_changes_only_adapter asserts the documented error
    model, _ = peft_model(entry, spec, **entry.nonidentity_overrides)
    model.train()
    batch = spec.batch_with_labels()
    loss = spec.loss(model, batch)
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert eager, "no adapter parameter got a gradient"
    model.zero_grad(set_to_none=True)
    doc = entry.documented_error("compile", spec.kind)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            spec.loss(compiled, batch).backward()
        return
    compiled_loss = spec.loss(compiled, batch)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss.detach(), loss.detach(), rtol=1e-5, atol=1e-6)
    params = dict(model.named_parameters())
    for name, grad in eager.items():
        assert params[name].grad is not None, f"{name}: no gradient in the compiled step"
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

