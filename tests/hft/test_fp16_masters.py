"""An fp16 base trains with fp32 master copies, so AMP's GradScaler (Trainer(fp16=True)) works."""

import torch
from peft import PeftModel, get_peft_model

from peft_ext import HftConfig


def test_fp16_base_gets_fp32_masters_and_trains_with_a_grad_scaler(llama, input_ids, tmp_path):
    model = get_peft_model(llama().half(), HftConfig())
    copies = [p for n, p in model.named_parameters() if p.requires_grad]
    assert copies and all(p.dtype == torch.float32 for p in copies)
    assert all(p.dtype == torch.float16 for n, p in model.named_parameters() if not p.requires_grad)
    before = [p.detach().clone() for p in copies]
    opt = torch.optim.AdamW(copies, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    model.train()
    scaler.scale(model(input_ids, labels=input_ids).loss).backward()
    scaler.unscale_(opt)  # raises "Attempting to unscale FP16 gradients" on fp16 parameters
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, p) for a, p in zip(before, copies))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
    assert expected.dtype == torch.float16  # activations stay fp16: only the copies are fp32
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama().half(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)


def test_autocast_adapter_dtype_false_keeps_fp16(llama):
    model = get_peft_model(llama().half(), HftConfig(), autocast_adapter_dtype=False)
    assert all(p.dtype == torch.float16 for p in model.parameters())


def test_bf16_base_keeps_bf16_copies_like_full_fine_tuning(llama):
    model = get_peft_model(llama().to(torch.bfloat16), HftConfig())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
