"""Saving from a state dict gathered elsewhere (FSDP2's `get_model_state_dict(full_state_dict=True)`, accelerate's
`get_state_dict`): the deltas are computed from the state dict's base parameters, not from the module's, which under
FSDP2 are still sharded DTensors ("aten.sub.Tensor got mixed torch.Tensor and DTensor" before the fix).

The DTensor-free tests stand a module whose base parameters differ from the state dict's for a sharded one; the
last test shards them for real (a DTensor on a one-process gloo group, in a subprocess)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from peft_ext import HftConfig
from peft_ext.testing.contract.distributed import _free_port
from peft_ext.tuners.hft.layer import HftLayer
from peft_ext.tuners.hft.state_dict import deltas_from_weights


def _trained(llama, input_ids, **config):
    model = get_peft_model(llama(), HftConfig(**config))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids, labels=input_ids).loss.backward()
    opt.step()
    return model.eval()


def _gathered(model) -> dict:
    """What a gathered full state dict holds: every tensor whole, separate from the module's parameters."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _scramble_bases(model) -> dict:
    """Overwrite each HFT module's base parameters (as a shard stands for the whole parameter: other values); returns
    the originals to restore."""
    kept = {}
    for name, module in model.named_modules():
        if isinstance(module, HftLayer):
            for pname, p in module.get_base_layer().named_parameters(recurse=False):
                kept[(name, pname)] = p.detach().clone()
                with torch.no_grad():
                    p.mul_(-3.0).add_(1.0)
    return kept


def _restore(model, kept: dict) -> None:
    with torch.no_grad():
        for (name, pname), value in kept.items():
            getattr(model.get_submodule(name).get_base_layer(), pname).copy_(value)


@pytest.mark.parametrize("strategy", ["matrix", "param"])
def test_deltas_come_from_the_passed_state_dicts_base(llama, input_ids, strategy):
    model = _trained(llama, input_ids, strategy=strategy)
    expected = get_peft_model_state_dict(model)
    state = _gathered(model)
    kept = _scramble_bases(model)
    got = get_peft_model_state_dict(model, state_dict=state)  # the module's bases differ from the state dict's
    _restore(model, kept)
    assert sorted(got) == sorted(expected) and any(".hft_delta." in k for k in got)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def test_deltas_from_weights_reads_the_base_key(llama, input_ids):
    """The function itself: a state dict whose `<module>.base_layer.<param>` differs from the module's parameter."""
    model = _trained(llama, input_ids, target_modules=["q_proj"], ratio=1.0)
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, HftLayer))
    trained = layer.hft_weight["default"]["weight"].detach()
    base = torch.zeros_like(trained)  # not the module's W0, and a delta that rebuilds `trained` exactly
    weights = {f"{name}.hft_weight.default.weight": trained}
    state = {**weights, f"{name}.base_layer.weight": base}
    out = deltas_from_weights(model, weights, "default", state)
    assert list(out) == [f"{name}.hft_delta.default.weight"]
    assert torch.equal(out[f"{name}.hft_delta.default.weight"], trained)
    # without a state dict (or without the base key) the module's own W0, as before
    w0 = layer.get_base_layer().weight.detach()
    for state in (None, dict(weights)):
        got = deltas_from_weights(model, weights, "default", state)
        key = next(iter(got))
        assert torch.equal(got[key], trained - w0 if ".hft_delta." in key else trained), key


def test_a_merged_module_still_saves_deltas_from_w0(llama, input_ids):
    """Merged, the state dict's base parameter holds W0 + delta: the delta is taken from the W0 the layer keeps."""
    model = _trained(llama, input_ids)
    expected = get_peft_model_state_dict(model)
    model.merge_adapter()
    try:
        for state in (None, _gathered(model)):
            got = get_peft_model_state_dict(model, state_dict=state)
            assert sorted(got) == sorted(expected)
            for key, tensor in expected.items():
                assert torch.equal(got[key], tensor), key
    finally:
        model.unmerge_adapter()


def test_save_pretrained_from_a_gathered_state_dict_reloads_exactly(llama, input_ids, tmp_path):
    model = _trained(llama, input_ids)
    with torch.no_grad():
        expected = model(input_ids).logits
    state = _gathered(model)
    kept = _scramble_bases(model)
    model.save_pretrained(tmp_path, state_dict=state)
    _restore(model, kept)
    assert any(".hft_delta." in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)


_SHARDED = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard
    from peft import get_peft_model, get_peft_model_state_dict
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_llama
    from peft_ext import HftConfig
    from peft_ext.tuners.hft.layer import HftLayer

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
    model = get_peft_model(tiny_llama(layers=1), HftConfig(target_modules=["q_proj", "v_proj"], ratio=1.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    expected = get_peft_model_state_dict(model)
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mesh = init_device_mesh("cpu", (1,))
    for m in model.modules():  # the base parameters sharded, as FSDP2 leaves them between steps
        if isinstance(m, HftLayer):
            base = m.get_base_layer()
            base.weight = torch.nn.Parameter(distribute_tensor(base.weight.detach(), mesh, [Shard(0)]), requires_grad=False)
    for state in (gathered, None):  # the gathered state dict's base; else the module's, gathered whole
        got = get_peft_model_state_dict(model, state_dict=state)
        assert sorted(got) == sorted(expected) and any(".hft_delta." in k for k in got), sorted(got)
        for k, v in expected.items():
            assert torch.equal(got[k], v), k
    dist.destroy_process_group()
    print("OK")
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_sharded_base_parameters(tmp_path):
    """A real DTensor base (one-process gloo group, in a subprocess so that this process holds no process group)."""
    port = _free_port()
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent), str(port)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-3000:] + run.stderr[-5000:]
