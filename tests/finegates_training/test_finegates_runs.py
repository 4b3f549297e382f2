"""FineGates' training companions in real runs on the tiny Llama: transformers' Trainer, TRL's SFTTrainer and
DPOTrainer, each through `attach_companions` (what `peft-ext train` does) and through `with_finegates`; the
sparsity loss pulls the mean keep probability toward 1 - target_sparsity; the logged keys; FineGatesCallback
without the mixin; stop_at_target."""

from __future__ import annotations

import math
import warnings

import pytest
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer

from peft_ext import FineGatesConfig
from peft_ext.testing.models import MODELS, TokenDataset
from peft_ext.testing.tokenizer import make_tokenizer
from peft_ext.training import FineGatesCallback, FineGatesTrainerMixin, attach_companions, with_finegates

from .common import COMMON, DPO_ROWS, LOG_KEYS, SFT_ROWS, finegates_model, step_logs, training_args

STEPS = 4
# Adam moves every gate logit by about the gates' lr per step: from ~1.0 (keep 0.994) to ~-0.2 (keep ~0.73) in 4
# steps, on the way to the target keep 0.6; without the sparsity loss the logits stay on the clamp's flat top
CONFIG = dict(target_sparsity=0.4, sparsity_lambda=50.0, gates_learning_rate=0.3, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def _keep(model) -> float:
    stats = model.base_model.gate_stats()
    return (stats["mean_keep_rows"] + stats["mean_keep_cols"]) / 2


def _run(which: str, how: str, tmp_path) -> dict:
    config = FineGatesConfig(**CONFIG)
    if which == "trainer":
        trainer_cls, args_cls, extra = Trainer, None, {}
        model, data = get_peft_model(MODELS["llama"].make(0), config), TokenDataset(n=8)
    else:
        from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

        sft = (SFTTrainer, SFTConfig, SFT_ROWS)
        trainer_cls, args_cls, rows = sft if which == "sft" else (DPOTrainer, DPOConfig, DPO_ROWS)
        extra = dict(peft_config=config, processing_class=make_tokenizer())
        model, data = MODELS["llama"].make(0), Dataset.from_list(rows)
    if how == "attach_companions":
        cls, callbacks = attach_companions(trainer_cls, config)
    else:
        cls, callbacks = with_finegates(trainer_cls), [FineGatesCallback()]
    if args_cls is None:
        args = training_args(tmp_path, max_steps=STEPS)
    else:
        args = args_cls(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=2,
                        learning_rate=1e-1, max_length=14, gradient_checkpointing=False, **COMMON)
    trainer = cls(model=model, args=args, train_dataset=data, callbacks=callbacks, **extra)
    peft_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    before = _keep(peft_model)
    trainer.train()
    return {"trainer": trainer, "model": peft_model, "before": before, "after": _keep(peft_model)}


@pytest.mark.parametrize("how", ["attach_companions", "with_finegates"])
@pytest.mark.parametrize("which", ["trainer", "sft", "dpo"])
def test_run_pulls_gates_toward_target_and_logs(tmp_path, which, how):
    run = _run(which, how, tmp_path)
    trainer, model = run["trainer"], run["model"]
    assert isinstance(trainer, FineGatesTrainerMixin)
    assert isinstance(model, PeftModel) and type(model.peft_config["default"]) is FineGatesConfig
    assert sum(type(c) is FineGatesCallback for c in trainer.callback_handler.callbacks) == 1
    if which == "dpo":
        assert trainer.ref_model is None  # the reference is the policy with the adapter disabled = the base
    assert trainer.state.global_step == STEPS
    # a real effect: the mean keep probability falls from ~0.99 toward the target keep 0.6
    assert run["before"] > 0.99
    assert 0.6 - 0.1 < run["after"] < run["before"] - 0.15
    logs = step_logs(trainer)
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    for h in logs:
        assert all(k in h and math.isfinite(h[k]) for k in LOG_KEYS), h
        assert h["finegates/lambda"] == 50.0
        assert 0.0 <= h["finegates/removable_fraction"] <= 1.0 and 0.0 < h["finegates/open_rows"] <= 1.0
    sparsity = [h["finegates/sparsity_loss"] for h in logs]
    assert sparsity[-1] < sparsity[0] - 0.05
    # the logged loss is the objective: the task loss + lambda * the sparsity loss (which dominates here)
    assert logs[0]["loss"] > 50.0 * sparsity[0]


def test_callback_without_mixin_warns_once_and_still_logs(tmp_path):
    model = finegates_model(gate_noise_std=0.0, **CONFIG)  # noise 0: the task alone gives the gates no gradient
    before = _keep(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=TokenDataset(n=4),
                      callbacks=[FineGatesCallback()])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
        trainer.train()
    messages = [str(w.message) for w in record if "FineGatesCallback" in str(w.message)]
    assert len(messages) == 1 and "with_finegates" in messages[0]
    logs = step_logs(trainer)
    assert all(h["finegates/lambda"] == 0.0 and all(math.isfinite(h[k]) for k in LOG_KEYS) for h in logs)
    assert logs[0]["finegates/sparsity_loss"] > 0.3  # evaluated at log time: all gates open, far from the target
    assert _keep(model) == before


def test_callback_leaves_other_models_alone(tmp_path):
    lora = get_peft_model(MODELS["llama"].make(0), LoraConfig(target_modules=["q_proj"], r=2))
    trainer = Trainer(model=lora, args=training_args(tmp_path, max_steps=1), train_dataset=TokenDataset(n=2),
                      callbacks=[FineGatesCallback(stop_at_target=True)])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in record if "FineGates" in str(w.message)]
    assert not any(k.startswith("finegates/") for h in trainer.state.log_history for k in h)


def test_stop_at_target(tmp_path):
    """Gates start fractional (init_weights=False, none closed) and close step by step under lambda 50 at gates lr
    0.05: training stops after the first step whose closed gate fraction reaches 0.4 - 0.02 (a fraction of gates,
    as target_sparsity: the removable fraction of weight entries is then larger)."""
    model = finegates_model(target_sparsity=0.4, sparsity_lambda=50.0, gates_learning_rate=0.05, init_weights=False)
    callback = FineGatesCallback(stop_at_target=True, tolerance=0.02)
    trainer = with_finegates(Trainer)(model=model, args=training_args(tmp_path, max_steps=20),
                                      train_dataset=TokenDataset(n=40), callbacks=[callback])
    trainer.train()
    closed = [h["finegates/closed_fraction"] for h in step_logs(trainer)]
    removable = [h["finegates/removable_fraction"] for h in step_logs(trainer)]
    assert callback.stopped_at is not None and 1 < callback.stopped_at < 20
    assert trainer.state.global_step == callback.stopped_at == len(closed)
    assert closed[-1] >= 0.38 > closed[-2]
    assert model.base_model.gate_stats()["closed_fraction"] == closed[-1]
    assert removable[-1] > closed[-1]  # 1 - (1 - r)(1 - c) > the gates' closed share


@pytest.mark.parametrize("start, stopped_at", [(0, 1), (100, None)])
def test_stop_waits_for_the_start_step(tmp_path, start, stopped_at):
    """A target already met (target 0) stops after the first step once the sparsity loss acts, not before."""
    model = finegates_model(target_sparsity=0.4, sparsity_start_step=start)
    callback = FineGatesCallback(stop_at_target=True, target=0.0)
    trainer = with_finegates(Trainer)(model=model, args=training_args(tmp_path, max_steps=2, learning_rate=1e-3),
                                      train_dataset=TokenDataset(n=4), callbacks=[callback])
    trainer.train()
    assert callback.stopped_at == stopped_at
    assert trainer.state.global_step == (stopped_at or 2)


def test_with_finegates_class():
    from trl import SFTTrainer

    cls = with_finegates(SFTTrainer)
    assert cls.__name__ == "FineGatesSFTTrainer" and cls.__mro__[1:3] == (FineGatesTrainerMixin, SFTTrainer)
    assert with_finegates(SFTTrainer) is cls and with_finegates(cls) is cls
    attached, callbacks = attach_companions(SFTTrainer, FineGatesConfig())
    assert with_finegates(attached) is attached and issubclass(attached, FineGatesTrainerMixin)
    assert [type(c) for c in callbacks] == [FineGatesCallback]
    assert attach_companions(cls, FineGatesConfig())[0] is cls  # the mixin is not put in twice
    with pytest.raises(TypeError):
        with_finegates("SFTTrainer")


@pytest.mark.parametrize("objective", [dict(sparsity_objective="l0"), dict(kurtosis=True)])
def test_other_objectives_train(tmp_path, objective):
    """The "l0" objective and the kurtosis weighting (its weights come from the forward, which runs before the
    mixin asks for the sparsity loss) train and log finite values."""
    model = finegates_model(**{**CONFIG, **objective})
    before = _keep(model)
    trainer = with_finegates(Trainer)(model=model, args=training_args(tmp_path, max_steps=2),
                                      train_dataset=TokenDataset(n=4), callbacks=[FineGatesCallback()])
    trainer.train()
    logs = step_logs(trainer)
    assert all(math.isfinite(h[k]) for h in logs for k in LOG_KEYS)
    assert _keep(model) < before - 0.01
