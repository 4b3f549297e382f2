"""The optimizer after a re-selection is the one a new Trainer would build: its two groups (weight decay, none),
new norms and biases in the no-decay group by the Trainer's own rule, each group in the model's order."""

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_ext import HftConfig
from peft_ext.training import HftReselectCallback, swap_optimizer_params
from peft_ext.training.optimizer_params import decay_parameter_names

from .trainers import reselect_trainer


def _llama_with_biases():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
    )
    return LlamaForCausalLM(config).eval()



def _layout(optimizer):
    return [([id(p) for p in g["params"]], g["weight_decay"]) for g in optimizer.param_groups]


def _check_trainers_layout(model, trainer, out):
    fresh = reselect_trainer(model, out, [], max_steps=1)  # what a new Trainer builds for the model as it is now
    fresh.create_optimizer()
    assert _layout(trainer.optimizer) == _layout(fresh.optimizer)
    decay = set(fresh.get_decay_parameter_names(model))
    group_of = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert group_of[id(p)] == (0.1 if name in decay else 0.0), name


def test_new_norms_and_biases_join_the_trainers_no_decay_group(tmp_path):
    model = get_peft_model(_llama_with_biases(), HftConfig(seed=0))
    callback = HftReselectCallback()
    reselect_trainer(model, tmp_path / "a", [callback], max_steps=1).train()
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer = reselect_trainer(model, tmp_path / "b", [callback], max_steps=1)
    trainer.train()
    new = {n for n, p in model.named_parameters() if p.requires_grad} - before
    assert any("layernorm" in n for n in new) and any(n.endswith(".bias") for n in new)  # the case of the issue
    assert len(trainer.optimizer.param_groups) == 2
    _check_trainers_layout(model, trainer, tmp_path / "c")


def test_epoch_reselections_keep_the_trainers_layout(tmp_path):
    model = get_peft_model(_llama_with_biases(), HftConfig(seed=0, reselect="epoch"))
    trainer = reselect_trainer(model, tmp_path / "a", [HftReselectCallback()], num_train_epochs=3)
    trainer.train()
    assert model.peft_config["default"].stage == 2
    _check_trainers_layout(model, trainer, tmp_path / "b")


def test_a_custom_optimizer_gets_a_group_without_weight_decay_for_new_norms(llama):
    model = get_peft_model(llama(), HftConfig(seed=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    added, removed = model.base_model.reselect()
    swap_optimizer_params(optimizer, added, removed, scheduler, model=model)
    decay = decay_parameter_names(model)
    new = {id(p) for p in added}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the model's order
    assert any(n not in decay for n, p in trainable if id(p) in new)  # new norms
    decayed, undecayed = optimizer.param_groups  # the user's group, and one added for the new norms
    assert undecayed["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.1
    # parameters already in the optimizer stay in the user's group; new ones follow the Trainer's rule
    assert [id(p) for p in undecayed["params"]] == [id(p) for n, p in trainable if id(p) in new and n not in decay]
    assert [id(p) for p in decayed["params"]] == [id(p) for n, p in trainable if id(p) not in new or n in decay]
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == 2  # the new group follows the schedule
