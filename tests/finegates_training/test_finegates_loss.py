"""FineGatesTrainerMixin's loss: lambda's schedule, the sparsity term counted once per optimizer step under gradient
accumulation (Trainer's num_items_in_batch path and its per-micro-batch-mean path, TRL's SFTTrainer and
DPOTrainer), evaluation losses without it, and the error without a FineGates adapter."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback

from peft_ext import FineGatesConfig
from peft_ext.testing.models import MODELS, TokenDataset
from peft_ext.testing.tokenizer import make_tokenizer
from peft_ext.training import FineGatesCallback, attach_companions, with_finegates

from .common import (
    DPO_ROWS, SFT_ROWS, AfterStep, GradsBeforeStep, finegates_model, gate_logits, hand_sparsity_loss, step_logs,
    training_args,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


# ------------------------------------------------------------------------------------------ lambda schedule
def test_lambda_at_schedule():
    assert [FineGatesConfig(sparsity_lambda=8.0).lambda_at(s) for s in (0, 1, 100)] == [8.0, 8.0, 8.0]
    cfg = FineGatesConfig(sparsity_lambda=8.0, sparsity_start_step=3, sparsity_warmup_steps=4)
    assert [cfg.lambda_at(s) for s in range(9)] == [0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0, 8.0, 8.0]
    cfg = FineGatesConfig(sparsity_lambda=8.0, sparsity_start_step=2)
    assert [cfg.lambda_at(s) for s in range(4)] == [0.0, 0.0, 8.0, 8.0]


class _Last(TrainerCallback):
    def __init__(self):
        self.trainer, self.records = None, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.records[state.global_step] = dict(self.trainer.finegates_last)


def test_trainer_follows_the_schedule(tmp_path):
    """start 2, warm-up 2, lambda 4: optimizer steps 1, 2 (global_step 0, 1) run without the sparsity loss (not even
    computed), then lambda 2, 4, 4. The gates start on the clamp's flat top (noise 0): the task gives them exactly
    zero gradient, so they move only once lambda > 0."""
    model = finegates_model(target_sparsity=0.4, sparsity_lambda=4.0, sparsity_start_step=2, sparsity_warmup_steps=2,
                            gate_noise_std=0.0)
    last, after = _Last(), AfterStep()
    trainer = with_finegates(Trainer)(model=model, args=training_args(tmp_path, max_steps=5),
                                      train_dataset=TokenDataset(n=10), callbacks=[FineGatesCallback(), last, after])
    last.trainer = trainer
    initial = float(hand_sparsity_loss(model, 0.4).detach())
    trainer.train()
    assert [h["finegates/lambda"] for h in step_logs(trainer)] == [0.0, 0.0, 2.0, 4.0, 4.0]
    assert [last.records[s]["step"] for s in range(1, 6)] == [0, 1, 2, 3, 4]
    assert [last.records[s]["sparsity_loss"] is None for s in range(1, 6)] == [True, True, False, False, False]
    moved = [any(not torch.equal(after.values[s - 1][n], after.values[s][n]) for n in after.values[0])
             for s in range(1, 6)]
    assert moved == [False, False, True, True, True]
    # the logged sparsity loss before the start is evaluated at log time, after it the value the loss used
    logged = [h["finegates/sparsity_loss"] for h in step_logs(trainer)]
    assert logged[0] == pytest.approx(initial, rel=1e-5) and logged[1] == pytest.approx(initial, rel=1e-5)
    assert logged[3] == pytest.approx(float(last.records[4]["sparsity_loss"]), rel=1e-6)


# ------------------------------------------------------------------------------------------ gradient accumulation
class _Rows(torch.utils.data.Dataset):
    """Two rows of random ids; the second has its first 6 labels masked (-100), so token-count and per-micro-batch
    normalisation differ."""

    def __init__(self):
        ids = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(7))
        labels = ids.clone()
        labels[1, :6] = -100
        self.rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(2)]

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.rows[i]


def _hand_gradients(reference, rows, normalisation):
    """(task gradient, sparsity-loss gradient) of the gate logits, from a copy of the model before training."""
    reference.train()
    sums, counts = [], []
    for row in rows:
        logits = reference(input_ids=row["input_ids"][None]).logits[0, :-1]
        targets = row["labels"][1:]
        sums.append(F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum"))
        counts.append(int((targets != -100).sum()))
    if normalisation == "tokens":  # num_items_in_batch: every micro-batch's sum over the step's token count
        task = sum(sums) / sum(counts)
    else:  # each micro-batch's own mean, averaged over the micro-batches
        task = sum(s / c for s, c in zip(sums, counts)) / len(rows)
    params = gate_logits(reference)
    names = list(params)
    g_task = torch.autograd.grad(task, [params[n] for n in names])
    g_sparse = torch.autograd.grad(hand_sparsity_loss(reference, 0.4), [params[n] for n in names])
    return names, dict(zip(names, g_task)), dict(zip(names, g_sparse))


@pytest.mark.parametrize("normalisation", ["tokens", "micro_batch_mean"])
def test_gradient_accumulation_counts_the_sparsity_term_once(tmp_path, normalisation):
    """One optimizer step of 2 micro-batches (batch 1, GA 2): the gate logits' gradient = the task's + lambda * dL_s,
    not 2 lambda dL_s (added per micro-batch, never divided) nor lambda / 2 dL_s (divided twice). Gates start
    fractional (init_weights=False) and without noise, so the task part is deterministic and non-zero.

    "tokens": the installed Trainer passes num_items_in_batch to the Llama (model_accepts_loss_kwargs) and does not
    divide the loss by the accumulation steps: the mixin divides its term. "micro_batch_mean": with
    model_accepts_loss_kwargs=False the Trainer divides every micro-batch's loss (task + term) by 2."""
    lam = 3.0
    model = finegates_model(target_sparsity=0.4, sparsity_lambda=lam, init_weights=False, gate_noise_std=0.0)
    reference = copy.deepcopy(model)
    data = _Rows()
    grads = GradsBeforeStep()
    trainer = with_finegates(Trainer)(
        model=model, args=training_args(tmp_path, max_steps=1, per_device_train_batch_size=1,
                                        gradient_accumulation_steps=2, learning_rate=1e-3),
        train_dataset=data, callbacks=[grads],
    )
    if normalisation == "micro_batch_mean":
        trainer.model_accepts_loss_kwargs = False
    else:
        assert trainer.model_accepts_loss_kwargs
    trainer.train()
    assert float(hand_sparsity_loss(reference, 0.4).detach()) == pytest.approx(
        float(reference.base_model.sparsity_loss().detach()), rel=1e-6
    )

    names, g_task, g_sparse = _hand_gradients(reference, [data[0], data[1]], normalisation)
    got = grads.grads[1]
    assert sorted(got) == sorted(names)
    expected = {n: g_task[n] + lam * g_sparse[n] for n in names}
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7)
    # the comparison tells the right scale from the wrong ones
    for wrong in (0.5, 2.0):
        diff = max(float((got[n] - g_task[n] - wrong * lam * g_sparse[n]).abs().max()) for n in names)
        assert diff > 1e-4


def _trl_sparsity_gradients(trainer_cls, args_cls, rows, tmp_path, lam):
    """The gate-logit gradients of one optimizer step (GA 2) under a TRL trainer, and lambda * dL_s by hand. The gates
    start on the clamp's flat top (init_weights=True, noise 0): the SFT / DPO loss gives them exactly zero
    gradient, so the whole gradient is the sparsity term's."""
    config = FineGatesConfig(target_sparsity=0.4, sparsity_lambda=lam, gate_noise_std=0.0, seed=0)
    cls, callbacks = attach_companions(trainer_cls, config)
    grads = GradsBeforeStep()
    args = args_cls(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=1,
                    gradient_accumulation_steps=2, learning_rate=1e-3, max_length=14, use_cpu=True, report_to=[],
                    save_strategy="no", logging_steps=1, weight_decay=0.0, dataloader_num_workers=0, seed=0,
                    disable_tqdm=True, max_grad_norm=0.0, bf16=False, fp16=False, gradient_checkpointing=False)
    trainer = cls(model=MODELS["llama"].make(0), args=args, train_dataset=Dataset.from_list(rows),
                  processing_class=make_tokenizer(), peft_config=config, callbacks=[*callbacks, grads])
    model = trainer.model
    reference = {n: p.detach().clone().requires_grad_(True) for n, p in gate_logits(model).items()}
    trainer.train()
    holder = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in gate_logits(holder).items():
            p.copy_(reference[n])
    params = gate_logits(holder)
    hand = torch.autograd.grad(lam * hand_sparsity_loss(holder, 0.4), list(params.values()))
    return trainer, grads.grads[1], dict(zip(params, hand))


@pytest.mark.parametrize("which", ["sft", "dpo"])
def test_trl_gradient_accumulation_counts_the_sparsity_term_once(tmp_path, which):
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    sft = (SFTTrainer, SFTConfig, SFT_ROWS)
    trainer_cls, args_cls, rows = sft if which == "sft" else (DPOTrainer, DPOConfig, DPO_ROWS)
    trainer, got, hand = _trl_sparsity_gradients(trainer_cls, args_cls, rows, tmp_path, lam=5.0)
    assert sorted(got) == sorted(hand)
    for n in hand:
        torch.testing.assert_close(got[n], hand[n], rtol=1e-5, atol=1e-9)
    assert max(float(h.abs().max()) for h in hand.values()) > 1e-4
    if which == "dpo":
        assert trainer.loss_is_scaled_for_ga is False  # TRL 1.16: the Trainer divides DPO's loss (and our term)


# ------------------------------------------------------------------------------------------ evaluation, errors
def test_evaluation_loss_is_the_task_loss(tmp_path):
    model = finegates_model(target_sparsity=0.4, sparsity_lambda=50.0, init_weights=False)
    args = training_args(tmp_path, per_device_eval_batch_size=4)
    with_gates = with_finegates(Trainer)(model=model, args=args, eval_dataset=TokenDataset(n=4))
    plain = Trainer(model=model, args=args, eval_dataset=TokenDataset(n=4))
    assert with_gates.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)


def test_no_finegates_adapter_is_a_clear_error(tmp_path):
    lora = get_peft_model(MODELS["llama"].make(0), LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match="no FineGates adapter.*FineGatesConfig"):
        with_finegates(Trainer)(model=lora, args=training_args(tmp_path), train_dataset=TokenDataset(n=4))
    cls, _ = attach_companions(Trainer, FineGatesConfig())
    with pytest.raises(ValueError, match="no FineGates adapter.*get_peft_model"):
        cls(model=MODELS["llama"].make(0), args=training_args(tmp_path), train_dataset=TokenDataset(n=4))
