"""The registry of methods the contract suite runs: one `MethodEntry` per peft-ext method.

A new method joins the suite by appending one entry to `METHODS`. The entry says how to build the method's config
for a tiny model, which parameter count its spec promises, which modules train, and, for each contract item the
method cannot support by its nature, the documented error the tests assert instead (`documented_errors`).

Contract item keys used in `documented_errors` (optionally suffixed with ":<model kind>", e.g. "unload:gpt2"):
    "identity_init"   output at init equals the base        "train"          one optimisation step
    "save"            save_pretrained / from_pretrained     "low_level_api"  inject_adapter_in_model + state dicts
    "merge"           merge_and_unload, merge/unmerge       "safe_merge"     safe_merge=True detects NaN
    "unload"          unload() gives the exact base         "disable"        disable_adapter() gives the base
    "multi_adapter"   add / switch / delete named adapters  "mixed_batch"    adapter_names= per row
    "bf16", "fp16"    a model in that dtype                 "autocast"       CPU bf16 autocast
    "gradient_checkpointing"                                "compile"        torch.compile
    "trl_sft", "trl_dpo"                                    TRL trainers with peft_config=

Adding a method, e.g. FineGates, whose pruned model cannot be unloaded to the base:

    FINEGATES_ENTRY = MethodEntry(
        name="finegates", peft_type="FINEGATES", config_cls=peft_ext.FineGatesConfig, prefix="gates_",
        make_config=lambda kind, **o: peft_ext.FineGatesConfig(**{"task_type": MODELS[kind].task_type, **o}),
        expected_trainable=..., trained_modules=lambda config: ...,
        bad_configs=(BadConfig("rank_zero", {"r": 0}, ValueError, r"\br\b"),),
        documented_errors={"unload": DocumentedError(ValueError, r"pruned", "a pruned model has no base to return")},
    )
    METHODS = [HFT_ENTRY, FINEGATES_ENTRY]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from peft import PeftConfig
from torch import nn

import peft_ext

from .models import MODELS


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


@dataclass(frozen=True)
class MethodEntry:
    name: str  # lower-case method name; the model card must mention it
    peft_type: str  # "HFT"
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
    documented_errors: dict[str, DocumentedError] = field(default_factory=dict)

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


# --------------------------------------------------------------------------------------------------- HFT
def _hft_config(model_kind: str, **overrides) -> PeftConfig:
    kwargs = {"task_type": MODELS[model_kind].task_type}
    kwargs.update(overrides)
    return peft_ext.HftConfig(**kwargs)


def _hft_expected_trainable(base: nn.Module, config) -> int:
    """HFT spec, strategy "matrix": every floating parameter (weight and bias) of each selected module, plus the
    modules_to_save copies. Strategy "param": of every selected module, `ratio` of its output rows (rounded half
    up, at least one) of each floating parameter."""
    total = modules_to_save_numel(base, config.modules_to_save)
    for name in config.selected_modules:
        module = base.get_submodule(name)
        if config.strategy != "param":
            total += floating_numel(module, recurse=False)
            continue
        conv1d = type(module).__name__ == "Conv1D"  # GPT-2's Conv1D stores its weight as (in, out)
        n_out = module.weight.shape[1 if conv1d else 0]
        rows = min(n_out, max(1, int(config.ratio * n_out + 0.5)))
        for pname, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                row_dim = 1 if (conv1d and pname == "weight") else 0
                total += p.numel() // p.shape[row_dim] * rows
    return total


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


_BLOCK = re.compile(r"\.(?:layers|h|layer)\.(\d+)\.")


def _role(name: str, module: nn.Module) -> Optional[str]:
    last = name.split(".")[-1]
    if "Norm" in type(module).__name__ or last.startswith("ln_"):
        return "norm"
    if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
        return None
    return "attention" if ("attn" in name or "attention" in name) else "mlp"


def _hft_check_structure(model_kind: str, base: nn.Module, config) -> None:
    """The "matrix" strategy: per block and role, `ratio` of the group; odd groups alternate across blocks, so
    that the running total per role is round_half_up(ratio * members so far). Names are classified here on
    their own (not with peft_ext's selection code)."""
    if config.strategy not in ("matrix", "param"):
        return
    groups: dict[tuple[str, int], list[str]] = {}
    for name, module in base.named_modules():
        role = _role(name, module)
        match = _BLOCK.search("." + name + ".")
        if role is None:
            continue
        if match is None:  # outside the blocks: only a block-less model (the MLP) draws from its linear layers
            if role == "norm" or any(_BLOCK.search("." + n + ".") for n, _ in base.named_modules()):
                continue
            block = -1
        else:
            block = int(match.group(1))
        if role != "norm" or config.train_norms:
            groups.setdefault((role, block), []).append(name)
    selected = set(config.selected_modules)
    pool = {n for names in groups.values() for n in names}
    assert selected <= pool, f"selected modules outside the pool: {sorted(selected - pool)[:5]}"
    if config.strategy == "param":  # every module of the pool trains some of its rows
        assert selected == pool, sorted(pool - selected)[:5]
        return
    per_role: dict[str, list[int]] = {}
    for role in sorted({r for r, _ in groups}):
        blocks = sorted(b for r, b in groups if r == role)
        seen = taken = 0
        for b in blocks:
            members = groups[(role, b)]
            seen += len(members)
            want = min(len(members), _round_half_up(config.ratio * seen) - taken)
            got = len(selected & set(members))
            assert got == want, f"{model_kind}: block {b} {role}: selected {got} of {len(members)}, expected {want}"
            taken += got
            per_role.setdefault(role, []).append(got)
    if model_kind == "llama" and config.ratio == 0.5:  # the spec's worked example: 2 of q/k/v/o, 2,1 of gate/up/down
        assert per_role == {"attention": [2, 2], "mlp": [2, 1], "norm": [1, 1]}, per_role


HFT_ENTRY = MethodEntry(
    name="hft",
    peft_type="HFT",
    config_cls=peft_ext.HftConfig,
    prefix="hft_",
    make_config=_hft_config,
    expected_trainable=_hft_expected_trainable,
    trained_modules=lambda config: list(config.selected_modules),
    nonidentity_overrides={"init_weights": False},
    seed_overrides=lambda seed: {"seed": seed},
    bad_configs=(
        BadConfig("ratio_zero", {"ratio": 0}, ValueError, r"ratio"),
        BadConfig("ratio_too_big", {"ratio": 1.5}, ValueError, r"ratio"),
        BadConfig("ratio_negative", {"ratio": -0.5}, ValueError, r"ratio"),
        BadConfig("strategy_unknown", {"strategy": "rows"}, ValueError, r"strategy"),
        BadConfig("explicit_without_modules", {"strategy": "explicit"}, ValueError, r"selected_modules"),
    ),
    nothing_trainable=BadConfig(
        "nothing_trainable", {"target_modules": ["q_proj"], "ratio": 0.1}, ValueError, r"selects nothing", "inject"
    ),
    check_structure=_hft_check_structure,
    card_terms=("hft", "peft-ext"),
    init_atol=0.0,
    documented_errors={},
)


# -------------------------------------------------------------------------------------------------- COLA
def _cola_config(model_kind: str, **overrides) -> PeftConfig:
    kwargs = {
        "task_type": MODELS[model_kind].task_type,
        "r": 4,
        "lora_alpha": 8,
        "target_modules": "all-linear",
        "chain_length": 3,
    }
    kwargs.update(overrides)
    return peft_ext.ColaConfig(**kwargs)


def _in_out(module: nn.Module) -> tuple[int, int]:
    if type(module).__name__ == "Conv1D":  # GPT-2's Conv1D stores its weight as (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _cola_expected_trainable(base: nn.Module, config) -> int:
    """COLA spec: only the link being trained trains, a LoRA of that link's rank r_k on each targeted module:
    r_k * (in + out) per module (the merged links are frozen factors), plus the modules_to_save copies."""
    total = modules_to_save_numel(base, config.modules_to_save)
    for name in config.target_modules:
        n_in, n_out = _in_out(base.get_submodule(name))
        rank = config.link_ranks[config.current_link] if config.link_ranks else config.r
        total += rank * (n_in + n_out)
    return total


COLA_ENTRY = MethodEntry(
    name="cola",
    peft_type="COLA",
    config_cls=peft_ext.ColaConfig,
    prefix="lora_",
    make_config=_cola_config,
    expected_trainable=_cola_expected_trainable,
    trained_modules=lambda config: list(config.target_modules),  # "all-linear", expanded to full names on injection
    nonidentity_overrides={"init_lora_weights": False},
    seed_overrides=lambda seed: {"seed": seed},
    bad_configs=(
        BadConfig("rank_zero", {"r": 0}, ValueError, r"\br\b"),
        BadConfig("chain_length_zero", {"chain_length": 0}, ValueError, r"chain_length"),
        BadConfig("steps_per_link_length", {"steps_per_link": [10, 10]}, ValueError, r"steps_per_link"),
        BadConfig("steps_per_link_zero", {"steps_per_link": 0}, ValueError, r"steps_per_link"),
        BadConfig("merge_every_past_end", {"merge_every": 0.6}, ValueError, r"merge_every"),
        BadConfig("two_schedules", {"steps_per_link": 5, "merge_every": 0.2}, ValueError, r"not both"),
        BadConfig("link_ranks_length", {"link_ranks": [4]}, ValueError, r"link_ranks"),
        BadConfig("dora", {"use_dora": True}, ValueError, r"use_dora"),
        BadConfig("pissa_init", {"init_lora_weights": "pissa"}, ValueError, r"init_lora_weights"),
        BadConfig("rank_larger_than_layer", {"r": 64}, ValueError, r"larger than", "inject"),
    ),
    nothing_trainable=BadConfig(
        "nothing_trainable", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, ValueError, r"matches no", "inject"
    ),
    card_terms=("cola", "peft-ext"),
    init_atol=0.0,
    documented_errors={},
)


# ---------------------------------------------------------------------------------------------- DELTACOME
def _deltacome_config(model_kind: str, **overrides) -> PeftConfig:
    # the tiny models' layers are too small to compress (the MLP's last layer is 20 x 4): at budget 1 an 8-bit and a
    # 4-bit band fit everywhere; group 16 gives several groups per singular vector
    kwargs = {"task_type": MODELS[model_kind].task_type, "budget": 1.0, "bands": [[1, 8], [None, 4]], "group_size": 16}
    kwargs.update(overrides)
    return peft_ext.DeltaComeConfig(**kwargs)


_INFERENCE_ONLY = DocumentedError(
    RuntimeError, r"inference.*compress", "a compressed delta is made by compressing a fine-tune, not trained"
)

DELTACOME_ENTRY = MethodEntry(
    name="deltacome",
    peft_type="DELTACOME",
    config_cls=peft_ext.DeltaComeConfig,
    prefix="deltacome_",
    make_config=_deltacome_config,
    # buffers only: nothing of the delta trains (PEFT still adds a classifier head to modules_to_save for SEQ_CLS)
    expected_trainable=lambda base, config: modules_to_save_numel(base, config.modules_to_save),
    trained_modules=lambda config: [],
    nonidentity_overrides={"init_weights": False},
    seed_overrides=lambda seed: {"seed": seed},
    bad_configs=(
        BadConfig("method_unknown", {"method": "gptq"}, ValueError, r"method"),
        BadConfig("budget_zero", {"budget": 0}, ValueError, r"budget"),
        BadConfig("budget_text", {"budget": "a sixteenth"}, ValueError, r"budget"),
        BadConfig("bitdelta_below_1_16", {"method": "bitdelta", "budget": 1 / 32}, ValueError, r"1/16"),
        BadConfig("bits_too_wide", {"bands": [[4, 9]]}, ValueError, r"bits"),
        BadConfig("two_fill_bands", {"bands": [[None, 3], [None, 2]]}, ValueError, r"fill"),
        BadConfig("group_size_zero", {"group_size": 0}, ValueError, r"group_size"),
        BadConfig("budget_too_small_for_bands", {"budget": 0.01, "bands": [[8, 8], [None, 2]]}, ValueError, r"raise budget", "inject"),
    ),
    nothing_trainable=BadConfig(
        "matches_nothing", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, ValueError, r"matches no", "inject"
    ),
    card_terms=("deltacome", "peft-ext"),
    init_atol=0.0,
    documented_errors={
        item: _INFERENCE_ONLY for item in ("train", "trl_sft", "trl_dpo", "gradient_checkpointing")
    },
)


def variant(entry: MethodEntry, label: str, **fixed) -> MethodEntry:
    """The same method with some config fields fixed (another strategy, say): runs the per-model contract items."""
    make = entry.make_config
    return replace(entry, name=f"{entry.name}[{label}]", make_config=lambda kind, **o: make(kind, **{**fixed, **o}))


# One entry per method: the whole suite (per-model items, TRL, bad inputs, compile) runs on each.
METHODS: list[MethodEntry] = [HFT_ENTRY, COLA_ENTRY, DELTACOME_ENTRY]
# Config variants of a method: the per-model items (1 to 6, without compile) run on each as well.
VARIANTS: list[MethodEntry] = [
    variant(HFT_ENTRY, "param", strategy="param"),
    variant(DELTACOME_ENTRY, "lowrank", method="lowrank"),
    variant(DELTACOME_ENTRY, "bitdelta", method="bitdelta"),
]
