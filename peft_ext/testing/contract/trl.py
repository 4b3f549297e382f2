"""Contract item 7: one TRL SFTTrainer step and one DPOTrainer step with peft_config=<the method's config>.

trl and datasets are imported inside the tests only: importing the suite does not import them.

TRL 1.16 defaults to bf16=True and gradient_checkpointing=True even on CPU (platform.md section 2): both are set
off here, and models are compared through accelerator.unwrap_model.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from ..harness import adapter_param_names
from ..marks import per_method
from ..models import MODELS
from ..tokenizer import make_tokenizer

__all__ = ["test_sft_one_step", "test_sft_one_step_text", "test_dpo_one_step_uses_disabled_adapter_as_reference"]

COMMON = dict(
    max_steps=1,
    per_device_train_batch_size=2,
    use_cpu=True,
    bf16=False,
    fp16=False,
    gradient_checkpointing=False,
    report_to=[],
    save_strategy="no",
    logging_strategy="no",
    learning_rate=1e-2,
    weight_decay=0.1,
    max_length=14,
    dataloader_num_workers=0,
    seed=0,
)


def _adapter_values(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(entry, trainer_cls, config_cls, dataset, tmp_path, **kwargs):
    """Build the trainer on a fresh tiny Llama with peft_config=, train one step, check the adapter moved.
    Returns (trainer, unwrapped PeftModel), or (None, None) after asserting the method's documented error."""
    spec = MODELS["llama"]
    doc = entry.documented_error("trl_sft" if trainer_cls.__name__.startswith("SFT") else "trl_dpo", spec.kind)
    args = config_cls(output_dir=str(tmp_path / "out"), **{**COMMON, "max_steps": entry.train_steps}, **kwargs)
    make = lambda: trainer_cls(  # noqa: E731
        model=spec.make(0), args=args, train_dataset=dataset, processing_class=make_tokenizer(),
        peft_config=entry.make_config(spec.kind),
    )
    if doc is not None:
        with pytest.raises(doc.error, match=doc.match):
            make().train()
        return None, None
    trainer = make()
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert isinstance(model, PeftModel) and type(model.peft_config["default"]) is entry.config_cls
    before = _adapter_values(model)
    assert before and set(before) == set(adapter_param_names(model, entry))
    result = trainer.train()
    assert result.global_step == entry.train_steps
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    after = _adapter_values(model)
    assert sorted(after) == sorted(before)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"adapter tensors unchanged by the step: {unchanged[:5]}"
    return trainer, model


def _assert_base_exact_under_disable(model):
    spec = MODELS["llama"]
    inputs = spec.inputs()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(spec.run(model, inputs), spec.run(spec.make(0), inputs), rtol=0, atol=0)


@per_method
def test_sft_one_step(entry, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [
        {"prompt": "what is 2 plus 3?", "completion": " 5."},
        {"prompt": "what is 1 plus 1?", "completion": " 2."},
        {"prompt": "sort c a b:", "completion": " a b c."},
        {"prompt": "say hi:", "completion": " hi."},
    ]
    _, model = _run(entry, SFTTrainer, SFTConfig, Dataset.from_list(rows), tmp_path)
    if model is not None:
        _assert_base_exact_under_disable(model)


@per_method
def test_sft_one_step_text(entry, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"text": t} for t in ("the cat sat.", "a dog ran.", "one two three.", "hello there.")]
    _, model = _run(entry, SFTTrainer, SFTConfig, Dataset.from_list(rows), tmp_path)
    if model is not None:
        _assert_base_exact_under_disable(model)


@per_method
def test_dpo_one_step_uses_disabled_adapter_as_reference(entry, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [
        {"prompt": "2 plus 3 is", "chosen": " 5.", "rejected": " 7."},
        {"prompt": "1 plus 1 is", "chosen": " 2.", "rejected": " 3."},
        {"prompt": "4 plus 4 is", "chosen": " 8.", "rejected": " 9."},
        {"prompt": "0 plus 6 is", "chosen": " 6.", "rejected": " 1."},
    ]
    calls = []

    # count the reference passes: TRL's use_adapter(model, None) enters model.disable_adapter()
    original = PeftModel.disable_adapter

    def counting_disable_adapter(self):
        calls.append(self)
        return original(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(PeftModel, "disable_adapter", counting_disable_adapter)
    try:
        trainer, model = _run(entry, DPOTrainer, DPOConfig, Dataset.from_list(rows), tmp_path, beta=0.1)
    finally:
        mp.undo()
    if trainer is None:
        return
    assert trainer.ref_model is None
    assert "ref" not in model.peft_config  # a fresh adapter: the reference is the base, not a copied adapter
    assert len(calls) >= 1 and all(c is model for c in calls), "the reference pass did not use disable_adapter()"
    # and what disable_adapter() gives is the exact base model
    _assert_base_exact_under_disable(model)
