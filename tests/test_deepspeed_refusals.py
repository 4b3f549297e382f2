"""Under DeepSpeed the Trainer's callbacks get accelerate's DeepSpeedOptimizerWrapper around DeepSpeed's ZeRO
optimizer, which itself holds the torch optimizer it was built from (`.optimizer`): the innermost object looks like a
plain AdamW. COLA's link boundaries and HFT's re-selection, which must edit the optimizer, refuse it before the first
step, naming the fix.

DeepSpeed needs CUDA and is not installed here: its ZeRO optimizer is stood in for by a class of DeepSpeed's module
path with the same `.optimizer` / `param_groups` structure, wrapped by accelerate's real wrapper (the GPU runbook,
benchmarks/multigpu_session.sh, launches the real thing: its cola-zero2 cell must show REFUSED)."""

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils.deepspeed import DeepSpeedOptimizerWrapper
from peft import get_peft_model
from transformers import TrainerControl, TrainerState, TrainingArguments

from peft_ext import ColaConfig, HftConfig
from peft_ext.data.tiny_model import tiny_llama
from peft_ext.training import ColaChainCallback, HftReselectCallback
from peft_ext.training.optimizer_params import editable


class DeepSpeedZeroOptimizer:
    """The structure of deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer that the check relies on."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = {}

    def state_dict(self):
        return {}


DeepSpeedZeroOptimizer.__module__ = "deepspeed.runtime.zero.stage_1_and_2"


@pytest.fixture(autouse=True)
def _accelerator():
    """accelerate's optimizer wrappers read the accelerator's state: one on the CPU, reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    Accelerator(cpu=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def deepspeed_optimizer(model) -> DeepSpeedOptimizerWrapper:
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return DeepSpeedOptimizerWrapper(DeepSpeedZeroOptimizer(inner))


def begin(callback, model, optimizer, epochs=1, max_steps=4):
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], num_train_epochs=epochs)
    state = TrainerState(max_steps=max_steps, global_step=0, num_train_epochs=epochs)
    callback.on_train_begin(args, state, TrainerControl(), model=model, optimizer=optimizer)


def test_deepspeed_anywhere_in_the_optimizer_chain_is_not_editable():
    model = get_peft_model(tiny_llama()[0], HftConfig(seed=0))
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert editable(plain) and editable(AcceleratedOptimizer(plain, device_placement=False))
    wrapped = deepspeed_optimizer(model)
    assert isinstance(wrapped.optimizer.optimizer, torch.optim.AdamW)  # the innermost object is a torch optimizer
    assert not editable(wrapped)


def test_cola_chain_under_deepspeed_is_refused_before_the_first_step():
    config = ColaConfig(r=4, target_modules=["q_proj", "v_proj"], chain_length=2, seed=0, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama()[0], config)
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO .* holds state peft-ext cannot reach"):
        begin(ColaChainCallback(), model, deepspeed_optimizer(model))
    assert model.peft_config["default"].current_link == 0


def test_hft_epoch_reselection_under_deepspeed_is_refused_before_the_first_step():
    model = get_peft_model(tiny_llama()[0], HftConfig(seed=0, reselect="epoch"))
    config = model.peft_config["default"]
    selected = list(config.selected_modules)
    with pytest.raises(ValueError, match=r"in this run \(reselect='epoch'.*cannot add.*DeepSpeedOptimizerWrapper"):
        begin(HftReselectCallback(), model, deepspeed_optimizer(model), epochs=2)
    assert config.stage == 0 and config.selected_modules == selected  # nothing was re-drawn


def test_hft_single_epoch_under_deepspeed_is_allowed():
    """One epoch with reselect='epoch' re-draws nothing: nothing to refuse."""
    model = get_peft_model(tiny_llama()[0], HftConfig(seed=0, reselect="epoch"))
    begin(HftReselectCallback(), model, deepspeed_optimizer(model), epochs=1)
