from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft_ext import PeftExtConfig


@dataclass
class ScaleConfig(PeftExtConfig):
    """A learned per-output-channel scale on each targeted linear layer: y = base(x) * (1 + s)."""

    target_modules: Optional[Union[list[str], str]] = field(default="all-linear")
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_weights: bool = field(default=True, metadata={"help": "True: s = 0 (identity); False: random (tests)."})
    seed: int = field(default=0)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)

    def training_companions(self) -> tuple[str, ...]:
        return ("tests.extension_method.scale_method.training:ScaleLogCallback",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ScaleConfig.seed must be a non-negative integer, got {self.seed!r}.")
        if isinstance(self.target_modules, (list, set, tuple)):
            self.target_modules = sorted(set(self.target_modules))
