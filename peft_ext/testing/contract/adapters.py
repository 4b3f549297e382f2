"""Contract item 5: two named adapters: add, switch, delete; mixed-batch inference with adapter_names=."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from peft.utils import ModulesToSaveWrapper

from ..harness import adapter_tensors, assert_equal, output, peft_model
from ..marks import per_model

__all__ = [
    "test_add_switch_delete",
    "test_mixed_batch_equals_per_adapter_runs",
    "test_unknown_adapter_name",
    "test_mixed_batch_while_merged",
    "test_several_active_adapters_run_as_merging_them_would",
]


def _config(entry, spec, seed: int):
    return entry.make_config(spec.kind, **entry.nonidentity_overrides, **entry.seed_overrides(seed))


def _two_adapters(entry, spec):
    model = get_peft_model(spec.make(0), _config(entry, spec, 0), adapter_name="a")
    model.add_adapter("b", _config(entry, spec, 1))
    # modules_to_save copies (the classifier of SEQ_CLS) start as copies of the base: make b's differ, so that a
    # row run with the wrong copy shows
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save.b." in name:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.5)
    model.eval()
    return model


def _single(entry, spec, seed: int):
    """A model with only the adapter built from `seed`: what "a" (seed 0) or "b" (seed 1) must reproduce."""
    return get_peft_model(spec.make(0), _config(entry, spec, seed), adapter_name="only").eval()


def _per_adapter_outputs(spec, model, inputs) -> dict:
    """The whole batch under each adapter in turn (set_adapter), and under the base model; leaves "a" active."""
    per_adapter = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        per_adapter[name] = output(spec, model, inputs)
    model.set_adapter("a")
    per_adapter["__base__"] = output(spec, spec.make(0), inputs)
    assert not torch.equal(per_adapter["a"], per_adapter["b"])
    return per_adapter


def _assert_rows_match(mixed, per_adapter: dict, names: list[str], what: str) -> None:
    for row, name in enumerate(names):
        # a row is computed in a sub-batch of its adapter's rows: allow for BLAS reduction order
        torch.testing.assert_close(
            mixed[row], per_adapter[name][row], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: row {row} ({name}): {m}"
        )


@per_model()
def test_add_switch_delete(entry, spec):
    doc = entry.documented_error("multi_adapter", spec.kind)
    if doc is not None:
        model = get_peft_model(spec.make(0), _config(entry, spec, 0), adapter_name="a")
        with pytest.raises(doc.error, match=doc.match):
            model.add_adapter("b", _config(entry, spec, 1))
        return
    model = _two_adapters(entry, spec)
    assert set(model.peft_config) == {"a", "b"}
    assert model.active_adapter == "a"  # add_adapter does not switch
    out_a = output(spec, model)
    model.set_adapter("b")
    assert model.active_adapter == "b"
    out_b = output(spec, model)
    assert not torch.equal(out_a, out_b), "the two adapters give the same output"
    assert not torch.equal(out_a, output(spec, spec.make(0)))
    # each adapter reproduces a model that holds only it
    assert_equal(out_a, output(spec, _single(entry, spec, 0)), "adapter a vs a model with only a")
    only_b = _single(entry, spec, 1)
    with torch.no_grad():  # b's perturbed modules_to_save copies (see _two_adapters)
        params = dict(model.named_parameters())
        for name, p in only_b.named_parameters():
            if ".modules_to_save.only." in name:
                p.copy_(params[name.replace(".modules_to_save.only.", ".modules_to_save.b.")])
    assert_equal(out_b, output(spec, only_b), "adapter b vs a model with only b")
    # set_adapter only trains the active adapter
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".b." in n or n.endswith(".b") for n in trainable), trainable[:3]
    assert trainable or not entry.trainable
    model.set_adapter("a")
    assert_equal(output(spec, model), out_a, "back to a")

    # delete b: its tensors go, a is untouched
    model.delete_adapter("b")
    assert set(model.peft_config) == {"a"}
    assert not [n for n in adapter_tensors(model, entry) if ".b." in n or n.endswith(".b")]
    assert_equal(output(spec, model), out_a, "a after deleting b")
    with pytest.raises(ValueError, match=r"(?i)\bb\b.*(not found|does not exist|unknown)"):
        model.set_adapter("b")
    with pytest.raises(ValueError, match=r"zzz"):
        model.delete_adapter("zzz")


@per_model()
def test_mixed_batch_equals_per_adapter_runs(entry, spec):
    model = _two_adapters(entry, spec)
    names = ["a", "b", "__base__", "a", "b", "__base__"]
    inputs = spec.inputs(batch=len(names))
    doc = entry.documented_error("mixed_batch", spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            output(spec, model, inputs, adapter_names=names)
        return
    mixed = output(spec, model, inputs, adapter_names=names)
    per_adapter = _per_adapter_outputs(spec, model, inputs)
    _assert_rows_match(mixed, per_adapter, names, "mixed batch")
    # the active adapter is unchanged by a mixed batch
    model.set_adapter("a")
    output(spec, model, inputs, adapter_names=names)
    assert_equal(output(spec, model, inputs), per_adapter["a"], "after a mixed batch")
    # mixed batches are for inference; an unknown name is refused
    with pytest.raises(ValueError, match=r"zzz"):
        output(spec, model, inputs, adapter_names=["zzz"] * len(names))
    model.train()
    with pytest.raises(ValueError, match=r"(?i)eval|inference|train"):
        spec.run(model, {**inputs, "adapter_names": names})


@per_model()
def test_unknown_adapter_name(entry, spec):
    model, _ = peft_model(entry, spec)
    with pytest.raises(ValueError, match=r"nope"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match=r"nope"):
        model.delete_adapter("nope")
    assert set(model.peft_config) == {"default"}


@per_model()
def test_mixed_batch_while_merged(entry, spec):
    """With an adapter merged into the base weights, a mixed batch must not silently compute "__base__" (or another
    adapter's) rows on the merged weights: either it gives the unmerged answer or it refuses (PEFT's LoRA raises
    "Cannot pass `adapter_names` when there are merged adapters")."""
    if not entry.supports("mixed_batch", spec.kind) or not entry.supports("merge", spec.kind):
        doc = entry.documented_error("mixed_batch", spec.kind) or entry.documented_error("merge", spec.kind)
        model = _two_adapters(entry, spec)
        with pytest.raises(doc.error, match=doc.match):
            model.merge_adapter()
            output(spec, model, spec.inputs(batch=3), adapter_names=["a", "b", "__base__"])
        return
    model = _two_adapters(entry, spec)
    names = ["a", "b", "__base__", "b"]
    inputs = spec.inputs(batch=len(names))
    per_adapter = _per_adapter_outputs(spec, model, inputs)
    model.merge_adapter()  # merges the active adapter, "a"
    try:
        got = output(spec, model, inputs, adapter_names=names)
    except ValueError as err:
        assert "merge" in str(err).lower(), err
        return
    _assert_rows_match(got, per_adapter, names, "mixed batch while merged")


@per_model()
def test_several_active_adapters_run_as_merging_them_would(entry, spec):
    """`set_adapter(["a", "b"])`: the unmerged forward computes what `merge_adapter()` then writes (merging stacks the
    active adapters, so a forward that refused them, or ran only one, disagreed with the merge)."""
    doc = entry.documented_error("multi_adapter", spec.kind)
    if doc is not None:
        return  # one adapter per model by design: test_add_switch_delete asserts the documented error
    model = _two_adapters(entry, spec)
    if any(isinstance(m, ModulesToSaveWrapper) for m in model.modules()):  # PEFT's own limit (the classifier copy)
        with pytest.raises(ValueError, match=r"Only one adapter can be set at a time"):
            model.base_model.set_adapter(["a", "b"])
        return
    model.base_model.set_adapter(["a", "b"])
    doc = entry.documented_error("several_active", spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            output(spec, model)
        return
    stacked = output(spec, model)
    model.set_adapter("a")
    assert not torch.equal(stacked, output(spec, model)), "two active adapters ran as one"
    model.base_model.set_adapter(["a", "b"])
    if entry.documented_error("merge", spec.kind) is not None:
        return
    model.merge_adapter()
    torch.testing.assert_close(output(spec, model), stacked, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    assert_equal(output(spec, model), stacked, "after merge + unmerge")

