"""Contract item 6: fp32/bf16/fp16 models, CPU autocast, gradient checkpointing, torch.compile, on our methods.

The tests live in peft_ext/testing/contract/dtypes.py; peft_ext.testing.plugin (enabled in tests/conftest.py)
parametrises them over the entries below.
"""

from peft_ext.testing.contract.dtypes import *  # noqa: F403

from .methods import METHODS, VARIANTS

PEFT_EXT_CONTRACT_METHODS = METHODS
PEFT_EXT_CONTRACT_VARIANTS = VARIANTS
