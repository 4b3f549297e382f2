"""The marker that makes a test function a contract test, and what the plugin parametrises it over.

    @per_model()                         args (entry, spec): every method and variant x every model kind,
                                         ids "<method>-<kind>" (e.g. "hft-llama", "hft[param]-gpt2")
    @per_model(transformers_only=True)   the same, without the model kinds that are not transformers models (mlp)
    @per_method                          arg entry: every method (not the variants) once, ids "<method>"
    @per_bad_config                      args (entry, bad): every method x each of its bad_configs, ids
                                         "<method>-<bad.id>"

The entries come from the test module the function is collected in (PEFT_EXT_CONTRACT_METHODS and
PEFT_EXT_CONTRACT_VARIANTS), so a user's own extra tests marked this way run on the user's entries too.
"""

from __future__ import annotations

import pytest

MARKER = "peft_ext_contract"
MARKER_HELP = (
    f"{MARKER}(per, transformers_only=False): a peft-ext contract test, parametrised by peft_ext.testing.plugin over "
    "the entries of its module's PEFT_EXT_CONTRACT_METHODS (and _VARIANTS): per='model' (args entry, spec), "
    "'method' (arg entry) or 'bad_config' (args entry, bad)"
)
# what each kind of contract test takes as its parametrised arguments
ARGNAMES = {"model": ("entry", "spec"), "method": ("entry",), "bad_config": ("entry", "bad")}


def per_model(*, transformers_only: bool = False) -> pytest.MarkDecorator:
    return getattr(pytest.mark, MARKER)(per="model", transformers_only=transformers_only)


per_method = getattr(pytest.mark, MARKER)(per="method")
per_bad_config = getattr(pytest.mark, MARKER)(per="bad_config")
