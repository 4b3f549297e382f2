"""Contract item 8: bad inputs each raise a clear error, on our methods.

The tests live in peft_ext/testing/contract/errors.py; peft_ext.testing.plugin (enabled in tests/conftest.py)
parametrises them over the entries below.
"""

from peft_ext.testing.contract.errors import *  # noqa: F403

from .methods import METHODS, VARIANTS

PEFT_EXT_CONTRACT_METHODS = METHODS
PEFT_EXT_CONTRACT_VARIANTS = VARIANTS
