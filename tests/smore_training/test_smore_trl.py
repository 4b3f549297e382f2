"""S'MoRE under TRL (1.16): SFTTrainer and DPOTrainer with peft_config=SmoreConfig(...) and the companions that
SmoreConfig declares (SmoreCallback). Both trainers build their loss from the fused LM head's per-token log_probs
(`model(..., fused_lm_head=True)`), not from outputs.loss.

The adapters start with P = 0 (init="w_final_zero"): in the first step the LM / DPO loss gives the routers exactly
zero gradient, so a router that moves in step 1 (AdamW, no weight decay) moved because of the load-balance loss."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from peft import PeftModel
from transformers import TrainerCallback

from peft_ext import SmoreConfig
from peft_ext.testing.models import MODELS
from peft_ext.testing.tokenizer import make_tokenizer
from peft_ext.training import SmoreCallback, attach_companions

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*starving experts:UserWarning"),
    pytest.mark.usefixtures("one_thread"),  # one_thread: tests/conftest.py
]

SMALL = dict(
    target_modules=["up_proj", "down_proj"], num_experts=[4, 4], num_active=[2, 2], expert_ranks=[2, 2],
    router_dim=8, router_down_dim=8, seed=0,
)
COMMON = dict(
    per_device_train_batch_size=2, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to=[],
    save_strategy="no", logging_steps=1, learning_rate=1e-2, weight_decay=0.0, max_length=14,
    dataloader_num_workers=0, seed=0, disable_tqdm=True,
)
SFT_ROWS = [
    {"prompt": "what is 2 plus 3?", "completion": " 5."},
    {"prompt": "what is 1 plus 1?", "completion": " 2."},
    {"prompt": "sort c a b:", "completion": " a b c."},
    {"prompt": "say hi:", "completion": " hi."},
]
DPO_ROWS = [
    {"prompt": "2 plus 3 is", "chosen": " 5.", "rejected": " 7."},
    {"prompt": "1 plus 1 is", "chosen": " 2.", "rejected": " 3."},
    {"prompt": "4 plus 4 is", "chosen": " 8.", "rejected": " 9."},
    {"prompt": "0 plus 6 is", "chosen": " 6.", "rejected": " 1."},
]



def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _AfterStep(TrainerCallback):
    """The adapter's values after each optimizer step."""

    def __init__(self):
        self.values: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.values[state.global_step] = _trainable(model)


def _moved(before, after, part: str = "") -> list[str]:
    return [n for n in before if part in n and not torch.equal(before[n], after[n])]


def _train(trainer_cls, args_cls, rows, tmp_path, mode, steps, **config):
    from datasets import Dataset

    config = SmoreConfig(**{**SMALL, "aux_loss_mode": mode, **config})
    trainer_cls, callbacks = attach_companions(trainer_cls, config)
    after = _AfterStep()
    args = args_cls(output_dir=str(tmp_path / mode), max_steps=steps, **COMMON)
    trainer = trainer_cls(
        model=MODELS["llama"].make(0), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=make_tokenizer(), peft_config=config, callbacks=[*callbacks, after],
    )
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert isinstance(model, PeftModel) and type(model.peft_config["default"]) is SmoreConfig
    assert any(type(c) is SmoreCallback for c in trainer.callback_handler.callbacks)
    before = _trainable(model)
    trainer.train()
    return {"trainer": trainer, "model": model, "before": before, "after": after.values}


# ------------------------------------------------------------------------------------------ SFTTrainer
@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    from trl import SFTConfig, SFTTrainer

    tmp = tmp_path_factory.mktemp("sft")
    return {
        mode: _train(SFTTrainer, SFTConfig, SFT_ROWS, tmp, mode, steps=2, balance_loss_weight=0.1)
        for mode in ("add_to_loss", "inject", "none")
    }


@pytest.mark.parametrize("mode", ["add_to_loss", "inject", "none"])
def test_sft_trains_every_adapter_tensor(sft_runs, mode):
    run = sft_runs[mode]
    assert run["trainer"].state.global_step == 2
    assert _moved(run["before"], run["after"][2]) == list(run["before"])
    logs = [h for h in run["trainer"].state.log_history if "loss" in h]
    assert len(logs) == 2
    if mode != "none":
        assert all(h["smore/aux_loss"] > 0 and "smore/load_max/l1" in h for h in logs)


def test_sft_logged_loss_is_the_lm_loss(sft_runs):
    """Measured with TRL 1.16: SFTTrainer logs -sum(log_probs) / tokens, so the logged loss of step 1 (same weights)
    is the same with and without the aux, whatever aux_loss_mode; the aux is in the log as smore/aux_loss."""
    first = {mode: [h for h in run["trainer"].state.log_history if "loss" in h][0] for mode, run in sft_runs.items()}
    assert first["add_to_loss"]["loss"] == pytest.approx(first["none"]["loss"], rel=1e-6)
    assert first["inject"]["loss"] == pytest.approx(first["none"]["loss"], rel=1e-6)
    assert first["add_to_loss"]["smore/aux_loss"] > 0.05  # gamma 0.1, four modules, two gates each


@pytest.mark.parametrize(
    "mode", ["add_to_loss", "inject"]
)
def test_sft_aux_reaches_the_routers(sft_runs, mode):
    run, lm_only = sft_runs[mode], sft_runs["none"]
    assert _moved(lm_only["before"], lm_only["after"][1], "smore_router") == []  # P = 0: no LM gradient yet
    routers = [n for n in run["before"] if "smore_router" in n]
    assert _moved(run["before"], run["after"][1], "smore_router") == routers


# ------------------------------------------------------------------------------------------ DPOTrainer
@contextmanager
def _watch_reference_passes(record: list):
    """Wrap PeftModel.disable_adapter (TRL's reference pass): record every forward run inside it, with the S'MoRE
    statistics before and after."""
    original = PeftModel.disable_adapter

    @contextmanager
    def disable_adapter(self):
        tuner = self.base_model
        run = tuner.smore_run
        calls = []

        def hook(module, args, kwargs, output):
            calls.append({"kwargs": dict(kwargs), "log_probs": output["log_probs"].detach().clone()})

        handle = tuner.model.register_forward_hook(hook, with_kwargs=True)
        stats_before, aux_before = dict(run.stats), run.last_aux
        try:
            with original(self):
                yield
        finally:
            handle.remove()
        record.append({
            "calls": calls,
            "stats_unchanged": run.stats.keys() == stats_before.keys()
            and all(run.stats[k] is stats_before[k] for k in stats_before),
            "aux_unchanged": run.last_aux == aux_before,
        })

    mp = pytest.MonkeyPatch()
    mp.setattr(PeftModel, "disable_adapter", disable_adapter)
    try:
        yield
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
    from trl import DPOConfig, DPOTrainer

    tmp = tmp_path_factory.mktemp("dpo")
    runs = {}
    for mode in ("add_to_loss", "inject", "none"):
        record = []
        with _watch_reference_passes(record):
            runs[mode] = _train(DPOTrainer, DPOConfig, DPO_ROWS, tmp, mode, steps=1, balance_loss_weight=1.0)
        runs[mode]["reference"] = record
    return runs


@pytest.mark.parametrize(
    "mode", ["add_to_loss", "inject"]
)
def test_dpo_aux_reaches_the_routers(dpo_runs, mode):
    run, lm_only = dpo_runs[mode], dpo_runs["none"]
    assert _moved(lm_only["before"], lm_only["after"][1], "smore_router") == []  # P = 0: no DPO gradient yet
    routers = [n for n in run["before"] if "smore_router" in n]
    assert _moved(run["before"], run["after"][1], "smore_router") == routers


@pytest.mark.parametrize("mode", ["add_to_loss", "inject", "none"])
def test_dpo_reference_is_the_exact_base_without_aux(dpo_runs, mode):
    from trl.trainer.utils import add_fused_lm_head

    run = dpo_runs[mode]
    assert run["trainer"].ref_model is None
    reference = run["reference"]
    assert reference and all(r["calls"] for r in reference), "the reference pass did not use disable_adapter()"
    # the reference forward recorded no S'MoRE statistics and no auxiliary loss
    assert all(r["stats_unchanged"] and r["aux_unchanged"] for r in reference)
    # and gave the base model's log-probabilities exactly
    base = MODELS["llama"].make(0)
    add_fused_lm_head(base)
    for r in reference:
        for call in r["calls"]:
            with torch.no_grad():
                expected = base(**call["kwargs"]).log_probs
            torch.testing.assert_close(call["log_probs"], expected, rtol=0, atol=0)
    if mode != "none":
        logs = [h for h in run["trainer"].state.log_history if "loss" in h]
        assert logs[0]["smore/aux_loss"] > 0  # the policy forward's aux, not overwritten by the reference pass
