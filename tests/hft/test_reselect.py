"""Continual learning: each stage trains a new random half; what earlier stages trained stays, frozen."""

import torch
from peft import PeftModel, get_peft_model

from peft_ext import HftConfig
from peft_ext.training import HftReselectCallback

from .trainers import reselect_trainer


def _copies(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".hft_weight." in n}


def _module(name):
    return name.removeprefix("base_model.model.").split(".hft_weight.")[0]


def test_stage_reselection_keeps_earlier_stages_and_trains_a_new_half(llama, tmp_path):
    model = get_peft_model(llama(), HftConfig(seed=0))
    config = model.peft_config["default"]
    callback = HftReselectCallback()
    reselect_trainer(model, tmp_path, [callback], max_steps=2).train()
    stage0 = set(config.selected_modules)
    assert config.trained_stages == 1 and config.stage == 0
    after_stage0 = _copies(model)

    trainer = reselect_trainer(model, tmp_path, [callback], max_steps=2)
    trainer.train()
    stage1 = set(config.selected_modules)
    assert config.stage == 1 and config.trained_stages == 2
    assert stage1 != stage0 and set(config.trained_modules) == stage0 | stage1
    after_stage1 = _copies(model)
    for name, before in after_stage0.items():
        changed = not torch.equal(before, after_stage1[name])
        assert changed == (_module(name) in stage1), name  # stage-0-only modules stayed frozen
    new = [n for n in after_stage1 if n not in after_stage0]
    assert new and all(_module(n) in stage1 for n in new)
    # the optimizer trains exactly the stage-1 copies
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for n, p in model.named_parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert {_module(n) for n, p in model.named_parameters() if p.requires_grad} == stage1


def test_a_saved_stage_reloads_with_its_frozen_history(llama, tmp_path, input_ids):
    model = get_peft_model(llama(), HftConfig(seed=0))
    callback = HftReselectCallback()
    reselect_trainer(model, tmp_path / "a", [callback], max_steps=1).train()
    reselect_trainer(model, tmp_path / "b", [callback], max_steps=1).train()
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids).logits
    loaded = PeftModel.from_pretrained(llama(), tmp_path / "adapter", is_trainable=True)
    config = loaded.peft_config["default"]
    assert (config.stage, config.trained_stages) == (1, 2)
    assert torch.equal(loaded(input_ids).logits, expected)
    trainable = {_module(n) for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == set(config.selected_modules) != set(config.trained_modules)
    # a third run re-draws again, in this new process-like setting
    reselect_trainer(loaded, tmp_path / "c", [HftReselectCallback()], max_steps=1).train()
    assert loaded.peft_config["default"].stage == 2


def test_epoch_reselection_swaps_the_optimizer_params_mid_run(llama, tmp_path):
    model = get_peft_model(llama(), HftConfig(seed=0, reselect="epoch"))
    trainer = reselect_trainer(model, tmp_path, [HftReselectCallback()], num_train_epochs=3)
    trainer.train()
    config = model.peft_config["default"]
    assert config.stage == 2
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(trainer.optimizer.state) <= set(p for p in model.parameters() if p.requires_grad)
    # the new halves joined the Trainer's own two groups (weight decay, none), which follow the schedule:
    # linear decay reached 0 for both
    assert len(trainer.optimizer.param_groups) == 2
    assert all(g["lr"] == 0.0 for g in trainer.optimizer.param_groups)


def test_never_means_one_selection(llama, tmp_path):
    model = get_peft_model(llama(), HftConfig(seed=0, reselect="never"))
    first = list(model.peft_config["default"].selected_modules)
    for run in range(2):
        reselect_trainer(model, tmp_path / str(run), [HftReselectCallback()], max_steps=1).train()
    assert model.peft_config["default"].selected_modules == first
