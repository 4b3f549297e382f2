"""A re-selection on an fp16 base makes fp32 masters, as the first stage did, so AMP's GradScaler still works."""

import torch
from peft import get_peft_model

from peft_ext import HftConfig


def test_copies_a_reselection_makes_on_an_fp16_base_are_fp32_masters(llama, input_ids):
    model = get_peft_model(llama().half(), HftConfig(seed=0))
    added, _ = model.base_model.reselect()
    assert added and all(p.dtype == torch.float32 for p in added)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    model.train()
    scaler.scale(model(input_ids, labels=input_ids).loss).backward()
    scaler.unscale_(opt)  # raised "Attempting to unscale FP16 gradients" on the new half's fp16 copies
    scaler.step(opt)
    scaler.update()
    assert all(p.grad is not None for p in added)


def test_a_reselection_keeps_fp16_copies_where_the_first_stage_did(llama):
    model = get_peft_model(llama().half(), HftConfig(seed=0), autocast_adapter_dtype=False)
    added, _ = model.base_model.reselect()
    assert added and all(p.dtype == torch.float16 for p in model.parameters())
