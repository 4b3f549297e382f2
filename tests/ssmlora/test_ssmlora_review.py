"""From a review: no state kept between steps without checkpointing, a forward started at the backbone (what TRL's
reward and value heads call) runs one chain from zero, encoder-decoder models are refused, loading tensors of
another chain layout is refused, and fp16 stays finite where the normalised state is constant."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_ext import SsmLoraConfig
from peft_ext.testing.models import MODELS


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def _model(**overrides):
    config = SsmLoraConfig(**{"task_type": "CAUSAL_LM", "r": 4, "insertion": "all", "chain": "all", "init_weights": False,
                              "state_dropout": 0.0, "seed": 0, **overrides})
    return get_peft_model(MODELS["llama"].make(0), config)


def test_no_state_is_kept_between_steps_without_checkpointing():
    model = _model().train()
    batch = MODELS["llama"].batch_with_labels()
    for _ in range(3):
        model(**batch).loss.backward()
    assert model.base_model.ssmlora_run.replay == {}


def test_a_forward_started_at_the_backbone_is_one_chain_from_zero():
    """model.model(...) (the backbone) gives the same hidden states as the full model's forward, whatever ran before
    (the official code's state carried from the previous batch would change them), in train and eval mode."""
    spec = MODELS["llama"]
    model = _model()
    backbone = model.base_model.model.model
    x, other = spec.inputs()["input_ids"], spec.inputs(batch=4, seed=5)["input_ids"]
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            full = model(input_ids=x, output_hidden_states=True).hidden_states[-1]
            model(input_ids=other)
            alone = backbone(input_ids=x).last_hidden_state
        assert torch.equal(alone, full)


def test_encoder_decoder_models_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    base = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                               num_decoder_layers=1, num_heads=4, decoder_start_token_id=0))
    with pytest.raises(ValueError, match=r"does not support encoder-decoder models.*decoder-only or encoder-only"):
        get_peft_model(base, SsmLoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"]))


def test_loading_tensors_of_another_chain_layout_is_refused(tmp_path):
    """Saved with one chain through q and v (the v modules hold a C), loaded with per_type chains (each type's first
    module has no C): the file's extra C is refused, not dropped."""
    model = _model()
    model.save_pretrained(tmp_path)
    other = SsmLoraConfig(task_type="CAUSAL_LM", r=4, insertion="all", chain="per_type", state_dropout=0.0)
    with pytest.raises(ValueError, match=r"another chain layout"):
        PeftModel.from_pretrained(MODELS["llama"].make(0), tmp_path, config=other)


@pytest.mark.parametrize("state_init", ["zeros", "normal"])
def test_fp16_stays_finite_where_the_state_is_constant(state_init):
    """With C = D = 0 every state is constant (0); 1e-8 rounds to 0 in fp16, so the normalisation runs in fp32."""
    spec = MODELS["llama"]
    model = _model(state_init=state_init, r=4).to(torch.float16).eval()
    with torch.no_grad():
        logits = model(**spec.inputs()).logits
    assert torch.isfinite(logits).all()
