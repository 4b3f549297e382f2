"""What the contract suite needs to know about a method: one `MethodEntry` per method (or config variant).

The entry says how to build the method's config for a tiny model, which parameter count its spec promises, which
modules train, and, for each contract item the method cannot support by its nature, the documented error the tests
assert instead (`documented_errors`).

Contract item keys used in `documented_errors` (optionally suffixed with ":<model kind>", e.g. "unload:gpt2"):
    "identity_init"   output at init equals the base        "train"          one optimisation step
    "save"            save_pretrained / from_pretrained     "low_level_api"  inject_adapter_in_model + state dicts
    "merge"           merge_and_unload, merge/unmerge       "safe_merge"     safe_merge=True detects NaN
    "unload"          unload() gives the exact base         "disable"        disable_adapter() gives the base
    "multi_adapter"   add / switch / delete named adapters  "mixed_batch"    adapter_names= per row
    "bf16", "fp16"    a model in that dtype                 "autocast"       CPU bf16 autocast
    "gradient_checkpointing"                                "compile"        torch.compile
    "trl_sft", "trl_dpo"                                    TRL trainers with peft_config=
    "several_active"  set_adapter([a, b]) runs what merging both writes
    "ddp", "fsdp"     2 processes (gloo) under DDP / FSDP2's fully_shard equal one process on the same global batch
    "fsdp1"           the same under FSDP1 (FullyShardedDataParallel, use_orig_params=True)

An entry for a method whose pruned model cannot be unloaded to the base, say:

    FINEGATES_ENTRY = MethodEntry(
        name="finegates", peft_type="FINEGATES", config_cls=FineGatesConfig, prefix="gates_",
        make_config=lambda kind, **o: FineGatesConfig(**{"task_type": MODELS[kind].task_type, **o}),
        expected_trainable=..., trained_modules=lambda config: ...,
        bad_configs=(BadConfig("rank_zero", {"r": 0}, ValueError, r"\\br\\b"),),
        documented_errors={"unload": DocumentedError(ValueError, r"pruned", "a pruned model has no base to return")},
    )

docs/contract_suite.md describes every field and how a test module selects the entries the suite runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from peft import PeftConfig
from torch import nn

from .models import MODEL_KINDS

# the keys of MethodEntry.documented_errors (each optionally suffixed with ":<model kind>")
CONTRACT_ITEMS = (
    "identity_init", "train", "save", "low_level_api", "merge", "safe_merge", "unload", "disable", "multi_adapter",
    "mixed_batch", "bf16", "fp16", "autocast", "gradient_checkpointing", "compile", "trl_sft", "trl_dpo",
    "several_active", "ddp", "fsdp", "fsdp1",
)  # fmt: skip


@dataclass(frozen=True)
class DocumentedError:
    """The error a method raises, by design, for a contract item it does not support."""

    error: type[BaseException]
    match: str  # regex searched in the message
    why: str = ""


@dataclass(frozen=True)
class BadConfig:
    """A config value out of range: building the config (when="config") or the model (when="inject") must fail."""

    id: str
    overrides: dict
    error: type[BaseException]
    match: str
    when: str = "config"

    def __post_init__(self):
        if self.when not in ("config", "inject"):
            raise ValueError(f"BadConfig {self.id!r}: when must be 'config' or 'inject', not {self.when!r}")


@dataclass(frozen=True)
class MethodEntry:
    name: str  # lower-case method name; the model card must mention it; the test ids start with it
    peft_type: str  # "HFT": what adapter_config.json stores
    config_cls: type[PeftConfig]
    prefix: str  # every adapter parameter's name contains "." + prefix
    # make_config(model_kind, **overrides) -> a fresh config for a MODELS[model_kind] model (task_type set)
    make_config: Callable[..., PeftConfig]
    # expected_trainable(base_model, injected_config) -> the count the method's spec promises (the base model is
    # an unwrapped copy of the model the adapter was injected into; the config is the one after injection)
    expected_trainable: Callable[[nn.Module, PeftConfig], int]
    # trained_modules(injected_config) -> full names (as in the base model) of the modules whose adapter
    # parameters train; modules_to_save copies are handled by the tests
    trained_modules: Callable[[PeftConfig], list[str]]
    # overrides that give a non-identity adapter (two adapters built with different seeds then differ)
    nonidentity_overrides: dict = field(default_factory=dict)
    # overrides that set the method's seed (None if the method draws nothing)
    seed_overrides: Callable[[int], dict] = lambda seed: {}
    bad_configs: tuple[BadConfig, ...] = ()
    # a config that leaves nothing to train on a 2-layer model (None if the method has no such case)
    nothing_trainable: Optional[BadConfig] = None
    # method-specific structural checks run by contract item 1: check_structure(model_kind, base, injected_config)
    check_structure: Optional[Callable[[str, nn.Module, PeftConfig], None]] = None
    card_terms: tuple[str, ...] = ("peft-ext",)
    init_atol: float = 0.0  # identity_init: 0.0 = bit-identical to the base
    # AdamW steps after which every trainable tensor has moved (test_one_step_changes_only_adapter): 1 for most
    # methods; 2 where a zero-initialised output factor blocks the first step's gradient to zero-initialised
    # tensors beneath it (weight decay moves the non-zero ones), e.g. S'MoRE's biases under P = 0
    train_steps: int = 1
    # config overrides for the distributed item (2 processes under DDP / FSDP2 vs one process on the same global
    # batch) that switch off what makes a replica's step differ from the whole batch's by design: a loss over batch
    # statistics (S'MoRE's load-balance loss is per replica), noise drawn per row. Noise drawn per parameter (FineGates'
    # gate noise) needs nothing: every rank and the single process draw it from the same seed
    distributed_overrides: dict = field(default_factory=dict)
    documented_errors: dict[str, DocumentedError] = field(default_factory=dict)

    def __post_init__(self):
        for key, doc in self.documented_errors.items():
            item, sep, kind = key.partition(":")
            if item not in CONTRACT_ITEMS or (sep and kind not in MODEL_KINDS):
                raise ValueError(
                    f"MethodEntry {self.name!r}: documented_errors key {key!r} is not a contract item "
                    f"({', '.join(CONTRACT_ITEMS)}), optionally suffixed with ':<model kind>' ({', '.join(MODEL_KINDS)})"
                )
            if not isinstance(doc, DocumentedError):
                raise TypeError(f"MethodEntry {self.name!r}: documented_errors[{key!r}] must be a DocumentedError")
        ids = [bad.id for bad in self.bad_configs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"MethodEntry {self.name!r}: bad_configs ids repeat: {ids}")

    def documented_error(self, item: str, model_kind: Optional[str] = None) -> Optional[DocumentedError]:
        if model_kind is not None and f"{item}:{model_kind}" in self.documented_errors:
            return self.documented_errors[f"{item}:{model_kind}"]
        return self.documented_errors.get(item)

    def supports(self, item: str, model_kind: Optional[str] = None) -> bool:
        return self.documented_error(item, model_kind) is None

    @property
    def supports_mixed_batch(self) -> bool:
        return self.supports("mixed_batch")

    @property
    def trainable(self) -> bool:
        return self.supports("train")

    def __str__(self) -> str:
        return self.name


def variant(entry: MethodEntry, label: str, **fixed) -> MethodEntry:
    """The same method with some config fields fixed (another strategy, say), named "<name>[<label>]": listed in
    PEFT_EXT_CONTRACT_VARIANTS, it runs the per-model contract items."""
    make = entry.make_config
    return replace(entry, name=f"{entry.name}[{label}]", make_config=lambda kind, **o: make(kind, **{**fixed, **o}))


# ------------------------------------------------------------------------------------------------- helpers
def floating_numel(module: nn.Module, recurse: bool) -> int:
    return sum(p.numel() for p in module.parameters(recurse=recurse) if p.is_floating_point())


def modules_to_save_names(base: nn.Module, modules_to_save) -> list[str]:
    """Full names of the base model's modules matched by `modules_to_save` (PEFT matches by name suffix)."""
    names = []
    for target in modules_to_save or ():
        names += [n for n, _ in base.named_modules() if n == target or n.endswith("." + target)]
    return sorted(set(names))


def modules_to_save_numel(base: nn.Module, modules_to_save) -> int:
    return sum(floating_numel(base.get_submodule(n), recurse=True) for n in modules_to_save_names(base, modules_to_save))
