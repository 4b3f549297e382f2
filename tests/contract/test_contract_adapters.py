"""Contract item 5: two named adapters: add, switch, delete; mixed-batch inference with adapter_names=, on our methods.

The tests live in peft_ext/testing/contract/adapters.py; peft_ext.testing.plugin (enabled in tests/conftest.py)
parametrises them over the entries below.
"""

from peft_ext.testing.contract.adapters import *  # noqa: F403

from .methods import METHODS, VARIANTS

PEFT_EXT_CONTRACT_METHODS = METHODS
PEFT_EXT_CONTRACT_VARIANTS = VARIANTS
