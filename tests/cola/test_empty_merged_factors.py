"""Before the first link is merged, COLA's merged factors are empty and must not be zero-size parameters: FSDP2
shards a (out, 0) parameter to an empty piece that torch 2.13's `get_model_state_dict(full_state_dict=True)` (what
accelerate's `get_state_dict` and the Trainer save an FSDP2 model from) cannot gather ("Expected cond to be True" in
`_maybe_unpad_tensor`). They are empty non-persistent buffers until a merge makes them frozen parameters; adapters
saved before (with empty tensors in the file) and after a merge keep loading exactly.

A link merge under FSDP2 (the link's parameters are sharded DTensors) is refused with an error naming the way out."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from peft_ext import ColaConfig
from peft_ext.tuners.cola import ColaChain
from peft_ext.testing.contract.distributed import _free_port
from peft_ext.tuners.cola.layer import FSDP2_LINK_MERGE

CONFIG = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, seed=0, chain_length=3)


def cola(factory, **fields):
    return get_peft_model(factory(), ColaConfig(**{**CONFIG, **fields}))


def layers(model):
    return [m for m in model.modules() if isinstance(m, ColaChain)]


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model):
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_no_zero_size_parameter_or_tensor_before_the_first_merge(llama, tmp_path):
    model = cola(llama)
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    assert not empty, empty[:3]
    assert not [k for k, v in model.state_dict().items() if v.numel() == 0]
    assert not [k for k, v in get_peft_model_state_dict(model).items() if ".cola_merged_" in k or v.numel() == 0]
    for layer in layers(model):  # still readable, as empty factors
        fa, fb = layer.cola_merged_A["default"], layer.cola_merged_B["default"]
        assert fa.empty and fa.weight.shape == (0, layer.in_features) and fb.weight.shape == (layer.out_features, 0)
        assert layer.merged_rank("default") == 0 and layer.links_merged("default") == 0
    model.save_pretrained(tmp_path)
    assert all(t.numel() for t in load_file(tmp_path / "adapter_model.safetensors").values())


@pytest.mark.parametrize("link_ranks", [None, [4, 2, 3]])
def test_the_first_merge_makes_frozen_parameters_in_the_links_dtype(llama, link_ranks):
    model = get_peft_model(llama().to(torch.bfloat16), ColaConfig(**{**CONFIG, "link_ranks": link_ranks}))
    perturb(model, 0)
    before = {
        id(layer): (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone(), layer.scaling["default"])
        for layer in layers(model)
    }
    model.base_model.next_link()
    for layer in layers(model):
        a, b, s = before[id(layer)]
        fa, fb = layer.cola_merged_A["default"], layer.cola_merged_B["default"]
        assert not fa.empty and isinstance(fa.weight, torch.nn.Parameter) and not fa.weight.requires_grad
        assert fa.weight.dtype == fb.weight.dtype == layer.lora_A["default"].weight.dtype == torch.float32  # fp32 adapter
        assert torch.equal(fa.weight, a) and torch.equal(fb.weight, (b.float() * s).to(fb.weight.dtype))
    names = {n for n, _ in model.named_parameters() if ".cola_merged_" in n}
    assert len(names) == 2 * len(layers(model))
    merged = {id(l): l.cola_merged_A["default"].weight for l in layers(model)}
    model.base_model.next_link()  # a second merge grows the same Parameter objects
    for layer in layers(model):
        assert layer.cola_merged_A["default"].weight is merged[id(layer)]
        assert layer.merged_rank("default") == sum((link_ranks or [4, 4])[:2])
    model.set_adapter("default")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".cola_merged_" in n)


@pytest.mark.parametrize("links", [0, 1, 2])
def test_save_load_round_trips(llama, ids, tmp_path, links):
    model = cola(llama, link_ranks=[4, 2, 3])
    for k in range(links + 1):
        perturb(model, k)
        if k < links:
            model.base_model.next_link()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert loaded.peft_config["default"].current_link == links
    assert torch.equal(logits(loaded, ids), expected)
    want = {k: v for k, v in model.state_dict().items() if "lora_" in k or "cola_" in k}
    got = loaded.state_dict()
    assert sorted(k for k in got if "lora_" in k or "cola_" in k) == sorted(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_loading_fewer_links_empties_the_merged_factors_again(llama, ids):
    """A model two links on loads a link-0 checkpoint (the best checkpoint at the end of a run, an earlier one): its
    merged factors go back to empty buffers, not zero-size parameters."""
    early = cola(llama)
    perturb(early, 3)
    state, expected = get_peft_model_state_dict(early), logits(early, ids)
    model = cola(llama)
    model.base_model.next_link()
    model.base_model.next_link()
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k or "cola_" in k]
    assert model.peft_config["default"].current_link == 0
    assert not [n for n, p in model.named_parameters() if p.numel() == 0 or ".cola_merged_" in n]
    assert torch.equal(logits(model, ids), expected)


def test_a_file_saved_with_empty_merged_factors_still_loads(llama, ids, tmp_path):
    """peft-ext before this change wrote the empty factors of a link-0 adapter into the file."""
    model = cola(llama)
    perturb(model, 1)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    for name in {k.split(".lora_A.")[0] for k in tensors if ".lora_A." in k}:
        a = tensors[f"{name}.lora_A.weight"]
        b = tensors[f"{name}.lora_B.weight"]
        tensors[f"{name}.cola_merged_A.weight"] = a.new_zeros(0, a.shape[1])
        tensors[f"{name}.cola_merged_B.weight"] = b.new_zeros(b.shape[0], 0)
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert torch.equal(logits(loaded, ids), expected)
    fresh = cola(llama)
    result = set_peft_model_state_dict(fresh, {k: v for k, v in tensors.items()})
    assert not result.unexpected_keys
    assert not [n for n, p in fresh.named_parameters() if p.numel() == 0]


_SHARDED = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from peft import get_peft_model
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_llama
    from peft_ext import ColaConfig

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
    model = get_peft_model(tiny_llama(), ColaConfig(r=4, target_modules="all-linear", chain_length=2))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    assert not [k for k in state if ".cola_merged_" in k]
    try:
        model.base_model.next_link()
    except RuntimeError as err:
        print("REFUSED:", err)
    dist.destroy_process_group()
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_link_merge_under_fsdp2_is_refused_clearly(tmp_path):
    """fully_shard on one process (a subprocess: this one holds no process group); the merge would concatenate the
    sharded DTensor link with the plain merged factors and resize FSDP2-managed parameters."""
    port = _free_port()
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent), str(port)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "REFUSED: " + FSDP2_LINK_MERGE in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
