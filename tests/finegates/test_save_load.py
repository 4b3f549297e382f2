"""Saving and loading FineGates adapters: in a fresh Python that never imports peft_ext (the start-up hook registers
FINEGATES when peft is imported) through PeftModel.from_pretrained, AutoPeftModelForCausalLM and transformers'
load_adapter; in this process with several adapters (each reloads bit for bit, and their composition too)."""

from __future__ import annotations

import json
import os

import torch
from peft import PeftModel, get_peft_model

from peft_ext import FineGatesConfig
from peft_ext.testing.models import MODELS

from tests.test_methods_fresh_process import loaders_in_fresh_process

from .refs import gated_layers


def test_adapter_loads_in_a_fresh_process_without_importing_peft_ext(tmp_path):
    from transformers import AutoModelForCausalLM

    MODELS["qwen2_gqa"].make(0).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    x = torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = base(x).logits
    config = FineGatesConfig(init_weights=False, bias="gates", lora_r=2, seed=3, task_type="CAUSAL_LM")
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        gated_layers(model)["model.layers.0.mlp.up_proj"].gates_row_logits["default"][:5] = -1.0  # some closed
    model.save_pretrained(tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "FINEGATES"
    with torch.no_grad():
        expected = model(x).logits
    assert (expected - base_logits).abs().max() > 1e-3  # a loader that dropped the adapter cannot pass
    assert loaders_in_fresh_process(tmp_path, x, expected, threads=1) == {
        "PeftModel": True, "AutoPeftModelForCausalLM": True, "load_adapter": True, "peft_ext_imported_by_the_hook": True,
    }  # fmt: skip


def test_several_adapters_save_and_reload(tmp_path):
    spec = MODELS["gpt2"]
    model = get_peft_model(spec.make(0), FineGatesConfig(task_type="CAUSAL_LM", init_weights=False, seed=1,
                                                         lora_r=2, bias="gates"), adapter_name="one")
    model.add_adapter("two", FineGatesConfig(task_type="CAUSAL_LM", init_weights=False, seed=2, gate_columns=False,
                                             target_modules=["c_fc"]))
    model.eval()
    inputs = spec.inputs()
    outs = {}
    with torch.no_grad():
        for active in ("one", "two", ["one", "two"]):
            model.base_model.set_adapter(active)
            outs[str(active)] = spec.run(model, inputs)
    assert (outs["one"] - outs["two"]).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    assert os.path.isdir(tmp_path / "one") and os.path.isdir(tmp_path / "two")
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if ".gates_" in n}

    reloaded = PeftModel.from_pretrained(spec.make(0), tmp_path / "one", adapter_name="one")
    reloaded.load_adapter(tmp_path / "two", adapter_name="two")
    reloaded.eval()
    params = dict(reloaded.named_parameters())
    assert sorted(n for n in params if ".gates_" in n) == sorted(saved)
    assert all(torch.equal(params[n], t) for n, t in saved.items())
    with torch.no_grad():
        for active in ("one", "two", ["one", "two"]):
            reloaded.base_model.set_adapter(active)
            assert torch.equal(spec.run(reloaded, inputs), outs[str(active)]), active
