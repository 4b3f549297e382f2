"""ColaChainCallback with transformers' Trainer and TRL's SFT / DPO trainers: merges at the link boundaries, fresh
optimizer state for each new link on an unchanged optimizer and LR schedule, resume mid-chain, clear errors."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_ext import ColaConfig, ColaLinear
from peft_ext.training import ColaChainCallback

COMMON = dict(per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True, report_to=[], logging_strategy="no",
              lr_scheduler_type="linear", seed=0, dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip


def hf_dataset():
    """datasets.Dataset, imported when a test runs: the GPU run collects this folder where datasets is missing."""
    from datasets import Dataset

    return Dataset


def token_data(n=32, seq=10):
    ids = torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(0)).tolist()
    return hf_dataset().from_dict({"input_ids": ids, "labels": ids})


def cola(factory, **fields):
    config = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", chain_length=3)
    return get_peft_model(factory(), ColaConfig(**{**config, **fields}))


def first_layer(model):
    return next(m for m in model.modules() if isinstance(m, ColaLinear))


class Spy(TrainerCallback):
    """Records, after each optimizer step (before the COLA callback acts if placed first), the chain position, the
    first layer's link tensors and their optimizer state, and the learning rate."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        layer = first_layer(model)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        self.steps.append({
            "step": state.global_step,
            "link": model.peft_config["default"].current_link,
            "a": a.detach().clone(), "b": b.detach().clone(), "scaling": layer.scaling["default"],
            "merged_a": layer.cola_merged_A["default"].weight.detach().clone(),
            "merged_b": layer.cola_merged_B["default"].weight.detach().clone(),
            "adam_step": optimizer.state[a]["step"].item() if a in optimizer.state else None,
            "groups": [len(g["params"]) for g in optimizer.param_groups],
            "a_in_optimizer": any(p is a for g in optimizer.param_groups for p in g["params"]),
            "lr": lr_scheduler.get_last_lr()[0],
        })  # fmt: skip


def train(model, tmp_path, max_steps, callbacks=(), resume=None, save_steps=None):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, **COMMON,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=token_data(), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_links_merge_at_the_boundaries_with_fresh_optimizer_state(llama, tmp_path):
    before, after = Spy(), Spy()
    model = cola(llama)
    train(model, tmp_path, max_steps=6, callbacks=[before, ColaChainCallback(), after])
    config = model.peft_config["default"]
    assert config.link_boundaries == [2, 4] and config.current_link == 2
    assert [s["link"] for s in after.steps] == [0, 1, 1, 2, 2, 2]
    # at a boundary the link's values (as trained, scaling folded) move into the merged factors...
    for boundary, merged_rank in ((2, 4), (4, 8)):
        pre, post = before.steps[boundary - 1], after.steps[boundary - 1]
        assert torch.equal(post["merged_a"][-4:], pre["a"])
        assert torch.equal(post["merged_b"][:, -4:], pre["b"] * pre["scaling"])
        assert post["merged_a"].shape[0] == merged_rank
        # ...the link restarts (B = 0) and its optimizer state is gone: the next step is Adam's first for it
        assert not post["b"].any() and post["adam_step"] is None
        assert after.steps[boundary]["adam_step"] == 1.0
    assert [s["adam_step"] for s in after.steps] == [1.0, None, 1.0, None, 1.0, 2.0]
    # the optimizer and its groups are the same throughout; the LR schedule runs on over the whole run
    assert all(s["a_in_optimizer"] and s["groups"] == after.steps[0]["groups"] for s in after.steps)
    expected_lrs = [COMMON["learning_rate"] * (6 - k) / 6 for k in range(1, 7)]  # linear decay, no restart
    assert [s["lr"] for s in after.steps] == pytest.approx(expected_lrs)


def test_resume_mid_chain_equals_an_uninterrupted_run(llama, tmp_path):
    fields = dict(link_ranks=[4, 2, 4], lora_dropout=0.1)  # a rank change and dropout: both must resume exactly
    whole = cola(llama, **fields)
    train(whole, tmp_path / "whole", max_steps=9, callbacks=[ColaChainCallback()])
    first = cola(llama, **fields)
    train(first, tmp_path / "first", max_steps=9, callbacks=[ColaChainCallback()], save_steps=5)
    checkpoint = tmp_path / "first" / "checkpoint-5"  # links 1 and 2 trained (merge after step 3), mid link 2
    resumed = cola(llama, **fields)  # a new process: the adapter is built at link 0
    train(resumed, tmp_path / "resumed", max_steps=9, callbacks=[ColaChainCallback()], resume=str(checkpoint))
    assert resumed.peft_config["default"].current_link == whole.peft_config["default"].current_link == 2
    expected = {k: v for k, v in whole.state_dict().items() if "lora_" in k or "cola_" in k}
    got = resumed.state_dict()
    assert expected and all(torch.equal(got[k], v) for k, v in expected.items())


def test_a_schedule_that_does_not_fit_the_run_fails_before_training(llama, tmp_path):
    model = cola(llama, steps_per_link=5)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"ColaConfig\.steps_per_link=5 with chain_length=3 needs at least 15 steps.*max_steps=10"):
        train(model, tmp_path, max_steps=10, callbacks=[ColaChainCallback()])
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_the_callback_needs_a_cola_adapter_and_a_fresh_chain(llama, tmp_path):
    lora = get_peft_model(llama(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="no active COLA adapter"):
        train(lora, tmp_path / "a", max_steps=2, callbacks=[ColaChainCallback()])
    model = cola(llama)
    model.base_model.next_link()
    with pytest.raises(ValueError, match=r"has 1 merged link\(s\), but at the start of a run .* expects 0"):
        train(model, tmp_path / "b", max_steps=6, callbacks=[ColaChainCallback()])


def _tiny_tokenizer_model():
    from peft_ext.data.tiny_model import tiny_llama

    return tiny_llama()


TRL = dict(max_steps=2, per_device_train_batch_size=2, use_cpu=True, bf16=False, fp16=False,
           gradient_checkpointing=False, report_to=[], save_strategy="no", logging_strategy="no",
           learning_rate=1e-2, max_length=32, dataloader_num_workers=0, seed=0, disable_tqdm=True)  # fmt: skip


def test_sft_trainer_with_peft_config_and_the_callback(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _tiny_tokenizer_model()
    rows = [{"text": t} for t in ("the cat sat.", "a dog ran.", "one two three.", "hello there.")]
    trainer = SFTTrainer(
        model=model, args=SFTConfig(output_dir=str(tmp_path), **TRL), train_dataset=hf_dataset().from_list(rows),
        processing_class=tokenizer, peft_config=ColaConfig(r=4, target_modules="all-linear", chain_length=2),
        callbacks=[ColaChainCallback()],
    )  # fmt: skip
    trainer.train()
    peft_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    config = peft_model.peft_config["default"]
    assert config.link_boundaries == [1] and config.current_link == 1
    layer = first_layer(peft_model)
    assert layer.cola_merged_A["default"].weight.shape[0] == 4 and layer.cola_merged_B["default"].weight.any()


def test_dpo_trainer_reference_is_the_base_and_a_wrapped_chain_is_copied_whole(tmp_path):
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": f"{a} plus {a} is", "chosen": f" {2 * a}.", "rejected": f" {2 * a + 1}."} for a in range(4)]
    model, tokenizer = _tiny_tokenizer_model()
    trainer = DPOTrainer(
        model=model, args=DPOConfig(output_dir=str(tmp_path / "a"), beta=0.1, **TRL), train_dataset=hf_dataset().from_list(rows),
        processing_class=tokenizer, peft_config=ColaConfig(r=4, target_modules="all-linear", chain_length=2),
        callbacks=[ColaChainCallback()],
    )  # fmt: skip
    trainer.train()
    peft_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert peft_model.peft_config["default"].current_link == 1 and trainer.ref_model is None
    probe = torch.tensor([tokenizer("2 plus 2 is 4.").input_ids])
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(peft_model(input_ids=probe).logits, _tiny_tokenizer_model()[0](input_ids=probe).logits)

    # an already-wrapped COLA model mid-chain: TRL copies the ".default." parameters into a "ref" adapter, which
    # must include the merged links (they are parameters, named cola_merged_*.default.weight)
    wrapped = PeftModel.from_pretrained(_tiny_tokenizer_model()[0], _save(peft_model, tmp_path / "saved"), is_trainable=True)
    DPOTrainer(model=wrapped, args=DPOConfig(output_dir=str(tmp_path / "b"), beta=0.1, **TRL),
               train_dataset=hf_dataset().from_list(rows), processing_class=tokenizer)  # fmt: skip
    assert "ref" in wrapped.peft_config
    with torch.no_grad():
        default = wrapped(input_ids=probe).logits
        wrapped.set_adapter("ref")
        assert torch.equal(wrapped(input_ids=probe).logits, default)


def _save(model, path):
    model.save_pretrained(path)
    return str(path)
