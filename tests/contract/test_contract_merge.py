"""Contract item 4: merge_and_unload, unload, disable_adapter, merge/unmerge, safe_merge, on our methods.

The tests live in peft_ext/testing/contract/merge.py; peft_ext.testing.plugin (enabled in tests/conftest.py)
parametrises them over the entries below.
"""

from peft_ext.testing.contract.merge import *  # noqa: F403

from .methods import METHODS, VARIANTS

PEFT_EXT_CONTRACT_METHODS = METHODS
PEFT_EXT_CONTRACT_VARIANTS = VARIANTS
