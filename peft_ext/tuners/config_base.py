"""What every peft-ext config shares: the requirement stamp and the pre-load folder check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.config import PeftConfig

from peft_ext.adapter_files import check_adapter_folder
from peft_ext.version import __version__

REQUIREMENT = f"peft-ext>={__version__}"


@dataclass
class PeftExtConfig(PeftConfig):
    """Base of peft-ext configs. `peft_ext_requirement` lands in adapter_config.json, so that someone who opens an
    adapter without peft-ext installed (PEFT then fails with `KeyError: 'HFT'`) sees what to install."""

    peft_ext_requirement: str = field(
        default=REQUIREMENT, metadata={"help": "The package that defines this peft type: pip install peft-ext."}
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        check_adapter_folder(pretrained_model_name_or_path, subfolder)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
