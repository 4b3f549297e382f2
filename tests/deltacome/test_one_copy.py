"""One compressed copy per layer: a Delta-CoMe layer holds its adapter in the version-2 slot layout (SlotDelta) and
every kernel path reads it as it is - the fused decode, prefill and mixed batches (Triton interpreter) - so the bytes
of all tensors a layer holds stay those of one slot copy before and after decode, prefill, mixed-batch and generate
calls (no cached relayout beside it), and no other tensor is left alive by those calls beyond the small kernel tables.
The files stay version 1 (bit planes): a save after a load writes the same bits, and a mismatched file fails naming
the field."""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from peft_ext.compression import compress_delta
from peft_ext.kernels import delta as delta_kernels
from peft_ext.kernels import delta_decode
from peft_ext.kernels.delta_format import PackedDelta, SlotDelta
from peft_ext.tuners.deltacome.config import DeltaComeConfig
from peft_ext.tuners.deltacome.layer import DeltaComeLinear

from .conftest import BANDS, BUDGET, GROUP, input_ids, make_finetune

ADAPTER_FILE = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def folders(pair, tokenizer, tmp_path_factory):
    base, ft = pair
    paths = []
    for name, finetune in (("a", ft), ("b", make_finetune(base, seed=3))):
        path = tmp_path_factory.mktemp(f"deltacome_{name}")
        compress_delta(base, finetune, path, budget=BUDGET, bands=BANDS, group_size=GROUP, tokenizer=tokenizer,
                       quantizer="rtn", calibration_seq_len=32, calibration_samples=8, progress=False)  # fmt: skip
        paths.append(path)
    return paths


def _tensor_bytes(obj, seen: set) -> int:
    """Bytes of the distinct storages of every tensor reachable from `obj` through tensors' and dataclasses'
    attributes, dicts, lists and tuples (a relayout cached on a buffer, as `cached_relayout` does, is counted)."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        total = 0
        if key not in seen:
            seen.add(key)
            total += obj.untyped_storage().nbytes()
        return total + sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    if isinstance(obj, (PackedDelta, SlotDelta)):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def held_bytes(layer: DeltaComeLinear) -> int:
    """All tensors the layer holds outside its base layer: buffers and parameters of its adapter modules, what is
    attached to them, and any tensor in the layer's own attributes."""
    seen = set()
    total = 0
    for name, module in layer.named_modules():
        if name.startswith("base_layer"):
            continue
        total += _tensor_bytes(dict(module._buffers), seen) + _tensor_bytes(dict(module._parameters), seen)
        total += _tensor_bytes({k: v for k, v in vars(module).items() if not k.startswith("_")}, seen)
    return total


def live_storages() -> dict:
    gc.collect()
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in gc.get_objects()
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"}  # fmt: skip


def one_copy_bytes(layer: DeltaComeLinear, adapter: str) -> tuple[int, int]:
    """(bytes of one slot copy, bytes of the bit-plane copy) of an adapter from its shape and bands alone."""
    _, bands, group_size = layer.delta_meta[adapter]
    args = (layer.out_features, layer.in_features, group_size, bands)
    return SlotDelta.empty(*args).nbytes, PackedDelta.empty(*args).nbytes


class _Counting:
    def __init__(self, kernel, launches, name):
        self.kernel, self.launches, self.name = kernel, launches, name

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


def test_a_layer_holds_one_compressed_copy_through_decode_prefill_mixed_batches_and_generate(pair, folders, monkeypatch):
    base, _ = pair
    model = PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="a")
    model.load_adapter(folders[1], adapter_name="b")
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, DeltaComeLinear)]
    assert len(layers) == 14
    for layer in layers:
        for adapter in ("a", "b"):
            assert isinstance(layer.delta(adapter), SlotDelta)
    expected = sum(one_copy_bytes(layer, a)[0] for layer in layers for a in ("a", "b"))
    bitplanes = sum(one_copy_bytes(layer, a)[1] for layer in layers for a in ("a", "b"))
    before = [held_bytes(layer) for layer in layers]
    assert sum(before) == expected  # exactly one slot copy per adapter and layer

    decode_ids, prefill_ids = input_ids(batch=2, length=1), input_ids(batch=3, length=10)
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        reference = [model(decode_ids).logits, model(prefill_ids).logits, model(prefill_ids, adapter_names=names).logits]
        model.set_adapter("a")
        ref_generate = model.generate(input_ids=prefill_ids, max_new_tokens=3, do_sample=False)
        launches = []
        for name in ("_slot_delta_shrink_kernel", "_slot_delta_expand_kernel", "_delta_shrink_kernel"):
            monkeypatch.setattr(delta_kernels, name, _Counting(getattr(delta_kernels, name), launches, name))
        monkeypatch.setattr(delta_decode, "_fused_decode_kernel",
                            _Counting(delta_decode._fused_decode_kernel, launches, "_fused_decode_kernel"))  # fmt: skip
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        storages = live_storages()
        got = [model(decode_ids).logits, model(prefill_ids).logits, model(prefill_ids, adapter_names=names).logits]
        generated = model.generate(input_ids=prefill_ids, max_new_tokens=3, do_sample=False)
        new = {k: v for k, v in live_storages().items() if k not in storages}
    for y, want in zip(got, reference):
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(generated, ref_generate)
    counts = {name: launches.count(name) for name in set(launches)}
    assert counts.get("_fused_decode_kernel", 0) >= 14 * 3  # decode: a forward and the generated tokens
    assert counts.get("_slot_delta_shrink_kernel", 0) >= 14 * 2  # prefill and the mixed batch on slots
    assert "_delta_shrink_kernel" not in counts  # never the bit planes (they are not held)

    after = [held_bytes(layer) for layer in layers]
    assert after == before, "a kernel path kept a second copy of a compressed delta"
    # nothing else either: the tensors these calls left alive (outputs aside) are the small cached kernel tables
    # (meta, tile, band and row-block tables: int32 / int64 rows), each smaller than the smallest codes tensor
    outputs = {t.untyped_storage().data_ptr() for t in got + [generated]}
    leftover = {k: v for k, v in new.items() if k not in outputs}
    smallest_codes = min(
        getattr(layer.delta(a), f"{side}_codes").numel() * 4 for layer in layers for a in ("a", "b") for side in "uv"
    )
    assert max(leftover.values(), default=0) < smallest_codes, (sorted(leftover.values()), smallest_codes)
    assert sum(leftover.values()) < 0.1 * expected, (sum(leftover.values()), expected)
    leftover = sum(leftover.values())
    codes = sum(getattr(layer.delta(a), f"{s}_codes").numel() * 4 for layer in layers for a in ("a", "b") for s in "uv")
    print(f"\n14 layers x 2 adapters: held {sum(after)} B = one slot copy {expected} B (bit planes alone: {bitplanes} B; "
          f"bit planes + the cached relayout's codes, as before: {bitplanes + codes} B); left alive by the calls: "
          f"{leftover} B")


def test_the_measure_sees_a_cached_relayout():
    """The byte count above is not blind: delta_linear's opt-in cache_relayout=True keeps a slot copy on the bit
    planes' tensors, and the count grows by exactly its codes (scales, mins and sigma are shared)."""
    g = torch.Generator().manual_seed(0)
    delta = PackedDelta.random(64, 96, ((8, 2), (3, 8), (2, 40)), group_size=32, generator=g)
    x, weight = torch.randn(2, 96), torch.randn(64, 96)
    assert _tensor_bytes(delta, set()) == delta.nbytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        delta_kernels.delta_linear(x, weight, None, delta)  # default: the bit-plane kernels, nothing kept
        assert _tensor_bytes(delta, set()) == delta.nbytes
        delta_kernels.delta_linear(x, weight, None, delta, cache_relayout=True)
    sd = SlotDelta.from_packed(delta)
    assert _tensor_bytes(delta, set()) == delta.nbytes + (sd.u_codes.numel() + sd.v_codes.numel()) * 4


def test_save_after_load_writes_the_same_bits_and_loads_back(pair, folders, tmp_path):
    base, _ = pair
    model = PeftModel.from_pretrained(copy.deepcopy(base), folders[0]).eval()
    held = [k for k in model.state_dict() if ".deltacome_delta." in k]
    assert held and not any(k.endswith("_words") for k in held)  # the buffers as held: slot codes
    keys = [k for k in get_peft_model_state_dict(model) if ".deltacome_delta." in k]
    assert keys and not any(k.endswith("_codes") for k in keys)  # what is saved: the files' version 1
    with torch.no_grad():
        y = model(input_ids()).logits
    model.save_pretrained(tmp_path)
    original, saved = load_file(folders[0] / ADAPTER_FILE), load_file(tmp_path / ADAPTER_FILE)
    assert sorted(original) == sorted(saved)
    for key, t in original.items():
        assert saved[key].dtype == t.dtype and torch.equal(saved[key], t), key
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format_version"] == 1
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids()).logits, y, rtol=0, atol=0)


def test_get_peft_model_state_dict_round_trip_is_bitwise(pair):
    """A random adapter (get_peft_model, init_weights=False) saved as bit planes and loaded into an empty one."""
    base, _ = pair
    config = dict(bands=[[4, 3], [None, 2]], group_size=GROUP, budget=BUDGET, target_modules="all-linear")
    model = get_peft_model(copy.deepcopy(base), DeltaComeConfig(init_weights=False, seed=7, **config)).eval()
    state = get_peft_model_state_dict(model)
    assert any(k.endswith(".deltacome_delta.v_words") for k in state)
    for key, t in state.items():  # bit planes, bitwise those of the layer's codes
        if key.endswith("_words"):
            layer = model.get_submodule(key.rsplit(".deltacome_delta.", 1)[0])
            packed = layer.delta("default").to_packed()
            assert t.dtype == torch.int32 and torch.equal(t, getattr(packed, key.rsplit(".", 1)[1])), key
    empty = get_peft_model(copy.deepcopy(base), DeltaComeConfig(**config)).eval()
    result = set_peft_model_state_dict(empty, state)
    assert not [k for k in result.unexpected_keys if ".deltacome_delta." in k]
    assert not [k for k in result.missing_keys if ".deltacome_delta." in k]
    torch.testing.assert_close(get_peft_model_state_dict(empty), state, rtol=0, atol=0)
    # a plain load_state_dict given the files' bit planes converts them too (the layer's load hook)
    other = get_peft_model(copy.deepcopy(base), DeltaComeConfig(**config)).eval()
    file_keys = {k.replace(".deltacome_delta.", ".deltacome_delta.default."): v for k, v in state.items()}
    other.load_state_dict(file_keys, strict=False)
    for a, b in zip(model.modules(), other.modules()):
        if isinstance(a, DeltaComeLinear):
            for name, t in a.deltacome_delta["default"].items():
                assert torch.equal(t, b.deltacome_delta["default"][name]), name
    for a, b in zip(model.modules(), empty.modules()):
        if isinstance(a, DeltaComeLinear):
            for name, t in a.deltacome_delta["default"].items():
                assert torch.equal(t, b.deltacome_delta["default"][name]), name


def test_a_mismatched_file_names_the_field_and_the_fix(pair, folders, tmp_path):
    base, _ = pair
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folders[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(folders[0] / ADAPTER_FILE)
    key = next(k for k in tensors if k.endswith("q_proj.deltacome_delta.v_words"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, bad / ADAPTER_FILE)
    with pytest.raises(ValueError, match=r"v_words has shape .* need .*do not match this config or this base model"):
        PeftModel.from_pretrained(copy.deepcopy(base), bad)


def test_transformers_load_adapter_holds_one_slot_copy(pair, folders):
    """transformers' own `load_adapter` (its weight loader sets buffers by name, not through the layers' hook):
    DeltaComeModel.state_dict_for_transformers converts the files' bit planes, so its layers hold the same single
    slot copy and give the same logits as PeftModel.from_pretrained."""
    base, _ = pair
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folders[0]).eval()
    model = copy.deepcopy(base)
    model.load_adapter(str(folders[0]))
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, DeltaComeLinear)]
    assert len(layers) == 14
    for layer in layers:
        adapter = next(iter(layer.delta_meta))
        assert held_bytes(layer) == one_copy_bytes(layer, adapter)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, peft_model(input_ids()).logits, rtol=0, atol=0)
