"""Adapter files hold deltas relative to the base; round trips are bit-exact in every dtype."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_ext import HftConfig


def _train_one_step(model, input_ids, lr=1e-4):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids, labels=input_ids).loss.backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("save_format", ["delta", "full"])
@pytest.mark.parametrize("strategy", ["matrix", "param"])
def test_round_trip_is_bit_exact(llama, input_ids, tmp_path, dtype, save_format, strategy):
    model = get_peft_model(llama().to(dtype), HftConfig(save_format=save_format, strategy=strategy))
    _train_one_step(model, input_ids)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    kinds = {k.split(".hft_")[1].split(".")[0] for k in tensors}
    if save_format == "full":
        assert kinds <= {"weight", "index"}
    else:  # a delta in the weight's own dtype where it rebuilds the copy bit for bit, else the full values
        assert "delta" in kinds
        assert all(t.dtype == dtype for k, t in tensors.items() if ".hft_index." not in k)
    loaded = PeftModel.from_pretrained(llama().to(dtype), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)


def test_deltas_are_the_fine_tune_change(llama, input_ids, tmp_path):
    model = get_peft_model(llama().to(torch.bfloat16), HftConfig())
    _train_one_step(model, input_ids, lr=1e-2)  # bf16 weights: a 1e-4 step would round away on the norms
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    # bf16: a delta is exact where every entry stays within a factor 2 of its pre-trained value (the norms here); a
    # matrix whose small entries cross zero is saved full (the same size)
    keys = [k for k in tensors if ".hft_delta." in k]
    assert keys and any(".hft_weight." in k for k in tensors)
    for key in keys:
        module = model.get_submodule(key.split(".hft_delta.")[0])
        delta = tensors[key]
        trained, base = module.hft_weight["default"]["weight"], module.get_base_layer().weight
        assert delta.dtype == torch.bfloat16
        assert torch.equal(delta, (trained.float() - base.float()).to(torch.bfloat16))
        assert torch.equal(base + delta, trained)  # the file rebuilds the trained copy bit for bit
    assert any(tensors[k].abs().max() > 0 for k in keys)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_deltas_are_no_larger_than_full_values(llama, input_ids, tmp_path, dtype):
    """Issue 11 item 10: "delta" stored fp32 deltas of bf16 weights, twice the size of "full". Each tensor is now a
    delta in the trained copy's own dtype (fp32 for the fp32 masters of an fp16 base) or, where that delta would not
    rebuild it bit for bit, its full values."""
    files = {}
    for save_format in ("delta", "full"):
        model = get_peft_model(llama().to(dtype), HftConfig(save_format=save_format))
        _train_one_step(model, input_ids)
        model.save_pretrained(tmp_path / save_format)
        files[save_format] = tmp_path / save_format / "adapter_model.safetensors"
        copies = {n: p.dtype for n, p in model.named_parameters() if ".hft_weight." in n}
    deltas, full = load_file(files["delta"]), load_file(files["full"])
    nbytes = {k: sum(t.numel() * t.element_size() for t in d.values()) for k, d in (("delta", deltas), ("full", full))}
    assert nbytes["delta"] == nbytes["full"], nbytes
    assert files["delta"].stat().st_size <= files["full"].stat().st_size + 4096
    assert any(".hft_delta." in k for k in deltas)
    copy_dtypes = {k.replace(".hft_weight.default.", ".hft_weight."): v for k, v in copies.items()}
    for key, t in deltas.items():
        assert t.dtype == copy_dtypes[key.replace(".hft_delta.", ".hft_weight.")], key


def test_files_with_the_earlier_fp32_deltas_of_bf16_weights_still_load(llama, input_ids, tmp_path):
    """Before issue 11 item 10, "delta" wrote every bf16 tensor as an fp32 delta: such files load bit-identically."""
    from safetensors.torch import save_file

    model = get_peft_model(llama().to(torch.bfloat16), HftConfig())
    _train_one_step(model, input_ids, lr=1e-2)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    old = {}
    for key, value in load_file(tmp_path / "adapter_model.safetensors").items():
        kind = ".hft_delta." if ".hft_delta." in key else ".hft_weight." if ".hft_weight." in key else None
        if kind is None:
            old[key] = value
            continue
        module_path, _, pname = key.partition(kind)
        layer = model.get_submodule(module_path)
        trained, base = layer.hft_weight["default"][pname], getattr(layer.get_base_layer(), pname)
        old[f"{module_path}.hft_delta.{pname}"] = trained.detach().float() - base.float()  # the earlier format
    assert any(".hft_weight." in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    save_file(old, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(llama().to(torch.bfloat16), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)
