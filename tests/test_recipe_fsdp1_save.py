"""run_recipe's guard against PEFT 0.21's empty adapter files under FSDP1: `save_pretrained(state_dict=...)` of a
model whose layers sit in FSDP1 units (`_fsdp_wrapped_module.` inside the module names) selects no tensor for PEFT's
own LoRA. Built here on a one-rank gloo group (FSDP1 wraps exactly as with more ranks): the LoRA file comes out empty
and is refused and removed; a peft-ext method's file (PeftExtTuner._get_adapter_state_dict) holds its tensors."""

import torch
from peft import LoraConfig, get_peft_model

from peft_ext import HftConfig
from peft_ext.data.tiny_model import tiny_llama
from peft_ext.recipe import _empty_adapter_file


def save_under_fsdp1(config, folder):
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = get_peft_model(tiny_llama()[0], config)
    blocks = {type(m) for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"}
    wrapped = FullyShardedDataParallel(
        model, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy(blocks), device_id=torch.device("cpu")
    )
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig()):
        state = wrapped.state_dict()
    model.save_pretrained(folder, state_dict=state)
    return model


def test_lora_under_fsdp1_saves_an_empty_file_which_is_refused(one_rank_group, tmp_path):
    model = save_under_fsdp1(LoraConfig(r=4, target_modules="all-linear"), tmp_path)
    assert _empty_adapter_file(tmp_path, model)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_a_peft_ext_method_under_fsdp1_saves_its_tensors(one_rank_group, tmp_path):
    from safetensors.torch import load_file

    model = save_under_fsdp1(HftConfig(seed=0), tmp_path)
    assert not _empty_adapter_file(tmp_path, model)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(saved) >= len(trained) > 0
