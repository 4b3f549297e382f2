"""Contract item 4: merge_and_unload, unload, disable_adapter, merge/unmerge, safe_merge."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper

from ..entries import modules_to_save_names
from ..harness import adapter_tensors, assert_equal, assert_state_equal, output, trained_peft_model
from ..marks import per_model

__all__ = [
    "test_merge_and_unload_matches_unmerged",
    "test_unload_returns_exact_base",
    "test_disable_adapter_gives_base_output",
    "test_merge_then_unmerge_restores_exactly",
    "test_merged_model_moved_to_another_dtype_unmerges_and_disables",
    "test_safe_merge_detects_nan",
]

MERGE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
MERGE_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _merge_adapter(entry, spec, model) -> bool:
    """`model.merge_adapter()`; for a method documented as not merging, assert its error instead and return False."""
    doc = entry.documented_error("merge", spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            model.merge_adapter()
        return False
    model.merge_adapter()
    return True


def _no_tuner_layers(model: torch.nn.Module) -> None:
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert not any("modules_to_save" in n or "base_layer" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@per_model()
def test_merge_and_unload_matches_unmerged(entry, spec, dtype):
    model, _ = trained_peft_model(entry, spec, dtype=dtype)
    inputs = spec.inputs(dtype=dtype)
    unmerged = output(spec, model, inputs)
    assert not torch.equal(unmerged, output(spec, spec.make(0, dtype), inputs)), "adapter is trivial"
    doc = entry.documented_error("merge", spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            model.merge_and_unload()
        return
    merged = model.merge_and_unload()
    _no_tuner_layers(merged)
    assert type(merged) is type(spec.make(0))
    torch.testing.assert_close(output(spec, merged, inputs), unmerged, rtol=MERGE_RTOL[dtype], atol=MERGE_ATOL[dtype])
    # the merged model has the base's architecture: same parameter names and shapes
    base = spec.make(0, dtype)
    assert {n: p.shape for n, p in merged.named_parameters()} == {n: p.shape for n, p in base.named_parameters()}


@per_model()
def test_unload_returns_exact_base(entry, spec):
    model, _ = trained_peft_model(entry, spec)
    base = spec.make(0)
    doc = entry.documented_error("unload", spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            model.unload()
        return
    # PEFT's documented unload() keeps the active adapter's trained copy of each modules_to_save module (the
    # classifier of SEQ_CLS): "Unloading in case of ModulesToSave means to simply return the wrapped module"
    # (peft.utils.other.ModulesToSaveWrapper). Everything else must be the exact base.
    kept = {
        name.removeprefix("base_model.model."): {k: v.clone() for k, v in m.modules_to_save[m.active_adapter].state_dict().items()}
        for name, m in model.named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    }
    assert sorted(kept) == modules_to_save_names(base, model.peft_config["default"].modules_to_save)
    unloaded = model.unload()
    _no_tuner_layers(unloaded)
    reference = spec.make(0)
    for name, state in kept.items():
        reference.get_submodule(name).load_state_dict(state)
    assert_state_equal(unloaded, reference, "unload() vs base")
    assert_equal(output(spec, unloaded), output(spec, reference), "unload() output vs base")
    if not kept:
        assert_state_equal(unloaded, base, "unload() vs base")
        assert_equal(output(spec, unloaded), output(spec, base), "unload() output vs base")


@per_model()
def test_disable_adapter_gives_base_output(entry, spec):
    model, _ = trained_peft_model(entry, spec)
    base_out = output(spec, spec.make(0))
    adapted = output(spec, model)
    assert not torch.equal(adapted, base_out)
    doc = entry.documented_error("disable", spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            with model.disable_adapter():
                output(spec, model)
        return
    with model.disable_adapter():
        assert_equal(output(spec, model), base_out, "disable_adapter() vs base")
    assert_equal(output(spec, model), adapted, "after disable_adapter()")


@per_model()
def test_merge_then_unmerge_restores_exactly(entry, spec):
    model, _ = trained_peft_model(entry, spec)
    adapted = output(spec, model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    if not _merge_adapter(entry, spec, model):
        return
    torch.testing.assert_close(output(spec, model), adapted, rtol=MERGE_RTOL[torch.float32], atol=MERGE_ATOL[torch.float32])
    model.unmerge_adapter()
    assert_equal(output(spec, model), adapted, "after merge_adapter + unmerge_adapter")
    for name, p in model.named_parameters():
        assert_equal(p.detach(), weights[name], f"{name} after merge + unmerge")
    # and the base is still exact under it
    with model.disable_adapter():
        assert_equal(output(spec, model), output(spec, spec.make(0)), "disabled after unmerge")
    # while merged, the base weights carry the adapter: disabling must still give the base exactly
    model.merge_adapter()
    with model.disable_adapter():
        assert_equal(output(spec, model), output(spec, spec.make(0)), "disabled while merged")


@per_model()
def test_merged_model_moved_to_another_dtype_unmerges_and_disables(entry, spec):
    """A merge keeps the original base tensors for unmerge; `model.to(torch.bfloat16)` while merged must convert
    them with the model, so that unmerge / disable_adapter() give the base converted the same way and the next
    forward runs (keeping them outside the module's tensors left an fp32 weight in a bf16 model)."""
    model, _ = trained_peft_model(entry, spec)
    if not _merge_adapter(entry, spec, model):
        return
    model.to(torch.bfloat16)
    base = spec.make(0).to(torch.bfloat16)
    inputs = spec.inputs(dtype=torch.bfloat16)
    with model.disable_adapter():
        assert_equal(output(spec, model, inputs), output(spec, base, inputs), "disabled after merge + .to(bf16)")
    model.merge_adapter()
    model.unmerge_adapter()
    for name, p in model.get_base_model().named_parameters():
        if "base_layer" in name:
            assert p.dtype == torch.bfloat16, f"{name} is {p.dtype} after unmerge"
    assert torch.isfinite(output(spec, model, inputs).float()).all()
    with model.disable_adapter():
        assert_equal(output(spec, model, inputs), output(spec, base, inputs), "disabled after unmerge in bf16")


@per_model()
def test_safe_merge_detects_nan(entry, spec):
    model, _ = trained_peft_model(entry, spec)
    tensors = adapter_tensors(model, entry)
    names = [n for n, t in tensors.items() if ".modules_to_save." not in n and t.is_floating_point()]
    assert names
    with torch.no_grad():  # the last layer's: a merge going layer by layer has touched the others by then
        tensors[names[-1]].fill_(float("nan"))
    doc = entry.documented_error("safe_merge", spec.kind) or entry.documented_error("merge", spec.kind)
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            model.merge_and_unload(safe_merge=True)
        return
    with pytest.raises(ValueError, match=r"(?i)nan"):
        model.merge_and_unload(safe_merge=True)
    # the failed safe merge left every layer untouched: the base exact, nothing merged, nothing unloaded
    with model.disable_adapter():
        assert_equal(output(spec, model), output(spec, spec.make(0)), "base after refused safe merge")
    assert not any(getattr(m, "merged", False) for m in model.modules() if isinstance(m, BaseTunerLayer))
    assert any(isinstance(m, BaseTunerLayer) for m in model.modules()), "the refused merge_and_unload unloaded layers"
    with pytest.raises(ValueError, match=r"(?i)nan"):
        model.merge_adapter(safe_merge=True)
    assert not any(getattr(m, "merged", False) for m in model.modules() if isinstance(m, BaseTunerLayer))
