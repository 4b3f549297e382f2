"""`model.to(dtype)` on a model holding Delta-CoMe adapters: the base converts, the compressed deltas keep their
storage format bit for bit (fp16 scales / mins, fp32 sigma, int32 codes) and the forward runs. Before the fix
`model.to(torch.bfloat16)` converted sigma to bf16 and every forward raised "delta.sigma has dtype torch.bfloat16"."""

import torch
from peft import get_peft_model

import peft_ext
from peft_ext.testing.models import MODELS


def test_to_bfloat16_keeps_the_compressed_format_and_runs():
    spec = MODELS["llama"]
    config = peft_ext.DeltaComeConfig(
        task_type="CAUSAL_LM", budget=1.0, bands=[[1, 8], [None, 4]], group_size=16, init_weights=False
    )
    model = get_peft_model(spec.make(0), config).eval()
    inputs = spec.inputs()
    with torch.no_grad():
        expected = spec.run(model, inputs)
    before = {n: b.clone() for n, b in model.named_buffers() if ".deltacome_delta." in n}
    model.to(torch.bfloat16)
    after = dict(model.named_buffers())
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = spec.run(model, inputs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=5e-2, atol=5e-2)
