"""torch.compile of a training step with the gates' noise on: the same seed gives the eager loss and gradients (the
contract suite's compile items run without noise)."""

import torch
from peft import get_peft_model

from peft_ext import FineGatesConfig
from peft_ext.testing.models import MODELS


def test_compiled_training_step_with_noise_matches_eager():
    spec = MODELS["llama"]
    model = get_peft_model(spec.make(0), FineGatesConfig(task_type="CAUSAL_LM", gate_init_mean=0.6, gate_noise_std=0.3))
    model.train()
    batch = spec.batch_with_labels()
    torch.manual_seed(5)
    loss = spec.loss(model, batch)
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(eager) == 2 * 14  # row and column logits of the 14 gated layers
    model.zero_grad(set_to_none=True)
    torch.manual_seed(6)  # another draw of the noise: another loss (the check below can fail)
    other = spec.loss(model, batch).detach()
    assert not torch.equal(other, loss.detach())
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(5)
    compiled_loss = spec.loss(compiled, batch)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss.detach(), loss.detach(), rtol=1e-6, atol=1e-6)
    for name, grad in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7)
