"""What every peft-ext config shares: its peft type, the requirement stamp, the pre-load folder check, and the
training companions a trainer needs to drive the method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.config import PeftConfig

from peft_ext.adapter_files import check_adapter_folder
from peft_ext.version import __version__

REQUIREMENT = f"peft-ext>={__version__}"


@dataclass
class PeftExtConfig(PeftConfig):
    """Base of peft-ext configs (and of a user's own method's config, see `peft_ext.register_method`).

    - `peft_type` is set from the registration (`register_method(NAME, ThisConfig, ThisModel)`), so a config class
      never names its own type.
    - `peft_ext_requirement` lands in adapter_config.json, so that someone who opens an adapter without the package
      that defines its method (PEFT then fails with `KeyError: 'HFT'`) sees what to install: peft-ext for its own
      methods, the registering package's distribution (name>=version) for a user's method.
    - `training_companions()` names what a trainer needs to drive the method over a run (see its docstring).
    """

    peft_ext_requirement: str = field(
        default=REQUIREMENT, metadata={"help": "The package that defines this peft type: pip install peft-ext."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from peft_ext.registry import peft_type_of, requirement_of_config

        self.peft_type = peft_type_of(type(self))
        if self.peft_ext_requirement == REQUIREMENT:  # a method of another package: that package is the requirement
            self.peft_ext_requirement = requirement_of_config(type(self)) or REQUIREMENT

    def training_companions(self) -> tuple[str, ...]:
        """The training companions this adapter needs, as "module:Name" paths (imported only by the trainer side,
        so a tuner never imports training code): a `transformers.TrainerCallback` subclass is instantiated and
        added to the trainer's callbacks; any other class is a trainer mixin, put in front of the trainer class.
        `peft-ext train` (and `peft_ext.training.attach_companions`) picks them up; the default is none."""
        return ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        check_adapter_folder(pretrained_model_name_or_path, subfolder)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
