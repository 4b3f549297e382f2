"""HFT is full fine-tuning restricted to the selected tensors: same loss, same gradients on them, same optimiser
step; and reset_fraction against a reference at fractions below 1."""

import copy

import torch
from peft import get_peft_model

from peft_ext import HftConfig, reset_fraction


def test_gradients_and_step_equal_full_fine_tuning_on_the_selected_tensors(llama, input_ids):
    base = llama(layers=2)
    fft = copy.deepcopy(base).train()
    model = get_peft_model(base, HftConfig(ratio=0.5, seed=0)).train()
    selected = model.peft_config["default"].selected_modules
    layers = {name: model.base_model.model.get_submodule(name) for name in selected}

    loss = model(input_ids, labels=input_ids).loss
    fft_loss = fft(input_ids, labels=input_ids).loss
    assert torch.equal(loss, fft_loss)  # the copies start as the base
    loss.backward()
    fft_loss.backward()
    pairs = []
    for name, layer in layers.items():
        for pname, copy_ in layer.hft_weight["default"].items():
            reference = getattr(fft.get_submodule(name), pname)
            torch.testing.assert_close(copy_.grad, reference.grad, rtol=1e-6, atol=1e-8)
            pairs.append((copy_, reference))
    assert {id(p) for p, _ in pairs} == {id(p) for p in model.parameters() if p.requires_grad}

    opt = torch.optim.AdamW([p for p, _ in pairs], lr=1e-2, weight_decay=0.1)
    fft_opt = torch.optim.AdamW([r for _, r in pairs], lr=1e-2, weight_decay=0.1)  # full FT of the same tensors
    opt.step()
    fft_opt.step()
    for copy_, reference in pairs:
        torch.testing.assert_close(copy_.detach(), reference.detach(), rtol=1e-6, atol=1e-8)
    model.eval(), fft.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, fft(input_ids).logits, rtol=1e-5, atol=1e-6)


def test_reset_against_a_reference_at_a_fraction_below_one(llama):
    base = llama(seed=0)
    tuned = llama(seed=0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1.0)
    names = sorted(n for n, _ in tuned.named_parameters())
    reset = reset_fraction(tuned, 0.5, seed=3, reference=base)
    assert len(reset) == round(0.5 * len(names)) and set(reset) <= set(names)
    base_params, tuned_params = dict(base.named_parameters()), dict(tuned.named_parameters())
    for name in names:  # the chosen half is back at the base, the rest keeps the fine-tune
        expected = base_params[name] if name in reset else base_params[name] + 1.0
        assert torch.equal(tuned_params[name], expected), name
    again = llama(seed=0)
    with torch.no_grad():
        for p in again.parameters():
            p.add_(1.0)
    assert reset_fraction(again, 0.5, seed=3, reference=base) == reset  # seeded
    # element granularity: about the fraction of every tensor's entries
    tuned = llama(seed=0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1.0)
    reset_fraction(tuned, 0.25, seed=0, reference=base, granularity="element")
    restored = sum((tuned_params_p == base_params[n]).sum().item() for n, tuned_params_p in tuned.named_parameters())
    total = sum(p.numel() for p in tuned.parameters())
    assert 0.22 < restored / total < 0.28
