"""FineGates' optimizer groups: `finegates_param_groups`, and the mixin's create_optimizer (gate logits in their own
group with gates_learning_rate and weight decay 0, the trainer's optimizer class and kwargs kept, a user optimizer
left alone)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer

from peft_ext import FineGatesConfig
from peft_ext.testing.models import MODELS, TokenDataset
from peft_ext.training import attach_companions, finegates_param_groups, with_finegates

from .common import finegates_model, gate_logits, training_args

FULL = dict(target_sparsity=0.4, bias="gates", lora_r=2, modules_to_save=["lm_head"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _split(model):
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    gates = gate_logits(model)
    bias = {n: p for n, p in trainable.items() if "gates_bias" in n}
    rest = {n: p for n, p in trainable.items() if n not in gates and n not in bias}
    assert gates and bias and any("gates_lora_A" in n for n in rest) and any("modules_to_save" in n for n in rest)
    return trainable, gates, bias, rest


def test_finegates_param_groups():
    model = finegates_model(**FULL)
    trainable, gates, bias, rest = _split(model)
    groups = finegates_param_groups(model, lr=1e-3, gates_lr=5e-2, weight_decay=0.1)
    assert len(groups) == 2
    assert _ids(groups[0]["params"]) == _ids(gates.values())
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (5e-2, 0.0)
    assert _ids(groups[1]["params"]) == _ids([*bias.values(), *rest.values()])
    assert (groups[1]["lr"], groups[1]["weight_decay"]) == (1e-3, 0.1)
    torch.optim.AdamW(groups)  # a valid parameter-group list

    only_gates = finegates_param_groups(finegates_model(), lr=1e-3)
    assert len(only_gates) == 1 and only_gates[0]["lr"] == 1e-3 and only_gates[0]["weight_decay"] == 0.0

    lora = get_peft_model(MODELS["llama"].make(0), LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match="no trainable FineGates gate logits"):
        finegates_param_groups(lora, lr=1e-3)


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_trainer_optimizer_groups(tmp_path, optim):
    model = finegates_model(gates_learning_rate=5e-2, **FULL)
    trainable, gates, bias, rest = _split(model)
    extra = dict(adam_beta1=0.8, adam_epsilon=1e-6) if optim == "adamw_torch" else dict(optim_args="momentum=0.9")
    trainer = with_finegates(Trainer)(
        model=model, args=training_args(tmp_path, optim=optim, learning_rate=1e-3, weight_decay=0.1, **extra),
        train_dataset=TokenDataset(n=4),
    )
    assert not any(n in gates for n in trainer.get_decay_parameter_names(model))
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is (torch.optim.AdamW if optim == "adamw_torch" else torch.optim.SGD)
    groups = optimizer.param_groups
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(_ids(trainable.values()))  # each trainable parameter exactly once
    (gate_group,) = [g for g in groups if _ids(g["params"]) & _ids(gates.values())]
    assert _ids(gate_group["params"]) == _ids(gates.values())
    assert (gate_group["lr"], gate_group["weight_decay"]) == (5e-2, 0.0)
    (bias_group,) = [g for g in groups if _ids(g["params"]) & _ids(bias.values())]
    assert (bias_group["lr"], bias_group["weight_decay"]) == (1e-3, 0.0)  # the Trainer's rule: no decay on biases
    (rest_group,) = [g for g in groups if _ids(g["params"]) & _ids(rest.values())]
    assert _ids(rest_group["params"]) == _ids(rest.values())
    assert (rest_group["lr"], rest_group["weight_decay"]) == (1e-3, 0.1)
    for group in groups:  # the optimizer's kwargs, in the gates' group too
        if optim == "adamw_torch":
            assert group["betas"] == (0.8, 0.999) and group["eps"] == 1e-6
        else:
            assert group["momentum"] == 0.9


def test_gates_lr_defaults_to_the_trainers_and_follows_its_schedule(tmp_path):
    config = FineGatesConfig(target_sparsity=0.4, lora_r=2, seed=0)
    cls, callbacks = attach_companions(Trainer, config)
    model = get_peft_model(MODELS["llama"].make(0), config)
    trainer = cls(model=model, args=training_args(tmp_path, learning_rate=2e-3, max_steps=2),
                  train_dataset=TokenDataset(n=4), callbacks=callbacks)
    optimizer = trainer.create_optimizer()
    (gate_group,) = [g for g in optimizer.param_groups if _ids(g["params"]) == _ids(gate_logits(model).values())]
    assert gate_group["lr"] == 2e-3 and gate_group["weight_decay"] == 0.0

    model = finegates_model(target_sparsity=0.4, lora_r=2, gates_learning_rate=4e-2)
    trainer = with_finegates(Trainer)(
        model=model, train_dataset=TokenDataset(n=8),
        args=training_args(tmp_path, learning_rate=2e-3, max_steps=2, lr_scheduler_type="constant_with_warmup",
                           warmup_steps=10),
    )
    trainer.train()
    lrs = {("gates" if _ids(g["params"]) == _ids(gate_logits(model).values()) else "other"): g["lr"]
           for g in trainer.optimizer.param_groups}
    assert lrs["gates"] == pytest.approx(4e-2 * 2 / 10) and lrs["other"] == pytest.approx(2e-3 * 2 / 10)


def test_user_optimizer_is_untouched(tmp_path):
    model = finegates_model(gates_learning_rate=5e-2, **FULL)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    trainer = with_finegates(Trainer)(model=model, args=training_args(tmp_path, max_steps=1),
                                      train_dataset=TokenDataset(n=4), optimizers=(optimizer, None))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert inner is optimizer
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == 0.01
    assert _ids(optimizer.param_groups[0]["params"]) == _ids(params)
