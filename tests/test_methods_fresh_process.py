"""An adapter of each method with routing or state (S'MoRE, SSMLoRA) opens in a fresh Python that never imports
peft_ext (the start-up hook registers the method when peft is imported): PeftModel.from_pretrained,
AutoPeftModelForCausalLM and transformers' load_adapter give the saved model's logits bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])
    from transformers import AutoModelForCausalLM
    x = torch.load(args["x"])
    results = {}
    for loader in ("PeftModel", "AutoPeftModelForCausalLM", "load_adapter"):
        try:
            if loader == "PeftModel":
                from peft import PeftModel
                model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args["base"]), args["adapter"])
            elif loader == "AutoPeftModelForCausalLM":
                from peft import AutoPeftModelForCausalLM
                model = AutoPeftModelForCausalLM.from_pretrained(args["adapter"])
            else:
                model = AutoModelForCausalLM.from_pretrained(args["base"])
                model.load_adapter(args["adapter"])
            with torch.no_grad():
                y = model.eval()(x).logits
            results[loader] = torch.equal(y, torch.load(args["expected"]))
        except Exception as err:  # reported, and the test fails with it
            results[loader] = repr(err)
    results["peft_ext_imported_by_the_hook"] = "peft_ext" in sys.modules  # this code never imports it
    print("REPORT " + json.dumps(results))
    """
)


def _smore():
    from peft_ext import SmoreConfig

    return SmoreConfig(init="normal", expert_ranks=[2, 2], router_dim=8, router_down_dim=8, seed=3)


def _ssmlora():
    from peft_ext import SsmLoraConfig

    return SsmLoraConfig(r=4, init_weights=False, insertion="all", seed=3)


@pytest.mark.parametrize("make_config", [_smore, _ssmlora], ids=["smore", "ssmlora"])
def test_adapter_loads_without_importing_peft_ext(tmp_path, make_config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = base(x).logits
    model = get_peft_model(base, make_config()).eval()
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(x).logits
    assert (expected - base_logits).abs().max() > 1e-3  # a loader that dropped the adapter cannot pass
    assert loaders_in_fresh_process(tmp_path, x, expected, threads=torch.get_num_threads()) == {
        "PeftModel": True, "AutoPeftModelForCausalLM": True, "load_adapter": True, "peft_ext_imported_by_the_hook": True,
    }  # fmt: skip


def loaders_in_fresh_process(tmp_path, x: torch.Tensor, expected: torch.Tensor, threads: int) -> dict:
    """Load tmp_path/adapter onto tmp_path/base in a fresh Python that never imports peft_ext, with each loader
    (PeftModel, AutoPeftModelForCausalLM, transformers' load_adapter): {loader: logits on x equal `expected` bit for
    bit, or the error}, and whether the start-up hook imported peft_ext."""
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "expected.pt")
    args = {"threads": threads, "base": str(tmp_path / "base"), "adapter": str(tmp_path / "adapter"),
            "x": str(tmp_path / "x.pt"), "expected": str(tmp_path / "expected.pt")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PEFT_EXT_NO_AUTOLOAD": "0"}
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])
