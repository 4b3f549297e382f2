"""Contract item 7: one TRL SFTTrainer step and one DPOTrainer step with peft_config=, on our methods.

The tests live in peft_ext/testing/contract/trl.py; peft_ext.testing.plugin (enabled in tests/conftest.py)
parametrises them over the entries below.
"""

from peft_ext.testing.contract.trl import *  # noqa: F403

from .methods import METHODS, VARIANTS

PEFT_EXT_CONTRACT_METHODS = METHODS
PEFT_EXT_CONTRACT_VARIANTS = VARIANTS
