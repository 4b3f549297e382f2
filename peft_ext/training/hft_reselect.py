"""HFT's continual-learning schedule: a new random half is trained at each stage (or epoch)."""

from __future__ import annotations

import json
import os
import weakref

import torch
from transformers import TrainerCallback

from peft_ext.tuners.hft import HftConfig, HftModel

from .optimizer_params import editable, swap_optimizer_params

_ADAPTER_CONFIG = "adapter_config.json"


class HftReselectCallback(TrainerCallback):
    """Re-draws the selection of every HFT adapter of the model, as its config's `reselect` says.

    - reselect="stage": at the start of each `trainer.train()` whose adapter already finished a run (continual
      learning: one run per task; the paper's setting). Works across processes: the count of finished runs is
      saved in adapter_config.json (`trained_stages`).
    - reselect="epoch": at the start of every epoch after the first (not again when a run resumes mid-epoch).
    - reselect="never": nothing.
    What earlier stages trained stays in the model (frozen); the optimizer drops the old half and takes the new, in
    the Trainer's own groups (weight decay, then none for norms and biases: `swap_optimizer_params`).

    Resuming: pass the callback to the Trainer (`callbacks=[...]`), then `trainer.train(resume_from_checkpoint=...)`
    continues a run after any number of stages exactly, in a new model built from the same HftConfig: when the
    Trainer loads the checkpoint, the adapter is first brought to the checkpoint's stage (`HftModel.load_selection`,
    from its adapter_config.json), and the optimizer checkpoint matches the one the Trainer builds for it.

    A re-selection needs the optimizer the Trainer passes to the callback's events; without one, or with one whose
    parameters cannot change (DeepSpeed's), it raises a ValueError that gives the fix, before anything is re-drawn.

    Several processes (DDP, e.g. `torchrun`): the Trainer wraps the model in DDP before the callback's events, and DDP
    all-reduces only the gradients of the parameters that required grad when it was built, so the callback takes the
    new half into the gradient averaging itself (`_DdpGradSync`: a gradient hook on each newly trainable copy that DDP
    does not reduce, which all-reduces and averages it during backward, before the Trainer clips the gradients), and
    broadcasts the new copies' values from rank 0. The draw itself is seeded (seed + stage), the same on every rank.
    Under FSDP a re-selection raises a ValueError that gives the fix (FSDP flattens and shards the parameters it was
    built with; it cannot take new trainable ones mid-run). So does, at the start of training, a re-selecting adapter
    under DDP with `ddp_find_unused_parameters=False`: the previous half, frozen by the re-selection, gets no gradient,
    which such a DDP fails on at the next step (the Trainer's default for a PeftModel searches, and works).

        trainer = SFTTrainer(model, ..., peft_config=HftConfig(), callbacks=[HftReselectCallback()])
    """

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _restore_stage_on_load(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        adapters = _hft_adapters(model)
        if optimizer is not None:  # a run that will re-draw where it cannot: refused before its first step
            for _, name, config in adapters:
                if config.reselect == "epoch" and _epochs(args, state) > 1:
                    _check_can_redraw(model, name, optimizer, "in this run (reselect='epoch', more than one epoch)")
        if adapters and _world_size() > 1:
            _check_unused_parameter_search(args, state, adapters)
            _DdpGradSync.of(adapters[0][0]).run_begins(model, optimizer)
        for tuner, name, config in adapters:
            if config.reselect == "stage" and config.trained_stages > config.stage:
                _reselect(model, tuner, name, optimizer, lr_scheduler, "at the start of a new trainer.train()")

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if state.epoch is None or int(round(state.epoch)) == 0 or abs(state.epoch - round(state.epoch)) > 1e-6:
            return  # the first epoch, or a run resumed mid-epoch (the checkpoint holds this epoch's selection)
        for tuner, name, config in _hft_adapters(model):
            if config.reselect == "epoch":
                _reselect(model, tuner, name, optimizer, lr_scheduler, f"at the start of epoch {int(round(state.epoch))}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for _, _, config in _hft_adapters(model):
            config.trained_stages += 1


def _check_unused_parameter_search(args, state, adapters) -> None:
    """Raise, before the first step, for a run that will re-draw under DDP without the unused-parameter search."""
    if getattr(args, "ddp_find_unused_parameters", None) is not False:
        return
    epochs = _epochs(args, state)
    due = [
        (name, config.reselect)
        for _, name, config in adapters
        if (config.reselect == "stage" and config.trained_stages > config.stage)
        or (config.reselect == "epoch" and epochs > 1)
    ]
    if due:
        raise ValueError(
            f"HftReselectCallback: HFT adapter {due[0][0]!r} re-selects its trained half in this run (reselect="
            f"{due[0][1]!r}) under DDP built with ddp_find_unused_parameters=False: the previous half, "
            f"frozen by the re-selection, would get no gradient, and DDP fails the next step (\"Expected to have "
            f"finished reduction in the prior iteration\"). Leave ddp_find_unused_parameters unset (the Trainer's "
            f"default for a PEFT model) or True, or use reselect='never'. Nothing was re-drawn."
        )


def _epochs(args, state) -> float:
    """The run's number of epochs (the Trainer sets state.num_train_epochs before on_train_begin)."""
    return getattr(state, "num_train_epochs", None) or getattr(args, "num_train_epochs", 1) or 1


def _hft_adapters(model):
    """(tuner, adapter name, config) for every active HFT adapter of a PeftModel (or tuner) `model`."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, HftModel):
        return []
    return [(tuner, n, tuner.peft_config[n]) for n in tuner.active_adapters if isinstance(tuner.peft_config.get(n), HftConfig)]


def _reselect(model, tuner, name, optimizer, lr_scheduler, when):
    if optimizer is None:
        raise ValueError(
            f"HftReselectCallback: HFT adapter {name!r} is due for a new selection {when}, but the callback got no "
            f"optimizer to hand the new half to, which would never be trained. Use the callback in a Trainer (it "
            f"passes optimizer= and lr_scheduler= to every event), or re-draw yourself and update your optimizer: "
            f"`added, removed = model.base_model.reselect({name!r}); peft_ext.training.swap_optimizer_params("
            f"optimizer, added, removed, lr_scheduler, model=model)`. Nothing was re-drawn."
        )
    _check_can_redraw(model, name, optimizer, when)
    added, removed = tuner.reselect(name)
    swap_optimizer_params(optimizer, added, removed, lr_scheduler, model=model)
    if _world_size() > 1:
        _DdpGradSync.of(tuner).take(model, added)


def _check_can_redraw(model, name, optimizer, when) -> None:
    """A ValueError with the fix where a re-draw cannot hand the new half to the optimizer or the sharding."""
    if not editable(optimizer):
        raise ValueError(
            f"HftReselectCallback: HFT adapter {name!r} is due for a new selection {when}, but the callback cannot add "
            f"the new half's parameters to {type(optimizer).__name__} (not a torch optimizer it can edit, e.g. "
            f"DeepSpeed's, which keeps its own copies of the parameters it was built with), so they would never be "
            f"trained. Use reselect='stage' and draw each stage before its trainer builds the optimizer: "
            f"`model.base_model.reselect({name!r})`, then a new Trainer for the next task (the callback sees the "
            f"stage already drawn). Nothing was re-drawn."
        )
    if _fsdp_wrapped(model):
        raise ValueError(
            f"HftReselectCallback: HFT adapter {name!r} is due for a new selection {when}, but the model is sharded "
            f"with FSDP, which flattens and shards the parameters it was wrapped with and cannot take newly trainable "
            f"copies mid-run (they would be neither sharded nor reduced across ranks). Use reselect='never' under "
            f"FSDP, or one stage per run: reselect='stage', and draw each stage before its Trainer wraps the model "
            f"(`model.base_model.reselect({name!r})`, then a new Trainer for the next task: the callback sees the stage "
            f"already drawn). Nothing was re-drawn."
        )


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _fsdp_wrapped(model) -> bool:
    """Whether `model` is (or holds) an FSDP (1 or 2) module, or has DTensor parameters (sharded at load time)."""
    if not torch.distributed.is_available():
        return False
    kinds = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kinds.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule

        kinds.append(FSDPModule)
    except ImportError:
        pass
    if kinds and any(isinstance(m, tuple(kinds)) for m in model.modules()):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


class _DdpGradSync:
    """Gradient averaging across ranks for the HFT copies a re-selection made trainable after DDP was built.

    DDP's Reducer takes the parameters that require grad when DDP is constructed (the Trainer does it before
    `on_train_begin`), and no others. At each run's start (`run_begins`), the parameters that require grad then are
    the ones the run's DDP reduces: a new Trainer (a new optimizer) wraps the model anew; the same Trainer again (the
    same optimizer) keeps its DDP wrapper, and with it the set of its first run. Each copy a re-selection makes
    trainable (`take`) gets a gradient hook, which, while the copy is not one DDP reduces, all-reduces the gradient
    on the default process group and divides it by the world size: during backward, like DDP, so that gradient
    clipping, the logged norm and the optimizer step see the averaged gradient (an all-reduce at `on_pre_optimizer_step`
    would come after the Trainer clipped each rank's own gradient, with a different factor per rank). Every rank
    runs the same backward graph, so the hooks' all-reduces come in the same order. Under gradient accumulation the
    hook averages every micro-batch's gradient (DDP skips the all-reduce under `no_sync`): the same sum, more traffic.
    The new copies' values are broadcast from rank 0 (they are copies of weights DDP synced, but the noise of
    `init_weights=False` draws from each process's own state).

    Kept on the HFT tuner (`tuner.__dict__`); a deep copy or a pickle of the model gets a fresh, empty one.
    """

    _KEY = "_hft_ddp_grad_sync"

    def __init__(self):
        self.reduced_by_ddp: set[int] = set()  # ids of the parameters the current DDP wrapper reduces
        self.hooked: set[int] = set()
        self._optimizer = None  # weakref to the torch optimizer of the run that built the wrapper

    @classmethod
    def of(cls, tuner) -> "_DdpGradSync":
        sync = tuner.__dict__.get(cls._KEY)
        if not isinstance(sync, cls):
            sync = tuner.__dict__[cls._KEY] = cls()
        return sync

    def __deepcopy__(self, memo):
        return type(self)()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def run_begins(self, model, optimizer) -> None:
        inner = _inner_optimizer(optimizer)
        if inner is not None and self._optimizer is not None and self._optimizer() is inner:
            return  # the same Trainer again: it kept its DDP wrapper, built in an earlier run
        self.reduced_by_ddp = {id(p) for p in model.parameters() if p.requires_grad}
        self._optimizer = weakref.ref(inner) if inner is not None else None

    def take(self, model, added) -> None:
        added_ids = {id(p) for p in added}
        params = [p for p in model.parameters() if id(p) in added_ids]  # the model's order: the same on every rank
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)
        for p in params:
            if id(p) not in self.hooked:
                p.register_hook(self._hook(id(p)))
                self.hooked.add(id(p))

    def _hook(self, param_id: int):
        sync = weakref.ref(self)

        def average_across_ranks(grad):
            owner = sync()
            if owner is None or param_id in owner.reduced_by_ddp or _world_size() <= 1:
                return grad
            grad = grad.clone()
            torch.distributed.all_reduce(grad)
            return grad.div_(torch.distributed.get_world_size())

        return average_across_ranks


def _inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (wrapped once per `trainer.train()`)."""
    inner, seen = optimizer, set()
    while getattr(inner, "optimizer", None) is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.optimizer
    return inner


def _restore_stage_on_load(model) -> None:
    """Make `model.load_adapter(folder, name)` (what a Trainer calls to resume from a checkpoint) first bring an
    existing HFT adapter to the stage saved in the folder's adapter_config.json, so that its weights load."""
    if not isinstance(getattr(model, "base_model", None), HftModel) or "load_adapter" in vars(model):
        return
    model.load_adapter = _LoadAdapterAtSavedStage(model)


class _LoadAdapterAtSavedStage:
    """`load_adapter` of one PeftModel (an instance attribute in front of PeftModel.load_adapter; an object rather than
    a bound method, so that the model still deep-copies and pickles)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, model_id, adapter_name, is_trainable=False, *args, **kwargs):
        model = self.model
        config = model.peft_config.get(adapter_name)
        subfolder = kwargs.get("subfolder")
        folder = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
        config_file = os.path.join(folder, _ADAPTER_CONFIG)
        if isinstance(config, HftConfig) and os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                peft_type = json.load(f).get("peft_type")
            if peft_type == "HFT":
                saved = HftConfig.from_pretrained(str(model_id), subfolder=subfolder)
                tuner = model.base_model
                copies = [p for _, m in tuner.hft_layers(adapter_name) for p in m.hft_weight[adapter_name].values()]
                trainable = is_trainable or any(p.requires_grad for p in copies)
                tuner.load_selection(adapter_name, saved, trainable=trainable)
        return type(model).load_adapter(model, model_id, adapter_name, is_trainable, *args, **kwargs)
