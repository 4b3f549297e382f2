"""What a comparison runs: one model, one training set, one scorer, several methods under the same budget.

    model: smollm2-135m-instruct       # a local folder, a Hub id, "smollm2-135m-instruct" (offline) or "tiny-llama"
    train_data: {path: train.jsonl}    # SFT (text | messages | prompt+completion) or preference (prompt+chosen+rejected)
    eval_data: {path: test.jsonl}      # see peft_ext/compare/data.py for every form of a data spec
    scorer: exact_match                # exact_match | multiple_choice | loss
    forgetting:                        # old-ability probes, scored before and after: the change is the forgetting
      - {name: english, data: {builtin: english-heldout, limit: 48}, scorer: loss}
    methods:                           # each: peft_type (a registered method, LORA or FULL) and its config fields
      - {peft_type: HFT, ratio: 0.5}
      - {peft_type: LORA, r: 8, learning_rate: 5e-4}
      - full                           # a bare name: that method with its defaults
    max_steps: 30                      # the budget every method gets
    per_device_train_batch_size: 8
    gradient_accumulation_steps: 1     # global batch = per-device batch x processes x accumulation
    max_length: 64
    seeds: [0, 1, 2]
    output_dir: outputs/compare

`builtin_default()` is the built-in comparison (`peft-ext compare` with no file; today's demo: HFT vs full
fine-tuning vs LoRA teaching SmolLM2 48 fictional facts; recipes/compare_default.yaml spells it out).
`CompareConfig()` holds the values a file's missing keys take: the built-in comparison's, except `forgetting`, which
is the English-text loss alone (builtin_default() adds the world-knowledge probes, which are SmolLM2's: see
BUILTIN_FORGETTING).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from peft_ext.data import SMOLLM2
from peft_ext.overrides import apply_overrides, config_from_dict, import_packages, load_yaml
from peft_ext.recipe import IMPORT_FIX

FULL = "FULL"  # full fine-tuning: no adapter, every weight trains
ENGLISH_PROBE = {"name": "english", "data": {"builtin": "english-heldout", "limit": 48}, "scorer": "loss"}
KNOWLEDGE_PROBE = {"name": "world_knowledge", "data": "world-knowledge-probes", "scorer": "multiple_choice"}
BUILTIN_FORGETTING = [ENGLISH_PROBE, KNOWLEDGE_PROBE]
# Learning rates for SFT when the file gives none. Methods that train base weights take the full fine-tuning rate
# (HFT: as the paper); adapters that start at zero take 10x (LoRA's convention; the demo measured 1e-3 for LoRA
# on its task). DPO takes 1/20 of these (recipes/hft_dpo.yaml: 5e-6 for HFT). Always better: your own sweep.
WEIGHT_RATE, ADAPTER_RATE, DPO_FACTOR = 1e-4, 1e-3, 0.05
WEIGHT_METHODS = (FULL, "HFT")
SHORT_NAMES = {"full": FULL, "fft": FULL, "full_ft": FULL}
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}  # the demo's LoRA
BUDGET_KEYS = ("max_steps", "per_device_train_batch_size", "max_length", "lr_scheduler_type", "warmup_steps",
               "learning_rate", "seed", "gradient_accumulation_steps", "num_train_epochs")
NOT_TRAINABLE = {"DELTACOME": "Delta-CoMe adapters are made by compressing a full fine-tune (`peft-ext compress`), "
                              "not trained: compare `full`, then compress its result"}


def _default_methods() -> list:
    return ["hft", "full", "lora"]


@dataclass
class MethodSpec:
    """One method of the comparison: its label, peft type, config fields and learning rate."""

    name: str
    peft_type: str
    fields: dict
    learning_rate: float

    @property
    def is_full(self) -> bool:
        return self.peft_type == FULL

    def method_dict(self, seed: int) -> dict | None:
        """The recipe's `method` ({peft_type, **fields}; None for full fine-tuning) for a run of `seed`."""
        if self.is_full:
            return None
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        fields = dict(self.fields)
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[self.peft_type]
        if "seed" in {f.name for f in dataclasses.fields(config_cls)}:
            fields.setdefault("seed", seed)  # a method's own random draw (HFT's selection) follows the run's seed
        return {"peft_type": self.peft_type, **fields}


@dataclass
class CompareConfig:
    model: str = SMOLLM2
    train_data: object = "fictional-facts"
    eval_data: object = "fictional-facts-probes"
    scorer: str = "multiple_choice"
    forgetting: list = field(default_factory=lambda: [dict(ENGLISH_PROBE)])
    methods: list = field(default_factory=_default_methods)
    max_steps: int = 30
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1  # the same for every method; global batch = per-device x processes x this
    max_length: int = 64
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = 3
    seeds: list = field(default_factory=lambda: [0])
    trainer_args: dict = field(default_factory=dict)  # more TRL arguments, the same for every method
    eval_max_length: int = 128  # tokens per evaluation text (loss scorers)
    max_new_tokens: int | None = None  # exact_match generation length (default: longest reference + 4)
    latency: bool = True  # time inference, adapter unmerged and merged
    latency_batch: int = 8
    save_adapters: bool = True  # keep each run's adapter under output_dir/runs/ (its size is measured either way)
    output_dir: str = "outputs/compare"
    imports: list = field(default_factory=list)  # packages that register methods of your own

    def __post_init__(self):
        self.imports = import_packages(self.imports, "compare imports", IMPORT_FIX)
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                     "eval_max_length", "latency_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"compare {name} must be a positive integer, got {value!r}")
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"compare seeds must be a non-empty list of integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"compare seeds repeat a seed: {self.seeds}")
        clash = sorted(set(self.trainer_args) & set(BUDGET_KEYS))
        if clash:
            raise ValueError(
                f"compare trainer_args sets {clash}: the budget is shared by every method, set it at the top level "
                f"(max_steps, per_device_train_batch_size, gradient_accumulation_steps, max_length, ...; seeds; a "
                f"method's learning_rate in its entry)"
            )
        check_scorer_name(self.scorer, "scorer")
        if not isinstance(self.forgetting, list):
            raise ValueError("compare forgetting must be a list of probes ({name, data, scorer}), or [] for none")
        self.forgetting = [self._probe(p, i) for i, p in enumerate(self.forgetting)]

    @staticmethod
    def _probe(probe, index: int) -> dict:
        field_name = f"forgetting[{index}]"
        if isinstance(probe, str):
            probe = {"data": probe}
        if not isinstance(probe, dict) or "data" not in probe:
            raise ValueError(f"{field_name} must be {{name, data, scorer}} (scorer optional), got {probe!r}")
        unknown = sorted(set(probe) - {"name", "data", "scorer"})
        if unknown:
            raise ValueError(f"{field_name}: unknown key(s) {unknown}; known keys: ['data', 'name', 'scorer']")
        data = probe["data"]
        if probe.get("scorer") is not None:
            check_scorer_name(probe["scorer"], f"{field_name}.scorer")
        return {"name": str(probe.get("name") or probe_name(data, index)), "data": data, "scorer": probe.get("scorer")}

    def method_specs(self, trainer: str = "sft") -> list[MethodSpec]:
        """Every method with its peft type checked (unknown names list the registered ones), its config fields
        built by the method's own config class and its budget checked (e.g. a COLA chain longer than max_steps)."""
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError("compare methods must be a non-empty list, e.g. [hft, full, lora]")
        specs = [self._method(entry, i, trainer) for i, entry in enumerate(self.methods)]
        names = [s.name for s in specs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"compare methods: the name(s) {repeated} repeat; give each entry its own `name:`")
        return specs

    def _method(self, entry, index: int, trainer: str) -> MethodSpec:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        from peft_ext.recipe import build_peft_config
        from peft_ext.registry import registered_methods

        where = f"methods[{index}]"
        entry = {"peft_type": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "peft_type" not in entry:
            raise ValueError(f"compare {where} must be a method name or {{peft_type: ..., fields...}}, got {entry!r}")
        fields = dict(entry)
        raw = str(fields.pop("peft_type"))
        peft_type = SHORT_NAMES.get(raw.lower(), raw.upper())
        name = str(fields.pop("name", None) or raw.lower())
        rate = fields.pop("learning_rate", None)
        known = sorted(set(registered_methods()) - set(NOT_TRAINABLE))
        if peft_type in NOT_TRAINABLE:
            raise ValueError(f"compare {where} ({name}): {peft_type} cannot be compared by training: {NOT_TRAINABLE[peft_type]}")
        if peft_type != FULL and peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise ValueError(
                f"compare {where}: unknown method {raw!r}. Registered peft-ext methods: {', '.join(known)}; also LORA "
                f"(PEFT's LoRA, or any other PEFT type) and FULL (full fine-tuning). "
                + "".join(f"Not listed: {n} ({why}). " for n, why in NOT_TRAINABLE.items())
                + "A method of your own registers when its package is imported: list it under `imports:`."
            )
        if peft_type == FULL and fields:
            raise ValueError(f"compare {where} ({name}): full fine-tuning takes no config fields, got {sorted(fields)}")
        if peft_type == "LORA" and not fields:
            fields = dict(LORA_DEFAULTS)
        if rate is None:
            rate = WEIGHT_RATE if peft_type in WEIGHT_METHODS else ADAPTER_RATE
            rate *= DPO_FACTOR if trainer == "dpo" else 1.0
        try:
            rate = float(rate)
        except (TypeError, ValueError):
            raise ValueError(f"compare {where} ({name}): learning_rate must be a number, got {rate!r}") from None
        spec = MethodSpec(name, peft_type, fields, rate)
        if not spec.is_full:
            try:
                config = build_peft_config(spec.method_dict(self.seeds[0]))
            except (ValueError, TypeError) as error:
                raise ValueError(f"compare {where} ({name}): {error}") from None
            if hasattr(config, "boundaries_for"):  # a schedule over the run's steps (COLA's chain)
                try:
                    config.boundaries_for(self.max_steps)
                except ValueError as error:
                    raise ValueError(
                        f"compare {where} ({name}) cannot meet the shared budget of max_steps={self.max_steps}: {error}"
                    ) from None
        return spec

    def fingerprint(self, *parts) -> str:
        """A hash of everything that decides a run's results (what a rerun compares to skip finished runs)."""
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict) -> "CompareConfig":
        return config_from_dict(cls, data, kind="compare ")

    @classmethod
    def from_yaml(cls, path: str | None = None, overrides: list[str] | None = None) -> "CompareConfig":
        """The file at `path` (missing keys: the defaults), or without a file the built-in default; then overrides."""
        data = load_yaml(path) if path else builtin_default_dict()
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a compare file is a YAML mapping (model:, train_data:, methods:, ...)")
        return cls.from_dict(apply_overrides(data, overrides))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: list[str] | None) -> "CompareConfig":
        """This config with `--set KEY=VALUE` overrides applied (checked as a file's keys are)."""
        return CompareConfig.from_dict(apply_overrides(self.to_dict(), overrides)) if overrides else self


def check_scorer_name(name, field_name: str) -> None:
    from peft_ext.compare.scoring import SCORERS

    if name not in SCORERS:
        raise ValueError(f"compare {field_name}: unknown scorer {name!r}; choose one of {sorted(SCORERS)}")


def probe_name(data, index: int) -> str:
    """A short default name for a forgetting probe: a built-in set's name, a file's stem, a dataset id's last part."""
    if isinstance(data, dict):
        sources = [(k, str(data[k])) for k in ("builtin", "path", "dataset") if data.get(k) is not None]
        if not sources:
            return f"probe{index}"  # a spec without a source fails when it is loaded
        kind, value = sources[0]
    else:
        kind, value = ("path" if ("/" in str(data) or "." in str(data)) else "builtin"), str(data)
    if kind == "path":
        return Path(value.rstrip("/")).stem or f"probe{index}"
    return value.rstrip("/").split("/")[-1] or f"probe{index}"


def looks_like_path(name: str) -> bool:
    """A model name written as a local path (./x, ../x, /x, ~/x, a/b/c, or in a folder that exists), not a Hub id
    (user/name)."""
    return (name.startswith(("./", "../", "/", "~", ".\\")) or os.path.isabs(name) or name.count("/") > 1
            or ("/" in name and os.path.isdir(os.path.dirname(name)) and os.path.dirname(name) not in ("", ".")))


def check_model(name: str) -> None:
    """A model given as a local path must exist (transformers would read it as a malformed Hub id)."""
    from peft_ext.data import SMOLLM2, TINY_LLAMA

    if name in (SMOLLM2, TINY_LLAMA) or os.path.isdir(os.path.expanduser(name)):
        return
    if os.path.isfile(name):
        raise ValueError(f"compare model: {name!r} is a file; give the folder that holds config.json and the weights")
    if looks_like_path(name):
        raise ValueError(
            f"compare model: {name!r} looks like a local folder but no such folder exists (as seen from "
            f"{os.getcwd()}). Give the folder that holds config.json and the weights (save_pretrained's output), a Hub "
            f"id such as HuggingFaceTB/SmolLM2-135M-Instruct, smollm2-135m-instruct (offline) or tiny-llama."
        )


def builtin_default_dict() -> dict:
    """The built-in comparison (`peft-ext compare` with no file; recipes/compare_default.yaml spells it out)."""
    return {"forgetting": [dict(p) for p in BUILTIN_FORGETTING]}


def builtin_default() -> CompareConfig:
    return CompareConfig.from_dict(builtin_default_dict())
