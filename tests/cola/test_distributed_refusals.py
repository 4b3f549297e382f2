"""ColaChainCallback refuses, at the start of training and before any step, the runs whose link boundaries would fail
or go wrong mid-run: a sharded model (FSDP2's DTensors, FSDP1's flat parameters); and at a boundary, an optimizer that
does not hold the new link's parameters (their state could not be reset: they would not train). The multi-process
rank-change refusal and the DDP chain itself are launched for real in tests/test_recipe_distributed.py.

The sharded models are built in this process on a one-rank gloo process group (FSDP needs a process group; one rank
shards nothing away but wraps the parameters exactly as with more)."""

import pytest
import torch
from peft import get_peft_model
from transformers import TrainerControl, TrainerState, TrainingArguments

from peft_ext import ColaConfig
from peft_ext.data.tiny_model import tiny_llama
from peft_ext.training import ColaChainCallback

MAX_STEPS = 4


def cola_model(chain_length=2):
    config = ColaConfig(r=4, target_modules=["q_proj", "v_proj"], chain_length=chain_length, seed=0, task_type="CAUSAL_LM")
    return get_peft_model(tiny_llama()[0], config)


def begin(model, optimizer=None, step=0):
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    state = TrainerState(max_steps=MAX_STEPS, global_step=step)
    callback = ColaChainCallback()
    callback.on_train_begin(args, state, TrainerControl(), model=model, optimizer=optimizer)
    return callback, args, state


def blocks(model):
    return [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]


def test_fsdp2_sharded_chain_is_refused_before_the_first_step(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    model = cola_model()
    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)
    with pytest.raises(ValueError, match=r"COLA adapter 'default': COLA cannot merge a link .* FSDP2 \(fully_shard\)"):
        begin(model)


def test_fsdp2_without_a_boundary_in_the_run_is_allowed(one_rank_group):
    """A one-link chain (plain LoRA) merges nothing: nothing to refuse under FSDP2."""
    from torch.distributed.fsdp import fully_shard

    model = cola_model(chain_length=1)
    fully_shard(model)
    begin(model)


def test_fsdp1_wrapped_chain_is_refused_before_the_first_step(one_rank_group):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = cola_model()
    policy = ModuleWrapPolicy({type(blocks(model)[0])})
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"sharded with FSDP1 .* train a COLA chain on one process or under DDP"):
        begin(wrapped)


def test_a_boundary_with_the_link_outside_the_optimizer_raises():
    model = cola_model()
    stray = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([stray], lr=1e-2)  # built from something else than the model's trainable parameters
    callback, args, state = begin(model, optimizer)
    state.global_step = model.peft_config["default"].link_boundaries[0]
    with pytest.raises(RuntimeError, match=r"the optimizer does not hold the new link's parameters"):
        callback.on_step_end(args, state, TrainerControl(), model=model, optimizer=optimizer)


def test_a_boundary_with_a_torch_optimizer_resets_the_new_link():
    """The counterpart: the optimizer built from the model's parameters passes and its link state is dropped."""
    model = cola_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(input_ids=torch.arange(8).view(1, 8), labels=torch.arange(8).view(1, 8)).loss.backward()
    optimizer.step()
    assert all(p in optimizer.state for p in params)
    callback, args, state = begin(model, optimizer, step=0)
    state.global_step = model.peft_config["default"].link_boundaries[0]
    callback.on_step_end(args, state, TrainerControl(), model=model, optimizer=optimizer)
    assert model.peft_config["default"].current_link == 1
    assert not any(p in optimizer.state for p in params), "the new link kept the old link's Adam moments"
