"""Contract items 1 and 2: forward at init, trainable-parameter count, and one optimisation step, on our methods.

The tests live in peft_ext/testing/contract/forward_train.py; peft_ext.testing.plugin (enabled in tests/conftest.py)
parametrises them over the entries below.
"""

from peft_ext.testing.contract.forward_train import *  # noqa: F403

from .methods import METHODS, VARIANTS

PEFT_EXT_CONTRACT_METHODS = METHODS
PEFT_EXT_CONTRACT_VARIANTS = VARIANTS
