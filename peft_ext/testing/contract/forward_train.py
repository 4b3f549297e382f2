"""Contract items 1 and 2: forward at init, trainable-parameter count, and one optimisation step."""

from __future__ import annotations

import pytest
import torch

from ..harness import (
    adapter_param_names,
    assert_equal,
    expected_trained_modules,
    module_of_param,
    output,
    peft_model,
    snapshot,
    train_step,
)
from ..marks import per_model

__all__ = ["test_forward_at_init_equals_base", "test_trainable_parameter_count", "test_one_step_changes_only_adapter"]


@per_model()
def test_forward_at_init_equals_base(entry, spec):
    base_out = output(spec, spec.make(0))
    model, _ = peft_model(entry, spec)
    out = output(spec, model)
    assert torch.isfinite(out).all()
    doc = entry.documented_error("identity_init", spec.kind)
    if doc is not None:  # the method's init is documented as not an identity: only check it differs
        assert not torch.equal(out, base_out), doc.why
        return
    if entry.init_atol == 0.0:
        assert_equal(out, base_out, "peft model at init vs base")
    else:
        torch.testing.assert_close(out, base_out, rtol=0, atol=entry.init_atol)


@per_model()
def test_trainable_parameter_count(entry, spec):
    model, config = peft_model(entry, spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = entry.expected_trainable(spec.make(0), config)
    assert trainable == expected
    assert expected > 0 or not entry.trainable, "a trainable method must train something"
    # PEFT's own report agrees
    assert model.get_nb_trainable_parameters()[0] == expected
    # every trainable parameter is the adapter's (prefixed, or a modules_to_save copy)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(adapter_param_names(model, entry)), sorted(names ^ set(adapter_param_names(model, entry)))[:5]
    if entry.check_structure is not None:
        entry.check_structure(spec.kind, spec.make(0), config)


@per_model()
def test_one_step_changes_only_adapter(entry, spec):
    model, config = peft_model(entry, spec)
    doc = entry.documented_error("train", spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            train_step(spec, model)
        return
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for step in range(entry.train_steps):
        loss = train_step(spec, model, seed=7 + step)
        assert torch.isfinite(loss)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # frozen: bit-identical, including the frozen originals of the trained modules
    assert not (changed - trainable), f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    # AdamW with weight decay moves every trainable tensor
    assert changed == trainable, f"trainable but unchanged: {sorted(trainable - changed)[:5]}"
    # and those belong to exactly the modules the method trains (plus modules_to_save)
    owners = {module_of_param(n, entry.prefix) for n in changed}
    assert owners == expected_trained_modules(entry, spec.make(0), config)
    # the base model's own weights (all of them) are unchanged
    base = spec.make(0)
    unwrapped = dict(model.get_base_model().named_parameters())
    for name, p in base.named_parameters():
        mod, _, leaf = name.rpartition(".")
        candidates = [name, f"{mod}.base_layer.{leaf}", f"{mod}.original_module.{leaf}"]
        key = next((c for c in candidates if c in unwrapped), None)
        assert key is not None, f"base parameter {name} not found in the wrapped model"
        assert_equal(unwrapped[key].detach(), p.detach(), f"base parameter {name}")
    # and the step did something: the output moved away from the base
    assert not torch.equal(output(spec, model), output(spec, base))
