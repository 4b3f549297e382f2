"""The contract suite as a pytest plugin (peft_ext.testing.plugin), seen from a user's project.

Each test here writes a small project in tmp_path (its own pytest.ini and conftest.py, none of ours) and runs pytest
on it in a subprocess. The method it tests is plain PEFT LoRA: the suite runs on any registered PEFT method.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

from peft_ext.testing import MODEL_KINDS, DocumentedError, MethodEntry, variant

from .methods import HFT_ENTRY

# a user's test module: PEFT's LoRA on q_proj/v_proj of the tiny Llama, and an rsLoRA variant of it
LORA_MODULE = '''
from peft import LoraConfig

from peft_ext.testing import MODELS, MethodEntry, modules_to_save_numel, variant
from peft_ext.testing.contract import *  # noqa: F403


def make_config(kind, **overrides):
    return LoraConfig(**{{"task_type": MODELS[kind].task_type, "r": 2, "target_modules": ["q_proj", "v_proj"], **overrides}})


def expected_trainable(base, config):
    total = modules_to_save_numel(base, config.modules_to_save)
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] in config.target_modules:
            total += config.r * (module.in_features + module.out_features)
    return total


ENTRY = MethodEntry(
    name="{name}", peft_type="LORA", config_cls=LoraConfig, prefix="lora_", make_config=make_config,
    expected_trainable=expected_trainable,
    trained_modules=lambda config: [f"model.layers.{{i}}.self_attn.{{p}}" for i in range(2) for p in config.target_modules],
    nonidentity_overrides={{"init_lora_weights": False}}, card_terms=("lora",),
)
PEFT_EXT_CONTRACT_METHODS = [ENTRY]
PEFT_EXT_CONTRACT_VARIANTS = [variant(ENTRY, "rslora", use_rslora=True)]
PEFT_EXT_CONTRACT_MODELS = ["llama", "qwen2_gqa"]
'''
CONFTEST = 'pytest_plugins = ["peft_ext.testing.plugin"]\n'
# collecting the whole suite imports neither trl nor datasets (the TRL tests import them when they run)
COLLECTION_IMPORTS = """
import sys

def pytest_collection_finish(session):
    print("imported after collection:", sorted(m for m in ("trl", "datasets") if m in sys.modules))
"""


def _project(root: Path, files: dict[str, str], importlib_mode: bool = True) -> Path:
    ini = "[pytest]\n" + ("addopts = --import-mode=importlib\n" if importlib_mode else "")
    for name, text in {"pytest.ini": ini, **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def _pytest(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not this session's xdist worker
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _ids(result: subprocess.CompletedProcess) -> dict[tuple[str, str], set[str]]:
    """{(file, test function): {parameter ids}} from `pytest --collect-only -q`."""
    out = defaultdict(set)
    for line in result.stdout.splitlines():
        match = re.fullmatch(r"(\S+\.py)::(\w+)\[(.+)\]", line.strip())
        if match:
            out[match.group(1), match.group(2)].add(match.group(3))
    return out


def test_modules_in_any_folder_run_on_their_own_methods(tmp_path):
    """Two test modules of the same name in two folders (importlib mode), each on its own method; a third star-imports
    the suite without PEFT_EXT_CONTRACT_METHODS and fails collection, naming the variable; --contract-models.
    Collecting the suite imports neither trl nor datasets."""
    from peft_ext.testing import contract
    from peft_ext.testing.contract import merge

    root = _project(tmp_path, {
        "tests/__init__.py": "",
        "tests/conftest.py": CONFTEST + COLLECTION_IMPORTS,
        "tests/ours/__init__.py": "",
        "tests/ours/test_contract.py": LORA_MODULE.format(name="lora"),
        "tests/extension_method/test_contract.py": LORA_MODULE.format(name="other").replace(
            "from peft_ext.testing.contract import *", "from peft_ext.testing.contract.merge import *"
        ).replace("PEFT_EXT_CONTRACT_VARIANTS", "# PEFT_EXT_CONTRACT_VARIANTS").replace("PEFT_EXT_CONTRACT_MODELS", "# all"),
        "tests/broken/test_contract.py": "from peft_ext.testing.contract import *  # noqa: F403\n",
    })  # fmt: skip
    result = _pytest(root, "--collect-only", "--continue-on-collection-errors")
    error = result.stdout[result.stdout.index("ERROR collecting tests/broken/test_contract.py") :]
    assert "does not say which methods" in error and "PEFT_EXT_CONTRACT_METHODS" in error, result.stdout
    assert "imported after collection: []" in result.stdout
    ids = _ids(result)
    ours, ext = "tests/ours/test_contract.py", "tests/extension_method/test_contract.py"
    # the whole suite, on this module's entries only
    assert {t for f, t in ids if f == ours} == set(contract.TESTS)
    assert ids[ours, "test_forward_at_init_equals_base"] == {
        "lora-llama", "lora-qwen2_gqa", "lora[rslora]-llama", "lora[rslora]-qwen2_gqa"
    }  # fmt: skip
    assert ids[ours, "test_save_and_reload_is_bit_identical"] == {
        f"{e}-{k}-{d}" for e in ("lora", "lora[rslora]") for k in ("llama", "qwen2_gqa") for d in ("fp32", "bf16")
    }
    assert ids[ours, "test_sft_one_step"] == {"lora"}  # per method: no variants
    assert ids[ours, "test_out_of_range_config"] == {"none"}  # no bad_configs: one skipped placeholder
    # the other module: only merge's tests, all model kinds, its own entry
    assert {t for f, t in ids if f == ext} == set(merge.__all__)
    assert ids[ext, "test_unload_returns_exact_base"] == {f"other-{k}" for k in MODEL_KINDS}
    assert not any("lora" in i for (f, _), i_s in ids.items() if f == ext for i in i_s)
    assert not any("other" in i for (f, _), i_s in ids.items() if f == ours for i in i_s)

    # --contract-models restricts the per-model items (within the module's own PEFT_EXT_CONTRACT_MODELS)
    ids = _ids(_pytest(root, "--collect-only", "--contract-models=qwen2_gqa,mlp", "tests/ours", "tests/extension_method"))
    assert ids[ours, "test_forward_at_init_equals_base"] == {"lora-qwen2_gqa", "lora[rslora]-qwen2_gqa"}
    assert ids[ours, "test_gradient_checkpointing_same_grads"] == {"lora-qwen2_gqa", "lora[rslora]-qwen2_gqa"}
    assert ids[ours, "test_sft_one_step"] == {"lora"}
    assert ids[ext, "test_unload_returns_exact_base"] == {"other-qwen2_gqa", "other-mlp"}


def test_a_users_method_passes_contract_items(tmp_path):
    """The suite runs (not only collects) with nothing but the plugin line: fixtures (tmp_adapter_dir) included."""
    root = _project(tmp_path, {"conftest.py": CONFTEST, "test_lora.py": LORA_MODULE.format(name="lora")}, importlib_mode=False)
    selected = "forward_at_init or trainable_parameter_count or one_step_changes_only or (bit_identical and fp32)"
    result = _pytest(root, "-k", selected, "--contract-models=llama")
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"\b8 passed\b", result.stdout), result.stdout[-1000:]


def test_without_the_plugin_the_error_says_how_to_enable_it(tmp_path):
    root = _project(tmp_path, {"test_lora.py": LORA_MODULE.format(name="lora")})
    result = _pytest(root, "--collect-only")
    assert result.returncode != 0
    assert 'pytest_plugins = ["peft_ext.testing.plugin"]' in result.stdout, result.stdout[-2000:]


def test_unknown_model_kind_is_refused():
    from peft_ext.testing.plugin import _model_kinds

    assert _model_kinds(["mlp", "llama"], "--contract-models") == ("llama", "mlp")  # in MODEL_KINDS order
    with pytest.raises(ValueError, match=r"--contract-models: unknown model kind\(s\) \['gpt3'\]; the kinds are llama"):
        _model_kinds(["llama", "gpt3"], "--contract-models")


def test_documented_error_keys_are_checked():
    doc = DocumentedError(ValueError, "x")
    MethodEntry(**{**_fields(HFT_ENTRY), "documented_errors": {"unload:gpt2": doc, "merge": doc}})
    for key in ("merg", "unload:gpt3", "unload:"):
        with pytest.raises(ValueError, match=re.escape(repr(key))):
            MethodEntry(**{**_fields(HFT_ENTRY), "documented_errors": {key: doc}})


def test_variant_name_and_fixed_fields():
    param = variant(HFT_ENTRY, "param", strategy="param")
    assert param.name == "hft[param]" and param.peft_type == HFT_ENTRY.peft_type
    assert param.make_config("llama").strategy == "param"
    assert param.make_config("llama", strategy="matrix").strategy == "matrix"  # a test's overrides still win


def _fields(entry: MethodEntry) -> dict:
    return {f: getattr(entry, f) for f in entry.__dataclass_fields__}
