"""A re-selection that cannot hand the new half to the optimizer is refused with the fix, before anything changes."""

import pytest
from peft import get_peft_model
from transformers import TrainerControl, TrainerState, TrainingArguments

from peft_ext import HftConfig
from peft_ext.training import HftReselectCallback


def _after_a_finished_run(llama, **kwargs):
    model = get_peft_model(llama(layers=2), HftConfig(seed=0, **kwargs))
    config = model.peft_config["default"]
    config.trained_stages = 1  # as HftReselectCallback.on_train_end leaves it
    return model, config


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)


def test_reselection_without_an_optimizer_is_refused(llama, tmp_path):
    model, config = _after_a_finished_run(llama)
    selected = list(config.selected_modules)
    with pytest.raises(ValueError, match=r"no optimizer.*swap_optimizer_params"):
        HftReselectCallback().on_train_begin(_args(tmp_path), TrainerState(), TrainerControl(), model=model)
    assert config.stage == 0 and config.selected_modules == selected  # nothing was re-drawn


class _NotAnOptimizer:  # e.g. DeepSpeed's engine optimizer: keeps flat copies of the parameters it was built with
    param_groups = [{"params": [], "lr": 1e-3}]


def test_reselection_with_an_optimizer_it_cannot_edit_is_refused(llama, tmp_path):
    model, config = _after_a_finished_run(llama, reselect="epoch")
    state = TrainerState(epoch=1.0)
    with pytest.raises(ValueError, match=r"cannot add.*_NotAnOptimizer.*reselect\("):
        HftReselectCallback().on_epoch_begin(_args(tmp_path), state, TrainerControl(), model=model, optimizer=_NotAnOptimizer())
    assert config.stage == 0
