"""The load-balance loss's weight wherever the trainer scales its loss, and the cases around it: reentrant gradient
checkpointing follows any scaling of outputs.loss (accumulation division, fp16 loss scale), an encoder-decoder's
encoder mask is not applied to its decoder, a frozen adapter adds no auxiliary loss, and the missing-default error
names the way out."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_ext import SmoreConfig
from peft_ext.testing.models import MODELS
from peft_ext.tuners.smore import SmoreLayer

SMALL = dict(target_modules=["up_proj", "down_proj"], expert_ranks=[2, 2], router_dim=8, router_down_dim=8, seed=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def _router_grad(checkpointing, scale: float, mode: str = "add_to_loss") -> torch.Tensor:
    spec = MODELS["llama"]
    model = get_peft_model(spec.make(0), SmoreConfig(task_type="CAUSAL_LM", aux_loss_mode=mode, **SMALL))
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (model(**spec.batch_with_labels()).loss * scale).backward()
    # at init P = 0: the routers' gradient is the auxiliary loss's alone
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "smore_router" in n])


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
@pytest.mark.parametrize("scale", [0.5, 1024.0])
def test_the_aux_gradient_follows_a_scaled_loss_under_checkpointing(checkpointing, scale):
    """(outputs.loss * s).backward(): the aux gradient is s times the unscaled one, also when reentrant checkpointing
    runs the forward without gradient and the layers inject the aux in their recomputation (the scale the backward
    sends into outputs.loss is read first)."""
    reference = _router_grad(None, 1.0)
    assert reference.abs().sum() > 0
    torch.testing.assert_close(_router_grad(checkpointing, scale), scale * reference, rtol=1e-5, atol=1e-9)


def test_an_encoder_decoder_mask_is_not_applied_to_the_decoder():
    """T5: attention_mask is the encoder's; the layers record no token mask (the decoder's tokens would be masked
    by the encoder's padding when the lengths match): every token counts in the load."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                               num_decoder_layers=1, num_heads=4, decoder_start_token_id=0))
    config = SmoreConfig(task_type="SEQ_2_SEQ_LM", target_modules=["wi", "wo"], expert_ranks=[2, 2], router_dim=8,
                         router_down_dim=8, seed=0)
    model = get_peft_model(base, config).train()
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[:, 3:] = 0
    model(input_ids=ids, attention_mask=mask, labels=torch.randint(2, 64, (2, 6)))
    layers = [m for n, m in model.named_modules() if isinstance(m, SmoreLayer)]
    assert len(layers) == 4 and all(layer._route_mask is None for layer in layers)


def test_a_frozen_adapter_adds_no_auxiliary_loss(tmp_path):
    """An adapter loaded for inference (PeftModel.from_pretrained without is_trainable) trains nothing: in .train()
    mode outputs.loss is the LM loss alone."""
    spec = MODELS["llama"]
    model = get_peft_model(spec.make(0), SmoreConfig(task_type="CAUSAL_LM", init="normal", **SMALL))
    model.save_pretrained(tmp_path)
    batch = spec.batch_with_labels()
    frozen = PeftModel.from_pretrained(spec.make(0), tmp_path).train()
    without = PeftModel.from_pretrained(spec.make(0), tmp_path, config=SmoreConfig(
        task_type="CAUSAL_LM", init="normal", aux_loss_mode="none", **SMALL)).train()
    with torch.no_grad():
        assert torch.equal(frozen(**batch).loss, without(**batch).loss)
        trainable = PeftModel.from_pretrained(spec.make(0), tmp_path, is_trainable=True).train()
        assert trainable(**batch).loss > without(**batch).loss  # the aux is there when the adapter trains


def test_no_default_target_modules_names_the_way_out():
    with pytest.raises(ValueError, match=r"target_modules.*model_type='bert'.*all-linear"):
        get_peft_model(MODELS["bert_cls"].make(0), SmoreConfig(task_type="SEQ_CLS"))
