from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from peft_ext.tuners.config_base import PeftExtConfig

INSERTIONS = ("alternate_qv", "all")
CHAINS = ("per_type", "all")


@dataclass
class SsmLoraConfig(PeftExtConfig):
    """SSMLoRA (Yu et al., NAACL 2025): LoRA modules linked by a small state-space recurrence, so that each module
    also sees the low-rank computation of the modules before it; with the link, half the insertion points (about
    half of LoRA's parameters) match LoRA.

    Per adapted linear layer W (in -> out), rank r, scale alpha; A (r x in), B (out x r), C, D (r x r):

        u  = x A^T                                   (tokens x r)
        h' = h C^T + u D^T + h                       h: the state handed over by the previous module of the chain
                                                     (zero for a chain's first module, which therefore has no C)
        ĥ  = (h' - min) / (max - min + 1e-8)         min / max over the rank axis, per token
        y  = x W^T + b + alpha * (u + leaky_relu(dropout(ĥ))) B^T
        ĥ is handed to the next module of the chain (detached with detach_state=True)

    The state starts from zero at every forward and flows along each chain in call order within that forward, so
    outputs are deterministic. (The official code keeps the state between calls, so a module receives the state
    left by the previous batch, padded or sub-sampled to its shape: not reproduced here.) At init B = 0 (the output
    is the base); D starts small and random (state_init="normal"), C at zero.

    `merge_and_unload` merges an adapter whose C and D are zero everywhere (then it is exactly a LoRA); while the
    state path is active (input-dependent and nonlinear) merging raises. `unload()` returns the exact base and
    `disable_adapter()` gives the base outputs.

    Args:
        r: the rank of every module (rank_pattern: per module). Default 8 (the official code's).
        alpha: the output scale, a plain multiplier as in the official code (16 there): y = ... + alpha * (...) B^T.
            (LoRA's lora_alpha / r is alpha here.) Default 16.
        insertion: where the modules go when target_modules is None: "alternate_qv" (default; the paper's sparse
            insertion: q_proj in even layers, v_proj in odd ones, about half of LoRA-on-q/v's parameters) or "all"
            (q_proj and v_proj of every layer). Give target_modules instead (names, a regex, "all-linear") for any
            other set; not both.
        chain: how modules link. "per_type" (default): one chain per module type across layers (the q/v modules of
            "alternate_qv" form one chain); "all": one chain through every adapted module in model order. The state
            is per token; a module that sees another number of tokens than the one before it in its chain (an
            encoder-decoder's other stack, a per-sequence head) starts from a zero state.
        detach_state: True (default, as the official code): the state handed to the next module carries no
            gradient. False: gradients flow along the chain (needs non-reentrant gradient checkpointing, the
            transformers default, when checkpointing is on). Under gradient checkpointing each layer's recomputation
            replays the state it received; give each forward its backward before the next forward (as trainers do),
            or run one backward over several forwards (two forwards followed by two separate backwards replay the
            wrong state in the first).
        state_dropout: dropout on the state path (official: 0.1), in [0, 1).
        rank_pattern: {module-name regex: rank} overriding r; every module of one chain must have the same rank.
        init_weights: True (default): B = 0, A ~ N(0, 1/r) (the official init; output = base). False: B random
            too (a non-identity adapter, for tests).
        state_init: how C and D start. "normal" (default): D ~ N(0, 1/r), C = 0. "zeros": C = D = 0, as the
            official code; then every state is exactly zero at the first steps, where the min-max normalisation's
            gradient is of order 1/1e-8: on the test suite's tiny GPT-2 (r=3) Adam's second moment overflowed in
            fp32 and the first module's D never left zero (the state path stayed off); on a tiny Llama (r=8) it did
            leave zero. Hence the default. With C = D = 0 the adapter is exactly a LoRA.
        seed: None (default): drawn from torch's global RNG. An int: drawn from (seed, module name).
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in PEFT's LoraConfig.
        chain_layout: the chains found at injection (lists of module names in model order), saved with the adapter;
            loading onto a model whose chains differ is refused. Filled in.
    """

    r: int = field(default=8, metadata={"help": "Rank of every module."})
    alpha: float = field(default=16.0, metadata={"help": "Output scale (a plain multiplier)."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    insertion: Optional[str] = field(default=None, metadata={"help": "alternate_qv | all (when no target_modules)."})
    chain: str = field(default="per_type", metadata={"help": "per_type | all"})
    detach_state: bool = field(default=True, metadata={"help": "Hand the state on without gradient."})
    state_dropout: float = field(default=0.1, metadata={"help": "Dropout on the state path."})
    rank_pattern: Optional[dict] = field(default=None, metadata={"help": "{module regex: rank}."})
    init_weights: bool = field(default=True, metadata={"help": "B = 0 (output = base)."})
    state_init: str = field(default="normal", metadata={"help": "normal (D ~ N(0, 1/r), C = 0) | zeros (official)."})
    seed: Optional[int] = field(default=None, metadata={"help": "Seed of the initialisation."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    chain_layout: Optional[list] = field(default=None, metadata={"help": "Chains (state)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, list, tuple)):
                setattr(self, name, sorted(value))
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.target_modules is not None and self.insertion is not None:
            raise ValueError(
                f"SsmLoraConfig: give target_modules or insertion, not both (target_modules={self.target_modules!r}, "
                f"insertion={self.insertion!r})."
            )
        if self.target_modules is None and self.insertion is None:
            self.insertion = "alternate_qv"
        if self.insertion is not None and self.insertion not in INSERTIONS:
            raise ValueError(
                f"SsmLoraConfig.insertion={self.insertion!r} is not one of {INSERTIONS}: use 'alternate_qv' (q_proj in "
                f"even layers, v_proj in odd ones), 'all' (q_proj and v_proj everywhere), or give target_modules."
            )
        if self.state_init not in ("normal", "zeros"):
            raise ValueError(f"SsmLoraConfig.state_init={self.state_init!r} is not 'normal' or 'zeros'.")
        if self.chain not in CHAINS:
            raise ValueError(f"SsmLoraConfig.chain={self.chain!r} is not one of {CHAINS}.")
        _check_int("r", self.r)
        for pattern, rank in (self.rank_pattern or {}).items():
            _check_int(f"rank_pattern[{pattern!r}]", rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"SsmLoraConfig.alpha must be a number > 0, got {self.alpha!r}.")
        p = self.state_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"SsmLoraConfig.state_dropout must be in [0, 1), got {p!r}.")
        if self.r == 1 or any(rank == 1 for rank in (self.rank_pattern or {}).values()):
            warnings.warn(
                "SsmLoraConfig: at rank 1 the min-max normalised state is always 0, so C and D never act (rank 2 "
                "gives only 0/1 states): use r >= 3 for the state path to matter.",
                stacklevel=3,
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"SsmLoraConfig.seed must be None or an integer >= 0, got {self.seed!r}.")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SsmLoraConfig.{name} must be an integer >= 1, got {value!r}.")
