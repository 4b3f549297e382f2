"""export_as_lora: the whole chain as ONE plain PEFT LoRA of rank M*r, which PEFT loads without peft-ext (checked in a
fresh interpreter with the start-up hook off) and which reproduces the COLA model's outputs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_ext import ColaConfig, ColaLinear, export_as_lora

LOAD_WITHOUT_PEFT_EXT = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import PeftModel
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False)).eval()
    model = PeftModel.from_pretrained(base, sys.argv[1])
    assert "peft_ext" not in sys.modules, "peft_ext was imported"
    assert type(model.base_model).__name__ == "LoraModel"
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
    print("loaded without peft_ext")
    """
)


def trained_chain(factory, links, **fields):
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, seed=0)
    model = get_peft_model(factory(), ColaConfig(**{**config, **fields}))
    g = torch.Generator().manual_seed(0)
    for k in range(links + 1):
        with torch.no_grad():
            for layer in (m for m in model.modules() if isinstance(m, ColaLinear)):
                for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if k < links:
            model.base_model.next_link()
    return model.eval()


def test_export_loads_in_plain_peft_without_peft_ext(llama, ids, tmp_path):
    # links of different ranks and rslora: per-link scalings that the export folds into lora_B
    model = trained_chain(llama, links=2, link_ranks=[4, 2, 3], use_rslora=True)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = tmp_path / "lora"
    written = export_as_lora(model, out)
    assert isinstance(written, LoraConfig) and written.r == written.lora_alpha == 9
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 9 and raw["lora_alpha"] == 9 and not raw["use_rslora"]
    assert "peft_ext_requirement" not in raw
    chain = json.loads((out / "cola_chain.json").read_text())
    assert chain["links"] == 3 and chain["link_ranks"] == [4, 2, 3] and chain["total_rank"] == 9
    assert "cola" in (out / "README.md").read_text().lower()
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "PEFT_EXT_NO_AUTOLOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PEFT_EXT, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded without peft_ext" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_with_per_module_ranks_and_conv1d(models, ids, kind, tmp_path):
    fields = {"rank_pattern": {"q_proj": 2}} if kind == "llama" else {}
    model = trained_chain(models[kind], links=1, **fields)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    config = export_as_lora(model, tmp_path)
    loaded = PeftModel.from_pretrained(models[kind](), tmp_path)
    layers = {n: m for n, m in loaded.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    ranks = {n.rsplit(".", 1)[-1]: m.r["default"] for n, m in layers.items()}
    if kind == "llama":
        assert ranks["q_proj"] == 4 and ranks["v_proj"] == 8 and config.r == 8  # 2 links of rank 2 / 4
        assert all(m.scaling["default"] == 1.0 for m in layers.values())
    else:
        assert config.fan_in_fan_out and set(ranks.values()) == {8}
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_bad_input(llama, tmp_path):
    lora = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="takes the PeftModel that holds a COLA adapter"):
        export_as_lora(lora, tmp_path)
    model = trained_chain(llama, links=0)
    with pytest.raises(ValueError, match=r"no adapter 'other'"):
        export_as_lora(model, tmp_path, adapter_name="other")
