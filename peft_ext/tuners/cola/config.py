from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft import LoraConfig

from peft_ext.registry import peft_type_of
from peft_ext.tuners.config_base import PeftExtConfig

# LoRA options COLA refuses: each makes a link something other than a plain low-rank product B A, so links could
# not be merged into one rank-M*r LoRA (or, for base-weight-dependent inits, the chain would not start from W_0).
_UNSUPPORTED = {
    "use_dora": "DoRA links are not low-rank sums",
    "lora_bias": "a link with a bias is not a low-rank product",
    "use_qalora": "QALoRA pools the input",
    "use_bdlora": "block-diagonal links",
    "arrow_config": "Arrow routes between adapters",
    "alora_invocation_tokens": "aLoRA applies per token",
    "velora_config": "VeLoRA changes the backward",
    "monteclora_config": "MonteCLoRA samples its factors",
    "kasa_config": "KaSA modifies the base weights",
    "target_parameters": "COLA wraps nn.Linear / Conv1D modules, not bare parameters",
    "layer_replication": "replicated layers cannot be merged",
}
_INITS = (True, False, "gaussian")


@dataclass
class ColaConfig(LoraConfig, PeftExtConfig):
    """COLA, Chain of LoRA (Xia et al., 2024, arXiv 2401.04151): a higher-rank update built as a chain of LoRAs.

    Train a LoRA for a while, merge it, start a fresh LoRA (A random, B = 0: the new link starts as an identity)
    with fresh optimizer moments, repeat; the learning-rate schedule runs on over the whole run. The sum of the M
    links is itself a LoRA of rank M*r, which `peft_ext.export_as_lora` writes as a plain PEFT LoRA. Memory and
    per-step cost stay those of one LoRA: finished links are frozen factors inside the adapter (the base weights
    are never modified, so `unload()` is the exact base and `disable_adapter()` gives the base outputs).

    Training: add `peft_ext.training.ColaChainCallback()` to the Trainer's callbacks; it merges at each link
    boundary (computed from the run's max_steps and the fields below) and resets the optimizer state of the new link.

    Base layers: nn.Linear, transformers' Conv1D (GPT-2) and bitsandbytes 4-bit Linear4bit. On a 4-bit base the
    merged links stay frozen factors like everywhere (the quantized weights are never dequantized and requantized,
    which would be lossy); merging the adapter into 4-bit weights is refused: export the chain instead.

    Every `LoraConfig` option applies (r, lora_alpha, target_modules, lora_dropout, use_rslora, rank_pattern,
    alpha_pattern, modules_to_save, ...) except those that make a link more than a low-rank product (DoRA,
    lora_bias, other variants, base-weight-dependent inits such as PiSSA/OLoRA/LoftQ): those raise.

    Args:
        chain_length: M, the number of links (>= 1; 1 is plain LoRA). Default 3, as the paper.
        steps_per_link: the step budget of each link. An int s: a merge every s steps (M - 1 merges); the last link
            trains to the end of the run, which must be at least M*s steps long. A list of M ints: each link's
            budget; the run must have exactly their sum of steps. Give at most one of steps_per_link and
            merge_every; with neither, the run is split into M equal links (the paper's default).
        merge_every: a merge every `merge_every` of the run (a fraction in (0, 1), with (M - 1) * merge_every < 1);
            the last link trains to the end.
        link_ranks: a rank per link (M ints; default: r for every link). Cannot be combined with rank_pattern.
            Scaling is per link (lora_alpha / rank, or lora_alpha / sqrt(rank) with use_rslora) and is folded into
            the merged factors, so the export stays exact.
        seed: None (default): the first link is drawn from torch's global RNG exactly as LoraConfig's (so COLA and
            LoRA start from the same adapter under the same torch.manual_seed). An int: the first link is drawn
            from this seed (reproducible per adapter). Later links are drawn from (seed, link index, module name), with
            the run's seed in place of a None seed (torch's initial seed, set by the Trainer from its `seed`), so
            they vary from run to run like the first link and a resumed run re-initialises exactly as an
            uninterrupted one. Every link follows init_lora_weights (kaiming-uniform A, or N(0, 1/r) for
            "gaussian"; B = 0).
        current_link: the link being trained, 0-based = the number of links merged so far. State, kept up to date
            by the callback and saved with the adapter; leave it at 0 for a new adapter.
        link_boundaries: the global steps at which the callback merges (M - 1 of them), resolved at the start of
            training from the schedule and the run's max_steps. State (informational).
    """

    chain_length: int = field(default=3, metadata={"help": "Number of links M (paper: 3)."})
    steps_per_link: Optional[Union[int, list[int]]] = field(
        default=None, metadata={"help": "Steps per link: an int (a merge every s steps) or one int per link."}
    )
    merge_every: Optional[float] = field(default=None, metadata={"help": "A merge every this fraction of the run."})
    link_ranks: Optional[list[int]] = field(default=None, metadata={"help": "One rank per link (default: r)."})
    seed: Optional[int] = field(default=None, metadata={"help": "Seed of the links' initialisation."})
    current_link: int = field(default=0, metadata={"help": "Links merged so far (state; 0 for a new adapter)."})
    link_boundaries: Optional[list[int]] = field(default=None, metadata={"help": "Merge steps (state)."})

    def training_companions(self) -> tuple[str, ...]:
        """COLA's chain callback: merges each link and starts the next on schedule."""
        return ("peft_ext.training.cola_chain:ColaChainCallback",)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_of(type(self))  # LoraConfig's __post_init__ set it to LORA
        # LoraConfig turns lists into sets; sorted lists keep adapter_config.json and config comparisons stable
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, list, tuple)):
                setattr(self, name, sorted(value))
        self._validate()

    # ------------------------------------------------------------------------------------------ checks
    def _validate(self) -> None:
        _check_int("r", self.r, 1)
        _check_int("chain_length", self.chain_length, 1)
        M = self.chain_length
        for name, why in _UNSUPPORTED.items():
            if getattr(self, name, None):
                raise ValueError(f"ColaConfig.{name} is not supported: {why}. Leave it unset for COLA.")
        if self.init_lora_weights not in _INITS:
            raise ValueError(
                f"ColaConfig.init_lora_weights must be True (LoRA's init: A random, B = 0), 'gaussian' or False "
                f"(non-identity, for tests), got {self.init_lora_weights!r}: inits computed from the base weights "
                f"(PiSSA, OLoRA, LoftQ, CorDA, EVA, ...) do not give a chain of identity-started links."
            )
        if self.steps_per_link is not None and self.merge_every is not None:
            raise ValueError("ColaConfig: give steps_per_link or merge_every, not both.")
        if isinstance(self.steps_per_link, (list, tuple)):
            self.steps_per_link = list(self.steps_per_link)
            if len(self.steps_per_link) != M:
                raise ValueError(
                    f"ColaConfig.steps_per_link has {len(self.steps_per_link)} entries but chain_length={M}: give one "
                    f"step budget per link, or an int."
                )
            for i, s in enumerate(self.steps_per_link):
                _check_int(f"steps_per_link[{i}]", s, 1)
        elif self.steps_per_link is not None:
            _check_int("steps_per_link", self.steps_per_link, 1)
        if self.merge_every is not None:
            f = self.merge_every
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0:
                raise ValueError(f"ColaConfig.merge_every must be a fraction of the run in (0, 1), got {f!r}.")
            if (M - 1) * f >= 1.0:
                raise ValueError(
                    f"ColaConfig.merge_every={f} with chain_length={M} puts the last of the {M - 1} merges at or past "
                    f"the end of the run ({M - 1} x {f} >= 1): use merge_every < {1 / max(M - 1, 1):.4g}."
                )
            self.merge_every = float(f)
        if self.link_ranks is not None:
            self.link_ranks = list(self.link_ranks)
            if len(self.link_ranks) != M:
                raise ValueError(f"ColaConfig.link_ranks has {len(self.link_ranks)} entries but chain_length={M}.")
            for i, r in enumerate(self.link_ranks):
                _check_int(f"link_ranks[{i}]", r, 1)
            if self.rank_pattern:
                raise ValueError("ColaConfig: give link_ranks or rank_pattern, not both.")
        _check_int("current_link", self.current_link, 0)
        if self.current_link >= M:
            raise ValueError(f"ColaConfig.current_link={self.current_link} is outside the chain of {M} links.")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)

    # ---------------------------------------------------------------------------------------- the chain
    def ranks_for(self, r: int) -> list[int]:
        """The rank of each link in a module whose LoRA rank (r, or its rank_pattern entry) is `r`."""
        return list(self.link_ranks) if self.link_ranks is not None else [r] * self.chain_length

    @staticmethod
    def link_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
        return alpha / math.sqrt(rank) if use_rslora else alpha / rank

    def boundaries_for(self, max_steps: int) -> list[int]:
        """The global steps after which link 1..M-1 is merged, for a run of `max_steps` optimizer steps.

        Raises ValueError, naming the field, when the schedule does not fit the run."""
        M, T = self.chain_length, int(max_steps)
        if T < 1:
            raise ValueError(f"COLA needs a run with max_steps >= 1, got {max_steps}.")
        if M == 1:
            return []
        if isinstance(self.steps_per_link, list):
            if sum(self.steps_per_link) != T:
                raise ValueError(
                    f"ColaConfig.steps_per_link={self.steps_per_link} sums to {sum(self.steps_per_link)} steps, but "
                    f"this run has max_steps={T}: make the budgets add up to {T}, or use an int / merge_every."
                )
            return [sum(self.steps_per_link[: k + 1]) for k in range(M - 1)]
        if self.steps_per_link is not None:
            s = self.steps_per_link
            if M * s > T:
                raise ValueError(
                    f"ColaConfig.steps_per_link={s} with chain_length={M} needs at least {M * s} steps, but this run "
                    f"has max_steps={T}: use steps_per_link <= {T // M}, or merge_every."
                )
            return [s * k for k in range(1, M)]
        if self.merge_every is not None:
            bounds = [int(round(k * self.merge_every * T)) for k in range(1, M)]
            if not _increasing([0, *bounds, T]):
                raise ValueError(
                    f"ColaConfig.merge_every={self.merge_every} gives links of 0 steps in a run of max_steps={T} "
                    f"(merges after steps {bounds}): raise merge_every or the number of steps."
                )
            return bounds
        if T < M:
            raise ValueError(
                f"ColaConfig.chain_length={M} links do not fit in a run of max_steps={T}: every link needs at least "
                f"one step."
            )
        return [int(round(k * T / M)) for k in range(1, M)]


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ColaConfig.{name} must be an integer >= {minimum}, got {value!r}.")


def _increasing(values: list[int]) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))
