"""YAML recipes: one file names the model, the data, the method, the TRL trainer and its arguments.

    model: smollm2-135m-instruct     # or tiny-llama (tests), a local folder, a Hub id
    data: fictional-facts            # a built-in dataset (peft_ext.data.tasks) or a .json/.jsonl file
    method:                          # any PEFT method, built through PEFT's own registry; omit for full FT
      peft_type: HFT
      ratio: 0.5
    trainer: sft                     # sft | dpo
    trainer_args:                    # passed to trl.SFTConfig / trl.DPOConfig
      max_steps: 30
      learning_rate: 1e-4
    output_dir: outputs/hft_sft      # the trained adapter (or full model) is saved here
    adapter: null                    # optional: a saved adapter to train further (a new stage), instead of `method`
    pruned_dir: outputs/pruned       # optional, FineGates: after training also cut what the gates closed and save
                                     # the smaller plain model there (merge_and_unload(prune=True) + save_pruned)
    imports: [my_methods]            # optional: packages to import first (a method of your own that registers
                                     # itself with peft_ext.register_method; installed ones with a "peft_ext.methods"
                                     # entry point register on their own)
    resume_from_checkpoint: true     # optional: go on from the latest checkpoint-N in output_dir (true) or a given
                                     # checkpoint folder (checkpoints: trainer_args save_strategy/save_steps)
    recompute_adapter_inputs: true   # optional: adapter layers rebuild their inputs in the backward instead of
                                     # saving them (less memory, same gradients; docs/memory.md)

Run it with `peft-ext train RECIPE.yaml [--set trainer_args.max_steps=2 ...]`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import peft_ext  # noqa: F401  (registers peft-ext's methods with PEFT)
from peft_ext.data import load_model, load_training_data
from peft_ext.overrides import apply_overrides, config_from_dict, import_packages, load_yaml
from peft_ext.trainer_defaults import device_defaults, quiet_defaults
from peft_ext.tuners.recompute import recompute_adapter_inputs
from peft_ext.training import attach_companions

TRAINERS = {"sft": (SFTTrainer, SFTConfig), "dpo": (DPOTrainer, DPOConfig)}
IMPORT_FIX = ": give the import name of the package that registers your method, installed or on PYTHONPATH."


@dataclass
class Recipe:
    model: str
    data: str
    method: dict | None = None
    trainer: str = "sft"
    trainer_args: dict = field(default_factory=dict)
    output_dir: str = "outputs/recipe"
    adapter: str | None = None
    imports: list = field(default_factory=list)
    pruned_dir: str | None = None
    resume_from_checkpoint: bool | str | None = None
    recompute_adapter_inputs: bool = False

    def __post_init__(self):
        for key in ("save_strategy", "eval_strategy", "logging_strategy"):
            if self.trainer_args.get(key) is False:  # YAML reads `no` as false
                self.trainer_args[key] = "no"
        self.imports = import_packages(self.imports, "recipe imports", IMPORT_FIX)
        if self.trainer not in TRAINERS:
            raise ValueError(f"recipe trainer must be one of {sorted(TRAINERS)}, got {self.trainer!r}")
        if self.method is not None and self.adapter is not None:
            raise ValueError("a recipe gives either `method` (a new adapter) or `adapter` (train a saved one), not both")
        if self.pruned_dir is not None:
            peft_type = str((self.method or {}).get("peft_type", "")).upper()
            if self.adapter is None and peft_type != "FINEGATES":
                raise ValueError(
                    f"recipe pruned_dir={self.pruned_dir!r} needs a FineGates method (method: {{peft_type: FINEGATES, "
                    f"...}}): it saves the model pruned by the gates. Remove pruned_dir for method {peft_type or None}."
                )
        if isinstance(self.resume_from_checkpoint, str) and not (Path(self.resume_from_checkpoint) / "trainer_state.json").is_file():
            raise ValueError(
                f"recipe resume_from_checkpoint={self.resume_from_checkpoint!r} is not a Trainer checkpoint folder (no "
                f"trainer_state.json): give a checkpoint folder (output_dir/checkpoint-N), or true for the latest one "
                f"in output_dir"
            )
        if self.resume_from_checkpoint is True and not list(Path(self.output_dir).glob("checkpoint-*")):
            raise ValueError(
                f"recipe resume_from_checkpoint=true, but output_dir {self.output_dir!r} holds no checkpoint-N folder: "
                f"save checkpoints with trainer_args save_strategy: steps and save_steps, or remove resume_from_checkpoint"
            )
        if not isinstance(self.recompute_adapter_inputs, bool):
            raise ValueError(f"recipe recompute_adapter_inputs must be true or false, got {self.recompute_adapter_inputs!r}")
        if self.recompute_adapter_inputs and self.method is None and self.adapter is None:
            raise ValueError(
                "recipe recompute_adapter_inputs=true needs adapter layers to hook: give a `method` (or an `adapter`), "
                "or remove recompute_adapter_inputs for full fine-tuning"
            )
        if self.recompute_adapter_inputs and self.trainer_args.get("gradient_checkpointing") is True:
            # the device defaults (peft_ext.trainer_defaults) set gradient_checkpointing False under trainer_args:
            # only an explicit true gets here; the trainer would turn it on inside train(), after the option is set
            raise ValueError(
                "recipe recompute_adapter_inputs=true and trainer_args gradient_checkpointing=true: under gradient "
                "checkpointing the adapter layers step aside (a checkpointed block saves only its input), so the "
                "option would do nothing. Remove trainer_args.gradient_checkpointing (or set it false) to use "
                "recompute_adapter_inputs, or remove recompute_adapter_inputs to keep gradient checkpointing"
            )
        if self.method is not None and "peft_type" not in self.method:
            raise ValueError("recipe `method` needs a peft_type, e.g. {peft_type: HFT, ratio: 0.5} or {peft_type: LORA, r: 8}")

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | None = None) -> "Recipe":
        data = apply_overrides(load_yaml(path), overrides)
        return config_from_dict(cls, data, where=f"{path}: ", kind="recipe ", required=("model", "data"))


def build_peft_config(method: dict) -> PeftConfig:
    """{peft_type: ..., **fields} -> that method's config class, looked up in PEFT's registry (LORA, HFT, ...)."""
    fields = dict(method)
    peft_type = str(fields.pop("peft_type")).upper()
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if config_cls is None:
        known = ", ".join(sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise ValueError(
            f"unknown peft_type {peft_type!r}; PEFT knows: {known}. A method of your own registers when its package is "
            f"imported: list it under `imports:` in the recipe (or `peft-ext train --import PACKAGE`)."
        )
    fields.setdefault("task_type", "CAUSAL_LM")
    try:
        return config_cls(**fields)
    except TypeError as error:  # an unknown field: name the method, not the dataclass internals
        raise ValueError(f"method {peft_type}: {error}") from None


def build_trainer(recipe: Recipe, train_dataset=None):
    """The TRL trainer of `recipe`, with the model, data, method and callbacks in place (not yet trained).

    `train_dataset`: a datasets.Dataset to train on instead of loading `recipe.data` (peft-ext compare loads its own)."""
    model, tokenizer = load_model(recipe.model)
    torch.manual_seed(recipe.trainer_args.get("seed", 42))  # a new adapter's random init, before TRL seeds
    peft_config = None
    if recipe.adapter is not None:
        model = PeftModel.from_pretrained(model, recipe.adapter, is_trainable=True)
        adapter_config = model.peft_config[model.active_adapter]
    elif recipe.method is not None:
        peft_config = adapter_config = build_peft_config(recipe.method)
    else:
        adapter_config = None
    trainer_cls, args_cls = TRAINERS[recipe.trainer]
    # what the method declares it needs over the run (HFT's re-selection, COLA's chain, ...)
    trainer_cls, callbacks = attach_companions(trainer_cls, adapter_config)
    args = args_cls(output_dir=recipe.output_dir, **{**device_defaults(), **quiet_defaults(), **recipe.trainer_args})
    extra = {}
    if recipe.trainer == "dpo" and adapter_config is None:
        # full-FT DPO needs a frozen reference copy; TRL would re-download it from the model's name
        extra["ref_model"] = load_model(recipe.model)[0]
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=load_training_data(recipe.data) if train_dataset is None else train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks or None,
        **extra,
    )
    if recipe.recompute_adapter_inputs:  # after the trainer wrapped the model: its adapter layers exist now
        recompute_adapter_inputs(trainer.model)
    return trainer


def run_recipe(recipe: Recipe):
    """Train, then save the adapter (or, without a method, the full model) and the tokenizer to output_dir.

    Distributed (`torchrun` / `accelerate launch`, see docs/distributed.md): every rank trains; only the main process
    writes the files and prints, the others wait for it at a barrier. Under FSDP the full state dict is gathered by
    every rank (a collective) before the main process saves it."""
    trainer = build_trainer(recipe)
    _check_launch(trainer)
    if recipe.pruned_dir is not None and trainer.is_fsdp_enabled:
        raise ValueError(
            "recipe pruned_dir is not supported under FSDP (the pruned model is cut from the whole, unsharded model): "
            "train with DDP or one process, or prune the saved adapter afterwards in one process"
        )
    trainer.train(resume_from_checkpoint=recipe.resume_from_checkpoint or None)
    output_dir = Path(recipe.output_dir)
    main = trainer.is_world_process_zero()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        # under FSDP every rank joins the gather; otherwise the main process's own tensors are the adapter
        state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
        empty = False
        if main:
            model.save_pretrained(output_dir, state_dict=state_dict)
            empty = _empty_adapter_file(output_dir, model)
        if trainer.accelerator.num_processes > 1:  # every rank raises, none waits for the others at the barrier
            flags = trainer.accelerator.gather(torch.tensor([int(empty)], device=trainer.accelerator.device))
            empty = bool(flags.any())
        if empty:
            raise ValueError(EMPTY_ADAPTER.format(path=output_dir / "adapter_model.safetensors"))
        what = "adapter"
    else:
        trainer.save_model(str(output_dir))  # every rank: Trainer gathers under FSDP and writes from the main process
        what = "model"
    if main:
        trainer.processing_class.save_pretrained(output_dir)
        print(f"Saved the trained {what} to {output_dir.resolve()}")
        if recipe.pruned_dir is not None:
            save_pruned_model(trainer, Path(recipe.pruned_dir))
    trainer.accelerator.wait_for_everyone()  # no rank returns (or exits) before the files are written
    return trainer


def save_pruned_model(trainer, pruned_dir: Path) -> None:
    """FineGates: the trained model with what its gates closed cut out, saved with its shape manifest (load it with
    peft_ext.load_pruned), and the size report printed."""
    from peft_ext.tuners.finegates import FineGatesModel, save_pruned

    model = trainer.model
    if not (isinstance(model, PeftModel) and isinstance(model.base_model, FineGatesModel)):
        raise ValueError(
            f"recipe pruned_dir: the trained model is not a FineGates model ({type(getattr(model, 'base_model', model)).__name__}): "
            f"remove pruned_dir, or train a FineGates adapter."
        )
    model.eval()
    pruned = model.merge_and_unload(prune=True)
    report = pruned.finegates_prune_report
    save_pruned(pruned, pruned_dir, report)
    trainer.processing_class.save_pretrained(pruned_dir)
    print(report.table() if hasattr(report, "table") else report)
    print(f"Saved the pruned model to {pruned_dir.resolve()} (load it with peft_ext.load_pruned)")


EMPTY_ADAPTER = (
    "the adapter saved to {path} held no tensor, although the model trained some (the file was removed): under FSDP1 "
    "(accelerate's fsdp_version 1, the Trainer's `fsdp` argument) PEFT's save_pretrained finds no tensor of the "
    "layers inside wrapped units, for PEFT's own methods such as LoRA. Use FSDP2 (recipes/accelerate/fsdp2.yaml, "
    "fsdp_version: 2; docs/distributed.md), or DDP."
)


def _empty_adapter_file(output_dir: Path, model) -> bool:
    """Whether save_pretrained wrote an adapter file without tensors for a model that trained some (then removed):
    PEFT 0.21's `save_pretrained(state_dict=...)` selects a method's entries by module name and, under FSDP1 with
    per-layer units (`_fsdp_wrapped_module.` inside the names), selects none for PEFT's own methods such as LoRA
    (peft-ext's methods handle it, see PeftExtTuner._get_adapter_state_dict)."""
    from safetensors import safe_open

    path = output_dir / "adapter_model.safetensors"
    if not path.is_file() or not any(p.requires_grad for p in model.parameters()):
        return False
    with safe_open(str(path), framework="pt") as f:
        if list(f.keys()):
            return False
    path.unlink()
    return True


def _check_launch(trainer) -> None:
    """Before training: a multi-process launch whose trainer does not see the processes (`use_cpu: false` on a
    machine without GPUs under torchrun: every rank would train alone on its own data and save) is refused; an
    accelerate FSDP config that accelerate did not apply (on CPU it runs MULTI_CPU, i.e. DDP) is said."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and trainer.accelerator.num_processes == 1:
        raise ValueError(
            f"this run was launched as {world} processes, but the trainer sees one (trainer_args use_cpu="
            f"{trainer.args.use_cpu!r} on a {'GPU' if torch.cuda.is_available() else 'CPU-only'} machine): each "
            f"rank would train alone on its own data and write the same output_dir. On a machine without GPUs leave "
            f"use_cpu unset (peft-ext sets it) or true; on GPUs, launch one process per GPU."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        warnings.warn(
            f"the accelerate config asks for FSDP, but accelerate runs this launch as "
            f"{trainer.accelerator.distributed_type.value} (it applies FSDP to GPU process groups only): the model is "
            f"not sharded; each process holds all of it (DDP).",
            stacklevel=2,
        )
