"""The contract suite's pytest plugin: runs peft_ext.testing.contract on the methods a test module lists.

Enable it in the root conftest.py (`pytest_plugins = ["peft_ext.testing.plugin"]`) or on the command line
(`-p peft_ext.testing.plugin`); then a test module

    from peft_ext.testing.contract import *  # noqa: F403  the contract suite's tests
    PEFT_EXT_CONTRACT_METHODS = [MY_ENTRY]                   # the whole suite runs on each
    PEFT_EXT_CONTRACT_VARIANTS = [variant(MY_ENTRY, "x", k=v)]  # optional: the per-model items only
    PEFT_EXT_CONTRACT_MODELS = ["llama", "gpt2"]             # optional: fewer model kinds (default: all)

collects the suite's tests parametrised over its own entries (peft_ext.testing.marks says how), with ids such as
`test_forward_at_init_equals_base[hft-llama]`. Each module reads only its own lists, so modules in different
folders test different methods. The plugin also gives the suite its `tmp_adapter_dir` fixture, seeds torch's global
RNG before each contract test, and adds `--contract-models=llama,gpt2` (restricts the per-model items' model kinds).
docs/contract_suite.md is the reference.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from .entries import MethodEntry
from .marks import ARGNAMES, MARKER, MARKER_HELP
from .models import MODEL_KINDS, MODELS

METHODS_ATTR = "PEFT_EXT_CONTRACT_METHODS"
VARIANTS_ATTR = "PEFT_EXT_CONTRACT_VARIANTS"
MODELS_ATTR = "PEFT_EXT_CONTRACT_MODELS"

_KINDS = pytest.StashKey[Optional[tuple]]()
_configured = 0  # pytest sessions in this process with the plugin configured (the suite checks it on import)


def is_active() -> bool:
    return _configured > 0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("peft-ext", "peft-ext contract suite").addoption(
        "--contract-models",
        dest="peft_ext_contract_models",
        metavar="KINDS",
        default=None,
        help=f"comma-separated model kinds the per-model contract tests run on (default: all: {','.join(MODEL_KINDS)})",
    )


def pytest_configure(config: pytest.Config) -> None:
    global _configured
    config.addinivalue_line("markers", MARKER_HELP)
    option = config.getoption("peft_ext_contract_models", None)
    kinds = None
    if option is not None:
        try:
            kinds = _model_kinds([k.strip() for k in option.split(",") if k.strip()], "--contract-models")
        except ValueError as err:
            raise pytest.UsageError(str(err)) from None
    config.stash[_KINDS] = kinds
    _configured += 1


def pytest_unconfigure(config: pytest.Config) -> None:
    global _configured
    _configured = max(0, _configured - 1)


def _model_kinds(kinds, where: str) -> tuple[str, ...]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in MODEL_KINDS]
    if unknown or not kinds:
        what = f"unknown model kind(s) {unknown}" if unknown else "no model kind given"
        raise ValueError(f"{where}: {what}; the kinds are {', '.join(MODEL_KINDS)}")
    return tuple(k for k in MODEL_KINDS if k in kinds)  # always in MODEL_KINDS order: stable ids


class _Selection:
    """What one test module runs the suite on."""

    def __init__(self, module, config: pytest.Config):
        where = f"{module.__name__} ({getattr(module, '__file__', '?')})"

        def fail(message: str):
            raise pytest.Collector.CollectError(f"{where}: {message} (see peft-ext's docs/contract_suite.md)")

        def entries(attr: str) -> list:
            value = getattr(module, attr, None)
            if value is None:
                return []
            if isinstance(value, MethodEntry) or not isinstance(value, (list, tuple)):
                fail(f"{attr} must be a list of MethodEntry, not {type(value).__name__}")
            for entry in value:
                if not isinstance(entry, MethodEntry):
                    fail(f"{attr} holds {entry!r}, not a peft_ext.testing.MethodEntry")
            return list(value)

        if getattr(module, METHODS_ATTR, None) is None:
            fail(
                f"the module imports the peft-ext contract suite but does not say which methods it runs on: "
                f"set {METHODS_ATTR} = [MethodEntry(...), ...] in it"
            )
        self.methods = entries(METHODS_ATTR)
        if not self.methods:
            fail(f"{METHODS_ATTR} is empty: list at least one MethodEntry")
        self.variants = entries(VARIANTS_ATTR)
        names = [e.name for e in self.methods + self.variants]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            fail(f"entry names repeat in {METHODS_ATTR} + {VARIANTS_ATTR}: {repeated} (the test ids must differ)")
        kinds = tuple(MODEL_KINDS)
        if getattr(module, MODELS_ATTR, None) is not None:
            try:
                kinds = _model_kinds(getattr(module, MODELS_ATTR), MODELS_ATTR)
            except ValueError as err:
                fail(str(err))
        option = config.stash.get(_KINDS, None)
        self.kinds = kinds if option is None else tuple(k for k in kinds if k in option)


def _skipped(argnames: tuple[str, ...], reason: str):
    return pytest.param(*[None] * len(argnames), id="none", marks=pytest.mark.skip(reason=reason))


@pytest.hookimpl(tryfirst=True)  # before @pytest.mark.parametrize: ids read "<method>-<kind>-<dtype>"
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    mark = metafunc.definition.get_closest_marker(MARKER)
    if mark is None:
        return
    per = mark.kwargs.get("per")
    if per not in ARGNAMES:
        raise pytest.Collector.CollectError(f"{metafunc.function.__name__}: {MARKER}(per=...) is one of {list(ARGNAMES)}")
    argnames = ARGNAMES[per]
    missing = [a for a in argnames if a not in metafunc.fixturenames]
    if missing:
        raise pytest.Collector.CollectError(f"{metafunc.function.__name__}: a per-{per} contract test takes {argnames}")
    selection = _Selection(metafunc.module, metafunc.config)
    if per == "model":
        kinds = [k for k in selection.kinds if MODELS[k].transformers or not mark.kwargs.get("transformers_only")]
        params = [
            pytest.param(entry, MODELS[kind], id=f"{entry.name}-{kind}")
            for entry in selection.methods + selection.variants
            for kind in kinds
        ]
        reason = "no model kind selected for this test (transformers models only)"
    elif per == "method":
        params = [pytest.param(entry, id=entry.name) for entry in selection.methods]
        reason = "no method"
    else:
        params = [
            pytest.param(entry, bad, id=f"{entry.name}-{bad.id}") for entry in selection.methods for bad in entry.bad_configs
        ]
        reason = "no method lists bad_configs"
    metafunc.parametrize(",".join(argnames), params or [_skipped(argnames, reason)])


@pytest.fixture(autouse=True)
def _peft_ext_contract_seed(request: pytest.FixtureRequest):
    """Every contract test starts from the same global RNG state (the tiny models seed themselves as well)."""
    if request.node.get_closest_marker(MARKER) is not None:
        torch.manual_seed(0)
    yield


@pytest.fixture
def tmp_adapter_dir(tmp_path):
    """A fresh folder for save_pretrained."""
    path = tmp_path / "adapter"
    path.mkdir()
    return path
