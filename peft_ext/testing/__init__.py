"""The contract suite, reusable: run it on any PEFT method registered with peft-ext, yours included.

    peft_ext.testing            MethodEntry and the other names an entry is written with, the tiny models
    peft_ext.testing.plugin     the pytest plugin (pytest_plugins = ["peft_ext.testing.plugin"])
    peft_ext.testing.contract   the suite's tests, to star-import into a test module that sets
                                PEFT_EXT_CONTRACT_METHODS
    peft_ext.testing.harness    the driving code the tests share (peft_model, train_step, output, assert_equal, ...)

Importing this package imports neither pytest nor trl/datasets (the TRL tests import those when they run).
docs/contract_suite.md is the reference.
"""

import sys as _sys

if "pytest" in _sys.modules:  # under pytest: a failed assert inside the suite shows its values (assertion rewriting)
    _sys.modules["pytest"].register_assert_rewrite("peft_ext.testing.harness", "peft_ext.testing.contract")

from .entries import (  # noqa: E402
    CONTRACT_ITEMS,
    BadConfig,
    DocumentedError,
    MethodEntry,
    floating_numel,
    modules_to_save_names,
    modules_to_save_numel,
    variant,
)
from .models import MODEL_KINDS, MODELS, ModelSpec  # noqa: E402
from .tokenizer import make_tokenizer  # noqa: E402

__all__ = [
    "MethodEntry",
    "DocumentedError",
    "BadConfig",
    "variant",
    "CONTRACT_ITEMS",
    "MODELS",
    "MODEL_KINDS",
    "ModelSpec",
    "make_tokenizer",
    "floating_numel",
    "modules_to_save_names",
    "modules_to_save_numel",
]
