"""The contract suite's test functions: star-import them into a test module that lists the methods to run them on.

    # conftest.py at the root of your tests
    pytest_plugins = ["peft_ext.testing.plugin"]

    # tests/test_contract.py
    from peft_ext.testing.contract import *  # noqa: F403  the contract suite's tests
    PEFT_EXT_CONTRACT_METHODS = [MY_ENTRY]

The star import brings the test functions (test_*) and the names an entry is written with (MethodEntry,
DocumentedError, BadConfig, variant, MODELS, MODEL_KINDS). Each module of this package is one group of contract
items and can be star-imported on its own (`from peft_ext.testing.contract.merge import *`), e.g. to spread the
suite over several test files. docs/contract_suite.md is the reference.
"""

from __future__ import annotations

import os
import sys

_plugin = sys.modules.get("peft_ext.testing.plugin")
if os.environ.get("PYTEST_VERSION") and not (_plugin and _plugin.is_active()):  # pytest >= 8.2 sets it in a session
    # without the plugin nothing parametrises the tests, and pytest would answer "fixture 'entry' not found"
    raise RuntimeError(
        "peft_ext.testing.contract needs its pytest plugin: add `pytest_plugins = [\"peft_ext.testing.plugin\"]` to "
        "the conftest.py at your tests' root, or run pytest with `-p peft_ext.testing.plugin`"
    )

from ..entries import BadConfig, DocumentedError, MethodEntry, variant  # noqa: E402
from ..models import MODEL_KINDS, MODELS  # noqa: E402
from . import adapters, distributed, dtypes, errors, forward_train, merge, save, trl  # noqa: E402
from .adapters import *  # noqa: E402, F403
from .distributed import *  # noqa: E402, F403
from .dtypes import *  # noqa: E402, F403
from .errors import *  # noqa: E402, F403
from .forward_train import *  # noqa: E402, F403
from .merge import *  # noqa: E402, F403
from .save import *  # noqa: E402, F403
from .trl import *  # noqa: E402, F403

SUITE_MODULES = (forward_train, save, merge, adapters, dtypes, errors, trl, distributed)
TESTS = [name for module in SUITE_MODULES for name in module.__all__]
__all__ = [*TESTS, "MethodEntry", "DocumentedError", "BadConfig", "variant", "MODELS", "MODEL_KINDS"]
