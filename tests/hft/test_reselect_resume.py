"""A Trainer checkpoint taken after re-selections resumes in a new model and Trainer as if never interrupted: the
checkpoint's stage is restored on load (HftReselectCallback), and the optimizer keeps the Trainer's group layout."""

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_ext import HftConfig
from peft_ext.testing.models import TokenDataset
from peft_ext.training import HftReselectCallback


def _trainer(model, out, n=16, **kwargs):
    kwargs.setdefault("save_strategy", "no")
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1, report_to=[],
        use_cpu=True, logging_steps=1, **kwargs,
    )
    return Trainer(model=model, args=args, train_dataset=TokenDataset(n), callbacks=[HftReselectCallback()])


def _losses(trainer, after=0):
    """The logged loss of each step after `after` (a resumed run's history starts with the checkpoint's)."""
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > after}


def _copies(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".hft_weight." in n}


def _check_same_run(resumed, checkpoint_step, expected_losses, expected_copies, expected_config, model):
    losses = _losses(resumed, after=checkpoint_step)
    assert sorted(losses) == [s for s in sorted(expected_losses) if s > checkpoint_step]
    for step, loss in losses.items():
        assert loss == pytest.approx(expected_losses[step], rel=1e-5, abs=1e-6), step
    config = model.peft_config["default"]
    for field in ("stage", "trained_stages", "selected_modules", "trained_modules", "candidate_modules"):
        assert getattr(config, field) == getattr(expected_config, field), field
    copies = _copies(model)
    assert copies.keys() == expected_copies.keys()
    for name, value in copies.items():
        torch.testing.assert_close(value, expected_copies[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stages_before", [1, 2])
def test_stage_resume_after_reselections_matches_the_uninterrupted_run(llama, tmp_path, stages_before):
    model = get_peft_model(llama(), HftConfig(seed=0))
    for s in range(stages_before):  # earlier tasks, each its own trainer.train()
        _trainer(model, tmp_path / f"stage{s}", n=8, max_steps=2).train()
    trainer = _trainer(model, tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()  # re-draws (stage == stages_before), checkpoint after step 2, mid-epoch
    config = model.peft_config["default"]
    assert config.stage == stages_before and len(trainer.optimizer.param_groups) == 2

    resumed_model = get_peft_model(llama(), HftConfig(seed=0))  # a new process: same script, fresh model
    resumed = _trainer(resumed_model, tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    _check_same_run(resumed, 2, _losses(trainer), _copies(model), config, resumed_model)


def test_epoch_resume_mid_epoch_matches_the_uninterrupted_run(llama, tmp_path):
    model = get_peft_model(llama(), HftConfig(seed=0, reselect="epoch"))
    trainer = _trainer(model, tmp_path / "run", n=8, num_train_epochs=3, save_strategy="steps", save_steps=3)
    trainer.train()  # 2 steps per epoch: re-draws before steps 3 and 5; checkpoint after step 3 (epoch 1.5)
    config = model.peft_config["default"]
    assert config.stage == 2

    resumed_model = get_peft_model(llama(), HftConfig(seed=0, reselect="epoch"))
    resumed = _trainer(resumed_model, tmp_path / "resumed", n=8, num_train_epochs=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    _check_same_run(resumed, 3, _losses(trainer), _copies(model), config, resumed_model)
