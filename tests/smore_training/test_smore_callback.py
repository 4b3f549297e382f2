"""SmoreCallback under transformers' Trainer: the logged auxiliary loss, expert load and router entropy, the
starving-expert warning, the auxiliary gradient's weight under gradient accumulation, and attach_companions."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from peft_ext import SmoreConfig
from peft_ext.testing.models import MODELS, TokenDataset
from peft_ext.training import SmoreCallback, attach_companions
from peft_ext.training.smore_balance import find_smore_model

SMALL = dict(
    target_modules=["up_proj", "down_proj"], num_experts=[4, 4], num_active=[2, 2], expert_ranks=[2, 2],
    router_dim=8, router_down_dim=8, seed=0,
)
MODULES = [f"model.layers.{i}.mlp.{p}:default" for i in (0, 1) for p in ("up_proj", "down_proj")]
# random keys in (0, 1) route very unevenly at init: the starving warning fires in most runs; tests that check it
# record warnings themselves
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*starving experts:UserWarning"),
    pytest.mark.usefixtures("one_thread"),  # one_thread: tests/conftest.py
]

LOAD_KEYS = {"smore/load_min/l0", "smore/load_max/l0", "smore/load_min/l1", "smore/load_max/l1"}



def smore_model(**overrides):
    return get_peft_model(MODELS["llama"].make(0), SmoreConfig(**{**SMALL, **overrides}))


def training_args(tmp_path, **overrides):
    args = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, learning_rate=1e-3, weight_decay=0.0,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    return TrainingArguments(**{**args, **overrides})


def train(model, tmp_path, data=None, callbacks=None, **overrides):
    callbacks = [SmoreCallback()] if callbacks is None else callbacks
    trainer = Trainer(model=model, args=training_args(tmp_path, **overrides), train_dataset=data or TokenDataset(n=8),
                      callbacks=callbacks)
    trainer.train()
    return trainer


def step_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def starving_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "starving experts" in str(w.message)]


# ------------------------------------------------------------------------------------------ logging
class _SeenLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_logs_aux_loss_load_and_entropy(tmp_path):
    seen = _SeenLogs()
    trainer = train(smore_model(), tmp_path, callbacks=[SmoreCallback(), seen])
    logs = step_logs(trainer)
    assert [h["step"] for h in logs] == [1, 2]
    assert [{k: v for k, v in h.items() if k != "step"} for h in logs] == [h for h in seen.logs if "loss" in h]
    for h in logs:
        assert h["smore/aux_loss"] > 0
        assert LOAD_KEYS <= set(h)
        for l in (0, 1):
            assert 0.0 <= h[f"smore/load_min/l{l}"] <= 0.25 <= h[f"smore/load_max/l{l}"] <= 1.0
        assert 0.0 < h["smore/router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
        assert "smore/starving_experts" in h
    # the run's summary and only the training logs get the keys
    assert not any(k.startswith("smore/") for k in trainer.state.log_history[-1])


def test_logged_values_are_the_models_statistics(tmp_path):
    """One step, GA 1: the logged values are smore_stats() of that step's forward, reduced as documented."""
    model = smore_model()
    seen = {}

    class Snapshot(TrainerCallback):  # runs after SmoreCallback's on_step_end, before the optimizer of step 2
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                stats = find_smore_model(model).smore_stats()
                seen.update(aux=stats["aux_loss"], layers={k: [dict(e) for e in v] for k, v in stats["layers"].items()})

    trainer = train(model, tmp_path, callbacks=[SmoreCallback(), Snapshot()], max_steps=1)
    (log,) = step_logs(trainer)
    assert sorted(seen["layers"]) == sorted(MODULES)
    assert log["smore/aux_loss"] == pytest.approx(seen["aux"], rel=1e-6)
    for l in (0, 1):
        loads = [e["load"] for v in seen["layers"].values() for e in v if e["layer"] == l]
        assert log[f"smore/load_min/l{l}"] == pytest.approx(sum(float(x.min()) for x in loads) / len(loads), abs=1e-6)
        assert log[f"smore/load_max/l{l}"] == pytest.approx(sum(float(x.max()) for x in loads) / len(loads), abs=1e-6)
    entropies = [float(e["entropy"]) for v in seen["layers"].values() for e in v]
    assert log["smore/router_entropy"] == pytest.approx(sum(entropies) / len(entropies), rel=1e-6)


def test_trainer_loss_includes_the_aux_loss(tmp_path):
    """add_to_loss under Trainer: the logged loss of step 1 (same weights) is the LM loss plus the summed aux."""
    with_aux = step_logs(train(smore_model(balance_loss_weight=0.1), tmp_path, max_steps=1))[0]
    without = step_logs(train(smore_model(balance_loss_weight=0.1, aux_loss_mode="none"), tmp_path, max_steps=1))[0]
    assert with_aux["loss"] - without["loss"] == pytest.approx(with_aux["smore/aux_loss"], rel=1e-4)


@pytest.mark.parametrize("overrides", [dict(aux_loss_mode="none"), dict(gate_type="dense")], ids=["no_aux", "dense"])
def test_load_is_logged_without_an_aux_loss(tmp_path, overrides):
    logs = step_logs(train(smore_model(**overrides), tmp_path, max_steps=1))
    assert LOAD_KEYS <= set(logs[0]) and "smore/router_entropy" in logs[0]


# ------------------------------------------------------------------------------------------ starving experts
def _starve(model, layer: int, expert: int) -> None:
    """Expert `expert` of S'MoRE layer `layer` never wins in any module: the router MLP's output gets a constant
    coordinate 0 of 50, and the expert's key -50 there (the other keys are in (0, 1))."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("smore_router.default"):
                p = module._parameters
                p[f"mlp_out_{layer}_weight"][0].zero_()
                p[f"mlp_out_{layer}_bias"][0] = 50.0
                p[f"keys_{layer}"][expert, 0] = -50.0


def test_starving_expert_is_warned_once_per_module_and_layer(tmp_path):
    model = smore_model()
    _starve(model, layer=1, expert=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = train(model, tmp_path, max_steps=3)
    messages = starving_warnings(record)
    assert len(messages) >= 1
    text = " ".join(messages)
    for module in MODULES:
        assert text.count(f"{module} S'MoRE layer 1 (threshold 0.062): ") == 1  # once per (module, layer) per run
        group = text.split(f"{module} S'MoRE layer 1 (threshold 0.062): ")[1].split(";")[0]
        assert "expert 3 share 0.000" in group
    assert "balance_loss_weight" in messages[0]
    logs = step_logs(trainer)
    assert all(h["smore/starving_experts"] >= len(MODULES) for h in logs)
    assert all(h["smore/load_min/l1"] == 0.0 for h in logs)


def test_balanced_routing_is_not_warned(tmp_path):
    """Every parent picks every child (num_active = num_experts): each expert gets exactly 1/s of the picks."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = train(smore_model(num_experts=[2, 2], num_active=[2, 2]), tmp_path)
    assert starving_warnings(record) == []
    for h in step_logs(trainer):
        assert h["smore/starving_experts"] == 0
        assert h["smore/load_min/l0"] == h["smore/load_max/l0"] == pytest.approx(0.5)


def test_does_nothing_without_smore_adapters(tmp_path):
    lora = get_peft_model(MODELS["llama"].make(0), LoraConfig(r=2, target_modules=["up_proj"]))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = train(lora, tmp_path, max_steps=1)
        plain = train(MODELS["llama"].make(0), tmp_path, max_steps=1)
    assert starving_warnings(record) == []
    for t in (trainer, plain):
        assert step_logs(t) and not any(k.startswith("smore/") for h in t.state.log_history for k in h)
    assert find_smore_model(lora) is None and find_smore_model(MODELS["llama"].make(0)) is None


def test_finds_the_smore_model_through_wrappers():
    model = smore_model()
    tuner = model.base_model

    class Wrapped(torch.nn.Module):  # accelerate / DDP keep the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert find_smore_model(model) is tuner
    assert find_smore_model(tuner) is tuner
    assert find_smore_model(Wrapped(Wrapped(model))) is tuner
    assert find_smore_model(None) is None


# ------------------------------------------------------------------------------------------ accumulation scale
class _Rows(torch.utils.data.Dataset):
    """Padded rows of different lengths (labels -100 on the padding): micro-batches hold unequal label counts."""

    def __init__(self, lengths, seq: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for n in lengths:
            mask = (torch.arange(seq) < n).long()
            ids = torch.randint(4, 64, (seq,), generator=g) * mask
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class _RouterGrads(TrainerCallback):
    """The routers' accumulated gradient, just before the optimizer step."""

    def __init__(self):
        self.grad = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grad = _router_vector(model, grad=True)


def _router_vector(model, grad=False):
    out = []
    for n, p in model.named_parameters():
        if "smore_router" in n:
            t = p.grad if grad else p
            out.append(torch.zeros_like(p).flatten() if t is None else t.detach().flatten().clone())
    return torch.cat(out)


def _step_router_grad(tmp_path, mode, ga, data, record=None, callbacks=None):
    """One Trainer step (max_grad_norm 0: no clipping); the routers' gradient and the micro-batches it saw."""
    model = smore_model(aux_loss_mode=mode, balance_loss_weight=1.0)
    tuner = model.base_model
    if record is not None:
        def keep(module, args, kwargs):
            batch = {k: kwargs[k] for k in ("input_ids", "attention_mask", "labels")}
            record.append({**batch, "num_items_in_batch": kwargs.get("num_items_in_batch"),
                           "scale": tuner.smore_run.inject_scale})
        tuner.model.register_forward_pre_hook(keep, with_kwargs=True)
    grads = _RouterGrads()
    callbacks = [SmoreCallback()] if callbacks is None else callbacks
    train(model, tmp_path, data=data, callbacks=[*callbacks, grads], max_steps=1, gradient_accumulation_steps=ga,
          per_device_train_batch_size=4 // ga, max_grad_norm=0.0)
    return grads.grad, tuner


def _aux_grad_alone(batch) -> torch.Tensor:
    """The routers' gradient of one micro-batch's summed aux loss, weight 1: add_to_loss minus none, same weights."""
    out = []
    for mode in ("add_to_loss", "none"):
        model = smore_model(aux_loss_mode=mode, balance_loss_weight=1.0).train()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        model(**inputs).loss.backward()
        out.append(_router_vector(model, grad=True))
    return out[0] - out[1]


def test_aux_gradient_under_gradient_accumulation(tmp_path):
    """add_to_loss with GA 2: each micro-batch's aux is weighted by its share of the label tokens (the trainer's
    num_items_in_batch), so the step's aux gradient is sum_i share_i grad aux_i; with the same data in one batch
    (GA 1) it is grad aux(full batch): not the same function (the switch loss is not linear in the batch), measured
    within 2 % here."""
    data = _Rows([10, 4, 7, 9])
    seen = []
    ga2 = _step_router_grad(tmp_path, "add_to_loss", 2, data, record=seen)[0]
    ga2 = ga2 - _step_router_grad(tmp_path, "none", 2, data)[0]
    ga1 = _step_router_grad(tmp_path, "add_to_loss", 1, data)[0] - _step_router_grad(tmp_path, "none", 1, data)[0]
    assert ga2.abs().sum() > 0
    assert len(seen) == 2
    counts = [int(b["labels"][..., 1:].ne(-100).sum()) for b in seen]
    assert counts[0] != counts[1]  # unequal shares
    assert all(int(b["num_items_in_batch"]) == sum(counts) for b in seen)
    expected = sum((c / sum(counts)) * _aux_grad_alone(b) for c, b in zip(counts, seen))
    torch.testing.assert_close(ga2, expected, rtol=1e-4, atol=1e-7)
    assert (ga2 - ga1).norm() / ga1.norm() < 0.02


def test_inject_scale_is_one_over_accumulation_steps(tmp_path):
    """inject with GA 2: the callback sets the injected gradient's weight to 1/2 for the run (restored after), so
    the step's aux gradient is the mean of the micro-batches' aux gradients; without the callback it is their sum."""
    data = _Rows([10, 4, 7, 9])
    seen = []
    injected, tuner = _step_router_grad(tmp_path, "inject", 2, data, record=seen)
    lm_only = _step_router_grad(tmp_path, "none", 2, data)[0]
    assert [b["scale"] for b in seen] == [0.5, 0.5]
    assert tuner.smore_run.inject_scale == 1.0
    per_batch = [_aux_grad_alone(b) for b in seen]
    torch.testing.assert_close(injected - lm_only, 0.5 * (per_batch[0] + per_batch[1]), rtol=1e-4, atol=1e-7)
    unscaled = _step_router_grad(tmp_path, "inject", 2, data, callbacks=[])[0]
    torch.testing.assert_close(unscaled - lm_only, per_batch[0] + per_batch[1], rtol=1e-4, atol=1e-7)


def test_fp16_scale_follows_the_loss_scaler(tmp_path):
    """fp16: the injected aux gradient is weighted by the GradScaler's scale / GA at every step (so that unscaling
    leaves 1/GA of it), read from accelerate's optimizer wrapper (`.scaler`); without a scaler in reach it warns."""
    from types import SimpleNamespace

    state, control = TrainerState(), TrainerControl()
    model = smore_model(aux_loss_mode="inject")
    callback = SmoreCallback()
    args = training_args(tmp_path, fp16=True, gradient_accumulation_steps=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = SimpleNamespace(scaler=scaler)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    assert not [w for w in record if "fp16" in str(w.message)]
    assert model.base_model.smore_run.inject_scale == 1024.0 / 4
    scaler.scale(torch.ones(()))
    scaler.update(new_scale=256.0)  # the scaler backs off after an overflow: the next step follows it
    callback.on_step_begin(args, state, control, model=model, optimizer=optimizer)
    assert model.base_model.smore_run.inject_scale == 256.0 / 4
    callback.on_train_end(args, state, control, model=model)
    assert model.base_model.smore_run.inject_scale == 1.0
    # no scaler in reach: a warning that names the way out, and the plain 1/GA
    callback = SmoreCallback()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        callback.on_train_begin(args, state, control, model=model, optimizer=SimpleNamespace())
    fp16 = [str(w.message) for w in record if "fp16" in str(w.message)]
    assert len(fp16) == 1 and "bf16" in fp16[0], fp16
    assert model.base_model.smore_run.inject_scale == 0.25


def test_an_unscaled_injection_warns_once_without_the_callback():
    """aux_loss_mode="inject" (or a loss built from the logits) with no SmoreCallback: the injected weight is 1 per
    forward whatever the accumulation: one warning naming the callback; none once the callback has set the scale."""
    model = smore_model(aux_loss_mode="inject").train()
    batch = MODELS["llama"].batch_with_labels()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(**batch)
        model(**batch)
    hits = [str(w.message) for w in record if "SmoreCallback" in str(w.message)]
    assert len(hits) == 1 and "accumulation" in hits[0], hits
    other = smore_model(aux_loss_mode="inject").train()
    other.base_model.set_aux_inject_scale(0.5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        other(**batch)
    assert not [w for w in record if "SmoreCallback" in str(w.message)]


# ------------------------------------------------------------------------------------------ companions
def test_attach_companions_attaches_the_callback(tmp_path):
    config = SmoreConfig(**SMALL)
    trainer_cls, callbacks = attach_companions(Trainer, config)
    assert trainer_cls is Trainer
    assert len(callbacks) == 1 and type(callbacks[0]) is SmoreCallback
    model = get_peft_model(MODELS["llama"].make(0), config)
    assert isinstance(model, PeftModel)
    trainer = train(model, tmp_path, callbacks=callbacks, max_steps=1)
    assert step_logs(trainer)[0]["smore/aux_loss"] > 0
