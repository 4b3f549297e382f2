"""Contract item 3: save_pretrained -> from_pretrained round trip, the folder's files, and the low-level API, on our methods.

The tests live in peft_ext/testing/contract/save.py; peft_ext.testing.plugin (enabled in tests/conftest.py)
parametrises them over the entries below.
"""

from peft_ext.testing.contract.save import *  # noqa: F403

from .methods import METHODS, VARIANTS

PEFT_EXT_CONTRACT_METHODS = METHODS
PEFT_EXT_CONTRACT_VARIANTS = VARIANTS
